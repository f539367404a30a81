//! Numerics of every `hf` architecture on the engine alone (no NATS): the fixture's tiny random
//! models (tests/fixtures/make_lm_models.py) against transformers on the same token ids, each
//! request in one batch with the others and alone.

mod lm_fixture;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use jetbatch::engine::{EngineHandle, Event};
use jetbatch::job::{JobInput, JobKind, Output};
use jetbatch::kinds::{GenerateInput, Sampling, Window};
use jetbatch::metrics::Metrics;
use jetbatch::plan::ModelPlan;
use lm_fixture::fixture;
use serde_json::Value;

fn engine() -> EngineHandle {
    EngineHandle::start(Arc::new(Metrics::new("hf-engine-test")), 0).0
}

/// Runs `inputs` as one engine call (one batch); the outputs in order.
fn run(engine: &EngineHandle, spec: &Arc<ModelPlan>, kind: JobKind, inputs: Vec<JobInput>) -> Vec<Output> {
    let n = inputs.len();
    let mut events = engine.run(spec.clone(), kind, inputs, vec![false; n], Vec::new());
    let mut out: Vec<Option<Output>> = (0..n).map(|_| None).collect();
    while out.iter().any(Option::is_none) {
        match events.blocking_recv() {
            Some(Event::Done { index, result, .. }) => out[index] = Some(result.unwrap_or_else(|e| panic!("{}: {e}", spec.name))),
            Some(Event::Chunk { .. }) => {}
            None => panic!("engine stopped"),
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Each input alone, then all in one batch.
fn alone_and_batched(engine: &EngineHandle, spec: &Arc<ModelPlan>, kind: JobKind, inputs: Vec<JobInput>) -> (Vec<Output>, Vec<Output>) {
    let alone = inputs.iter().map(|i| run(engine, spec, kind, vec![i.clone()]).remove(0)).collect();
    (alone, run(engine, spec, kind, inputs))
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn windows(r: &Value) -> JobInput {
    JobInput::Score(r["scored"].as_array().unwrap().iter().map(|w| Window { context: ids(&w[0]), continuation: ids(&w[1]), top_logprobs: 0 }).collect())
}

fn load(name: &str) -> Arc<ModelPlan> {
    let (dir, _) = fixture();
    Arc::new(ModelPlan::load(&dir.join("models").join(name)).unwrap())
}

/// The fixture's greedy generation cases, stopping at `eos`.
fn greedy_cases(cases: &[Value], eos: &[u32]) -> Vec<JobInput> {
    cases
        .iter()
        .map(|r| {
            JobInput::Generate(GenerateInput {
                prompt: ids(&r["prompt_ids"]),
                max_new_tokens: r["max_new_tokens"].as_u64().unwrap() as usize,
                sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None },
                stop: vec![],
                stop_token_ids: eos.to_vec(),
                top_logprobs: 0,
            })
        })
        .collect()
}

/// An encoder case (text, maybe a pair) encoded by the model's tokenizer.
fn encode_case(spec: &ModelPlan, r: &Value) -> JobInput {
    let tok = &spec.lm.as_ref().unwrap().tokenizer;
    let e = match r["text_pair"].as_str() {
        Some(pair) => tok.encode((r["text"].as_str().unwrap(), pair), true),
        None => tok.encode(r["text"].as_str().unwrap(), true),
    }
    .unwrap();
    JobInput::Encode { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec(), normalize: true }
}

/// Checks one decoder: loglikelihood and rolling within 1e-4 (relative to |logprob| past 1) of
/// transformers, greedy flags and greedy generations equal, batched equal to alone. Returns the
/// largest relative log-prob error.
fn check_decoder(engine: &EngineHandle, name: &str) -> f64 {
    let (_, refs) = fixture();
    let refs = &refs["models"][name];
    let spec = load(name);
    let eos = spec.lm.as_ref().unwrap().config.eos_ids();
    let mut worst = 0.0f64;
    for (kind, key) in [(JobKind::Loglikelihood, "loglikelihood"), (JobKind::LoglikelihoodRolling, "loglikelihood_rolling")] {
        let cases = refs[key].as_array().unwrap();
        let (alone, batched) = alone_and_batched(engine, &spec, kind, cases.iter().map(windows).collect());
        for (i, want) in cases.iter().enumerate() {
            let (Output::Score { logprob: a, .. }, Output::Score { logprob: g, is_greedy, tokens, .. }) = (&alone[i], &batched[i]) else { panic!("{name}: not a score") };
            let w = want["logprob"].as_f64().unwrap();
            let err = (g - w).abs() / w.abs().max(1.0);
            worst = worst.max(err);
            assert!(err <= 1e-4, "{name} {key} {i}: logprob {g} vs transformers {w}");
            assert!((a - g).abs() <= 1e-4 * g.abs().max(1.0), "{name} {key} {i}: alone {a} vs batched {g}");
            assert_eq!(*tokens as u64, want["tokens"].as_u64().unwrap(), "{name} {key} {i}");
            if kind == JobKind::Loglikelihood {
                assert_eq!(*is_greedy, want["is_greedy"].as_bool(), "{name} {key} {i}");
            }
        }
    }
    let cases = refs["generate"].as_array().unwrap();
    let (alone, batched) = alone_and_batched(engine, &spec, JobKind::Generate, greedy_cases(cases, &eos));
    for (i, want) in cases.iter().enumerate() {
        let (Output::Generate { tokens: a, .. }, Output::Generate { tokens: g, .. }) = (&alone[i], &batched[i]) else { panic!("{name}: not a generation") };
        assert_eq!(g, &ids(&want["tokens"]), "{name} generate {i}: greedy tokens equal transformers'");
        assert_eq!(a, g, "{name} generate {i}: alone == batched");
    }
    worst
}

#[test]
fn decoders_match_transformers_on_the_engine() {
    let engine = engine();
    let (_, refs) = fixture();
    let mut worst = BTreeMap::new();
    for (name, r) in refs["models"].as_object().unwrap() {
        if r.get("generate").is_some() {
            worst.insert(name.clone(), check_decoder(&engine, name));
        }
    }
    eprintln!("FIGURES engine: worst relative logprob error vs transformers (fp32): {worst:?}");
}

/// Encoders: classifier logits within 1e-4 of transformers, embeddings at cosine >= 0.9999 to
/// sentence-transformers (or transformers' pooled output), batched equal to alone.
#[test]
fn encoders_match_transformers_on_the_engine() {
    let engine = engine();
    let (_, refs) = fixture();
    let mut figures = BTreeMap::new();
    for (name, r) in refs["models"].as_object().unwrap() {
        let spec = load(name);
        let encode = |r: &Value| encode_case(&spec, r);
        if let Some(cases) = r.get("classify").and_then(Value::as_array) {
            let (alone, batched) = alone_and_batched(&engine, &spec, JobKind::Classify, cases.iter().map(encode).collect());
            let mut worst = 0.0f64;
            for (i, want) in cases.iter().enumerate() {
                let (Output::Classification { logits: a, .. }, Output::Classification { logits: g, label_id, .. }) = (&alone[i], &batched[i]) else { panic!() };
                let w: Vec<f64> = serde_json::from_value(want["logits"].clone()).unwrap();
                for ((g, a), w) in g.iter().zip(a).zip(&w) {
                    worst = worst.max((*g as f64 - w).abs());
                    assert!((*g as f64 - w).abs() <= 1e-4, "{name} classify {i}: {g} vs {w}");
                    assert!((g - a).abs() <= 1e-5, "{name} classify {i}: batched {g} vs alone {a}");
                }
                assert_eq!(*label_id as u64, want["label_id"].as_u64().unwrap(), "{name} {i}");
            }
            figures.insert(format!("{name} classify max |logit error|"), worst);
        }
        if let Some(cases) = r.get("embed").and_then(Value::as_array) {
            let (alone, batched) = alone_and_batched(&engine, &spec, JobKind::Embed, cases.iter().map(encode).collect());
            let mut min_cos = 1.0f64;
            for (i, want) in cases.iter().enumerate() {
                let (Output::Embedding { embedding: a, .. }, Output::Embedding { embedding: e, .. }) = (&alone[i], &batched[i]) else { panic!() };
                let w: Vec<f64> = serde_json::from_value(want["embedding"].clone()).unwrap();
                let dot: f64 = e.iter().zip(&w).map(|(a, b)| *a as f64 * b).sum();
                let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
                let cos = dot / (norm(&mut e.iter().map(|&x| x as f64)) * norm(&mut w.iter().copied()));
                min_cos = min_cos.min(cos);
                assert!(cos >= 0.9999, "{name} embed {i}: cosine {cos}");
                assert!(e.iter().zip(a).all(|(x, y)| (x - y).abs() <= 1e-5), "{name} embed {i}: batched == alone");
            }
            figures.insert(format!("{name} embed min cosine"), min_cos);
        }
    }
    eprintln!("FIGURES engine encoders: {figures:?}");
}


fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> JobInput {
    let sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None };
    JobInput::Generate(GenerateInput { prompt, max_new_tokens, sampling, stop: vec![], stop_token_ids: vec![], top_logprobs: 0 })
}

/// Rows joining a running generation (prefilled into free slots of its KV cache, shorter and
/// longer than the rows running) and leaving it at different steps (the last row moving into a
/// freed slot) generate what they generate alone: GQA, a sliding window, soft-capping.
#[test]
fn generations_joining_and_leaving_a_running_batch_equal_alone() {
    let engine = engine();
    for name in ["tiny-llama", "tiny-mistral", "tiny-gemma2", "tiny-qwen3"] {
        let spec = load(name);
        let prompt = |len: usize, seed: usize| (0..len).map(|i| 3 + ((seed * 37 + i * 11) % 300) as u32).collect::<Vec<u32>>();
        let running = vec![greedy(prompt(4, 1), 30), greedy(prompt(9, 2), 6), greedy(prompt(6, 3), 18)];
        let joining = vec![greedy(prompt(20, 4), 12), greedy(prompt(2, 5), 25), greedy(prompt(13, 6), 3)];
        let alone: Vec<Output> = running.iter().chain(&joining).map(|i| run(&engine, &spec, JobKind::Generate, vec![i.clone()]).remove(0)).collect();
        // The first rows stream, so the second batch is sent once they have stepped.
        let mut first = engine.run(spec.clone(), JobKind::Generate, running, vec![true; 3], Vec::new());
        let mut out: Vec<Option<Output>> = (0..6).map(|_| None).collect();
        let mut chunks = 0;
        while chunks == 0 {
            match first.blocking_recv() {
                Some(Event::Chunk { .. }) => chunks += 1,
                Some(Event::Done { index, result, .. }) => out[index] = Some(result.unwrap()),
                None => panic!("engine stopped"),
            }
        }
        let joined = run(&engine, &spec, JobKind::Generate, joining);
        while out[..3].iter().any(Option::is_none) {
            if let Some(Event::Done { index, result, .. }) = first.blocking_recv() {
                out[index] = Some(result.unwrap());
            }
        }
        for (i, j) in joined.into_iter().enumerate() {
            out[3 + i] = Some(j);
        }
        for (i, (a, b)) in alone.iter().zip(&out).enumerate() {
            let (Output::Generate { tokens: a, .. }, Some(Output::Generate { tokens: b, .. })) = (a, b) else { panic!("{name}: not a generation") };
            assert_eq!(a, b, "{name} generation {i}: alone == joining a running batch");
            assert!(!a.is_empty());
        }
    }
}

/// Multiple-choice questions sent as one `loglikelihood` job per option, in one batch with jobs of
/// other contexts: the options of a question share a row (its context run once) and score what
/// they score alone and what transformers scores for each (within 1e-4), every architecture
/// (sliding windows, soft-capping, LongRoPE, which scores them apart).
#[test]
fn options_sharing_a_context_score_as_alone_and_as_transformers() {
    let engine = engine();
    let (_, refs) = fixture();
    for (name, r) in refs["models"].as_object().unwrap() {
        let Some(questions) = r.get("multiple_choice").and_then(Value::as_array) else { continue };
        let spec = load(name);
        // (input, transformers' logprob and greedy flag): the options interleaved with unshared windows.
        let mut cases: Vec<(JobInput, f64, Option<bool>)> = Vec::new();
        for (q, unshared) in questions.iter().zip(r["loglikelihood"].as_array().unwrap()) {
            for (i, cont) in q["continuations"].as_array().unwrap().iter().enumerate() {
                let window = Window { context: ids(&q["context"]), continuation: ids(cont), top_logprobs: 0 };
                cases.push((JobInput::Score(vec![window]), q["logprobs"][i].as_f64().unwrap(), q["is_greedy"][i].as_bool()));
                if i == 1 {
                    cases.push((windows(unshared), unshared["logprob"].as_f64().unwrap(), unshared["is_greedy"].as_bool()));
                }
            }
        }
        let (alone, batched) = alone_and_batched(&engine, &spec, JobKind::Loglikelihood, cases.iter().map(|c| c.0.clone()).collect());
        for (i, (_, want, want_greedy)) in cases.iter().enumerate() {
            let (Output::Score { logprob: a, .. }, Output::Score { logprob: g, is_greedy, .. }) = (&alone[i], &batched[i]) else { panic!("{name}: not a score") };
            assert!((g - want).abs() <= 1e-4 * want.abs().max(1.0), "{name} {i}: shared {g} vs transformers {want}");
            assert!((g - a).abs() <= 1e-4 * a.abs().max(1.0), "{name} {i}: shared {g} vs alone {a}");
            assert_eq!(is_greedy, want_greedy, "{name} {i}");
        }
    }
}

/// The choices form (`continuations`): one job per question answers, per choice, what a separate
/// job with that one continuation answers and what transformers gives for it — beside other jobs
/// in one batch, on every decoder architecture of the fixture (Phi-3 with longrope unpacked).
#[test]
fn a_choices_job_scores_each_choice_as_a_separate_job_and_as_transformers() {
    let engine = engine();
    let (_, refs) = fixture();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
    let mut checked = Vec::new();
    for (name, r) in refs["models"].as_object().unwrap() {
        let Some(questions) = r.get("multiple_choice").and_then(Value::as_array) else { continue };
        let spec = load(name);
        let choices = |q: &Value, top_logprobs: usize| -> Vec<Window> {
            q["continuations"].as_array().unwrap().iter().map(|k| Window { context: ids(&q["context"]), continuation: ids(k), top_logprobs }).collect()
        };
        // One batch: every question's choices job, each beside an unshared window.
        let mut jobs = Vec::new();
        for (q, unshared) in questions.iter().zip(r["loglikelihood"].as_array().unwrap()) {
            jobs.push(JobInput::Choices(choices(q, 0)));
            jobs.push(windows(unshared));
        }
        let together = run(&engine, &spec, JobKind::Loglikelihood, jobs);
        // And every choice as its own job, in one batch.
        let separate = questions.iter().flat_map(|q| choices(q, 0)).map(|w| JobInput::Score(vec![w])).collect();
        let mut separate = run(&engine, &spec, JobKind::Loglikelihood, separate).into_iter();
        for (qi, q) in questions.iter().enumerate() {
            let Output::Choices { logprobs, is_greedy, tokens, top } = &together[2 * qi] else { panic!("{name}: {:?}", together[2 * qi]) };
            let n = q["continuations"].as_array().unwrap().len();
            assert_eq!((logprobs.len(), is_greedy.len(), tokens.len(), top.len()), (n, n, n, 0), "{name} {qi}");
            for i in 0..n {
                let Some(Output::Score { logprob: alone, is_greedy: alone_greedy, tokens: alone_tokens, .. }) = separate.next() else { panic!("{name}: not a score") };
                let want = q["logprobs"][i].as_f64().unwrap();
                assert!(close(logprobs[i], want), "{name} {qi}/{i}: choice {} vs transformers {want}", logprobs[i]);
                assert!(close(logprobs[i], alone), "{name} {qi}/{i}: choice {} vs separate {alone}", logprobs[i]);
                assert_eq!((Some(is_greedy[i]), Some(is_greedy[i])), (q["is_greedy"][i].as_bool(), alone_greedy), "{name} {qi}/{i}");
                assert_eq!(tokens[i], alone_tokens, "{name} {qi}/{i}");
            }
        }
        // top_logprobs per choice: those of the choice's separate job.
        let asked = choices(&questions[0], 3);
        let Output::Choices { top, .. } = run(&engine, &spec, JobKind::Loglikelihood, vec![JobInput::Choices(asked.clone())]).remove(0) else { panic!("{name}") };
        assert_eq!(top.len(), asked.len(), "{name}");
        for (w, top) in asked.iter().zip(&top) {
            let Output::Score { top: alone, .. } = run(&engine, &spec, JobKind::Loglikelihood, vec![JobInput::Score(vec![w.clone()])]).remove(0) else { panic!("{name}") };
            assert_eq!(top.len(), w.continuation.len(), "{name}");
            for (a, b) in top.iter().zip(&alone) {
                assert_eq!(a.ids, b.ids, "{name}");
                a.logprobs.iter().zip(&b.logprobs).for_each(|(x, y)| assert!(close(f64::from(*x), f64::from(*y)), "{name}: top {x} vs {y}"));
            }
        }
        checked.push(name.clone());
    }
    assert!(checked.len() >= 2, "architectures checked: {checked:?}");
    eprintln!("FIGURES choices checked on {checked:?}");
}

// `dtype = "bf16" | "f16"` end to end, on the CPU (libtorch runs both there, so the reduced
// precision paths are exercised without a GPU): the fixture's decoders and encoders with their
// weights and activations in bf16 (f16 for two decoders) score, generate and encode close to
// transformers' f32 references. The tolerances below are the recorded ones; `scripts/gpu-check.sh`
// checks the same on CUDA against transformers in the same dtype.

/// |logprob error| / max(1, |logprob|) of a reduced-precision decoder against transformers' f32
/// (measured on the fixture, CPU, libtorch 2.11: bf16 ≤ 2.3e-2 (tiny-qwen2), f16 ≤ 1.8e-3).
const LOGPROB_TOL: [(&str, f64); 2] = [("bf16", 0.04), ("f16", 0.004)];
/// Least share of greedy tokens agreeing with transformers' f32 generations, per model and over
/// all bf16 decoders (measured: 18/36 for tiny-mistral, whose random logits have near-ties;
/// 276/324 over all; f16 36/36).
const GREEDY_AGREEMENT: (f64, f64) = (0.4, 0.8);
/// Least cosine of a bf16 embedding to sentence-transformers' f32 one (measured: 0.99991).
const EMBED_COSINE: f64 = 0.9995;
/// Largest |logit error| of a bf16 classifier over max(1, |f32 logits|) (measured: 0.037).
const CLASSIFY_TOL: f64 = 0.06;

/// The fixture's model `name` copied into `tmp`, its `jetbatch.toml` asking for `dtype`.
fn in_dtype(tmp: &Path, name: &str, dtype: &str) -> Arc<ModelPlan> {
    configured(tmp, name, dtype, &format!("dtype = \"{dtype}\""))
}

/// The fixture's model `name` copied into `tmp` (as `name-tag`), with `line` added to its
/// `jetbatch.toml`.
fn configured(tmp: &Path, name: &str, tag: &str, line: &str) -> Arc<ModelPlan> {
    let (dir, _) = fixture();
    let src = dir.join("models").join(name);
    let dst = tmp.join(format!("{name}-{tag}"));
    copy_dir(&src, &dst);
    let toml = std::fs::read_to_string(dst.join("jetbatch.toml")).unwrap();
    let key = line.split('=').next().unwrap().trim();
    assert!(!toml.contains(key), "{name}: the fixture sets no {key}");
    std::fs::write(dst.join("jetbatch.toml"), format!("{toml}\n{line}\n")).unwrap();
    Arc::new(ModelPlan::load(&dst).unwrap())
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        match std::fs::metadata(entry.path()).unwrap().is_dir() {
            true => copy_dir(&entry.path(), &dst.join(entry.file_name())),
            false => drop(std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap()),
        }
    }
}

#[test]
fn reduced_precision_decoders_score_and_generate_close_to_f32() {
    let engine = engine();
    let tmp = tempfile::tempdir().unwrap();
    let (_, refs) = fixture();
    let mut figures = Vec::new();
    let mut all_bf16 = (0, 0);
    for (name, r) in refs["models"].as_object().unwrap() {
        if r.get("generate").is_none() {
            continue;
        }
        let dtypes: &[&str] = if matches!(name.as_str(), "tiny-llama" | "tiny-qwen3") { &["bf16", "f16"] } else { &["bf16"] };
        for &dtype in dtypes {
            let tol = LOGPROB_TOL.iter().find(|(d, _)| *d == dtype).unwrap().1;
            let spec = in_dtype(tmp.path(), name, dtype);
            let cases = r["loglikelihood"].as_array().unwrap();
            let inputs = cases.iter().map(windows).collect();
            let mut worst = 0.0f64;
            for (i, (got, want)) in run(&engine, &spec, JobKind::Loglikelihood, inputs).iter().zip(cases).enumerate() {
                let Output::Score { logprob, .. } = got else { panic!("{name}: not a score") };
                let w = want["logprob"].as_f64().unwrap();
                let err = (logprob - w).abs() / w.abs().max(1.0);
                assert!(logprob.is_finite() && err <= tol, "{name} {dtype} loglikelihood {i}: {logprob} vs f32 {w}");
                worst = worst.max(err);
            }
            let gens = r["generate"].as_array().unwrap();
            let inputs = greedy_cases(gens, &spec.lm.as_ref().unwrap().config.eos_ids());
            // Greedy agreement: the tokens generated before the first that differs from f32's,
            // over all of f32's (once a near-tie flips, the rest of a generation follows it).
            let (mut agreed, mut total) = (0, 0);
            for (o, g) in run(&engine, &spec, JobKind::Generate, inputs).iter().zip(gens) {
                let Output::Generate { tokens, .. } = o else { panic!("{name}: not a generation") };
                let want = ids(&g["tokens"]);
                agreed += tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
                total += want.len();
            }
            let agreement = agreed as f64 / total as f64;
            assert!(agreement >= GREEDY_AGREEMENT.0, "{name} {dtype}: {agreed} of {total} greedy tokens agree with f32's");
            if dtype == "bf16" {
                all_bf16.0 += agreed;
                all_bf16.1 += total;
            }
            figures.push(format!("{name} {dtype}: worst relative logprob error {worst:.2e}, greedy tokens agreeing {agreed}/{total}"));
        }
    }
    assert!(figures.len() >= 6, "every fixture decoder ran: {figures:?}");
    assert!(all_bf16.0 as f64 >= GREEDY_AGREEMENT.1 * all_bf16.1 as f64, "bf16: {all_bf16:?} greedy tokens agree with f32's");
    eprintln!("FIGURES reduced precision (CPU) vs transformers f32:\n{}", figures.join("\n"));
}

#[test]
fn bf16_encoders_embed_and_classify_close_to_f32() {
    let engine = engine();
    let tmp = tempfile::tempdir().unwrap();
    let (_, refs) = fixture();
    let mut checked = 0;
    for (name, r) in refs["models"].as_object().unwrap() {
        if r.get("embed").is_none() && r.get("classify").is_none() {
            continue;
        }
        let spec = in_dtype(tmp.path(), name, "bf16");
        let encode = |r: &Value| encode_case(&spec, r);
        if let Some(cases) = r.get("embed").and_then(Value::as_array) {
            for (i, (got, want)) in run(&engine, &spec, JobKind::Embed, cases.iter().map(encode).collect()).iter().zip(cases).enumerate() {
                let Output::Embedding { embedding: e, .. } = got else { panic!() };
                let w: Vec<f64> = serde_json::from_value(want["embedding"].clone()).unwrap();
                let dot: f64 = e.iter().zip(&w).map(|(a, b)| *a as f64 * b).sum();
                let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
                let cos = dot / (norm(&mut e.iter().map(|&x| x as f64)) * norm(&mut w.iter().copied()));
                assert!(cos >= EMBED_COSINE, "{name} bf16 embed {i}: cosine {cos} to f32");
                checked += 1;
            }
        }
        if let Some(cases) = r.get("classify").and_then(Value::as_array) {
            for (i, (got, want)) in run(&engine, &spec, JobKind::Classify, cases.iter().map(encode).collect()).iter().zip(cases).enumerate() {
                let Output::Classification { logits, label_id, .. } = got else { panic!() };
                assert_eq!(*label_id as u64, want["label_id"].as_u64().unwrap(), "{name} bf16 classify {i}: the f32 label");
                let w: Vec<f64> = serde_json::from_value(want["logits"].clone()).unwrap();
                let err = logits.iter().zip(&w).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
                assert!(err <= CLASSIFY_TOL * w.iter().map(|x| x.abs()).fold(1.0, f64::max), "{name} bf16 classify {i}: logits {logits:?} vs f32 {w:?}");
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "the fixture has encoders");
}

/// Few-shot-shaped windows: a shared prefix of `prefix` tokens, then per question its own tokens,
/// and options of 1-3 tokens; ids from a fixed LCG below `vocab`.
fn few_shot(vocab: u32, prefix: usize, questions: usize, options: usize) -> (Vec<u32>, Vec<Vec<Window>>) {
    let mut seed = 11u64;
    let mut next = move |n: u32| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) % u64::from(n)) as u32
    };
    let shared: Vec<u32> = (0..prefix).map(|_| 3 + next(vocab - 3)).collect();
    let qs = (0..questions)
        .map(|_| {
            let mut context = shared.clone();
            let len = 4 + next(7) as usize;
            context.extend((0..len).map(|_| 3 + next(vocab - 3)));
            (0..options).map(|_| Window { context: context.clone(), continuation: (0..1 + next(3)).map(|_| 3 + next(vocab - 3)).collect(), top_logprobs: 0 }).collect()
        })
        .collect();
    (shared, qs)
}

/// The prefix cache changes no answer. On every decoder of the fixture (sliding windows shorter
/// than the shared prefix, soft-capping, GQA, LongRoPE, which does not use it), few-shot-shaped
/// jobs scored with the cache on equal the same jobs with it off (`prefix_cache_mb = 0`) within
/// 1e-4, greedy flags and token counts equal: cold (the batch's shared prefix computed once, then
/// its rows over it), each alone afterwards (warm), in a batch that mixes new questions over the
/// cached prefix with left-truncated contexts (which must not share it), unshared windows and
/// choices jobs, and rolling windows; greedy generations over the prefix give the same tokens,
/// in a batch and alone over cached prompts. The cache was used: its hit counter moved.
#[test]
fn the_prefix_cache_changes_no_score_on_any_decoder() {
    let metrics = Arc::new(Metrics::new("prefix-test"));
    let engine = EngineHandle::start(metrics.clone(), 0).0;
    let tmp = tempfile::tempdir().unwrap();
    let (_, refs) = fixture();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs().max(1.0);
    let mut checked = Vec::new();
    for (name, r) in refs["models"].as_object().unwrap() {
        if r.get("generate").is_none() {
            continue;
        }
        let on = load(name);
        let off = configured(tmp.path(), name, "no-prefix", "prefix_cache_mb = 0");
        let (shared, qs) = few_shot(300, 24, 12, 3);
        let score = |w: &Window| JobInput::Score(vec![w.clone()]);
        let cold: Vec<JobInput> = qs[..6].iter().flatten().map(score).collect();
        let mut mixed: Vec<JobInput> = Vec::new();
        for (i, q) in qs[6..].iter().enumerate() {
            match i % 2 {
                0 => mixed.extend(q.iter().map(score)),
                _ => mixed.push(JobInput::Choices(q.clone())),
            }
            let mut truncated = q[0].clone();
            truncated.context.drain(..1 + i);
            mixed.push(score(&truncated));
            mixed.push(score(&Window { context: vec![5 + i as u32; 3], continuation: vec![7, 8], top_logprobs: 0 }));
        }
        let rolling = vec![JobInput::Score(vec![
            Window { context: vec![0], continuation: shared[..20].to_vec(), top_logprobs: 0 },
            Window { context: shared[..20].to_vec(), continuation: shared[20..].to_vec(), top_logprobs: 0 },
        ])];
        let warm: Vec<Vec<JobInput>> = cold.iter().map(|j| vec![j.clone()]).collect();
        let counter = |spec: &ModelPlan| metrics.prefix_hit_tokens_total.with_label_values(&[&spec.name]).get();
        let hits_before = counter(&on);
        for (what, kind, batches) in [
            ("cold", JobKind::Loglikelihood, vec![cold.clone()]),
            ("warm", JobKind::Loglikelihood, warm),
            ("mixed", JobKind::Loglikelihood, vec![mixed]),
            ("rolling", JobKind::LoglikelihoodRolling, vec![rolling]),
        ] {
            for batch in batches {
                let (a, b) = (run(&engine, &on, kind, batch.clone()), run(&engine, &off, kind, batch));
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    match (x, y) {
                        (Output::Score { logprob: p, is_greedy: g, tokens: t, .. }, Output::Score { logprob: q, is_greedy: h, tokens: u, .. }) => {
                            assert!(close(*p, *q), "{name} {what} {i}: {p} with the cache vs {q} without");
                            assert_eq!((g, t), (h, u), "{name} {what} {i}");
                        }
                        (Output::Choices { logprobs: p, is_greedy: g, .. }, Output::Choices { logprobs: q, is_greedy: h, .. }) => {
                            p.iter().zip(q).for_each(|(p, q)| assert!(close(*p, *q), "{name} {what} {i}: {p} with the cache vs {q} without"));
                            assert_eq!(g, h, "{name} {what} {i}");
                        }
                        other => panic!("{name} {what} {i}: {other:?}"),
                    }
                }
            }
        }
        let scoring_hits = counter(&on) - hits_before;
        // Generation: prompts over the shared prefix, in one batch (cold), then each alone over
        // the cached prompts: the same greedy tokens as with the cache off.
        let eos = on.lm.as_ref().unwrap().config.eos_ids();
        // New prompts (a token before the questions' contexts): the shared 25 tokens are
        // computed once for the batch, then each prompt alone finds all but its last token.
        let prompts: Vec<JobInput> = qs
            .iter()
            .take(6)
            .map(|q| {
                let prompt = [&[7u32][..], &q[0].context].concat();
                greedy_cases(&[serde_json::json!({"prompt_ids": prompt, "max_new_tokens": 6})], &eos).remove(0)
            })
            .collect();
        let mut batches = vec![prompts.clone()];
        batches.extend(prompts.iter().map(|p| vec![p.clone()]));
        for (b, batch) in batches.into_iter().enumerate() {
            let (a, x) = (run(&engine, &on, JobKind::Generate, batch.clone()), run(&engine, &off, JobKind::Generate, batch));
            for (i, (p, q)) in a.iter().zip(&x).enumerate() {
                let (Output::Generate { tokens: p, .. }, Output::Generate { tokens: q, .. }) = (p, q) else { panic!("{name}: not a generation") };
                assert_eq!(p, q, "{name} generate batch {b} row {i}: with the cache vs without");
            }
        }
        let generation_hits = counter(&on) - hits_before - scoring_hits;
        let uses = on.lm.as_ref().unwrap().config.rope().map(|r| !matches!(r.scaling, jetbatch::hf_config::RopeScaling::LongRope { .. })).unwrap_or(true);
        match uses {
            // At least the shared prefix for every question but the first; for generation, the
            // shared prefix for every prompt of the batch, and every prompt but its last token
            // when it runs alone after it.
            true => {
                assert!(scoring_hits >= 24 * 11, "{name}: {scoring_hits} prefix tokens from the cache");
                assert!(generation_hits >= 6 * 25 + 6 * 28, "{name}: {generation_hits} prompt tokens from the cache");
            }
            false => assert_eq!(scoring_hits + generation_hits, 0, "{name}: LongRoPE keys depend on the row's length"),
        }
        assert_eq!(counter(&off), 0, "{name}: off is off");
        checked.push((name.clone(), scoring_hits, generation_hits));
    }
    assert!(checked.len() >= 8, "{checked:?}");
    eprintln!("FIGURES prefix tokens served from the cache per decoder: {checked:?}");
}

/// Runs `inputs` as one streamed engine call: the outputs in order, and each job's streamed text.
fn run_streamed(engine: &EngineHandle, spec: &Arc<ModelPlan>, inputs: Vec<JobInput>) -> (Vec<Output>, Vec<String>) {
    let n = inputs.len();
    let mut events = engine.run(spec.clone(), JobKind::Generate, inputs, vec![true; n], Vec::new());
    let mut out: Vec<Option<Output>> = (0..n).map(|_| None).collect();
    let mut streamed = vec![String::new(); n];
    while out.iter().any(Option::is_none) {
        match events.blocking_recv() {
            Some(Event::Done { index, result, .. }) => out[index] = Some(result.unwrap_or_else(|e| panic!("{}: {e}", spec.name))),
            Some(Event::Chunk { index, chunk }) => streamed[index].push_str(&chunk.text),
            None => panic!("engine stopped"),
        }
    }
    (out.into_iter().map(Option::unwrap).collect(), streamed)
}

fn generated(o: &Output) -> &[u32] {
    let Output::Generate { tokens, .. } = o else { panic!("not a generation") };
    tokens
}

/// Drafts (of up to `k` tokens) whose first token the greedy generation `tokens` of `prompt`
/// chose: those a speculating engine accepts.
fn agreeing_drafts(prompt: &[u32], tokens: &[u32], k: usize) -> usize {
    let seq: Vec<u32> = prompt.iter().chain(tokens).copied().collect();
    (prompt.len()..seq.len() - 1).filter(|&end| jetbatch::engine::draft::draft(&seq[..end], k).first() == Some(&seq[end])).count()
}

/// Exact greedy speculation changes no token. On every decoder of the fixture, generations with
/// drafts (`speculate_tokens = 4`) equal those without (`0`) — tokens, text, finish reason and
/// streamed text — for prompts that repeat themselves, chosen so that the model's own greedy
/// tokens agree with drafts (random weights rarely continue a pattern): each alone; in one batch
/// with sampled rows (which do not draft) and a `top_logprobs` row; with `max_new_tokens` at
/// every length, and stop strings and stop tokens taken from every position of a generation, so
/// that generations end inside accepted drafts. Drafts were accepted (the counter moved) except
/// under LongRoPE, which does not draft.
#[test]
fn greedy_speculation_changes_no_token_on_any_decoder() {
    let metrics = Arc::new(Metrics::new("speculation-test"));
    let engine = EngineHandle::start(metrics.clone(), 0).0;
    let tmp = tempfile::tempdir().unwrap();
    let (_, refs) = fixture();
    let mut checked = Vec::new();
    let greedy_job = |prompt: Vec<u32>, max_new_tokens: usize, stop: Vec<String>, stop_token_ids: Vec<u32>| {
        JobInput::Generate(GenerateInput { prompt, max_new_tokens, sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None }, stop, stop_token_ids, top_logprobs: 0 })
    };
    // A phrase of `period` tokens repeated.
    let repeating = |seed: u32, period: u32, len: usize| -> Vec<u32> { (0..len as u32).map(|i| 3 + (seed * 53 + (i % period) * 29) % 250).collect() };
    for (name, r) in refs["models"].as_object().unwrap() {
        if r.get("generate").is_none() {
            continue;
        }
        let on = configured(tmp.path(), name, "spec", "speculate_tokens = 4");
        let off = configured(tmp.path(), name, "no-spec", "speculate_tokens = 0");
        // Prompts whose generations agree with drafts, most agreeing first.
        let candidates: Vec<Vec<u32>> = (0..24).map(|s| repeating(s, 1 + s % 6, 16 + s as usize % 5)).collect();
        let outs = run(&engine, &off, JobKind::Generate, candidates.iter().map(|p| greedy_job(p.clone(), 24, vec![], vec![])).collect());
        let mut ranked: Vec<(usize, Vec<u32>, Vec<u32>)> = candidates.into_iter().zip(&outs).map(|(p, o)| (agreeing_drafts(&p, generated(o), 4), p, generated(o).to_vec())).collect();
        ranked.sort_by_key(|r| std::cmp::Reverse(r.0));
        assert!(ranked[0].0 > 0, "{name}: no prompt whose generation agrees with a draft");
        let sampled = |seed: u64| {
            let sampling = Sampling { temperature: 0.8, top_k: 0, top_p: 0.95, seed: Some(seed) };
            JobInput::Generate(GenerateInput { prompt: repeating(seed as u32, 3, 9), max_new_tokens: 20, sampling, stop: vec![], stop_token_ids: vec![], top_logprobs: 0 })
        };
        let base: Vec<JobInput> = ranked[..4].iter().map(|(_, p, _)| greedy_job(p.clone(), 24, vec![], vec![])).collect();
        let mut with_top = greedy_job(ranked[4].1.clone(), 12, vec![], vec![]);
        if let JobInput::Generate(g) = &mut with_top {
            g.top_logprobs = 2;
        }
        let mut batches: Vec<Vec<JobInput>> = base.iter().map(|j| vec![j.clone()]).collect();
        batches.push(base.iter().cloned().chain([sampled(1), sampled(2), with_top]).collect());
        // Ends at every position of a generation: its length, a stop token, stop strings (the text
        // of the tokens ending there, 1 to 3 of them). A stop ends a generation at its first
        // occurrence, and drafts copy earlier tokens: the prompt holds the start of the most
        // agreeing generation, so that its continuation's first occurrences may be drafted
        // already, and stop strings of several tokens first occur late in a repetition.
        let (_, prompt, tokens) = &ranked[0];
        let prompt: Vec<u32> = prompt.iter().chain(&tokens[..tokens.len() / 2]).copied().collect();
        let tokens = generated(&run(&engine, &off, JobKind::Generate, vec![greedy_job(prompt.clone(), 24, vec![], vec![])])[0]).to_vec();
        let tokenizer = &on.lm.as_ref().unwrap().tokenizer;
        for at in 1..tokens.len() {
            let mut ends = vec![greedy_job(prompt.clone(), at, vec![], vec![]), greedy_job(prompt.clone(), 24, vec![], vec![tokens[at]])];
            for from in at.saturating_sub(2)..=at {
                let piece = tokenizer.decode(&tokens[from..=at], true).unwrap();
                if !piece.trim().is_empty() {
                    ends.push(greedy_job(prompt.clone(), 24, vec![piece], vec![]));
                }
            }
            batches.push(ends);
        }
        let accepted = |spec: &ModelPlan| metrics.speculated_accepted_tokens_total.with_label_values(&[&spec.name]).get();
        let drafted = |spec: &ModelPlan| metrics.speculated_tokens_total.with_label_values(&[&spec.name]).get();
        let mut mixed_accepted = 0;
        for (b, batch) in batches.into_iter().enumerate() {
            let before = accepted(&on);
            let (a, sa) = run_streamed(&engine, &on, batch.clone());
            if b == base.len() {
                mixed_accepted = accepted(&on) - before;
            }
            let (x, sx) = run_streamed(&engine, &off, batch);
            for (i, (p, q)) in a.iter().zip(&x).enumerate() {
                let (Output::Generate { tokens: p, text: tp, finish_reason: fp, top: op, .. }, Output::Generate { tokens: q, text: tq, finish_reason: fq, top: oq, .. }) = (p, q) else {
                    panic!("{name}: not a generation")
                };
                assert_eq!((p, tp, fp), (q, tq, fq), "{name} batch {b} row {i}: with drafts vs without");
                assert_eq!(op.len(), oq.len(), "{name} batch {b} row {i}: top log-probs");
                assert_eq!(sa[i], *tp, "{name} batch {b} row {i}: the streamed text is the text");
                assert_eq!(sa[i], sx[i], "{name} batch {b} row {i}: streamed with drafts vs without");
            }
        }
        let longrope = on.lm.as_ref().unwrap().config.rope().is_ok_and(|r| matches!(r.scaling, jetbatch::hf_config::RopeScaling::LongRope { .. }));
        let (d, k) = (drafted(&on), accepted(&on));
        match longrope {
            true => assert_eq!((d, k), (0, 0), "{name}: LongRoPE drafts nothing"),
            false => {
                assert!(k > 0 && d >= k, "{name}: {k} of {d} drafted tokens accepted");
                assert!(mixed_accepted > 0, "{name}: drafts accepted beside sampled rows");
            }
        }
        assert_eq!((drafted(&off), accepted(&off)), (0, 0), "{name}: off is off");
        checked.push((name.clone(), ranked[0].0, d, k, mixed_accepted));
    }
    assert!(checked.len() >= 8, "{checked:?}");
    eprintln!("FIGURES per decoder: agreeing drafts of the best prompt, tokens drafted, accepted, accepted beside sampled rows: {checked:?}");
}
