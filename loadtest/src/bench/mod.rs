//! The benchmarks of `loadtest/README.md`. Each starts its own nats-server and workers, runs the
//! two sides of its comparison one after the other in the same process, and reports the ratio.
//! The language-model ones (#11) are in `lm`, the embeddings one in `embed`.

mod embed;
mod lm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use jetbatch::config::Topology;
use jetbatch::infer::Infer;
use jetbatch::metrics::Metrics;

use crate::driver::{self, Mode, Plan, Recording};
use crate::load::{run_id, warm_then_drive, LoadOpts};
use crate::local::{Local, WideModel, WideOpts};
use crate::report::{Ratio, Report, RunReport};
use crate::workload::{Dist, Generator, Template, Workload};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub which: Which,
    /// Folder for the reports (one sub-folder per benchmark, plus summary.md).
    #[arg(long, default_value = "loadtest-report")]
    pub out: PathBuf,
    /// Seconds each measured run lasts (saturation runs; the generation benchmark is a job count).
    #[arg(long, default_value_t = 10.0)]
    pub secs: f64,
    /// Run each benchmark this many times and report each ratio as the median of the rounds, with
    /// every round's value beside it (runs on 2 shared cores vary by 5–20 %; 3 is a good choice
    /// before trusting a ratio near its target). Runs, tables and plots are the last round's.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Closed-loop concurrency of the saturation runs.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    #[command(flatten)]
    pub wide: WideOpts,
    /// `engine`: the widths of `wide` to compare at (comma-separated). Compute per job grows with
    /// the square of the width while the bus's cost per job stays the same, so the sweep shows
    /// from what model size on the bus stops mattering.
    #[arg(long, value_delimiter = ',', default_values_t = [1024i64, 2048, 4096])]
    pub engine_widths: Vec<i64>,
    /// `lm-score`: `loglikelihood` jobs in the backlog each side drains.
    #[arg(long, default_value_t = 5000)]
    pub lm_jobs: u64,
    /// `mc`: multiple-choice questions (4 jobs each) in the backlog each side drains.
    #[arg(long, default_value_t = 1250)]
    pub mc_questions: u64,
    /// `lm-generate`: `generate` jobs, all published at once.
    #[arg(long, default_value_t = 384)]
    pub gen_jobs: u64,
    /// `embed`: `embed` jobs in the backlog each side drains.
    #[arg(long, default_value_t = 3000)]
    pub embed_jobs: u64,
    /// The LM benchmarks on a tiny model (vocabulary 259, hidden 64, 1 layer) instead of the
    /// 32k-vocabulary one: seconds instead of minutes, for checking that they run, not for ratios.
    #[arg(long)]
    pub lm_tiny: bool,
    /// The 32k-vocabulary LM's hidden size and layers (`HIDDEN,LAYERS`): `512,8` is the shape of a
    /// small real model (the `fewshot` benchmark's); the default keeps runs within minutes.
    #[arg(long, value_delimiter = ',', default_values_t = [256i64, 4])]
    pub lm_shape: Vec<i64>,
    /// The nats-server binary (default: the project venv's, then PATH).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Python for the baseline worker and the LM benchmarks' transformers side (default: the project venv's).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Which {
    /// 1. `wide` through the core in process (no bus; 1…256 jobs in flight) vs through jetbatch
    /// end to end, at each of `--engine-widths`.
    Engine,
    /// 2. `wide` with max_batch_size = 1 vs dynamic batching: capacity, and p99 at half load.
    Batching,
    /// 3. Raw JetStream publish + pull + result + ack vs jetbatch answering from its cache.
    Bus,
    /// 4. The nats-py + torch baseline worker vs jetbatch on `mlp`.
    Python,
    /// 5. Continuous vs static batching for `generate` on a mixed short/long workload.
    Generation,
    /// 6. 1, 2 and 3 workers on one consumer.
    Scaling,
    /// 7. A `loglikelihood` backlog drained: jetbatch vs the Python worker (transformers), on
    ///    a random Llama with a 32k vocabulary.
    LmScore,
    /// 8. Multiple choice (4 `loglikelihood` jobs sharing a context): jetbatch vs the Python
    ///    worker and vs transformers in process.
    Mc,
    /// 9. Greedy `generate`, mixed lengths: jetbatch vs transformers' batched `generate`.
    LmGenerate,
    /// 10. LM scoring end to end vs the engine alone (in process).
    LmE2e,
    /// 11. An `embed` backlog drained: jetbatch vs a sentence-transformers worker (all-MiniLM-L6-v2).
    Embed,
    /// All of the above, one after the other.
    All,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Engine => "engine",
            Which::Batching => "batching",
            Which::Bus => "bus",
            Which::Python => "python",
            Which::Generation => "generation",
            Which::Scaling => "scaling",
            Which::LmScore => "lm-score",
            Which::Mc => "mc",
            Which::LmGenerate => "lm-generate",
            Which::LmE2e => "lm-e2e",
            Which::Embed => "embed",
            Which::All => "all",
        }
    }
}

/// What every benchmark needs: its options and a fresh local target.
struct Bench<'a> {
    args: &'a BenchArgs,
    local: Local,
    client: async_nats::Client,
}

impl Bench<'_> {
    async fn new(args: &BenchArgs) -> anyhow::Result<Bench<'_>> {
        Bench::with_wide(args, &WideModel { width: args.wide.wide_width, depth: args.wide.wide_depth }).await
    }

    async fn with_wide<'a>(args: &'a BenchArgs, wide: &WideModel) -> anyhow::Result<Bench<'a>> {
        Bench::with_repository(args, None, wide).await
    }

    /// A target serving the repository `models` (None: the built-in one, with `wide` as given).
    async fn with_repository<'a>(args: &'a BenchArgs, models: Option<PathBuf>, wide: &WideModel) -> anyhow::Result<Bench<'a>> {
        let local = Local::start(args.nats_server.clone(), models, wide)?;
        let client = async_nats::connect(local.url()).await?;
        Ok(Bench { args, local, client })
    }

    fn load(&self) -> LoadOpts {
        LoadOpts {
            rate: None,
            concurrency: self.args.concurrency,
            duration: Some(self.args.secs),
            jobs: None,
            warmup: 500,
            drain_timeout: 60.0,
        }
    }

    /// Sets up `topology`'s streams, warms up and measures `load` with jobs from `workload`.
    async fn measure(&self, topology: &Topology, workload: Workload, load: &LoadOpts, label: &str) -> anyhow::Result<Recording> {
        self.measure_beside(topology, workload, load, label, None).await
    }

    /// `measure`, accounting the CPU time of a worker process (`(label, pid)`) too.
    async fn measure_beside(&self, topology: &Topology, workload: Workload, load: &LoadOpts, label: &str, process: Option<(&str, u32)>) -> anyhow::Result<Recording> {
        jetbatch::bus::setup_streams(&async_nats::jetstream::new(self.client.clone()), topology).await?;
        let mut generator = Generator::new(workload);
        println!("  {label} …");
        let mut others = vec![self.local.server_process()];
        others.extend(process);
        let r = warm_then_drive(&self.client, topology, &mut generator, load, label, !self.args.quiet, &others).await?;
        println!("  {label}: {:.0} jobs/s, p99 {:.1} ms, lost {}", r.throughput(), r.latency_us.value_at_quantile(0.99) as f64 / 1e3, r.lost());
        Ok(r)
    }

    /// Starts `baselines/python_worker.py` on `topology`'s consumer (which must exist) serving
    /// `model`, batches of up to 64, with `extra` arguments.
    fn python_worker(&self, topology: &Topology, model: &Path, extra: &[&str]) -> anyhow::Result<tokio::process::Child> {
        let python = interpreter(self.args);
        tokio::process::Command::new(&python)
            .arg(baselines().join("python_worker.py"))
            .args(["--nats-url", &self.local.url(), "--stream", &topology.jobs_stream, "--consumer", &topology.consumer])
            .args(["--results-prefix", &format!("{}.results", topology.prefix)])
            .arg("--model")
            .arg(model)
            .args(["--max-batch", "64"])
            .args(extra)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("{}: {e}", python.display()))
    }

    fn wide_jobs(&self, model: &str) -> Workload {
        Workload::tensor(model, &[crate::local::WIDE_IO as u64], 0.0)
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let list = match args.which {
        Which::All => vec![
            Which::Engine,
            Which::Batching,
            Which::Bus,
            Which::Python,
            Which::Generation,
            Which::Scaling,
            Which::LmScore,
            Which::Mc,
            Which::LmGenerate,
            Which::LmE2e,
            Which::Embed,
        ],
        w => vec![w],
    };
    // The LM benchmarks' model, built once for all of them (its tokenizer takes a while to train).
    let lm_model = if list.iter().any(|w| lm::uses_model(*w)) { Some(lm::LmModel::build(&args)?) } else { None };
    let lm_model = || lm_model.as_ref().expect("built for the LM benchmarks above");
    let mut summary = Report::new("jetbatch benchmarks: summary");
    let rounds = args.repeat.max(1);
    for which in list {
        let mut reports = Vec::with_capacity(rounds);
        for round in 1..=rounds {
            let of = if rounds > 1 { format!(" (round {round} of {rounds})") } else { String::new() };
            println!("== {}{of}", which.name());
            reports.push(match which {
                Which::Engine => engine(&args).await?,
                Which::Batching => batching(&args).await?,
                Which::Bus => bus(&args).await?,
                Which::Python => python(&args).await?,
                Which::Generation => generation(&args).await?,
                Which::Scaling => scaling(&args).await?,
                Which::LmScore => lm::score(&args, lm_model()).await?,
                Which::Mc => lm::multiple_choice(&args, lm_model()).await?,
                Which::LmGenerate => lm::generate(&args, lm_model()).await?,
                Which::LmE2e => lm::e2e(&args, lm_model()).await?,
                Which::Embed => embed::embed(&args).await?,
                Which::All => unreachable!("expanded above"),
            });
        }
        let report = Report::median_of(reports);
        let dir = args.out.join(which.name());
        report.write(&dir)?;
        println!("{}", report.markdown());
        println!("report: {}", dir.join("report.md").display());
        summary.ratios.extend(report.ratios.iter().cloned());
        summary.notes.extend(report.notes.iter().map(|n| format!("{}: {n}", which.name())));
    }
    summary.write(&args.out)?;
    Ok(())
}

/// 1. Engine alone vs end to end, for each width of `wide` in `--engine-widths`: the same ratio
/// at growing compute per job shows how much of a job's time the bus costs.
async fn engine(args: &BenchArgs) -> anyhow::Result<Report> {
    let mut report = Report::new("Engine alone vs jetbatch end to end (model `wide` at several widths)");
    for &width in &args.engine_widths {
        let wide = WideModel { width, depth: args.wide.wide_depth };
        let mut b = Bench::with_wide(args, &wide).await?;
        let (best, cpu, table) = engine_alone(&b.local.models, "wide", b.wide_jobs("wide"), Duration::from_secs_f64((args.secs / 4.0).max(1.0))).await?;
        report.tables.push(format!("Engine alone, width {width} (in process, no bus); CPU at the best rate: {}\n\n{table}", crate::cpu::describe(&cpu)));
        b.local.start_worker("e2e", false)?;
        let topology = b.local.topology();
        let load = b.load();
        let label = format!("end-to-end, width {width}");
        let r = b.measure(&topology, b.wide_jobs("wide"), &load, &label).await?;
        b.local.stop_workers().await?;
        // The name stays the same from round to round (`--repeat` matches ratios by name).
        report.ratios.push(Ratio::new(&format!("e2e ÷ engine alone, width {width}"), r.throughput() / best, Some(0.9)));
        report.notes.push(format!("width {width}: engine alone (the core in process) at its best {best:.0} jobs/s ({:.2} ms of compute a job); end to end {:.0} jobs/s", 1e3 / best, r.throughput()));
        report.runs.push(RunReport::new(&label, Mode::Closed { concurrency: load.concurrency }, &r));
    }
    Ok(report)
}

/// `model` of the repository `models` through the core in process (`jetbatch::infer::Infer`: the
/// worker's batcher and engine, no bus) with 1…256 jobs in flight, `per_size` each, the jobs drawn
/// from `workload` (as the end-to-end run sends them). Returns the best rate, the CPU shares while
/// it ran, and a Markdown table.
async fn engine_alone(models: &Path, model: &str, workload: Workload, per_size: Duration) -> anyhow::Result<(f64, BTreeMap<String, f64>, String)> {
    let infer = Infer::start(models, 0, Arc::new(Metrics::new("bench")))?;
    infer.preload(model).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let mut generator = Generator::new(workload);
    let payloads: Vec<bytes::Bytes> = (0..1024).map(|i| generator.next(format!("engine.{i}")).body).collect();
    let mut table = "| jobs in flight | jobs/s | mean batch |\n| --- | --- | --- |\n".to_string();
    let (mut best, mut best_cpu) = (0.0f64, BTreeMap::new());
    for inflight in [1usize, 4, 16, 64, 256] {
        let (start, cpu) = (Instant::now(), crate::cpu::Snapshot::take(&[]));
        let lanes = (0..inflight).map(|lane| {
            let (infer, payloads) = (&infer, &payloads);
            async move {
                let (mut jobs, mut batched) = (0usize, 0usize);
                while start.elapsed() < per_size {
                    let answer = infer.run(model, &payloads[(lane * 61 + jobs) % payloads.len()]).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
                    jobs += 1;
                    batched += answer.timing.batch_size;
                }
                anyhow::Ok((jobs, batched))
            }
        });
        let (mut jobs, mut batched) = (0usize, 0usize);
        for lane in futures::future::join_all(lanes).await {
            let (j, s) = lane?;
            (jobs, batched) = (jobs + j, batched + s);
        }
        let rate = jobs as f64 / start.elapsed().as_secs_f64();
        if rate > best {
            (best, best_cpu) = (rate, crate::cpu::Snapshot::take(&[]).shares_since(&cpu));
        }
        table += &format!("| {inflight} | {rate:.0} | {:.1} |\n", batched as f64 / jobs.max(1) as f64);
    }
    infer.shutdown().await;
    Ok((best, best_cpu, table))
}

/// 2. max_batch_size = 1 vs dynamic batching.
async fn batching(args: &BenchArgs) -> anyhow::Result<Report> {
    let mut b = Bench::new(args).await?;
    let mut report = Report::new("Batching: max_batch_size = 1 vs dynamic (model `wide`)");
    b.local.start_worker("w", false)?;
    let topology = b.local.topology();
    let load = b.load();
    let one = b.measure(&topology, b.wide_jobs("wide-b1"), &load, "batch-1 saturated").await?;
    let dynamic = b.measure(&topology, b.wide_jobs("wide"), &load, "dynamic saturated").await?;
    let rate = one.throughput() / 2.0;
    let half = LoadOpts { rate: Some(rate), ..load.clone() };
    let one_half = b.measure(&topology, b.wide_jobs("wide-b1"), &half, "batch-1 half load").await?;
    let dynamic_half = b.measure(&topology, b.wide_jobs("wide"), &half, "dynamic half load").await?;
    b.local.stop_workers().await?;
    let p99 = |r: &Recording| r.latency_us.value_at_quantile(0.99) as f64;
    report.ratios.push(Ratio::new("dynamic ÷ batch-1 throughput (saturated)", dynamic.throughput() / one.throughput(), None));
    report.ratios.push(Ratio::new("batch-1 p99 ÷ dynamic p99 (half of batch-1 capacity)", p99(&one_half) / p99(&dynamic_half), None));
    report.notes.push(format!("half load = {rate:.0} jobs/s (half of batch-1 capacity), offered to both"));
    let closed = Mode::Closed { concurrency: load.concurrency };
    report.runs.push(RunReport::new("batch-1 saturated", closed, &one));
    report.runs.push(RunReport::new("dynamic saturated", closed, &dynamic));
    report.runs.push(RunReport::new("batch-1 half load", Mode::Open { rate }, &one_half));
    report.runs.push(RunReport::new("dynamic half load", Mode::Open { rate }, &dynamic_half));
    Ok(report)
}

/// The Python interpreter the baselines run in (default: the project venv's).
fn interpreter(args: &BenchArgs) -> PathBuf {
    args.python.clone().unwrap_or_else(|| baselines().join("../../.venv/bin/python"))
}

/// `loadtest/baselines/`: the Python side of the comparisons.
fn baselines() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("baselines")
}

/// A topology beside jetbatch's default one, for a worker that is not jetbatch.
fn side_topology(base: &Topology, name: &str) -> Topology {
    let upper = name.to_uppercase();
    Topology {
        prefix: name.to_string(),
        jobs_stream: format!("{upper}_JOBS"),
        results_stream: format!("{upper}_RESULTS"),
        dead_stream: format!("{upper}_DEAD"),
        consumer: format!("{name}-workers"),
        ..base.clone()
    }
}

/// `mlp` jobs (16 floats in, 4 out): small enough that the bus is the bound.
fn mlp_jobs(duplicate_ratio: f64) -> Workload {
    Workload::tensor("mlp", &[16], duplicate_ratio)
}

/// 3. The bus alone vs jetbatch's cache-hit path.
async fn bus(args: &BenchArgs) -> anyhow::Result<Report> {
    let mut b = Bench::new(args).await?;
    let mut report = Report::new("Bus limit: raw JetStream vs jetbatch cache hits (`mlp` jobs)");
    let load = b.load();
    let raw_topology = side_topology(&b.local.topology(), "rawbus");
    jetbatch::bus::setup_streams(&async_nats::jetstream::new(b.client.clone()), &raw_topology).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (url, t) = (b.local.url(), raw_topology.clone());
    let defaults = jetbatch::config::ServeArgs::local(b.local.url(), PathBuf::new(), None);
    let (inflight, pull) = (defaults.max_inflight, defaults.pull_batch);
    let raw = std::thread::spawn(move || -> anyhow::Result<()> {
        // Named like the in-process workers' threads, so its CPU time counts as worker I/O.
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("jb-rawbus").build()?;
        runtime.block_on(crate::rawbus::serve(url, t, inflight, pull, stopped))
    });
    let raw_rec = b.measure(&raw_topology, mlp_jobs(0.0), &load, "raw JetStream").await?;
    let _ = stop.send(());
    raw.join().map_err(|_| anyhow::anyhow!("raw worker panicked"))??;

    b.local.start_worker("cached", true)?;
    let topology = b.local.topology();
    // Fill the cache with 2,000 distinct inputs, then send only repeats of them (new ids).
    let mut generator = Generator::new(mlp_jobs(0.0));
    let fill = Plan { mode: Mode::Closed { concurrency: 256 }, duration: None, jobs: Some(2000), drain_timeout: Duration::from_secs(60), run_id: run_id("fill"), progress: false };
    jetbatch::bus::setup_streams(&async_nats::jetstream::new(b.client.clone()), &topology).await?;
    driver::drive(&b.client, &topology, &mut generator, &fill).await?;
    generator.set_duplicate_ratio(1.0);
    println!("  jetbatch cache hits …");
    let hits = warm_then_drive(&b.client, &topology, &mut generator, &load, "cache-hits", !args.quiet, &[b.local.server_process()]).await?;
    b.local.stop_workers().await?;
    report.ratios.push(Ratio::new("jetbatch cache hits ÷ raw JetStream", hits.throughput() / raw_rec.throughput(), Some(0.7)));
    report.notes.push(format!("cache-hit share of the measured jobs: {:.1}%", hits.cached as f64 / hits.received.max(1) as f64 * 100.0));
    let closed = Mode::Closed { concurrency: load.concurrency };
    report.runs.push(RunReport::new("raw JetStream", closed, &raw_rec));
    report.runs.push(RunReport::new("jetbatch cache hits", closed, &hits));
    Ok(report)
}

/// 4. The Python baseline vs jetbatch, same model, same batch limits, same workload.
async fn python(args: &BenchArgs) -> anyhow::Result<Report> {
    let mut b = Bench::new(args).await?;
    let mut report = Report::new("Python baseline (nats-py + torch) vs jetbatch (`mlp`, batch ≤ 64, 2 ms wait)");
    let load = b.load();
    let py_topology = side_topology(&b.local.topology(), "pybase");
    let js = async_nats::jetstream::new(b.client.clone());
    jetbatch::bus::setup_streams(&js, &py_topology).await?;
    jetbatch::bus::setup_consumer(&js, &py_topology).await?;
    let mut child = b.python_worker(&py_topology, &b.local.models.join("mlp/model.pt"), &["--max-wait-ms", "2"])?;
    let pid = child.id().unwrap_or(0);
    let py = b.measure_beside(&py_topology, mlp_jobs(0.0), &load, "python baseline", Some(("python worker", pid))).await;
    child.kill().await?;
    let py = py?;
    b.local.start_worker("jetbatch", false)?;
    let jb = b.measure(&b.local.topology(), mlp_jobs(0.0), &load, "jetbatch").await?;
    b.local.stop_workers().await?;
    let p99 = |r: &Recording| r.latency_us.value_at_quantile(0.99) as f64 / 1e3;
    report.ratios.push(Ratio::new("jetbatch ÷ Python baseline throughput", jb.throughput() / py.throughput(), Some(3.0)));
    // CPU time each worker spent per job: what the throughput ratio becomes once the broker and
    // the producers no longer share the worker's cores.
    let (py_us, jb_us) = (py.cpu_us_per_job(&["python worker"]), jb.cpu_us_per_job(&["worker I/O", "model compute"]));
    report.ratios.push(Ratio::new("Python CPU per job ÷ jetbatch CPU per job", py_us / jb_us.max(1e-9), None));
    report.notes.push(format!("worker CPU per job: jetbatch {jb_us:.1} µs, Python {py_us:.1} µs"));
    report.notes.push(format!("p99 at saturation: jetbatch {:.1} ms, Python {:.1} ms", p99(&jb), p99(&py)));
    let closed = Mode::Closed { concurrency: load.concurrency };
    report.runs.push(RunReport::new("python baseline", closed, &py));
    report.runs.push(RunReport::new("jetbatch", closed, &jb));
    Ok(report)
}

/// 5. Continuous vs static batching for generation, end to end.
async fn generation(args: &BenchArgs) -> anyhow::Result<Report> {
    let mut b = Bench::new(args).await?;
    let mut report = Report::new("Generation: continuous vs static batching (Llama-arch 512×4, 3 short : 1 long)");
    b.local.start_worker("w", false)?;
    let topology = b.local.topology();
    // 96 jobs arriving at 400/s (a burst the batch cannot absorb at once), 8 or 128 new tokens.
    let load = LoadOpts { rate: Some(400.0), jobs: Some(96), duration: None, warmup: 4, ..b.load() };
    let mut runs = Vec::new();
    for mode in ["continuous", "static"] {
        let mut t = Template::new(&format!("gen-{mode}"), "generate");
        t.prompt_words = Some(Dist::Fixed(2));
        t.max_new_tokens = Some(Dist::Choice { choice: vec![8, 8, 8, 128] });
        t.params.insert("temperature".into(), 0.0.into());
        let workload = Workload { encoding: "msgpack".into(), duplicate_ratio: 0.0, seed: 5, mix: vec![t] };
        runs.push(b.measure(&topology, workload, &load, mode).await?);
    }
    b.local.stop_workers().await?;
    let tps = |r: &Recording| r.tokens as f64 / r.wall.as_secs_f64();
    let p99 = |r: &Recording| r.latency_us.value_at_quantile(0.99) as f64;
    report.ratios.push(Ratio::new("continuous ÷ static tokens/s", tps(&runs[0]) / tps(&runs[1]), None));
    report.ratios.push(Ratio::new("static p99 ÷ continuous p99", p99(&runs[1]) / p99(&runs[0]), None));
    let mode = Mode::Open { rate: 400.0 };
    report.runs.push(RunReport::new("continuous", mode, &runs[0]));
    report.runs.push(RunReport::new("static", mode, &runs[1]));
    Ok(report)
}

/// 6. 1, 2, 3 workers on one consumer.
async fn scaling(args: &BenchArgs) -> anyhow::Result<Report> {
    let mut b = Bench::new(args).await?;
    let mut report = Report::new("Scaling: 1, 2, 3 workers on one consumer (`mlp`)");
    let load = b.load();
    let topology = b.local.topology();
    let mut base = 0.0;
    for n in 1..=3 {
        for i in 0..n {
            b.local.start_worker(&format!("w{i}"), false)?;
        }
        let label = format!("{n} worker{}", if n > 1 { "s" } else { "" });
        let r = b.measure(&topology, mlp_jobs(0.0), &load, &label).await?;
        b.local.stop_workers().await?;
        if n == 1 {
            base = r.throughput();
        } else {
            report.ratios.push(Ratio::new(&format!("{n} workers ÷ 1 worker"), r.throughput() / base, None));
        }
        report.notes.push(format!("{label}: lost {}, answered twice {}, workers that answered {}", r.lost(), r.duplicates, r.workers.len()));
        report.runs.push(RunReport::new(&label, Mode::Closed { concurrency: load.concurrency }, &r));
    }
    Ok(report)
}
