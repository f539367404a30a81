//! End-to-end tests of `jetbatch serve` against a real nats-server (the worker-core acceptance).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use jetbatch::job::{Encoding, ErrorCode, JobResult, Status};
use jetbatch::tensor::TensorData;

const MINUTE: Duration = Duration::from_secs(60);

fn check_against_direct(h: &Harness, r: &JobResult, model: &str, input: &TensorData, tol: f64) {
    assert_eq!(r.status, Status::Ok, "{r:?}");
    let got = r.output_tensors().expect("tensor output");
    assert_eq!(got.len(), 1);
    let want = direct_forward(&h.models.join(model).join("model.pt"), std::slice::from_ref(input));
    assert_close(&got[0].to_f64_vec(), &want[0], tol, &r.id);
}

#[tokio::test]
async fn tensor_jobs_round_trip_in_msgpack_and_json() {
    let h = Harness::new().await;
    let _w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    let mut raw_json = h.client.subscribe("jetbatch.results.rt-json-mlp").await.unwrap();
    let mut raw_msgpack = h.client.subscribe("jetbatch.results.rt-msgpack-mlp").await.unwrap();
    let (x, s) = (mlp_input(1), seq_input(2, 5));
    for (enc, tag) in [(Encoding::MsgPack, "msgpack"), (Encoding::Json, "json")] {
        h.publish(&tensor_job(&format!("rt-{tag}-mlp"), "mlp", std::slice::from_ref(&x), enc), enc).await;
        h.publish(&tensor_job(&format!("rt-{tag}-seq"), "seqproj", std::slice::from_ref(&s), enc), enc).await;
    }
    let got = collect(&mut sub, 4, MINUTE).await;
    assert_eq!(got.len(), 4, "{got:?}");
    for tag in ["msgpack", "json"] {
        let mlp = &got[&format!("rt-{tag}-mlp")];
        let seq = &got[&format!("rt-{tag}-seq")];
        assert_eq!((mlp.len(), seq.len()), (1, 1), "one answer each");
        check_against_direct(&h, &mlp[0], "mlp", &x, 1e-6);
        check_against_direct(&h, &seq[0], "seqproj", &s, 1e-6);
        assert_eq!(seq[0].output_tensors().unwrap()[0].shape, vec![5, 3]);
    }
    // Each result is encoded the way its job was.
    let json = raw_json.next().await.unwrap();
    assert_eq!(json.payload[0], b'{');
    assert_eq!(json.headers.unwrap().get("Content-Type").unwrap().as_str(), "application/json");
    let msgpack = raw_msgpack.next().await.unwrap();
    assert_ne!(msgpack.payload[0], b'{');
    assert!(rmp_serde::from_slice::<JobResult>(&msgpack.payload).is_ok());
}

#[tokio::test]
async fn a_burst_forms_batches_whose_outputs_equal_unbatched_runs() {
    let h = Harness::new().await;
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let mut inputs = HashMap::new();
    let mut jobs = Vec::new();
    for i in 0..240u64 {
        let (id, model, input) = if i % 2 == 0 {
            (format!("burst-{i}"), "mlp", mlp_input(i))
        } else {
            // Very different lengths in one batch: 1 to 60 positions.
            (format!("burst-{i}"), "seqproj", seq_input(i, 1 + (i * 7 % 60) as i64))
        };
        jobs.push(tensor_job(&id, model, std::slice::from_ref(&input), Encoding::MsgPack));
        inputs.insert(id, (model, input));
    }
    burst(&h, &jobs).await;
    let got = collect(&mut sub, 240, MINUTE).await;
    assert_eq!(got.len(), 240);
    let mut largest: HashMap<&str, usize> = HashMap::new();
    for (id, results) in &got {
        assert_eq!(results.len(), 1, "{id} answered once");
        let (model, input) = &inputs[id];
        check_against_direct(&h, &results[0], model, input, 1e-5);
        let size = results[0].timing.batch_size;
        let e = largest.entry(model).or_default();
        *e = (*e).max(size);
    }
    assert!(largest["mlp"] > 1 && largest["seqproj"] > 1, "batches formed: {largest:?}");
}

#[tokio::test]
async fn repeated_jobs_are_served_from_a_cache_that_survives_restarts_and_follows_the_weights() {
    let h = Harness::new().await;
    let cache = h.dir.path().join("cache");
    let cache_arg = cache.to_str().unwrap();
    let x = mlp_input(7);
    let mut sub = h.subscribe_results().await;
    let run = |id: &'static str| tensor_job(id, "mlp", std::slice::from_ref(&x), Encoding::MsgPack);

    let mut w = h.worker("w1", &["--cache-dir", cache_arg]);
    h.publish(&run("c1"), Encoding::MsgPack).await;
    let first = collect(&mut sub, 1, MINUTE).await.remove("c1").unwrap();
    assert!(!first[0].cached);
    h.publish(&run("c2"), Encoding::MsgPack).await;
    let second = collect(&mut sub, 1, MINUTE).await.remove("c2").unwrap();
    assert!(second[0].cached, "same input, new id: a cache hit");
    assert_eq!(second[0].output, first[0].output);
    assert_eq!(w.metric("jetbatch_engine_jobs_total{model=\"mlp\"}").await, 1.0, "the model ran once");
    assert_eq!(w.metric("jetbatch_cache_hits_total{tier=\"local\"}").await, 1.0);
    // `cache: false` bypasses the cache: the model runs again.
    let mut uncached = run("c2-nocache");
    if let rmpv::Value::Map(m) = &mut uncached {
        m.push(("cache".into(), false.into()));
    }
    h.publish(&uncached, Encoding::MsgPack).await;
    let bypass = collect(&mut sub, 1, MINUTE).await.remove("c2-nocache").unwrap();
    assert!(!bypass[0].cached);
    assert_eq!(bypass[0].output, first[0].output);
    assert_eq!(w.metric("jetbatch_engine_jobs_total{model=\"mlp\"}").await, 2.0, "cache: false ran the model");
    w.signal("TERM");
    assert!(w.wait(MINUTE).success());

    // A new worker process on the same cache: still a hit, and its model never runs.
    let mut w = h.worker("w2", &["--cache-dir", cache_arg]);
    h.publish(&run("c3"), Encoding::MsgPack).await;
    let third = collect(&mut sub, 1, MINUTE).await.remove("c3").unwrap();
    assert!(third[0].cached, "cache survives a restart");
    assert_eq!(w.metric("jetbatch_engine_jobs_total{model=\"mlp\"}").await, 0.0);
    w.signal("TERM");
    assert!(w.wait(MINUTE).success());

    // New weights in the model folder: the fingerprint changes and the cache is not used.
    let module = jetbatch_testkit::mlp_module(99).unwrap();
    module.save(h.models.join("mlp/model.pt")).unwrap();
    let w = h.worker("w3", &["--cache-dir", cache_arg]);
    h.publish(&run("c4"), Encoding::MsgPack).await;
    let fourth = collect(&mut sub, 1, MINUTE).await.remove("c4").unwrap();
    assert!(!fourth[0].cached, "changed weights invalidate the cache");
    assert_ne!(fourth[0].output, first[0].output);
    check_against_direct(&h, &fourth[0], "mlp", &x, 1e-6);
    assert_eq!(w.metric("jetbatch_engine_jobs_total{model=\"mlp\"}").await, 1.0);
}

#[tokio::test]
async fn bad_input_gets_an_error_result_and_is_never_redelivered() {
    let h = Harness::new().await;
    let w = h.worker("w1", &["--max-payload-bytes", "4096"]);
    let mut sub = h.subscribe_results().await;
    let json = |s: &str| s.as_bytes().to_vec();
    let x16: Vec<f32> = values(3, 16);
    let x16s = serde_json::to_string(&x16).unwrap();
    let cases: Vec<(&str, &str, Vec<u8>, ErrorCode, &str)> = vec![
        ("bad-missing", "mlp", json(r#"{"id":"bad-missing","model":"mlp","kind":"tensor"}"#), ErrorCode::BadRequest, "missing field `input`"),
        ("bad-model", "nope", json(r#"{"id":"bad-model","model":"nope","kind":"tensor","input":{"inputs":[]}}"#), ErrorCode::UnknownModel, "'nope'"),
        ("bad-kind", "mlp", json(r#"{"id":"bad-kind","model":"mlp","kind":"dance","input":{}}"#), ErrorCode::UnsupportedKind, "dance"),
        ("bad-lmkind", "mlp", json(r#"{"id":"bad-lmkind","model":"mlp","kind":"generate","input":{"prompt":"hi"}}"#), ErrorCode::UnsupportedKind, "generate"),
        (
            "bad-shape",
            "mlp",
            json(r#"{"id":"bad-shape","model":"mlp","kind":"tensor","input":{"inputs":[{"dtype":"f32","shape":[3],"data":[1,2,3]}]}}"#),
            ErrorCode::BadRequest,
            "input.inputs[0].shape",
        ),
        (
            "bad-dtype",
            "mlp",
            json(&format!(r#"{{"id":"bad-dtype","model":"mlp","kind":"tensor","input":{{"inputs":[{{"dtype":"f64","shape":[16],"data":{x16s}}}]}}}}"#)),
            ErrorCode::BadRequest,
            "input.inputs[0].dtype",
        ),
        (
            "bad-count",
            "mlp",
            json(r#"{"id":"bad-count","model":"mlp","kind":"tensor","input":{"inputs":[]}}"#),
            ErrorCode::BadRequest,
            "takes 1 tensor(s)",
        ),
        (
            "bad-size",
            "mlp",
            json(&format!(r#"{{"id":"bad-size","model":"mlp","kind":"tensor","input":{{"inputs":[],"pad":"{}"}}}}"#, "x".repeat(5000))),
            ErrorCode::BadRequest,
            "over the limit",
        ),
        (
            "bad-subject",
            "mlp",
            json(r#"{"id":"bad-subject","model":"seqproj","kind":"tensor","input":{"inputs":[]}}"#),
            ErrorCode::BadRequest,
            "subject's model",
        ),
    ];
    for (id, model, payload, _, _) in &cases {
        h.publish_raw(model, Some(id), payload.clone(), true).await;
    }
    // A msgpack job whose binary data has the wrong length.
    let mut bad_bin = tensor_job("bad-bytes", "mlp", &[mlp_input(1)], Encoding::MsgPack);
    if let rmpv::Value::Map(m) = &mut bad_bin {
        m[3].1 = rmpv::Value::Map(vec![(
            "inputs".into(),
            rmpv::Value::Array(vec![rmpv::Value::Map(vec![
                ("dtype".into(), "f32".into()),
                ("shape".into(), rmpv::Value::Array(vec![16.into()])),
                ("data".into(), rmpv::Value::Binary(vec![0; 10])),
            ])]),
        )]);
    }
    h.publish(&bad_bin, Encoding::MsgPack).await;
    // Payloads without a readable id: nobody to answer, so they go to the dead letters.
    h.publish_raw("mlp", None, vec![0xc1, 0xc1, 0x00], false).await;
    h.publish_raw("mlp", None, json(r#"{"id":"cut-off","model":"#), true).await;

    let got = collect(&mut sub, cases.len() + 1, MINUTE).await;
    for (id, _, _, code, needle) in &cases {
        let r = &got.get(*id).unwrap_or_else(|| panic!("no result for {id}: {got:?}"))[0];
        let err = r.error.as_ref().expect("error result");
        assert_eq!((r.status, err.code), (Status::Error, *code), "{id}: {err:?}");
        assert!(err.message.contains(needle), "{id}: '{}' should mention '{needle}'", err.message);
    }
    let bytes = &got["bad-bytes"][0].error.as_ref().unwrap().message;
    assert!(bytes.starts_with("input.inputs[0].data: 10 bytes"), "{bytes}");

    // Past ack_wait (5 s): nothing redelivered, nothing pending, the jobs stream is empty.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let info = h.consumer_info().await;
    assert_eq!((info.num_redelivered, info.num_ack_pending, info.num_pending), (0, 0, 0), "{info:?}");
    assert_eq!(h.stream_messages("JETBATCH_JOBS").await, 0);
    let dead = h.js.get_stream("JETBATCH_DEAD").await.unwrap();
    let msg = dead.get_last_raw_message_by_subject("jetbatch.dead.invalid").await.expect("dead letter");
    assert!(msg.headers.get("Jetbatch-Error-Code").is_some_and(|v| v.as_str() == "bad_request"));
    assert_eq!(h.stream_messages("JETBATCH_DEAD").await, 2);
    assert!(w.log_text().lines().all(|l| !l.contains("panicked")), "no panic");
    assert_eq!(w.metric("jetbatch_jobs_total{kind=\"tensor\",model=\"mlp\",status=\"error\"}").await, 6.0);
}

#[tokio::test]
async fn two_workers_share_a_thousand_jobs_and_answer_each_exactly_once() {
    let h = Harness::new().await;
    let spread = ["--max-inflight", "64", "--pull-batch", "16"];
    let (w1, w2) = (h.worker("w1", &spread), h.worker("w2", &spread));
    w1.ready().await;
    w2.ready().await;
    let mut sub = h.subscribe_results().await;
    let jobs: Vec<_> = (0..1000u64)
        .map(|i| tensor_job(&format!("pool-{i}"), "seqproj", &[seq_input(i, 64 + (i % 64) as i64)], Encoding::MsgPack))
        .collect();
    burst(&h, &jobs).await;
    let got = collect(&mut sub, 1000, 2 * MINUTE).await;
    assert_eq!(got.len(), 1000);
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for (id, rs) in &got {
        assert_eq!(rs.len(), 1, "{id} answered {} times", rs.len());
        assert_eq!(rs[0].status, Status::Ok);
        *by_worker.entry(rs[0].worker.clone()).or_default() += 1;
    }
    assert_eq!(by_worker.len(), 2, "both workers did work: {by_worker:?}");
    assert_eq!(h.stream_messages("JETBATCH_JOBS").await, 0);
}

#[tokio::test]
async fn sigterm_under_load_loses_no_job() {
    let h = Harness::new().await;
    write_heavy_model(&h, 40, 512, 4);
    let mut sub = h.subscribe_results().await;
    burst(&h, &heavy_jobs("term", 1000)).await;
    // With a 120 s ack_wait, a job w1 held and did not hand back would miss the 60 s deadline below.
    let slow_redelivery = ["--ack-wait-secs", "120"];
    let mut w1 = h.worker("w1", &[&["--max-inflight", "64", "--pull-batch", "32"][..], &slow_redelivery].concat());
    let early = collect(&mut sub, 100, MINUTE).await;
    w1.signal("TERM");
    let status = w1.wait(MINUTE);
    assert!(status.success(), "clean exit after SIGTERM: {status:?}\n{}", w1.log_text());
    let log = w1.log_text();
    assert!(log.contains("shutdown") && log.contains("stopped"), "{log}");
    let done_by_w1 = h.stream_messages("JETBATCH_RESULTS").await;
    assert!(done_by_w1 < 1000, "the signal arrived mid-load ({done_by_w1} done)");
    let handed_back: u64 = log
        .split("handed_back=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .expect("shutdown reports the jobs it handed back");
    assert!(handed_back > 0, "unstarted jobs were nak'ed at shutdown");

    let _w2 = h.worker("w2", &slow_redelivery);
    let mut got = collect(&mut sub, 1000 - early.len(), MINUTE).await;
    for (id, rs) in early {
        got.entry(id).or_default().extend(rs);
    }
    let ids: HashSet<_> = got.keys().cloned().collect();
    assert_eq!(ids.len(), 1000, "every job answered");
    for (id, rs) in &got {
        assert_eq!(rs.len(), 1, "{id} answered once");
    }
    assert_eq!(h.stream_messages("JETBATCH_RESULTS").await, 1000);
    assert_eq!(h.stream_messages("JETBATCH_JOBS").await, 0);
}

#[tokio::test]
async fn metrics_endpoint_and_bus_snapshots_report_the_work() {
    let h = Harness::new().await;
    let cache = h.dir.path().join("cache");
    let w = h.worker("w1", &["--cache-dir", cache.to_str().unwrap()]);
    let mut snapshots = h.client.subscribe("jetbatch.metrics.w1").await.unwrap();
    let mut sub = h.subscribe_results().await;
    let jobs: Vec<_> = (0..25u64).map(|i| tensor_job(&format!("m-{i}"), "mlp", &[mlp_input(i % 20)], Encoding::MsgPack)).collect();
    burst(&h, &jobs[..20]).await;
    collect(&mut sub, 20, MINUTE).await;
    burst(&h, &jobs[20..]).await;
    collect(&mut sub, 5, MINUTE).await;

    let text = w.http_get("/metrics").await;
    for name in [
        "jetbatch_jobs_total",
        "jetbatch_job_latency_seconds_bucket",
        "jetbatch_batch_size_bucket",
        "jetbatch_batch_compute_seconds_bucket",
        "jetbatch_cache_hits_total",
        "jetbatch_cache_misses_total",
        "jetbatch_inflight_jobs",
        "jetbatch_consumer_pending",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(w.metric("jetbatch_jobs_total{kind=\"tensor\",model=\"mlp\",status=\"ok\"}").await, 25.0);
    assert_eq!(w.metric("jetbatch_cache_hits_total{tier=\"local\"}").await, 5.0);
    assert_eq!(w.metric("jetbatch_cache_misses_total").await, 20.0);
    assert_eq!(w.metric("jetbatch_job_latency_seconds_count{model=\"mlp\"}").await, 25.0);
    assert_eq!(w.metric("jetbatch_batch_size_sum{model=\"mlp\"}").await, 20.0, "every computed job in a batch");
    let batches = w.metric("jetbatch_batch_size_count{model=\"mlp\"}").await;
    assert!((1.0..=20.0).contains(&batches), "{batches} batches");
    let compute = w.metric("jetbatch_batch_compute_seconds_sum{model=\"mlp\"}").await;
    assert!(compute > 0.0 && compute < 10.0, "compute seconds {compute}");
    let latency = w.metric("jetbatch_job_latency_seconds_sum{model=\"mlp\"}").await;
    assert!(latency > 0.0 && latency < 25.0 * 10.0, "latency sum {latency}");
    assert_eq!(w.metric("jetbatch_inflight_jobs").await, 0.0);

    // Snapshots are structured (schemas/metrics-snapshot.schema.json); one taken before the work
    // may still be in the subscription.
    let hits = |snap: &serde_json::Value| snap["metrics"]["jetbatch_cache_hits_total"]["series"][0]["value"].as_f64();
    let snap = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), snapshots.next()).await.expect("a snapshot within 10 s").unwrap();
        let snap: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        if hits(&snap) == Some(5.0) {
            break snap;
        }
        assert_eq!(hits(&snap), Some(0.0), "{snap}");
    };
    assert_eq!(snap["worker"], "w1");
    let ok = &snap["metrics"]["jetbatch_jobs_total"]["series"][0];
    assert_eq!((&ok["labels"]["model"], &ok["value"]), (&"mlp".into(), &25.0.into()), "{snap}");
    assert_eq!(snap["metrics"]["jetbatch_cache_hits_total"]["series"][0]["labels"]["tier"], "local", "{snap}");
}

#[tokio::test]
async fn long_batches_send_progress_acks_instead_of_being_redelivered() {
    let h = Harness::new().await;
    // One batch of 64 through 750 2048-wide layers (~400 GFLOP, 2 s at 200 GFLOP/s) outlasts the 1 s ack_wait.
    write_heavy_model(&h, 750, 2048, 64);
    let mut sub = h.subscribe_results().await;
    burst(&h, &heavy_jobs("long", 64)).await;
    let w = h.worker("w1", &["--ack-wait-secs", "1", "--max-inflight", "64"]);
    while w.metric("jetbatch_inflight_jobs").await < 64.0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An idle second worker would take over any job whose lease expired, and answer it again.
    let thief = h.worker("w2", &["--ack-wait-secs", "1"]);
    let got = collect(&mut sub, 64, MINUTE).await;
    assert_eq!(got.len(), 64);
    let compute = got.values().map(|r| r[0].timing.compute_ms).fold(0.0, f64::max);
    assert!(compute > 1500.0, "a batch outlasted ack_wait ({compute} ms)");
    assert!(got.values().all(|r| r.len() == 1), "answered once each");
    assert_eq!(thief.metric("jetbatch_redeliveries_total").await, 0.0, "progress acks kept every job with w1");
    assert!(w.metric("jetbatch_progress_acks_total").await >= 64.0);
}

#[tokio::test]
async fn submit_resumes_and_publishes_only_what_is_missing() {
    let h = Harness::new().await;
    let w = h.worker("w1", &[]);
    let input = h.dir.path().join("jobs.jsonl");
    let output = h.dir.path().join("results.jsonl");
    let lines: Vec<String> = (0..10u64)
        .map(|i| serde_json::to_string(&serde_json::json!({"id": format!("s-{i}"), "model": "mlp", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": values(i, 16)}]}})).unwrap())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    // As if an earlier run had written four results before it crashed.
    let earlier: Vec<String> = (0..4).map(|i| format!(r#"{{"id":"s-{i}","status":"ok","from":"earlier run"}}"#)).collect();
    std::fs::write(&output, earlier.join("\n") + "\n").unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_jetbatch"))
        .args(["submit", "--quiet", "--nats-url", &h.url(), "--idle-timeout-secs", "60", "-i"])
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&output).unwrap();
    let ids: Vec<String> = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 10, "{text}");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 10, "no id twice");
    for line in text.lines().skip(4) {
        let r = JobResult::decode(line.as_bytes()).unwrap();
        assert_eq!(r.status, Status::Ok);
        let i: u64 = r.id.trim_start_matches("s-").parse().unwrap();
        check_against_direct(&h, &r, "mlp", &mlp_input(i), 1e-6);
    }
    assert_eq!(w.metric("jetbatch_jobs_total{kind=\"tensor\",model=\"mlp\",status=\"ok\"}").await, 6.0, "only the missing six were submitted");
}

#[tokio::test]
async fn setup_models_and_cache_commands() {
    let h = Harness::new().await;
    let bin = env!("CARGO_BIN_EXE_jetbatch");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    // Settings from a config file (flag names as keys); a flag still wins over the file.
    let config = h.dir.path().join("jetbatch.toml");
    std::fs::write(&config, format!("nats-url = [\"{}\"]\nmax-ack-pending = 77\nmax-deliver = 7\nack-wait-secs = 9\n", h.url())).unwrap();
    let (ok, out) = run(&["setup", "--config", config.to_str().unwrap(), "--ack-wait-secs", "11"]);
    assert!(ok && out.contains("consumers jetbatch-workers-high, jetbatch-workers, jetbatch-workers-low are ready"), "{out}");
    let info = h.consumer_info().await;
    assert_eq!((info.config.max_ack_pending, info.config.ack_wait), (77, std::time::Duration::from_secs(11)));
    // Workers count deliveries against max-deliver; the server redelivers without limit, so it strands no job.
    assert_eq!(info.config.max_deliver, -1);

    let models = h.models.to_str().unwrap();
    let (ok, out) = run(&["models", "--models", models, "--load"]);
    assert!(ok, "{out}");
    assert!(out.contains("ok      mlp  kinds=tensor") && out.contains("loaded+warm"), "{out}");
    std::fs::create_dir_all(h.models.join("broken")).unwrap();
    std::fs::write(h.models.join("broken/jetbatch.toml"), "backend = \"torchscript\"\n").unwrap();
    let (ok, out) = run(&["models", "--models", models]);
    assert!(!ok && out.contains("invalid broken"), "an invalid model fails validation: {out}");

    let cache = h.dir.path().join("cache");
    let c = jetbatch::cache::Local::open(&cache, None, 0).unwrap();
    c.put(&[1; 32], &jetbatch::job::Output::Tensor(vec![mlp_input(1)])).unwrap();
    c.flush().unwrap();
    drop(c);
    let cache = cache.to_str().unwrap();
    // `setup` made the (empty) shared bucket too.
    let url = h.url();
    let (ok, out) = run(&["cache", "--cache-dir", cache, "--nats-url", &url, "stats"]);
    assert!(ok && out.contains("\"local\":{\"entries\":1") && out.contains("\"status\":\"ok\""), "{out}");
    let (ok, out) = run(&["cache", "--cache-dir", cache, "--nats-url", &url, "clear"]);
    assert!(ok && out.contains("\"local\":{\"entries\":0"), "{out}");
}

#[tokio::test]
async fn an_unopenable_cache_is_logged_and_the_worker_runs_without_it() {
    let h = Harness::new().await;
    let not_a_dir = h.dir.path().join("cache-file");
    std::fs::write(&not_a_dir, b"this is not a sled database").unwrap();
    let w = h.worker("w1", &["--cache-dir", not_a_dir.to_str().unwrap()]);
    let mut sub = h.subscribe_results().await;
    for id in ["nc-1", "nc-2"] {
        h.publish(&tensor_job(id, "mlp", &[mlp_input(1)], Encoding::MsgPack), Encoding::MsgPack).await;
    }
    let got = collect(&mut sub, 2, MINUTE).await;
    assert!(got.values().all(|r| r[0].status == Status::Ok && !r[0].cached), "{got:?}");
    assert!(w.log_text().contains("local cache unavailable"), "{}", w.log_text());
    assert_eq!(w.metric("jetbatch_errors_total{layer=\"cache\",type=\"storage\"}").await, 1.0);
}

#[tokio::test]
async fn submit_says_what_it_waits_for_and_fails_on_error_results() {
    let h = Harness::new().await;
    jetbatch::bus::setup(&h.js, &h.topology).await.unwrap();
    let dir = h.dir.path();
    let jobs = |prefix: &str| {
        let good = serde_json::json!({"id": format!("{prefix}-ok"), "model": "mlp", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": values(1, 16)}]}});
        let bad = serde_json::json!({"id": format!("{prefix}-bad"), "model": "nope", "kind": "tensor", "input": {"inputs": []}});
        let path = dir.join(format!("{prefix}.jsonl"));
        std::fs::write(&path, format!("{good}\n{bad}\n")).unwrap();
        path
    };
    let submit = |input: &std::path::Path, output: &str, extra: &[&str], idle: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_jetbatch"))
            .args(["submit", "--quiet", "--nats-url", &h.url(), "--idle-timeout-secs", idle, "-i"])
            .arg(input)
            .args(["-o", dir.join(output).to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    // No worker: submit says so while it waits, then gives up.
    let first = jobs("a");
    let out = submit(&first, "a.out", &[], "6");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no worker is pulling") && stderr.contains("2 job(s) pending"), "{stderr}");
    // With a worker, the same run (resumed) answers both; an error answer fails the run, by code.
    let _w = h.worker("w1", &[]);
    let out = submit(&first, "a.out", &[], "60");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an error result fails the run: {stderr}");
    assert!(stderr.contains("2 answered: 1 ok (0 cached), 1 error(s) (unknown_model 1)") && stderr.contains("--allow-errors"), "{stderr}");
    assert_eq!(std::fs::read_to_string(dir.join("a.out")).unwrap().lines().count(), 2, "every result is written first");
    let out = submit(&jobs("b"), "b.out", &["--allow-errors"], "60");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
