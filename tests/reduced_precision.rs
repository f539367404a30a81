//! `dtype = "bf16" | "f16"` end to end, on the CPU (libtorch runs both there, so the reduced
//! precision paths are exercised without a GPU): the fixture's decoders and encoders with their
//! weights and activations in bf16 (f16 for two decoders) score, generate and encode close to
//! transformers' f32 references. The tolerances below are the recorded ones; `scripts/gpu-check.sh`
//! checks the same on CUDA against transformers in the same dtype.

mod lm_fixture;

use std::path::Path;
use std::sync::Arc;

use jetbatch::engine::{EngineHandle, Event};
use jetbatch::job::{JobInput, JobKind, Output};
use jetbatch::kinds::{GenerateInput, Sampling, Window};
use jetbatch::metrics::Metrics;
use jetbatch::repository::ModelSpec;
use lm_fixture::fixture;
use serde_json::Value;

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

fn run(engine: &EngineHandle, spec: &Arc<ModelSpec>, kind: JobKind, inputs: Vec<JobInput>) -> Vec<Output> {
    let n = inputs.len();
    let mut events = engine.run(spec.clone(), kind, inputs, vec![false; n]);
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

/// The fixture's model `name` copied into `tmp`, its `jetbatch.toml` asking for `dtype`.
fn in_dtype(tmp: &Path, name: &str, dtype: &str) -> Arc<ModelSpec> {
    let (dir, _) = fixture();
    let src = dir.join("models").join(name);
    let dst = tmp.join(format!("{name}-{dtype}"));
    copy_dir(&src, &dst);
    let toml = std::fs::read_to_string(dst.join("jetbatch.toml")).unwrap();
    assert!(!toml.contains("dtype"), "{name}: the fixture sets no dtype");
    std::fs::write(dst.join("jetbatch.toml"), format!("{toml}\ndtype = \"{dtype}\"\n")).unwrap();
    Arc::new(ModelSpec::load(&dst).unwrap())
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

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn reduced_precision_decoders_score_and_generate_close_to_f32() {
    let engine = EngineHandle::start(Arc::new(Metrics::new("reduced-precision")), 0).0;
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
            let inputs = cases
                .iter()
                .map(|c| JobInput::Score(c["scored"].as_array().unwrap().iter().map(|w| Window { context: ids(&w[0]), continuation: ids(&w[1]), top_logprobs: 0 }).collect()))
                .collect();
            let mut worst = 0.0f64;
            for (i, (got, want)) in run(&engine, &spec, JobKind::Loglikelihood, inputs).iter().zip(cases).enumerate() {
                let Output::Score { logprob, .. } = got else { panic!("{name}: not a score") };
                let w = want["logprob"].as_f64().unwrap();
                let err = (logprob - w).abs() / w.abs().max(1.0);
                assert!(logprob.is_finite() && err <= tol, "{name} {dtype} loglikelihood {i}: {logprob} vs f32 {w}");
                worst = worst.max(err);
            }
            let gens = r["generate"].as_array().unwrap();
            let eos = spec.lm.as_ref().unwrap().config.eos_ids();
            let inputs = gens
                .iter()
                .map(|g| {
                    JobInput::Generate(GenerateInput {
                        prompt: ids(&g["prompt_ids"]),
                        max_new_tokens: g["max_new_tokens"].as_u64().unwrap() as usize,
                        sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None },
                        stop: vec![],
                        stop_token_ids: eos.clone(),
                        top_logprobs: 0,
                    })
                })
                .collect();
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
    let engine = EngineHandle::start(Arc::new(Metrics::new("reduced-precision")), 0).0;
    let tmp = tempfile::tempdir().unwrap();
    let (_, refs) = fixture();
    let mut checked = 0;
    for (name, r) in refs["models"].as_object().unwrap() {
        if r.get("embed").is_none() && r.get("classify").is_none() {
            continue;
        }
        let spec = in_dtype(tmp.path(), name, "bf16");
        let tok = &spec.lm.as_ref().unwrap().tokenizer;
        let encode = |r: &Value| {
            let e = match r["text_pair"].as_str() {
                Some(pair) => tok.encode((r["text"].as_str().unwrap(), pair), true),
                None => tok.encode(r["text"].as_str().unwrap(), true),
            }
            .unwrap();
            JobInput::Encode { ids: e.get_ids().to_vec(), type_ids: e.get_type_ids().to_vec(), normalize: true }
        };
        if let Some(cases) = r.get("embed").and_then(Value::as_array) {
            for (i, (got, want)) in run(&engine, &spec, JobKind::Embed, cases.iter().map(encode).collect()).iter().zip(cases).enumerate() {
                let Output::Embedding(e) = got else { panic!() };
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
