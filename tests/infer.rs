//! The transport-neutral core in process: jobs as payloads in, outputs out, no broker. The
//! same validation and batching as the worker; batched equals alone.

use std::sync::Arc;

use futures::future::join_all;
use jetbatch::infer::Infer;
use jetbatch::job::{ErrorCode, Output};
use jetbatch::metrics::Metrics;
use serde_json::json;

fn payload(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

#[tokio::test]
async fn jobs_in_process_answer_as_on_the_bus() {
    let dir = tempfile::tempdir().unwrap();
    jetbatch_testkit::write_fixture_models(dir.path()).unwrap();
    let infer = Infer::start(dir.path(), 0, Arc::new(Metrics::new("test"))).unwrap();
    infer.preload("tiny-lm").await.unwrap();

    // Eight scoring jobs at once share batches; each equals the same job run alone.
    let score = |i: usize| payload(json!({"id": format!("s{i}"), "model": "tiny-lm", "kind": "loglikelihood",
        "input": {"context": format!("jetbatch number {i} says "), "continuation": "hello"}}));
    let together = join_all((0..8).map(|i| {
        let p = score(i);
        let infer = &infer;
        async move { infer.run("tiny-lm", &p).await.unwrap() }
    }))
    .await;
    assert!(together.iter().any(|a| a.timing.batch_size > 1), "concurrent jobs are batched");
    for (i, batched) in together.iter().enumerate() {
        let alone = infer.run("tiny-lm", &score(i)).await.unwrap();
        match (&batched.output, &alone.output) {
            (Output::Score { logprob: a, is_greedy: ga, .. }, Output::Score { logprob: b, is_greedy: gb, .. }) => {
                assert!((a - b).abs() < 1e-4 && a.is_finite() && *a < 0.0, "job {i}: batched {a} vs alone {b}");
                assert_eq!(ga, gb);
            }
            other => panic!("not a loglikelihood output: {other:?}"),
        }
    }

    let generated = infer
        .run("tiny-lm", &payload(json!({"id": "g", "model": "tiny-lm", "kind": "generate", "input": {"prompt": "hi"}, "params": {"max_new_tokens": 5}})))
        .await
        .unwrap();
    match generated.output {
        Output::Generate { tokens, .. } => assert_eq!(tokens.len(), 5),
        other => panic!("not a generation: {other:?}"),
    }

    // Bad input is answered with the worker's error codes and messages.
    let bad = infer.run("tiny-lm", &payload(json!({"id": "b", "model": "tiny-lm", "kind": "generate", "input": {"prompt": "hi"}, "params": {"until": ["x"]}}))).await.unwrap_err();
    assert_eq!(bad.code, ErrorCode::BadRequest);
    assert!(bad.message.contains("until") && bad.message.contains("stop"), "{}", bad.message);
    let unknown = infer.run("nope", &payload(json!({"id": "u", "model": "nope", "kind": "generate", "input": {"prompt": "hi"}}))).await.unwrap_err();
    assert_eq!(unknown.code, ErrorCode::UnknownModel);
    infer.shutdown().await;
}

#[tokio::test]
async fn a_repeated_job_is_answered_from_the_cache_without_the_engine() {
    use jetbatch::cache::{Cache, Local, SharedTier};
    let (dir, cache_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    jetbatch_testkit::write_fixture_models(dir.path()).unwrap();
    let metrics = Arc::new(Metrics::new("test"));
    let cache = Cache::new(Some(Local::open(cache_dir.path(), None, 0).unwrap()), SharedTier::Off, metrics.clone());
    let infer = Infer::start(dir.path(), 0, metrics.clone()).unwrap().with_cache(cache);
    let job = payload(json!({"id": "r", "model": "tiny-lm", "kind": "loglikelihood", "input": {"context": "jetbatch says ", "continuation": "hello"}}));

    let first = infer.run("tiny-lm", &job).await.unwrap();
    let second = infer.run("tiny-lm", &job).await.unwrap();
    assert!(!first.cached && second.cached);
    assert_eq!(first.output, second.output);
    assert_eq!(second.timing.batch_size, 0, "not batched: not computed");
    assert_eq!(metrics.engine_jobs_total.with_label_values(&["tiny-lm"]).get(), 1, "the engine ran the job once");
    assert_eq!(metrics.cache_hits_total.with_label_values(&["local"]).get(), 1);
    assert_eq!(metrics.jobs_answered(), (2, 0), "both answers are counted");
    infer.shutdown().await;
}
