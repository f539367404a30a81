//! The `hf` backend over the bus against transformers / sentence-transformers references
//! computed in test setup (tests/fixtures/make_lm_models.py) on the same weights.

mod common;
mod lm_fixture;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use lm_fixture::{fixture, python};
use jetbatch::job::{ErrorCode, JobResult, Status};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

/// A harness whose repository also holds the fixture's models.
async fn harness() -> Harness {
    let (dir, _) = fixture();
    let h = Harness::new().await;
    for entry in std::fs::read_dir(dir.join("models")).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), h.models.join(entry.file_name())).unwrap();
    }
    h
}

fn job(id: &str, model: &str, kind: &str, input: Value, params: Value) -> rmpv::Value {
    let v = json!({"id": id, "model": model, "kind": kind, "input": input, "params": params});
    rmpv::ext::to_value(v).unwrap()
}

fn output(r: &JobResult) -> Value {
    assert_eq!(r.status, Status::Ok, "{r:?}");
    serde_json::to_value(r.output.as_ref().unwrap()).unwrap()
}

/// All requests of a decoder's references, published as one burst so they share batches.
fn decoder_jobs(model: &str, refs: &Value) -> Vec<(String, rmpv::Value, Value)> {
    let mut jobs = Vec::new();
    for (i, r) in refs["loglikelihood"].as_array().unwrap().iter().enumerate() {
        let input = if r.get("context_tokens").is_some() {
            json!({"context_tokens": r["context_tokens"], "continuation_tokens": r["continuation_tokens"]})
        } else {
            json!({"context": r["context"], "continuation": r["continuation"]})
        };
        let id = format!("{model}-ll-{i}");
        jobs.push((id.clone(), job(&id, model, "loglikelihood", input, json!({})), r.clone()));
    }
    for (i, r) in refs["loglikelihood_rolling"].as_array().unwrap().iter().enumerate() {
        let id = format!("{model}-roll-{i}");
        jobs.push((id.clone(), job(&id, model, "loglikelihood_rolling", json!({"text": r["text"]}), json!({})), r.clone()));
    }
    for (i, r) in refs["generate"].as_array().unwrap().iter().enumerate() {
        let id = format!("{model}-gen-{i}");
        jobs.push((id.clone(), job(&id, model, "generate", json!({"prompt": r["prompt"]}), json!({"max_new_tokens": r["max_new_tokens"]})), r.clone()));
    }
    jobs
}

#[tokio::test]
async fn decoders_match_transformers_batched_and_alone() {
    let h = harness().await;
    let (_, refs) = fixture();
    let _w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    let mut worst = HashMap::new();
    // Gemma: text encoded with BOS, as the harness encodes it for Gemma.
    for model in ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-mistral", "tiny-llama3", "tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-gemma3"] {
        let jobs = decoder_jobs(model, &refs["models"][model]);
        // Batched: one burst, requests of very different lengths side by side.
        let wire: Vec<rmpv::Value> = jobs.iter().map(|(_, j, _)| j.clone()).collect();
        burst(&h, &wire).await;
        let batched = collect(&mut sub, jobs.len(), MINUTE).await;
        // Alone: each request by itself (a new id, no cache), one at a time.
        let mut alone = HashMap::new();
        for (id, j, _) in &jobs {
            let mut single = serde_json::to_value(rmpv::ext::from_value::<Value>(j.clone()).unwrap()).unwrap();
            single["id"] = json!(format!("{id}-alone"));
            single["cache"] = json!(false);
            h.publish(&rmpv::ext::to_value(&single).unwrap(), jetbatch::job::Encoding::MsgPack).await;
            let got = collect(&mut sub, 1, MINUTE).await;
            alone.insert(id.clone(), got.into_values().next().unwrap().remove(0));
        }
        let mut max_batch = 0;
        for (id, _, want) in &jobs {
            let r = &batched[id][0];
            max_batch = max_batch.max(r.timing.batch_size);
            let got = output(r);
            let single = output(&alone[id]);
            if id.contains("-gen-") {
                assert_eq!(got["tokens"], want["tokens"], "{id}: greedy tokens equal transformers'");
                assert_eq!(got["prompt_tokens"], want["prompt_tokens"], "{id}");
                assert_eq!(single["tokens"], got["tokens"], "{id}: batched == alone");
                let reason = if want["tokens"].as_array().unwrap().last() == Some(&json!(1)) { "eos" } else { "length" };
                assert_eq!(got["finish_reason"], reason, "{id}");
            } else {
                let (g, w) = (got["logprob"].as_f64().unwrap(), want["logprob"].as_f64().unwrap());
                let err = (g - w).abs();
                let e = worst.entry(model).or_insert(0.0f64);
                *e = e.max(err / w.abs().max(1.0));
                assert!(err <= 1e-4 * w.abs().max(1.0), "{id}: logprob {g} vs transformers {w}");
                assert_eq!(got["tokens"], want["tokens"], "{id}: scored tokens");
                if id.contains("-ll-") {
                    assert_eq!(got["is_greedy"], want["is_greedy"], "{id}");
                }
                let s = single["logprob"].as_f64().unwrap();
                assert!((s - g).abs() <= 1e-4 * g.abs().max(1.0), "{id}: batched {g} vs alone {s}");
            }
        }
        assert!(max_batch > 1, "{model}: requests shared batches");
    }
    eprintln!("FIGURES worst relative logprob error vs transformers (fp32): {worst:?}");
}

#[tokio::test]
async fn encoders_match_transformers_and_sentence_transformers() {
    let h = harness().await;
    let (_, refs) = fixture();
    let _w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    // (model, kind, its labels by id): BERT and XLM-RoBERTa classifiers and embedders.
    let models = [
        ("tiny-bert-cls", "classify", &["neg", "neutral", "pos"][..]),
        ("tiny-xlmr-cls", "classify", &["no", "yes"][..]),
        ("minilm", "embed", &[][..]),
        ("tiny-xlmr", "embed", &[][..]),
    ];
    let mut jobs = Vec::new();
    for (model, kind, labels) in models {
        for (i, r) in refs["models"][model][kind].as_array().unwrap().iter().enumerate() {
            let mut input = json!({"text": r["text"]});
            if !r["text_pair"].is_null() {
                input["text_pair"] = r["text_pair"].clone();
            }
            let id = format!("{model}-{i}");
            jobs.push((id.clone(), job(&id, model, kind, input, json!({})), r.clone(), labels));
        }
    }
    let wire: Vec<rmpv::Value> = jobs.iter().map(|(_, j, _, _)| j.clone()).collect();
    burst(&h, &wire).await;
    let got = collect(&mut sub, jobs.len(), MINUTE).await;
    let mut min_cos = 1.0f64;
    for (id, _, want, labels) in &jobs {
        let out = output(&got[id][0]);
        if !labels.is_empty() {
            let logits: Vec<f64> = serde_json::from_value(out["logits"].clone()).unwrap();
            let expect: Vec<f64> = serde_json::from_value(want["logits"].clone()).unwrap();
            assert_close(&logits, &expect, 1e-4, id);
            assert_eq!(out["label_id"], want["label_id"]);
            assert_eq!(out["label"], labels[want["label_id"].as_u64().unwrap() as usize]);
            let probs: Vec<f64> = serde_json::from_value(out["probs"].clone()).unwrap();
            assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5);
        } else {
            let e: Vec<f64> = serde_json::from_value(out["embedding"].clone()).unwrap();
            let w: Vec<f64> = serde_json::from_value(want["embedding"].clone()).unwrap();
            assert_eq!((out["dim"].as_u64(), e.len()), (Some(w.len() as u64), w.len()));
            let dot: f64 = e.iter().zip(&w).map(|(a, b)| a * b).sum();
            let cos = dot / (e.iter().map(|a| a * a).sum::<f64>().sqrt() * w.iter().map(|b| b * b).sum::<f64>().sqrt());
            min_cos = min_cos.min(cos);
            assert!(cos >= 0.9999, "{id}: cosine {cos} to the reference");
        }
    }
    eprintln!("FIGURES encoders (all-MiniLM-L6-v2 vs sentence-transformers, XLM-R vs transformers) min cosine: {min_cos:.7}");
}

#[tokio::test]
async fn over_long_inputs_and_unknown_architectures() {
    let h = harness().await;
    let _w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    // 48 positions: a prompt of 60 tokens leaves no room to generate.
    let long_prompt: Vec<u32> = (3..63).collect();
    h.publish(&job("long-gen", "tiny-llama", "generate", json!({"prompt_tokens": long_prompt}), json!({})), jetbatch::job::Encoding::MsgPack).await;
    h.publish(&job("big-new", "tiny-llama", "generate", json!({"prompt": "the"}), json!({"max_new_tokens": 100000})), jetbatch::job::Encoding::MsgPack).await;
    h.publish(&job("bad-token", "tiny-llama", "loglikelihood", json!({"context_tokens": [1], "continuation_tokens": [99999]}), json!({})), jetbatch::job::Encoding::MsgPack).await;
    // Scoring kinds truncate instead: a 200-token context is cut from the left.
    let long_ctx: Vec<u32> = (0..200).map(|i| 3 + (i % 300)).collect();
    h.publish(&job("long-ll", "tiny-llama", "loglikelihood", json!({"context_tokens": long_ctx, "continuation_tokens": [5, 6]}), json!({})), jetbatch::job::Encoding::MsgPack).await;
    let got = collect(&mut sub, 4, MINUTE).await;
    let err = |id: &str| got[id][0].error.clone().unwrap_or_else(|| panic!("{id} should fail"));
    assert_eq!(err("long-gen").code, ErrorCode::BadRequest);
    assert!(err("long-gen").message.contains("no room to generate"), "{}", err("long-gen").message);
    assert!(err("big-new").message.starts_with("params.max_new_tokens"));
    assert!(err("bad-token").message.starts_with("input.continuation_tokens"));
    let ll = output(&got["long-ll"][0]);
    assert_eq!(ll["tokens"], 2);
    assert!(ll["logprob"].as_f64().unwrap() < 0.0);

    // An architecture the backend does not implement is refused at load with a clear message.
    let weird = h.dir.path().join("weird");
    std::fs::create_dir_all(weird.join("falcon")).unwrap();
    std::fs::write(weird.join("falcon/config.json"), r#"{"architectures": ["FalconForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 8, "max_position_embeddings": 8}"#).unwrap();
    std::fs::write(weird.join("falcon/jetbatch.toml"), "backend = \"hf\"\n").unwrap();
    let repo = jetbatch::repository::Repository::scan(&weird).unwrap();
    let msg = repo.invalid["falcon"].to_string();
    assert!(msg.contains("architecture 'FalconForCausalLM' is not supported"), "{msg}");
}

async fn answer(h: &Harness, sub: &mut async_nats::Subscriber, id: &str, input: Value, params: Value) -> JobResult {
    h.publish(&job(id, "tiny-llama", "generate", input, params), jetbatch::job::Encoding::MsgPack).await;
    collect(sub, 1, MINUTE).await.remove(id).unwrap_or_else(|| panic!("no result for {id}")).remove(0)
}

#[tokio::test]
async fn generation_stats_count_the_rows_jobs_ran_beside_the_tokens_and_the_first_token() {
    let h = harness().await;
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let jobs: Vec<_> = (0..4)
        .map(|i| job(&format!("g-{i}"), "tiny-llama", "generate", json!({"prompt": "the quick"}), json!({"max_new_tokens": 6 + 4 * i, "stop_token_ids": []})))
        .collect();
    burst(&h, &jobs).await;
    let results = collect(&mut sub, jobs.len(), MINUTE).await;
    let tokens: usize = results.values().map(|r| output(&r[0])["tokens"].as_array().unwrap().len()).sum();
    let rows: Vec<usize> = results.values().map(|r| r[0].timing.batch_size).collect();
    assert_eq!(tokens, 6 + 10 + 14 + 18);
    assert!(rows.iter().any(|&r| r > 1), "the jobs shared the running batch: {rows:?}");
    let instance = jetbatch::pool::find(&h.client, "jetbatch", "w1", jetbatch::pool::DISCOVERY_WINDOW).await.unwrap();
    let stats: jetbatch::pool::WorkerStats =
        jetbatch::pool::call(&h.client, instance.subject(jetbatch::pool::verb::STATS), &json!({}), jetbatch::pool::CALL_TIMEOUT).await.unwrap();
    let gen = &stats.batches["tiny-llama"];
    // One entry per job, the rows its result reports (not 1 per job, as each comes alone).
    assert_eq!(gen.batches, 4);
    assert!((gen.mean_size - rows.iter().sum::<usize>() as f64 / 4.0).abs() < 1e-9, "{gen:?} vs {rows:?}");
    assert_eq!(gen.generated_tokens, tokens as u64);
    assert_eq!(w.metric("jetbatch_generated_tokens_total{model=\"tiny-llama\"}").await, tokens as f64);
    // Time to first token: one observation a job, no longer than the job's own compute.
    assert_eq!(w.metric("jetbatch_time_to_first_token_seconds_count{model=\"tiny-llama\"}").await, 4.0);
    let longest = results.values().map(|r| r[0].timing.compute_ms).fold(0.0, f64::max);
    assert!(gen.time_to_first_token_ms > 0.0 && gen.time_to_first_token_ms <= longest + 1.0, "{gen:?}, compute up to {longest} ms");
    // Every prompt was looked up in the prefix cache (hits depend on who joined together).
    assert!(gen.prefix_lookup_tokens > 0 && gen.prefix_hit_tokens <= gen.prefix_lookup_tokens, "{gen:?}");
}

#[tokio::test]
async fn seeded_sampling_is_reproducible_across_batches_and_workers_and_cached() {
    let h = harness().await;
    let w1 = h.worker("w1", &["--cache-dir", h.dir.path().join("c1").to_str().unwrap()]);
    let mut sub = h.subscribe_results().await;
    let prompt = json!({"prompt": "the quick"});
    let sampled = |seed: u64| json!({"max_new_tokens": 12, "temperature": 1.5, "top_k": 40, "top_p": 0.95, "seed": seed});
    // Alone.
    let alone = output(&answer(&h, &mut sub, "s-alone", prompt.clone(), sampled(42)).await);
    // In a batch with other generations of different lengths and settings.
    let mut jobs = vec![job("s-batched", "tiny-llama", "generate", prompt.clone(), sampled(42))];
    for (i, p) in ["a batch of jobs waits on the bus for", "numbers like", "rolling windows cover a long text"].iter().enumerate() {
        jobs.push(job(&format!("s-other-{i}"), "tiny-llama", "generate", json!({"prompt": p}), json!({"max_new_tokens": 5 + i * 7, "temperature": 0.7, "seed": i})));
    }
    let mut uncached = jobs[0].clone();
    if let rmpv::Value::Map(m) = &mut uncached {
        m.push(("cache".into(), false.into()));
    }
    jobs[0] = uncached;
    burst(&h, &jobs).await;
    let batched = collect(&mut sub, jobs.len(), MINUTE).await;
    let b = &batched["s-batched"][0];
    assert!(b.timing.batch_size > 1 && !b.cached, "{:?}", b.timing);
    assert_eq!(output(b)["tokens"], alone["tokens"], "same seed, same tokens, whatever shares the batch");
    // Another worker process, cache off.
    drop(w1);
    let _w2 = h.worker("w2", &[]);
    let mut p = sampled(42);
    p["max_new_tokens"] = json!(12);
    let mut other = job("s-w2", "tiny-llama", "generate", prompt.clone(), p);
    if let rmpv::Value::Map(m) = &mut other {
        m.push(("cache".into(), false.into()));
    }
    h.publish(&other, jetbatch::job::Encoding::MsgPack).await;
    let w2 = collect(&mut sub, 1, MINUTE).await.remove("s-w2").unwrap().remove(0);
    assert_eq!(output(&w2)["tokens"], alone["tokens"], "same tokens on another worker");
    assert_eq!(w2.worker, "w2");
    // A different seed draws differently; greedy differs from sampling at this temperature.
    let seed43 = output(&answer(&h, &mut sub, "s-43", prompt.clone(), sampled(43)).await);
    assert_ne!(seed43["tokens"], alone["tokens"]);
    // Cache: the seeded job is cached (on a worker with a cache); an unseeded one never is.
    drop(_w2);
    let _w3 = h.worker("w3", &["--cache-dir", h.dir.path().join("c3").to_str().unwrap()]);
    assert!(!answer(&h, &mut sub, "c-seeded-1", prompt.clone(), sampled(7)).await.cached);
    let again = answer(&h, &mut sub, "c-seeded-2", prompt.clone(), sampled(7)).await;
    assert!(again.cached, "seeded sampling is deterministic, so cached");
    let unseeded = json!({"max_new_tokens": 12, "temperature": 1.5});
    assert!(!answer(&h, &mut sub, "c-free-1", prompt.clone(), unseeded.clone()).await.cached);
    assert!(!answer(&h, &mut sub, "c-free-2", prompt.clone(), unseeded).await.cached, "unseeded sampling is never cached");
}

#[tokio::test]
async fn stop_strings_finish_reasons_and_streaming() {
    let h = harness().await;
    let _w = h.worker("w1", &["--cache-dir", h.dir.path().join("c").to_str().unwrap()]);
    let mut sub = h.subscribe_results().await;
    let prompt = json!({"prompt": "a batch of jobs waits on the bus for"});
    let full = output(&answer(&h, &mut sub, "full", prompt.clone(), json!({"max_new_tokens": 16})).await);
    let text = full["text"].as_str().unwrap().to_string();
    assert_eq!(full["finish_reason"], "length");
    // A stop string from the middle of the greedy text.
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = chars[chars.len() / 2].0;
    let stop: String = text[at..].chars().take(3).collect();
    let first = text.find(&stop).unwrap();
    let cut = output(&answer(&h, &mut sub, "cut", prompt.clone(), json!({"max_new_tokens": 16, "stop": [stop.clone(), "never-appears"]})).await);
    assert_eq!(cut["finish_reason"], "stop");
    assert_eq!(cut["text"].as_str().unwrap(), &text[..first], "text ends before the stop string '{stop}'");
    assert!(cut["tokens"].as_array().unwrap().len() < full["tokens"].as_array().unwrap().len());
    // A stop token: the first generated token stops at once.
    let first_tok = full["tokens"][0].clone();
    let by_token = output(&answer(&h, &mut sub, "tok", prompt.clone(), json!({"max_new_tokens": 16, "stop_token_ids": [first_tok]})).await);
    assert_eq!((by_token["finish_reason"].as_str(), by_token["tokens"].as_array().unwrap().len()), (Some("stop"), 1));

    // Streaming: chunks in order on jetbatch.stream.<id>, then done, then the result.
    for (id, expect_cached) in [("st-1", false), ("st-2", true)] {
        let mut both = h.client.subscribe(format!("jetbatch.*.{id}")).await.unwrap();
        h.client.flush().await.unwrap();
        h.publish(&job(id, "tiny-llama", "generate", prompt.clone(), json!({"max_new_tokens": 16, "stop": [stop.clone()], "stream": true})), jetbatch::job::Encoding::Json).await;
        let mut streamed = String::new();
        let mut indices = Vec::new();
        let mut done = false;
        let result = loop {
            let msg = tokio::time::timeout(MINUTE, futures::StreamExt::next(&mut both)).await.unwrap().unwrap();
            if msg.subject.starts_with("jetbatch.results.") {
                break JobResult::decode(&msg.payload).unwrap();
            }
            assert!(!done, "nothing after done but the result");
            let chunk: Value = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(chunk["id"], id);
            if chunk["done"] == true {
                done = true;
            } else {
                indices.push(chunk["index"].as_u64().unwrap());
                streamed.push_str(chunk["text"].as_str().unwrap());
            }
        };
        assert!(done, "{id}: done arrives before the result");
        assert_eq!(indices, (0..indices.len() as u64).collect::<Vec<_>>(), "{id}: chunks in order");
        assert!(!indices.is_empty());
        let out = output(&result);
        assert_eq!(result.cached, expect_cached, "{id}");
        assert_eq!(streamed, out["text"].as_str().unwrap(), "{id}: chunks concatenate to the text");
        assert_eq!(out["text"], cut["text"], "{id}: the stop string is not streamed either");
    }
}

#[tokio::test]
async fn a_short_generation_overtakes_a_long_one_already_running() {
    let h = harness().await;
    // Wide enough that 240 steps take a while on CPU.
    jetbatch_testkit::write_tiny_lm(&h.models.join("gen-lm"), 1, 768, 6).unwrap();
    std::fs::write(h.models.join("gen-lm/jetbatch.toml"), "backend = \"hf\"\nmax_batch_size = 8\nmax_wait_ms = 1\nmax_new_tokens_limit = 250\n").unwrap();
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let long = job("long", "gen-lm", "generate", json!({"prompt": "a long story"}), json!({"max_new_tokens": 240, "stop_token_ids": []}));
    h.publish(&long, jetbatch::job::Encoding::MsgPack).await;
    // Let the long generation get going, then send a short one.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let short = job("short", "gen-lm", "generate", json!({"prompt": "hi"}), json!({"max_new_tokens": 2, "stop_token_ids": []}));
    h.publish(&short, jetbatch::job::Encoding::MsgPack).await;
    let mut order = Vec::new();
    while order.len() < 2 {
        let msg = tokio::time::timeout(MINUTE, futures::StreamExt::next(&mut sub)).await.unwrap_or_else(|_| panic!("no result; log:\n{}", w.log_text())).unwrap();
        let r = JobResult::decode(&msg.payload).unwrap();
        assert_eq!(r.status, Status::Ok, "{r:?}");
        order.push((r.id.clone(), output(&r)["tokens"].as_array().unwrap().len()));
    }
    assert_eq!(order, vec![("short".to_string(), 2), ("long".to_string(), 240)], "the short job joined the running batch and left first");
}

/// lm-evaluation-harness's pair encoding and left truncation, on the whole context (the reference
/// the bounded parsing must equal).
fn whole_loglikelihood(lm: &jetbatch::lm::LmSpec, context: &str, continuation: &str) -> (Vec<u32>, Vec<u32>) {
    // lm-evaluation-harness 0.4.13 tok_encode: the tokenizer's special tokens unless the text
    // starts with the prefix token's text.
    let enc = |s: &str| lm.tokenizer.encode(s, !s.starts_with(&lm.prefix_text) && lm.add_bos.unwrap_or(true)).unwrap().get_ids().to_vec();
    let trimmed = context.trim_end();
    let continuation = format!("{}{continuation}", &context[trimmed.len()..]);
    let whole = enc(&format!("{trimmed}{continuation}"));
    let ctx = enc(trimmed);
    let cont = whole[ctx.len().min(whole.len())..].to_vec();
    let keep = (lm.max_length + 1).saturating_sub(cont.len());
    (ctx[ctx.len().saturating_sub(keep)..].to_vec(), cont)
}

fn parse(lm: &jetbatch::lm::LmSpec, kind: jetbatch::job::JobKind, input: Value) -> Result<jetbatch::job::JobInput, jetbatch::job::JobError> {
    let model = jetbatch::kinds::Model::Lm { name: "m", lm };
    kind.validate(&model, &rmpv::ext::to_value(input).unwrap(), &Default::default()).map(|r| r.input).map_err(Into::into)
}

/// Texts are bounded before tokenising (a window of 16 bytes per token needed, doubled until it
/// yields enough); for texts around and past that window the results equal whole-text tokenising,
/// on the fixture's real tokenizers (WordPiece, byte-level BPE); a 4 MiB text parses in well under
/// a second and a 1,000,000-character prompt is refused as fast.
#[test]
fn bounded_tokenisation_equals_whole_text_tokenisation() {
    use jetbatch::job::{JobInput, JobKind};
    use jetbatch::kinds::Window;
    let (dir, _) = fixture();
    let corpus = "Workers ack a job only after its result is published. The quick brown fox jumps over the lazy dog; \
                  numbers like 12 345 and symbols ! ? , . are tokens too, as are Ünïcödé and 東京 and tabs\tand\nnewlines. ";
    let text = |len: usize, skip: usize| -> String { corpus.chars().cycle().skip(skip).take(len).collect() };
    for model in ["minilm", "tiny-bert-cls", "tiny-llama", "tiny-gpt2"] {
        let spec = jetbatch::plan::ModelPlan::load(&dir.join("models").join(model)).unwrap();
        let lm = spec.lm.as_ref().unwrap();
        let max = lm.max_length;
        let window = max * 16;
        let mut lengths: Vec<usize> = vec![10, max, window - 3, window, window + 1, window + 40, 2 * window + 7, 9 * window];
        lengths.extend((1..12).map(|i| window / 4 * i + i));
        for (n, &len) in lengths.iter().enumerate() {
            let t = text(len, n * 7);
            if lm.arch.is_decoder() {
                let whole = lm.tokenizer.encode(t.as_str(), lm.add_bos.unwrap_or(true)).unwrap().get_ids().to_vec();
                match parse(lm, JobKind::Generate, json!({"prompt": t})) {
                    Ok(JobInput::Generate(g)) => assert_eq!(g.prompt, whole, "{model} {len}"),
                    Ok(other) => panic!("{other:?}"),
                    Err(e) => assert!(whole.len() >= max, "{model} {len}: {} tokens refused: {}", whole.len(), e.message),
                }
                for continuation in [" the end", "!", " and so on and so forth"] {
                    let (context, cont) = whole_loglikelihood(lm, &t, continuation);
                    let got = parse(lm, JobKind::Loglikelihood, json!({"context": t, "continuation": continuation})).unwrap();
                    assert_eq!(got, JobInput::Score(vec![Window { context, continuation: cont, top_logprobs: 0 }]), "{model} {len}");
                }
            } else {
                let truncate = |e: tokenizers::Encoding| -> (Vec<u32>, Vec<u32>) {
                    let (mut ids, mut types) = (e.get_ids().to_vec(), e.get_type_ids().to_vec());
                    if ids.len() > max {
                        let last = (*ids.last().unwrap(), *types.last().unwrap());
                        ids.truncate(max - 1);
                        types.truncate(max - 1);
                        ids.push(last.0);
                        types.push(last.1);
                    }
                    (ids, types)
                };
                let kind = if model == "minilm" { JobKind::Embed } else { JobKind::Classify };
                let (ids, type_ids) = truncate(lm.tokenizer.encode(t.as_str(), true).unwrap());
                let got = parse(lm, kind, json!({"text": t})).unwrap();
                assert_eq!(got, JobInput::Encode { ids, type_ids, normalize: true }, "{model} {len}");
                if kind == JobKind::Classify {
                    for pair_len in [5, len / 2 + 1, len] {
                        let b = text(pair_len, 3);
                        let (ids, type_ids) = truncate(lm.tokenizer.encode((t.as_str(), b.as_str()), true).unwrap());
                        let got = parse(lm, kind, json!({"text": t, "text_pair": b})).unwrap();
                        assert_eq!(got, JobInput::Encode { ids, type_ids, normalize: true }, "{model} {len} pair {pair_len}");
                    }
                }
            }
        }
    }
    // Time: a 4 MiB embed text, a 4 MiB context, a 1,000,000-character prompt.
    let load = |m: &str| jetbatch::plan::ModelPlan::load(&dir.join("models").join(m)).unwrap();
    let (minilm, llama) = (load("minilm"), load("tiny-llama"));
    let big = text(4 << 20, 0);
    let start = Instant::now();
    parse(minilm.lm.as_ref().unwrap(), JobKind::Embed, json!({"text": big})).unwrap();
    let embed = start.elapsed();
    let start = Instant::now();
    parse(llama.lm.as_ref().unwrap(), JobKind::Loglikelihood, json!({"context": big, "continuation": " end"})).unwrap();
    let context = start.elapsed();
    let prompt = text(1_000_000, 0);
    let start = Instant::now();
    let err = parse(llama.lm.as_ref().unwrap(), JobKind::Generate, json!({"prompt": prompt})).unwrap_err();
    let refused = start.elapsed();
    assert!(err.message.starts_with("input.prompt: more than 48 tokens"), "{}", err.message);
    eprintln!("FIGURES bounded tokenising: 4 MiB embed {embed:?}, 4 MiB context {context:?}, 1M-char prompt refused {refused:?}");
    for (what, t) in [("embed", embed), ("context", context), ("prompt", refused)] {
        assert!(t < Duration::from_secs(1), "{what}: {t:?}");
    }
}

/// Over the bus: a large `embed` job (900 KiB: the test server keeps NATS's 1 MiB max_payload;
/// the 4 MiB case is timed in `bounded_tokenisation_equals_whole_text_tokenisation`) is answered
/// quickly, with the embedding of its first 256 tokens (all-MiniLM-L6-v2's length), the same as a
/// short text with those tokens.
#[tokio::test]
async fn a_large_embed_job_is_answered_quickly_and_truncated_like_a_short_one() {
    let h = harness().await;
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let sentence = "The quick brown fox jumps over the lazy dog while workers ack their jobs. ";
    let big = sentence.repeat((900 << 10) / sentence.len());
    let short = sentence.repeat(40); // ~600 tokens: past 256 and past the first window
    let start = Instant::now();
    h.publish(&job("big-embed", "minilm", "embed", json!({"text": big}), json!({})), jetbatch::job::Encoding::MsgPack).await;
    let got = collect(&mut sub, 1, MINUTE).await;
    let took = start.elapsed();
    h.publish(&job("short-embed", "minilm", "embed", json!({"text": short}), json!({})), jetbatch::job::Encoding::MsgPack).await;
    let short_got = collect(&mut sub, 1, MINUTE).await;
    let (a, b) = (output(&got["big-embed"][0]), output(&short_got["short-embed"][0]));
    let (a, b): (Vec<f64>, Vec<f64>) = (serde_json::from_value(a["embedding"].clone()).unwrap(), serde_json::from_value(b["embedding"].clone()).unwrap());
    assert_close(&a, &b, 1e-6, "900 KiB text vs its 600-token start");
    eprintln!("FIGURES 900 KiB embed job answered in {took:?} (publish to result)");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// `truncate: "left"` over the bus: a prompt longer than `max_length - max_new_tokens` keeps the
/// tokens lm-evaluation-harness keeps (`context_enc[:, -max_ctx_len:]`, here from transformers'
/// tokenizer on the same files), and generates what those tokens given directly generate.
#[tokio::test]
async fn truncate_left_cuts_a_long_prompt_as_the_harness_does() {
    let h = harness().await;
    let (dir, _) = fixture();
    let _w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    let prompt = "workers ack a job only after its result is safely published and rolling windows cover a long text ".repeat(4);
    let (max_new, keep) = (8, 48 - 8);
    let want = python(
        "import json, sys\nfrom transformers import PreTrainedTokenizerFast\n\
         tok = PreTrainedTokenizerFast(tokenizer_file=sys.argv[1])\n\
         ids = tok(sys.argv[2], add_special_tokens=False).input_ids\n\
         print(json.dumps({'whole': len(ids), 'kept': ids[-int(sys.argv[3]):]}))",
        &[dir.join("models/tiny-llama/tokenizer.json").to_str().unwrap(), &prompt, &keep.to_string()],
    );
    assert!(want["whole"].as_u64().unwrap() > 48, "the prompt is longer than the model: {want}");
    let params = json!({"max_new_tokens": max_new, "truncate": "left"});
    let jobs = [
        job("cut-text", "tiny-llama", "generate", json!({"prompt": prompt}), params.clone()),
        job("cut-tokens", "tiny-llama", "generate", json!({"prompt_tokens": (3..103).collect::<Vec<u32>>()}), params),
        job("kept", "tiny-llama", "generate", json!({"prompt_tokens": want["kept"]}), json!({"max_new_tokens": max_new})),
        job("kept-tail", "tiny-llama", "generate", json!({"prompt_tokens": (63..103).collect::<Vec<u32>>()}), json!({"max_new_tokens": max_new})),
        job("refused", "tiny-llama", "generate", json!({"prompt": prompt}), json!({"max_new_tokens": max_new})),
    ];
    burst(&h, &jobs).await;
    let got = collect(&mut sub, jobs.len(), MINUTE).await;
    let (cut, kept) = (output(&got["cut-text"][0]), output(&got["kept"][0]));
    assert_eq!(cut["prompt_tokens"], keep);
    assert_eq!(cut["tokens"].as_array().unwrap().len(), max_new);
    assert_eq!(cut["tokens"], kept["tokens"], "the cut prompt is the harness's last {keep} tokens");
    assert_eq!(output(&got["cut-tokens"][0])["tokens"], output(&got["kept-tail"][0])["tokens"]);
    let err = got["refused"][0].error.clone().expect("the default refuses");
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.starts_with("input.prompt: ") && err.message.contains("truncate"), "{}", err.message);
}

/// lm-evaluation-harness's HF backend encoding (`tok_encode`, `_encode_pair`, the empty context),
/// written with transformers' tokenizer on a model folder: argv = folder, add_bos_token
/// ("auto": the harness's rule, BOS for Gemma only), then a JSON list of (context, continuation).
const HARNESS_ENCODING: &str = "import json, sys
from transformers import PreTrainedTokenizerFast
d, override, pairs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tok = PreTrainedTokenizerFast(tokenizer_file=d + '/tokenizer.json')
prefix = json.load(open(d + '/config.json'))['bos_token_id']
prefix_text = tok.decode(prefix)
special = {'auto': {}, 'true': {'add_special_tokens': True}, 'false': {'add_special_tokens': False}}[override]
def tok_encode(s):
    kwargs = {'add_special_tokens': False} if s.startswith(prefix_text) else special
    return tok.encode(s, **kwargs)
def encode_pair(context, continuation):
    if not context:
        cont = tok.encode(continuation, add_special_tokens=False)
        return [[prefix], cont] if cont[0] != prefix else [cont[:1], cont[1:]]
    n = len(context) - len(context.rstrip())
    if n > 0:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole, ctx = tok_encode(context + continuation), tok_encode(context)
    return [ctx, whole[len(ctx):]]
def prompt_encode(s):  # tok_batch_encode, as generate_until encodes its contexts
    bos = tok.bos_token
    return tok.encode(s, **({'add_special_tokens': False} if bos and s.startswith(bos) else special))
print(json.dumps({'pairs': [encode_pair(c, k) for c, k in pairs], 'texts': [tok_encode(c + k) for c, k in pairs],
                  'prompts': [prompt_encode(c + k) for c, k in pairs]}))
";

/// Producer text is encoded as lm-evaluation-harness 0.4.13's HF backend encodes it — with the
/// tokenizer's own special tokens (a BOS where its post-processor adds one), none for a text
/// that already starts with the prefix token's text; an empty context is the prefix token and its
/// continuation has no special tokens — for loglikelihood pairs, rolling texts and generate
/// prompts; `add_bos_token` in jetbatch.toml overrides the tokenizer either way. Checked against
/// transformers' tokenizer.
#[test]
fn text_is_encoded_as_the_harness_encodes_it() {
    use jetbatch::job::{JobInput, JobKind};
    let (dir, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let pairs = [("the quick brown", " fox jumps"), ("a batch of jobs waits ", "on the bus"), ("", "workers ack a job"), ("numbers like 12", " 345"), ("<s>the quick", " fox")];
    let pairs_json = serde_json::to_string(&pairs).unwrap();
    for (model, add_bos, expect_bos) in
        [("tiny-llama", None, true), ("tiny-qwen2", None, false), ("tiny-gemma2", None, true), ("tiny-gpt2", None, false), ("tiny-llama", Some(false), false), ("tiny-gemma2", Some(false), false)]
    {
        let src = dir.join("models").join(model);
        let folder = match add_bos {
            None => src.clone(),
            Some(b) => {
                let f = tmp.path().join(format!("{model}-{b}"));
                std::fs::create_dir_all(&f).unwrap();
                for file in ["config.json", "tokenizer.json", "model.safetensors"] {
                    std::os::unix::fs::symlink(src.join(file), f.join(file)).unwrap();
                }
                std::fs::write(f.join("jetbatch.toml"), format!("backend = \"hf\"\nadd_bos_token = {b}\n")).unwrap();
                f
            }
        };
        let spec = jetbatch::plan::ModelPlan::load(&folder).unwrap();
        let lm = spec.lm.as_ref().unwrap();
        let override_arg = add_bos.map(|b| b.to_string()).unwrap_or_else(|| "auto".into());
        let want = python(HARNESS_ENCODING, &[folder.to_str().unwrap(), &override_arg, &pairs_json]);
        let what = format!("{model} add_bos_token={override_arg}");
        for (i, (context, continuation)) in pairs.iter().enumerate() {
            let ids = |v: &Value| -> Vec<u32> { serde_json::from_value(v.clone()).unwrap() };
            let [ctx, cont] = [&want["pairs"][i][0], &want["pairs"][i][1]];
            let JobInput::Score(w) = parse(lm, JobKind::Loglikelihood, json!({"context": context, "continuation": continuation})).unwrap() else { panic!() };
            assert_eq!((&w[0].context, &w[0].continuation), (&ids(ctx), &ids(cont)), "{what}: loglikelihood {context:?} {continuation:?}");
            let text = format!("{context}{continuation}");
            let whole = ids(&want["texts"][i]);
            if !text.starts_with("<s>") {
                assert_eq!(whole.first() == Some(&0), expect_bos, "{what}: BOS (id 0) in {whole:?}");
            }
            let JobInput::Generate(g) = parse(lm, JobKind::Generate, json!({"prompt": text})).unwrap() else { panic!() };
            assert_eq!(g.prompt, ids(&want["prompts"][i]), "{what}: generate prompt {text:?}");
            let JobInput::Score(r) = parse(lm, JobKind::LoglikelihoodRolling, json!({"text": text})).unwrap() else { panic!() };
            let scored: Vec<u32> = r.iter().flat_map(|w| w.continuation.clone()).collect();
            assert_eq!((r[0].context.clone(), scored), (vec![lm.prefix_token], whole), "{what}: rolling {text:?}");
        }
    }
}

/// `generate` with `messages` over the bus: rendered with the model's chat template (here
/// Mistral-7B-Instruct-v0.1's, in tokenizer_config.json) and encoded as transformers'
/// `apply_chat_template(tokenize=True)` encodes it (no special tokens added: the template writes
/// `<s>`), it generates what those token ids generate. A refusal of the template and a model
/// without one are `bad_request`s that say so.
#[tokio::test]
async fn generate_renders_messages_with_the_models_chat_template() {
    let h = harness().await;
    let (dir, _) = fixture();
    let template = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates/mistral-7b-v0.1.jinja")).unwrap();
    let chat = h.models.join("chat-llama");
    std::fs::create_dir_all(&chat).unwrap();
    for file in ["config.json", "tokenizer.json", "model.safetensors", "jetbatch.toml"] {
        std::os::unix::fs::symlink(dir.join("models/tiny-llama").join(file), chat.join(file)).unwrap();
    }
    let config = json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template});
    std::fs::write(chat.join("tokenizer_config.json"), config.to_string()).unwrap();
    let messages = json!([{"role": "user", "content": "the"}, {"role": "assistant", "content": "fox"}, {"role": "user", "content": "a"}]);
    let want = python(
        "import json, sys\nfrom transformers import PreTrainedTokenizerFast\n\
         tok = PreTrainedTokenizerFast(tokenizer_file=sys.argv[1] + '/tokenizer.json', bos_token='<s>', eos_token='</s>')\n\
         tok.chat_template = json.load(open(sys.argv[1] + '/tokenizer_config.json'))['chat_template']\n\
         out = {}\n\
         for g in (True, False):\n    \
             text = tok.apply_chat_template(json.loads(sys.argv[2]), tokenize=False, add_generation_prompt=g)\n    \
             out[str(g)] = {'text': text, 'ids': tok(text, add_special_tokens=False).input_ids}\n\
         print(json.dumps(out))",
        &[chat.to_str().unwrap(), &messages.to_string()],
    );
    let ids = &want["True"]["ids"];
    assert_eq!(ids[0], 0, "the template writes <s> (id 0): {}", want["True"]["text"]);
    let _w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    let gen = json!({"max_new_tokens": 6});
    let jobs = [
        job("chat", "chat-llama", "generate", json!({"messages": messages}), gen.clone()),
        job("chat-ids", "chat-llama", "generate", json!({"prompt_tokens": ids}), gen.clone()),
        job("chat-no-prompt", "chat-llama", "generate", json!({"messages": messages}), json!({"max_new_tokens": 6, "add_generation_prompt": false})),
        job("chat-no-prompt-ids", "chat-llama", "generate", json!({"prompt_tokens": want["False"]["ids"]}), gen.clone()),
        job("chat-refused", "chat-llama", "generate", json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}), gen.clone()),
        job("no-template", "tiny-llama", "generate", json!({"messages": messages}), gen),
    ];
    burst(&h, &jobs).await;
    let got = collect(&mut sub, jobs.len(), MINUTE).await;
    let chat = output(&got["chat"][0]);
    assert_eq!(chat["prompt_tokens"].as_u64(), Some(ids.as_array().unwrap().len() as u64));
    assert_eq!(chat["tokens"], output(&got["chat-ids"][0])["tokens"]);
    assert_eq!(output(&got["chat-no-prompt"][0])["tokens"], output(&got["chat-no-prompt-ids"][0])["tokens"]);
    let err = |id: &str| got[id][0].error.clone().unwrap_or_else(|| panic!("{id} should fail"));
    assert_eq!(err("chat-refused").code, ErrorCode::BadRequest);
    assert_eq!(
        err("chat-refused").message,
        "input.messages: the model's chat template refuses them: Conversation roles must alternate user/assistant/user/assistant/..."
    );
    assert_eq!(err("no-template").code, ErrorCode::BadRequest);
    assert!(err("no-template").message.starts_with("input.messages: the model has no chat template"), "{}", err("no-template").message);
}

/// `top_logprobs: k` over the bus, against transformers' `log_softmax(...).topk(k)` on the same
/// weights: per continuation token of a `loglikelihood` job, per generated token of a `generate`
/// job (ids, their text as `tokenizer.decode([id])`, log-probs within 1e-4); jobs that do not ask,
/// batched beside them, get no list.
#[tokio::test]
async fn top_logprobs_match_transformers() {
    let h = harness().await;
    let (dir, _) = fixture();
    let _w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    let pair = json!({"context": "the quick brown", "continuation": " fox jumps"});
    let jobs = [
        job("ll-top", "tiny-llama", "loglikelihood", pair.clone(), json!({"top_logprobs": 5})),
        job("ll-plain", "tiny-llama", "loglikelihood", pair, json!({})),
        job("gen-top", "tiny-llama", "generate", json!({"prompt": "the quick"}), json!({"max_new_tokens": 4, "top_logprobs": 3})),
        job("gen-plain", "tiny-llama", "generate", json!({"prompt": "a batch of jobs"}), json!({"max_new_tokens": 4})),
    ];
    burst(&h, &jobs).await;
    let got = collect(&mut sub, jobs.len(), MINUTE).await;
    let (ll, gen) = (output(&got["ll-top"][0]), output(&got["gen-top"][0]));
    assert!(output(&got["ll-plain"][0]).get("top_logprobs").is_none() && output(&got["gen-plain"][0]).get("top_logprobs").is_none());
    // The two share a context, so they may share a row (scored once): equal within 1e-4.
    let (with, without) = (ll["logprob"].as_f64().unwrap(), output(&got["ll-plain"][0])["logprob"].as_f64().unwrap());
    assert!((with - without).abs() <= 1e-4 * without.abs().max(1.0), "asking for top log-probs changes no score: {with} vs {without}");
    let want = python(
        "import json, sys, torch\nfrom transformers import AutoModelForCausalLM, PreTrainedTokenizerFast\n\
         d, generated = sys.argv[1], json.loads(sys.argv[2])\n\
         tok = PreTrainedTokenizerFast(tokenizer_file=d + '/tokenizer.json')\n\
         model = AutoModelForCausalLM.from_pretrained(d, attn_implementation='eager').eval()\n\
         enc = lambda s: tok(s).input_ids\n\
         def top(ids, n, k):\n    \
             with torch.no_grad():\n        \
                 logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)[-n:]\n    \
             v, i = logp.topk(k, -1)\n    \
             return [{'ids': r.tolist(), 'tokens': [tok.decode([t]) for t in r.tolist()], 'logprobs': x.tolist()} for x, r in zip(v, i)]\n\
         ctx = enc('the quick brown'); cont = enc('the quick brown fox jumps')[len(ctx):]\n\
         prompt = enc('the quick')\n\
         print(json.dumps({'ll': top((ctx + cont)[:-1], len(cont), 5), 'gen': top((prompt + generated)[:-1], len(generated), 3)}))",
        &[dir.join("models/tiny-llama").to_str().unwrap(), &gen["tokens"].to_string()],
    );
    for (what, got, want, k) in [("loglikelihood", &ll, &want["ll"], 5), ("generate", &gen, &want["gen"], 3)] {
        let (got, want) = (got["top_logprobs"].as_array().unwrap(), want.as_array().unwrap());
        assert_eq!(got.len(), want.len(), "{what}: one entry per token");
        for (g, w) in got.iter().zip(want) {
            assert_eq!((&g["ids"], &g["tokens"]), (&w["ids"], &w["tokens"]), "{what}");
            let (g, w): (Vec<f64>, Vec<f64>) = (serde_json::from_value(g["logprobs"].clone()).unwrap(), serde_json::from_value(w["logprobs"].clone()).unwrap());
            assert_eq!(g.len(), k);
            assert_close(&g, &w, 1e-4, what);
        }
    }
    // Greedy: each generated token is the first of its position's list.
    let firsts: Vec<Value> = gen["top_logprobs"].as_array().unwrap().iter().map(|t| t["ids"][0].clone()).collect();
    assert_eq!(Value::from(firsts), gen["tokens"]);
}

/// A multiple-choice question as one job (`continuations`) over the bus, in JSON and in
/// MessagePack, answers per choice what the same choices sent as separate jobs answer; the cache
/// key covers the choices (the same job again is a hit, the choices reordered are not).
#[tokio::test]
async fn a_choices_job_answers_as_its_choices_sent_as_separate_jobs() {
    use jetbatch::job::Encoding;
    let h = harness().await;
    let _w = h.worker("w1", &["--cache-dir", h.dir.path().join("cache").to_str().unwrap()]);
    let mut sub = h.subscribe_results().await;
    let uncached = |mut j: rmpv::Value| {
        if let rmpv::Value::Map(m) = &mut j {
            m.push(("cache".into(), false.into()));
        }
        j
    };
    // The second context's trailing space moves to each continuation; "!" splits differently.
    let questions = [("Question: what follows the quick brown?\nAnswer:", vec![" fox", " dog", " jumps over", "!"]), ("a batch of jobs waits ", vec!["on the bus", "for", "x"])];
    for encoding in [Encoding::Json, Encoding::MsgPack] {
        let mut expected = 0;
        for (q, (context, choices)) in questions.iter().enumerate() {
            let params = json!({"top_logprobs": 2});
            h.publish(&uncached(job(&format!("{encoding:?}-q{q}"), "tiny-llama", "loglikelihood", json!({"context": context, "continuations": choices}), params.clone())), encoding).await;
            for (i, k) in choices.iter().enumerate() {
                h.publish(&uncached(job(&format!("{encoding:?}-q{q}-{i}"), "tiny-llama", "loglikelihood", json!({"context": context, "continuation": k}), params.clone())), encoding).await;
            }
            expected += 1 + choices.len();
        }
        let got = collect(&mut sub, expected, MINUTE).await;
        for (q, (_, choices)) in questions.iter().enumerate() {
            let one = output(&got[&format!("{encoding:?}-q{q}")][0]);
            let n = choices.len();
            for key in ["logprobs", "tokens", "is_greedy", "top_logprobs"] {
                assert_eq!(one[key].as_array().map(Vec::len), Some(n), "{encoding:?} q{q}: {key} per choice: {one}");
            }
            for i in 0..n {
                let alone = output(&got[&format!("{encoding:?}-q{q}-{i}")][0]);
                let (g, a) = (one["logprobs"][i].as_f64().unwrap(), alone["logprob"].as_f64().unwrap());
                assert!((g - a).abs() <= 1e-4 * a.abs().max(1.0), "{encoding:?} q{q}/{i}: choice {g} vs separate job {a}");
                assert_eq!((&one["tokens"][i], &one["is_greedy"][i]), (&alone["tokens"], &alone["is_greedy"]), "{encoding:?} q{q}/{i}");
                let ids = |t: &Value| t.as_array().unwrap().iter().map(|e| e["ids"].clone()).collect::<Vec<_>>();
                assert_eq!(ids(&one["top_logprobs"][i]), ids(&alone["top_logprobs"]), "{encoding:?} q{q}/{i}");
            }
        }
    }
    // Cached: the same choices again are a hit with the same numbers; reordered, a miss answered in the new order.
    let (context, choices) = &questions[0];
    let mut answers = Vec::new();
    for (id, choices) in [("c-1", choices.clone()), ("c-2", choices.clone()), ("c-3", choices.iter().rev().copied().collect())] {
        h.publish(&job(id, "tiny-llama", "loglikelihood", json!({"context": context, "continuations": choices}), json!({})), Encoding::Json).await;
        answers.push(collect(&mut sub, 1, MINUTE).await.remove(id).unwrap().remove(0));
    }
    assert_eq!(answers.iter().map(|r| r.cached).collect::<Vec<_>>(), vec![false, true, false]);
    let (first, hit, reversed) = (output(&answers[0]), output(&answers[1]), output(&answers[2]));
    assert_eq!(hit, first);
    let mut back: Vec<f64> = serde_json::from_value(reversed["logprobs"].clone()).unwrap();
    back.reverse();
    assert_close(&back, &serde_json::from_value::<Vec<f64>>(first["logprobs"].clone()).unwrap(), 1e-4, "reordered choices");
}
