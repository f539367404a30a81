//! `deadline` over a real nats-server: a job whose deadline passed while it waited in the stream
//! is answered `timeout` and termed without compute; a generation that runs past its deadline
//! ends with the text so far and `finish_reason: "deadline"` (never cached); a job with a future
//! deadline is answered as usual, however far (past 2554 too).

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jetbatch::job::{Encoding, ErrorCode, JobResult, Status};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

fn job(id: &str, model: &str, kind: &str, input: Value, params: Value, extra: Value) -> rmpv::Value {
    let mut v = json!({"id": id, "model": model, "kind": kind, "input": input, "params": params});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    rmpv::ext::to_value(v).unwrap()
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn answer(h: &Harness, sub: &mut async_nats::Subscriber, id: &str, job: rmpv::Value) -> JobResult {
    h.publish(&job, Encoding::MsgPack).await;
    collect(sub, 1, 3 * MINUTE).await.remove(id).unwrap_or_else(|| panic!("no result for {id}")).remove(0)
}

fn output(r: &JobResult) -> Value {
    assert_eq!(r.status, Status::Ok, "{r:?}");
    serde_json::to_value(r.output.as_ref().unwrap()).unwrap()
}

#[tokio::test]
async fn a_job_whose_deadline_passed_in_the_stream_is_answered_timeout_without_compute() {
    let h = Harness::new().await;
    let mut sub = h.subscribe_results().await;
    let now = SystemTime::now();
    let prompt = json!({"prompt": "a batch of jobs"});
    let rfc3339 = |t: SystemTime| jetbatch::job::Deadline::from_unix_ms(epoch_ms(t)).unwrap().to_string();
    // Published while no worker runs: one deadline passes before a worker starts, one had passed
    // already (as a job can be after hours in the stream); a tensor job too.
    let soon = now + Duration::from_millis(800);
    h.publish(&job("gen-late", "tiny-lm", "generate", prompt.clone(), json!({"max_new_tokens": 4}), json!({"deadline": rfc3339(soon)})), Encoding::Json).await;
    let past = epoch_ms(now) - 3_600_000;
    h.publish(&job("gen-past", "tiny-lm", "generate", prompt.clone(), json!({}), json!({"deadline": past})), Encoding::MsgPack).await;
    let tensor = tensor_job("mlp-past", "mlp", &[mlp_input(1)], Encoding::MsgPack);
    let rmpv::Value::Map(mut fields) = tensor else { unreachable!() };
    fields.push(("deadline".into(), past.into()));
    h.publish(&rmpv::Value::Map(fields), Encoding::MsgPack).await;
    tokio::time::sleep(soon.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(100)).await;

    let w = h.worker("w1", &[]);
    let results = collect(&mut sub, 3, MINUTE).await;
    for id in ["gen-late", "gen-past", "mlp-past"] {
        let r = &results[id][0];
        assert_eq!(r.status, Status::Error, "{id}: {r:?}");
        let err = r.error.as_ref().unwrap();
        assert_eq!(err.code, ErrorCode::Timeout, "{id}: {err:?}");
        assert!(err.message.starts_with("deadline ") && err.message.contains("passed"), "{id}: {}", err.message);
        assert!(r.timing.queued_ms >= 800.0 && r.timing.compute_ms == 0.0, "{id}: {:?}", r.timing);
    }
    assert!(results["gen-past"][0].error.as_ref().unwrap().message.contains("passed 36"), "an hour late: {:?}", results["gen-past"][0].error);
    // Termed: nothing is left to redeliver; no model was loaded, nothing ran.
    let info = h.consumer_info().await;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
    assert_eq!(h.stream_messages("JETBATCH_JOBS").await, 0);
    assert_eq!(w.metric("jetbatch_models_loaded").await, 1.0, "mlp is preloaded; tiny-lm was never loaded");
    for model in ["tiny-lm", "mlp"] {
        assert_eq!(w.metric(&format!("jetbatch_engine_jobs_total{{model=\"{model}\"}}")).await, 0.0, "{model}");
        assert_eq!(w.metric(&format!("jetbatch_model_forward_total{{model=\"{model}\"}}")).await, 0.0, "{model}");
    }
    assert_eq!(w.metric("jetbatch_jobs_total{kind=\"generate\",model=\"tiny-lm\",status=\"error\"}").await, 2.0);

    // A deadline still ahead: answered as usual.
    let ahead = rfc3339(SystemTime::now() + MINUTE);
    h.publish(&job("gen-ahead", "tiny-lm", "generate", prompt, json!({"max_new_tokens": 4}), json!({"deadline": ahead})), Encoding::Json).await;
    let r = collect(&mut sub, 1, MINUTE).await.remove("gen-ahead").unwrap().remove(0);
    let out = output(&r);
    assert_eq!((out["finish_reason"].as_str(), out["tokens"].as_array().unwrap().len()), (Some("length"), 4), "{out}");
    assert_eq!(w.metric("jetbatch_engine_jobs_total{model=\"tiny-lm\"}").await, 1.0);
    // One past 2554 (u64 nanoseconds since the epoch) is simply far: answered as usual.
    let far = job("gen-far", "tiny-lm", "generate", json!({"prompt": "far"}), json!({"max_new_tokens": 2}), json!({"deadline": "2600-01-01T00:00:00Z"}));
    assert_eq!(output(&answer(&h, &mut sub, "gen-far", far).await)["tokens"].as_array().unwrap().len(), 2);

    // `jetbatch submit` passes the field through as written.
    let input = h.dir.path().join("jobs.jsonl");
    let line = |id: &str, deadline: Value| json!({"id": id, "model": "tiny-lm", "kind": "generate", "input": {"prompt": "hi"}, "params": {"max_new_tokens": 2}, "deadline": deadline}).to_string();
    std::fs::write(&input, [line("sub-past", json!(past)), line("sub-ahead", json!(ahead))].join("\n")).unwrap();
    let out = h.dir.path().join("out.jsonl");
    let url = h.url();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_jetbatch"))
        .args(["submit", "--quiet", "--nats-url", &url, "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    let results: std::collections::HashMap<String, JobResult> = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&run.stderr)))
        .lines()
        .map(|l| serde_json::from_str::<JobResult>(l).unwrap())
        .map(|r| (r.id.clone(), r))
        .collect();
    assert_eq!(results["sub-past"].error.as_ref().map(|e| e.code), Some(ErrorCode::Timeout), "{:?}", results["sub-past"]);
    assert_eq!(results["sub-ahead"].status, Status::Ok, "{:?}", results["sub-ahead"]);
}

#[tokio::test]
async fn a_generation_past_its_deadline_ends_with_its_text_so_far_marked_and_uncached() {
    let h = Harness::new().await;
    // Wide enough that 200 steps take a while on CPU (~0.5 s on an idle core, more when busy).
    jetbatch_testkit::write_tiny_lm(&h.models.join("gen-lm"), 1, 512, 4).unwrap();
    std::fs::write(h.models.join("gen-lm/jetbatch.toml"), "backend = \"hf\"\nmax_batch_size = 8\nmax_wait_ms = 1\nmax_new_tokens_limit = 250\n").unwrap();
    let w = h.worker("w1", &["--torch-threads", "1", "--cache-dir", h.dir.path().join("cache").to_str().unwrap()]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let long = |id: &str, extra: Value| job(id, "gen-lm", "generate", json!({"prompt": "a long story"}), json!({"max_new_tokens": 200, "stop_token_ids": []}), extra);
    // Loads the model, so the next one times the generation alone.
    let warm = job("warm", "gen-lm", "generate", json!({"prompt": "hi"}), json!({"max_new_tokens": 1}), json!({"cache": false}));
    output(&answer(&h, &mut sub, "warm", warm).await);
    // The whole generation (not cached), to time it and compare with.
    let full = answer(&h, &mut sub, "full", long("full", json!({"cache": false}))).await;
    let full_tokens = output(&full)["tokens"].as_array().unwrap().clone();
    assert_eq!(full_tokens.len(), 200);
    // A deadline a quarter of the way into the same generation (a busy host's speed varies
    // twofold from one generation to the next), after it has surely started.
    let quarter = Duration::from_secs_f64(full.timing.compute_ms / 4e3).max(Duration::from_millis(100));
    let deadline = epoch_ms(SystemTime::now() + quarter);
    let cut = answer(&h, &mut sub, "cut", long("cut", json!({"deadline": deadline}))).await;
    let out = output(&cut);
    assert_eq!(out["finish_reason"], "deadline", "{out}");
    let tokens = out["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty() && tokens.len() < 200, "{} tokens", tokens.len());
    assert_eq!(tokens[..], full_tokens[..tokens.len()], "the tokens so far are the whole generation's first ones");
    assert!(!out["text"].as_str().unwrap().is_empty());
    // The partial answer was not cached: the same job without a deadline computes in full, and
    // only then is it a cache hit.
    let again = answer(&h, &mut sub, "again", long("again", json!({}))).await;
    assert_eq!((again.cached, output(&again)["finish_reason"].as_str()), (false, Some("length")));
    assert_eq!(output(&again)["tokens"].as_array().unwrap(), &full_tokens);
    assert!(answer(&h, &mut sub, "hit", long("hit", json!({}))).await.cached);
}
