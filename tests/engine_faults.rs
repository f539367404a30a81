//! Inputs that used to kill the engine thread (a `narrow` out of range in the scoring path),
//! interleaved with good jobs against a real worker: the bad ones are refused with `bad_request`
//! naming the field, every good one is answered, and the worker stays healthy throughout.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use jetbatch::job::{Encoding, ErrorCode, JobResult, Status};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

fn lm_job(id: &str, kind: &str, input: Value, params: Value) -> rmpv::Value {
    rmpv::ext::to_value(json!({"id": id, "model": "tiny-lm", "kind": kind, "input": input, "params": params})).unwrap()
}

fn output(id: &str, r: &JobResult) -> Value {
    assert_eq!(r.status, Status::Ok, "{id}: {r:?}");
    serde_json::to_value(r.output.as_ref().unwrap()).unwrap()
}

#[tokio::test]
async fn poison_inputs_are_refused_and_the_engine_keeps_serving() {
    let h = Harness::new().await;
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;

    // The demo `tiny-lm` reads 256 positions; its byte-level tokenizer makes one token per byte.
    let spec = jetbatch::plan::ModelPlan::load(&h.models.join("tiny-lm")).unwrap();
    let lm = spec.lm.as_ref().unwrap();
    let positions = lm.max_length;
    let pair_text = lm.tokenizer.decode(&[5, 6], false).unwrap();
    assert_eq!(lm.tokenizer.encode(pair_text.as_str(), false).unwrap().get_ids(), [5, 6], "tokens 5, 6 as text");
    let long_continuation = " the quick brown fox".repeat(positions / 10);

    // Bad: (id, job, the field its error names).
    let bad = [
        ("bad-long-text", lm_job("bad-long-text", "loglikelihood", json!({"context": "Hi", "continuation": long_continuation}), json!({})), "input.continuation:"),
        (
            "bad-long-tokens",
            lm_job("bad-long-tokens", "loglikelihood", json!({"context_tokens": [5], "continuation_tokens": vec![7; positions + 1]}), json!({})),
            "input.continuation_tokens:",
        ),
        (
            "bad-long-tokens-no-context",
            lm_job("bad-long-tokens-no-context", "loglikelihood", json!({"context_tokens": [], "continuation_tokens": vec![9; 2 * positions]}), json!({})),
            "input.continuation_tokens:",
        ),
        ("bad-stop-id", lm_job("bad-stop-id", "generate", json!({"prompt": "hi"}), json!({"stop_token_ids": [(1u64 << 32) + 1]})), "params.stop_token_ids"),
        ("bad-huge-prompt", lm_job("bad-huge-prompt", "generate", json!({"prompt": "word ".repeat(200_000)}), json!({})), "input.prompt:"),
    ];
    // Empty contexts: as tokens (used to panic), and as text with the same continuation tokens.
    let empty_tokens = lm_job("empty-ctx-tokens", "loglikelihood", json!({"context_tokens": [], "continuation_tokens": [5, 6]}), json!({}));
    let empty_text = lm_job("empty-ctx-text", "loglikelihood", json!({"context": "", "continuation": pair_text}), json!({}));
    // Good jobs of every kind, a long scoring job among them so the bad ones would share its batch.
    let mut good: Vec<(String, rmpv::Value)> = Vec::new();
    for i in 0..8 {
        let id = format!("good-ll-{i}");
        let context = if i == 0 { "a long context ".repeat(30) } else { format!("context {i}") };
        good.push((id.clone(), lm_job(&id, "loglikelihood", json!({"context": context, "continuation": " the quick brown fox"}), json!({}))));
    }
    for i in 0..6 {
        let id = format!("good-gen-{i}");
        good.push((id.clone(), lm_job(&id, "generate", json!({"prompt": format!("prompt {i}")}), json!({"max_new_tokens": 4 + i}))));
    }
    for i in 0..6 {
        let id = format!("good-mlp-{i}");
        let t = tensor_job(&id, "mlp", &[mlp_input(i)], Encoding::MsgPack);
        good.push((id, t));
    }

    // Interleaved: a bad job after every few good ones, all as one burst (shared batches) ...
    let mut wire = Vec::new();
    let mut bad_iter = bad.iter();
    for (n, (_, j)) in good.iter().enumerate() {
        wire.push(j.clone());
        if n % 4 == 1 {
            if let Some((_, b, _)) = bad_iter.next() {
                wire.push(b.clone());
            }
        }
    }
    wire.extend(bad_iter.map(|(_, b, _)| b.clone()));
    wire.push(empty_tokens.clone());
    let start = Instant::now();
    burst(&h, &wire).await;
    // ... and once more one by one as JSON.
    h.publish(&lm_job("json-bad-long-text", "loglikelihood", json!({"context": "Hi", "continuation": " the quick brown fox".repeat(positions / 10)}), json!({})), Encoding::Json)
        .await;
    h.publish(&lm_job("json-empty-ctx-tokens", "loglikelihood", json!({"context_tokens": [], "continuation_tokens": [5, 6]}), json!({})), Encoding::Json).await;
    h.publish(&lm_job("json-good-ll", "loglikelihood", json!({"context": "Hi", "continuation": " there"}), json!({})), Encoding::Json).await;
    h.publish(&empty_text, Encoding::MsgPack).await;
    let total = wire.len() + 4;
    let got: HashMap<String, Vec<JobResult>> = collect(&mut sub, total, 2 * MINUTE).await;
    let took = start.elapsed();
    assert_eq!(got.len(), total, "every job answered: {:?}", got.keys().collect::<Vec<_>>());

    for (id, _) in good.iter().chain([("json-good-ll".to_string(), empty_text.clone())].iter()) {
        output(id, &got[id][0]);
    }
    for (id, _, field) in bad.iter().map(|(i, j, f)| (i.to_string(), j, *f)).chain([("json-bad-long-text".to_string(), &empty_text, "input.continuation:")]) {
        let r = &got[&id][0];
        let err = r.error.as_ref().unwrap_or_else(|| panic!("{id} should be refused: {r:?}"));
        assert_eq!(err.code, ErrorCode::BadRequest, "{id}: {err:?}");
        assert!(err.message.starts_with(field), "{id}: {}", err.message);
        if field.starts_with("input.continuation") {
            assert!(err.message.contains(&format!("at most {positions} continuation tokens")), "{id}: {}", err.message);
        }
    }
    // An empty context is conditioned on the prefix token, whether given as text or as tokens.
    let by_text = output("empty-ctx-text", &got["empty-ctx-text"][0]);
    for id in ["empty-ctx-tokens", "json-empty-ctx-tokens"] {
        let by_tokens = output(id, &got[id][0]);
        let (a, b) = (by_tokens["logprob"].as_f64().unwrap(), by_text["logprob"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{id}: {a} vs text {b}");
        assert_eq!(by_tokens["tokens"], 2);
    }

    // The worker stays healthy, the jobs stream empties, and nothing panicked.
    let health = w.http_get("/healthz").await;
    assert!(health.starts_with("HTTP/1.0 200") || health.starts_with("HTTP/1.1 200"), "{health}");
    let deadline = Instant::now() + MINUTE;
    while h.stream_messages("JETBATCH_JOBS").await > 0 {
        assert!(Instant::now() < deadline, "jobs stream did not empty");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = w.log_text();
    assert!(!log.contains("panicked"), "worker log:\n{log}");
    // And the engine still serves afterwards.
    h.publish(&lm_job("after", "generate", json!({"prompt": "after"}), json!({"max_new_tokens": 3})), Encoding::MsgPack).await;
    output("after", &collect(&mut sub, 1, MINUTE).await["after"][0]);
    eprintln!("FIGURES engine faults: {total} jobs ({} refused) answered in {took:?}", bad.len() + 1);
}
