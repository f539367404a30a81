//! The language-model benchmarks of #11, on a model shaped like a real one: a random
//! Llama-architecture decoder (hidden 256, 4 layers, GQA) with a 32,000-token vocabulary and a
//! trained BPE tokenizer of the same size, written by `baselines/lm_model.py` from a fixed seed.
//! The Python sides are `baselines/python_worker.py` over the bus (transformers, batches of 64)
//! and `baselines/lm_transformers.py` in process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jetbatch::config::Topology;
use jetbatch::infer::Infer;
use jetbatch::job::Output;
use jetbatch::metrics::Metrics;

use super::{baselines, engine_alone, interpreter, side_topology, Bench, BenchArgs, Which};
use crate::driver::{self, Mode, Plan, Recording};
use crate::load::{run_id, LoadOpts};
use crate::local::WideModel;
use crate::report::{Ratio, Report, RunReport};
use crate::workload::{Dist, Generator, Template, Workload};

/// The model's name in the benchmarks' repository.
const MODEL: &str = "lm";

/// How jetbatch serves it: batches of up to 64 (as the Python worker), continuous generation.
const JETBATCH_TOML: &str = "# LM benchmarks: a random Llama-architecture decoder.\nbackend = \"hf\"\nmax_batch_size = 64\nmax_wait_ms = 5\nmax_new_tokens_limit = 128\npreload = true\n";

/// The Python worker's batching, the same as `JETBATCH_TOML`'s.
const PYTHON_BATCHING: [&str; 2] = ["--max-wait-ms", "5"];

/// Seconds a worker may take to answer its first job (a Python interpreter importing
/// transformers on a loaded machine), and then between two results.
const START_TIMEOUT: Duration = Duration::from_secs(300);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

pub fn uses_model(which: Which) -> bool {
    matches!(which, Which::LmScore | Which::Mc | Which::LmGenerate | Which::LmE2e)
}

/// The benchmarks' model repository (one model, `lm`), written once per `bench` run.
pub struct LmModel {
    repository: tempfile::TempDir,
    /// Hidden size and layers of the 32k-vocabulary model; `None`: the tiny one.
    shape: Option<(i64, i64)>,
}

impl LmModel {
    /// The 32k-vocabulary model (`baselines/lm_model.py`), or with `--lm-tiny` the demo's tiny
    /// Llama (byte-level tokenizer, hidden 64, 1 layer), which costs nothing to build.
    pub fn build(args: &BenchArgs) -> anyhow::Result<LmModel> {
        let repository = tempfile::Builder::new().prefix("jetbatch-lm-").tempdir()?;
        let dir = repository.path().join(MODEL);
        let [hidden, layers] = args.lm_shape[..] else { anyhow::bail!("--lm-shape: HIDDEN,LAYERS (two numbers), not {:?}", args.lm_shape) };
        let shape = (!args.lm_tiny).then_some((hidden, layers));
        if let Some((hidden, layers)) = shape {
            println!("building the LM benchmarks' model (vocabulary 32,000, hidden {hidden}, {layers} layers) …");
            let status = std::process::Command::new(interpreter(args))
                .arg(baselines().join("lm_model.py"))
                .arg(&dir)
                .args(["--hidden", &hidden.to_string(), "--layers", &layers.to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "baselines/lm_model.py failed ({status})");
        } else {
            jetbatch_testkit::write_tiny_lm(&dir, 7, 64, 1).map_err(anyhow::Error::msg)?;
            // Room for the generation workload's longest prompts (up to 40 words of bytes).
            let path = dir.join("config.json");
            let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            config["max_position_embeddings"] = 1024.into();
            std::fs::write(&path, config.to_string())?;
        }
        std::fs::write(dir.join("jetbatch.toml"), JETBATCH_TOML)?;
        Ok(LmModel { repository, shape })
    }

    fn dir(&self) -> PathBuf {
        self.repository.path().join(MODEL)
    }

    /// The Python worker's side: this model, scored as lm-evaluation-harness scores.
    fn scorer(&self) -> PythonSide<'static> {
        PythonSide { kind: "loglikelihood", model: self.dir() }
    }

    fn describe(&self) -> String {
        match self.shape {
            None => "tiny Llama, vocabulary 259, hidden 64, 1 layer".into(),
            Some((hidden, layers)) => format!("random Llama, vocabulary 32,000, hidden {hidden}, {layers} layers, GQA"),
        }
    }

    async fn bench<'a>(&self, args: &'a BenchArgs) -> anyhow::Result<Bench<'a>> {
        // `wide` is not written: the repository is this one.
        Bench::with_repository(args, Some(self.repository.path().to_path_buf()), &WideModel { width: 0, depth: 0 }).await
    }
}

/// `loglikelihood` jobs of eval-like lengths (contexts of 6–24 words, about 15–60 tokens;
/// continuations of 1–3 words), or with `choices` questions of that many options sharing a
/// longer context (12–40 words; options of 2–6 words).
fn scoring_jobs(choices: Option<u64>) -> Workload {
    let mut t = Template::new(MODEL, "loglikelihood");
    let (context, continuation) = match choices {
        None => (Dist::Uniform { uniform: [6, 24] }, Dist::Choice { choice: vec![1, 1, 2, 3] }),
        Some(_) => (Dist::Uniform { uniform: [12, 40] }, Dist::Uniform { uniform: [2, 6] }),
    };
    (t.context_words, t.continuation_words) = (Some(context), Some(continuation));
    t.choices = choices;
    Workload { encoding: "msgpack".into(), duplicate_ratio: 0.0, seed: 11, mix: vec![t] }
}

/// Greedy generation, mixed: prompts of 4–40 words, 8–64 new tokens.
fn generation_jobs() -> Workload {
    let mut t = Template::new(MODEL, "generate");
    t.prompt_words = Some(Dist::Uniform { uniform: [4, 40] });
    t.max_new_tokens = Some(Dist::Uniform { uniform: [8, 64] });
    t.params.insert("temperature".into(), 0.0.into());
    Workload { encoding: "msgpack".into(), duplicate_ratio: 0.0, seed: 13, mix: vec![t] }
}

/// Who drains a backlog.
#[derive(Clone, Copy)]
enum Side {
    Jetbatch,
    Python,
}

/// What the Python worker serves in a drain: its `--kind` and `--model`.
pub struct PythonSide<'a> {
    pub kind: &'a str,
    pub model: PathBuf,
}

/// Publishes `jobs` jobs of `workload` with no worker running, then starts `side`'s worker and
/// records the drain (the rate from its first result to its last, see [`driver::Backlog`]).
async fn drain(b: &mut Bench<'_>, python: &PythonSide<'_>, side: Side, workload: Workload, jobs: u64) -> anyhow::Result<Recording> {
    let (label, topology) = match side {
        Side::Jetbatch => ("jetbatch", b.local.topology()),
        Side::Python => ("python worker", side_topology(&b.local.topology(), "pybase")),
    };
    let js = async_nats::jetstream::new(b.client.clone());
    jetbatch::bus::setup_streams(&js, &topology).await?;
    println!("  {label}: publishing a backlog of {jobs} jobs …");
    let backlog = driver::publish_backlog(&b.client, &topology, &mut Generator::new(workload), jobs, &run_id(label)).await?;
    let mut others = vec![b.local.server_process()];
    let mut child = None;
    match side {
        Side::Jetbatch => b.local.start_worker("jetbatch", false)?,
        Side::Python => {
            jetbatch::bus::setup_consumer(&js, &topology).await?;
            let c = b.python_worker(&topology, &python.model, &[&["--kind", python.kind][..], &PYTHON_BATCHING].concat())?;
            others.push(("python worker", c.id().unwrap_or(0)));
            child = Some(c);
        }
    }
    println!("  {label}: draining …");
    let r = backlog.drain(START_TIMEOUT, DRAIN_TIMEOUT, &others).await;
    match child {
        Some(mut c) => c.kill().await?,
        None => b.local.stop_workers().await?,
    }
    let r = r?;
    println!("  {label}: {:.0} jobs/s, lost {}, errors {:?}", r.throughput(), r.lost(), r.errors);
    Ok(r)
}

/// The worker CPU per job of a drain, in µs (`python worker` or jetbatch's threads).
fn worker_us(r: &Recording, side: Side) -> f64 {
    match side {
        Side::Jetbatch => r.cpu_us_per_job(&["worker I/O", "model compute"]),
        Side::Python => r.cpu_us_per_job(&["python worker"]),
    }
}

/// Both drains, Python first, and their runs in `report`; returns (jetbatch, python).
pub async fn drains(b: &mut Bench<'_>, python: &PythonSide<'_>, workload: &Workload, jobs: u64, report: &mut Report) -> anyhow::Result<(Recording, Recording)> {
    let py = drain(b, python, Side::Python, workload.clone(), jobs).await?;
    let jb = drain(b, python, Side::Jetbatch, workload.clone(), jobs).await?;
    report.notes.push(format!(
        "drain rates: jetbatch {:.0} jobs/s, Python worker {:.0} jobs/s; worker CPU per job: jetbatch {:.0} µs, Python {:.0} µs",
        jb.throughput(),
        py.throughput(),
        worker_us(&jb, Side::Jetbatch),
        worker_us(&py, Side::Python)
    ));
    report.notes.push(format!("CPU during the drains — jetbatch: {}; Python: {}", crate::cpu::describe(&jb.cpu), crate::cpu::describe(&py.cpu)));
    report.runs.push(RunReport::new("python worker", Mode::Backlog { jobs }, &py));
    report.runs.push(RunReport::new("jetbatch", Mode::Backlog { jobs }, &jb));
    Ok((jb, py))
}

/// 7. A `loglikelihood` backlog: jetbatch vs the Python worker.
pub async fn score(args: &BenchArgs, m: &LmModel) -> anyhow::Result<Report> {
    let mut b = m.bench(args).await?;
    let mut report = Report::new(&format!("LM scoring: a backlog of {} `loglikelihood` jobs drained, jetbatch vs the Python worker ({})", args.lm_jobs, m.describe()));
    let (jb, py) = drains(&mut b, &m.scorer(), &scoring_jobs(None), args.lm_jobs, &mut report).await?;
    report.ratios.push(Ratio::new("jetbatch ÷ Python worker jobs/s (loglikelihood backlog)", jb.throughput() / py.throughput(), Some(3.0)));
    Ok(report)
}

/// Runs `baselines/lm_transformers.py MODE` on `workload`'s first `jobs` jobs (written as JSON
/// lines) and returns what it printed.
async fn transformers(args: &BenchArgs, m: &LmModel, mode: &str, workload: Workload, jobs: u64) -> anyhow::Result<serde_json::Value> {
    let file = tempfile::NamedTempFile::new()?;
    let mut generator = Generator::new(workload);
    let lines: Vec<String> = (0..jobs).map(|i| generator.next(format!("t.{i}")).input_and_params().to_string()).collect();
    std::fs::write(file.path(), lines.join("\n"))?;
    println!("  transformers in process ({mode}) …");
    let out = tokio::process::Command::new(interpreter(args))
        .arg(baselines().join("lm_transformers.py"))
        .arg(mode)
        .arg(m.dir())
        .arg(file.path())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "baselines/lm_transformers.py {mode} failed ({})", out.status);
    let last = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
    serde_json::from_str(&last).map_err(|e| anyhow::anyhow!("lm_transformers.py printed {last:?}: {e}"))
}

fn number(v: &serde_json::Value, key: &str) -> anyhow::Result<f64> {
    v[key].as_f64().ok_or_else(|| anyhow::anyhow!("lm_transformers.py: no number `{key}` in {v}"))
}

/// 8. Multiple choice: 4 options a question, each its own job with the same context.
pub async fn multiple_choice(args: &BenchArgs, m: &LmModel) -> anyhow::Result<Report> {
    let mut b = m.bench(args).await?;
    let jobs = args.mc_questions * 4;
    let mut report = Report::new(&format!(
        "Multiple choice: {} questions × 4 options (4 `loglikelihood` jobs sharing a context, as lm-evaluation-harness sends them), jetbatch vs the Python worker and vs transformers in process ({})",
        args.mc_questions,
        m.describe()
    ));
    let workload = scoring_jobs(Some(4));
    let (jb, py) = drains(&mut b, &m.scorer(), &workload, jobs, &mut report).await?;
    let tf = transformers(args, m, "score", workload, jobs).await?;
    let tf_rate = number(&tf, "jobs_per_s")?;
    report.ratios.push(Ratio::new("jetbatch ÷ Python worker jobs/s (multiple choice)", jb.throughput() / py.throughput(), Some(5.0)));
    report.ratios.push(Ratio::new("jetbatch ÷ transformers in process jobs/s (multiple choice)", jb.throughput() / tf_rate, Some(5.0)));
    report.notes.push(format!("transformers in process (each option scored on its own, batches of 64, no bus): {tf_rate:.0} jobs/s"));
    Ok(report)
}

/// 9. Greedy generation: jetbatch (every job published at once, continuous batching) vs
///    transformers' batched `generate` in process (static batches of 64, left padding).
pub async fn generate(args: &BenchArgs, m: &LmModel) -> anyhow::Result<Report> {
    let mut b = m.bench(args).await?;
    let jobs = args.gen_jobs;
    let mut report = Report::new(&format!("LM generation: {jobs} greedy `generate` jobs (prompts of 4–40 words, 8–64 new tokens), jetbatch vs transformers' batched `generate` ({})", m.describe()));
    b.local.start_worker("jetbatch", false)?;
    let topology = b.local.topology();
    jetbatch::bus::setup_streams(&async_nats::jetstream::new(b.client.clone()), &topology).await?;
    // Warm up on other prompts, so the measured jobs are exactly the ones transformers gets.
    let warm = Plan { mode: Mode::Closed { concurrency: 8 }, duration: None, jobs: Some(8), drain_timeout: START_TIMEOUT, run_id: run_id("gen-warmup"), progress: false };
    driver::drive(&b.client, &topology, &mut Generator::new(Workload { seed: 99, ..generation_jobs() }), &warm).await?;
    println!("  jetbatch …");
    let all_at_once = Plan { mode: Mode::Closed { concurrency: jobs as usize }, duration: None, jobs: Some(jobs), drain_timeout: DRAIN_TIMEOUT, run_id: run_id("gen"), progress: false };
    let others = [b.local.server_process()];
    let before = crate::cpu::Snapshot::take(&others);
    let mut jb = driver::drive(&b.client, &topology, &mut Generator::new(generation_jobs()), &all_at_once).await?;
    jb.cpu = crate::cpu::Snapshot::take(&others).shares_since(&before);
    b.local.stop_workers().await?;
    let tf = transformers(args, m, "generate", generation_jobs(), jobs).await?;
    let (jb_tps, tf_tps) = (jb.tokens as f64 / jb.wall.as_secs_f64(), number(&tf, "tokens_per_s")?);
    let jb_p99 = jb.latency_us.value_at_quantile(0.99) as f64 / 1e3;
    let tf_p99 = number(&tf, "p99_ms")?;
    report.ratios.push(Ratio::new("jetbatch ÷ transformers generate tokens/s", jb_tps / tf_tps, Some(3.0)));
    report.ratios.push(Ratio::new("transformers p99 ÷ jetbatch p99 (all jobs due at once)", tf_p99 / jb_p99, None));
    report.notes.push(format!(
        "jetbatch {jb_tps:.0} tokens/s ({} tokens, {} lost), p99 {jb_p99:.0} ms; transformers {tf_tps:.0} tokens/s ({} tokens), p99 {tf_p99:.0} ms",
        jb.tokens,
        jb.lost(),
        tf["tokens"]
    ));
    report.notes.push(agreement(&b.local.models, &tf["sample"]).await?);
    report.runs.push(RunReport::new("jetbatch", Mode::Closed { concurrency: jobs as usize }, &jb));
    Ok(report)
}

/// Whether jetbatch's greedy tokens equal transformers' on the jobs of `sample` (the first jobs
/// of the workload, each a list of token ids): the same jobs run through the core in process. A
/// final EOS is left out of both (whether it is listed is each side's convention).
async fn agreement(models: &Path, sample: &serde_json::Value) -> anyhow::Result<String> {
    let sample: Vec<Vec<u32>> = serde_json::from_value(sample.clone())?;
    let infer = Infer::start(models, 0, std::sync::Arc::new(Metrics::new("agreement")))?;
    let mut generator = Generator::new(generation_jobs());
    let payloads: Vec<bytes::Bytes> = (0..sample.len()).map(|i| generator.next(format!("a.{i}")).body).collect();
    let answers = futures::future::join_all(payloads.iter().map(|p| infer.run(MODEL, p))).await;
    infer.shutdown().await;
    let eos = 1; // both benchmark models' eos_token_id
    let trim = |t: &[u32]| t.strip_suffix(&[eos]).unwrap_or(t).to_vec();
    let mut differ = Vec::new();
    for (i, (answer, theirs)) in answers.into_iter().zip(&sample).enumerate() {
        let ours = match answer.map_err(|e| anyhow::anyhow!("generate job {i}: {}", e.message))?.output {
            Output::Generate { tokens, .. } => tokens,
            other => anyhow::bail!("generate job {i} answered {other:?}"),
        };
        let (ours, theirs) = (trim(&ours), trim(theirs));
        if ours != theirs {
            let at = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
            differ.push(format!("job {i} from token {at}"));
        }
    }
    Ok(if differ.is_empty() {
        format!("greedy tokens: identical on all {} sampled jobs", sample.len())
    } else {
        format!("greedy tokens: {} of {} sampled jobs differ ({})", differ.len(), sample.len(), differ.join(", "))
    })
}

/// 10. LM scoring end to end ÷ the engine alone (the core in process, 1…256 jobs in flight).
pub async fn e2e(args: &BenchArgs, m: &LmModel) -> anyhow::Result<Report> {
    let mut b = m.bench(args).await?;
    let mut report = Report::new(&format!("LM scoring: jetbatch end to end vs the engine alone ({})", m.describe()));
    // `--secs` at each number in flight (not a quarter, as for `wide`): an LM batch takes
    // seconds on a loaded 2-core machine, and a shorter window would see one or two of them.
    let (best, cpu, table) = engine_alone(&b.local.models, MODEL, scoring_jobs(None), Duration::from_secs_f64(args.secs)).await?;
    report.tables.push(format!("Engine alone (in process, no bus); CPU at the best rate: {}\n\n{table}", crate::cpu::describe(&cpu)));
    b.local.start_worker("e2e", false)?;
    let topology: Topology = b.local.topology();
    // Two batches warm the worker (the model is preloaded); more would only delay the run.
    let load = LoadOpts { warmup: 128, ..b.load() };
    let r = b.measure(&topology, scoring_jobs(None), &load, "end-to-end").await?;
    b.local.stop_workers().await?;
    report.ratios.push(Ratio::new("e2e ÷ engine alone (loglikelihood)", r.throughput() / best, Some(0.9)));
    report.notes.push(format!(
        "engine alone at its best {best:.0} jobs/s; end to end {:.0} jobs/s. nats-server and the load generator share the worker's {} cores: {}",
        r.throughput(),
        crate::cpu::cores(),
        crate::cpu::describe(&r.cpu)
    ));
    report.runs.push(RunReport::new("end-to-end", Mode::Closed { concurrency: load.concurrency }, &r));
    Ok(report)
}
