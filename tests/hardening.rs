//! A hostile or careless producer against a real worker on real nats-servers: `reply_to` cannot
//! make the worker act with its permissions (the shipped accounts), a result stored under a job's
//! id counts only if it answers that very job, dead letters and results the server refuses still
//! settle the job, made-up names do not become metric series, and neither one huge job nor a model
//! whose chat template loops holds up the rest.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use common::*;
use futures::StreamExt;
use jetbatch::job::{ErrorCode, JobResult, Status};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_jetbatch");

fn mlp_job(id: &str) -> serde_json::Value {
    json!({"id": id, "model": "mlp", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": values(3, 16)}]}})
}

/// Publishes a JSON job with `Nats-Msg-Id` = its id and waits for the stream's ack.
async fn publish_json(js: &jetstream::Context, job: &serde_json::Value) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", job["id"].as_str().unwrap());
    headers.insert("Content-Type", "application/json");
    let subject = format!("jetbatch.jobs.{}", job["model"].as_str().unwrap());
    js.publish_with_headers(subject, headers, job.to_string().into()).await.unwrap().await.expect("job stored");
}

async fn messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream).await.unwrap().info().await.unwrap().state.messages
}

/// Waits until `stream` holds exactly `n` messages.
async fn wait_messages(js: &jetstream::Context, stream: &str, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = messages(js, stream).await;
        if got == n {
            return;
        }
        assert!(Instant::now() < deadline, "{stream}: {got} messages, want {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn error_of(r: &JobResult) -> (ErrorCode, &str) {
    let e = r.error.as_ref().unwrap_or_else(|| panic!("{}: expected an error result, got status {:?}", r.id, r.status));
    (e.code, e.message.as_str())
}

/// A worker process authenticated as `auth`, on the demo models in `dir`.
fn spawn_worker(dir: &Path, url: &str, auth: &[&str]) -> Child {
    let models = dir.join("models");
    jetbatch_testkit::write_fixture_models(&models).unwrap();
    Command::new(BIN)
        .args(["serve", "--nats-url", url, "--worker-id", "w1", "--models", models.to_str().unwrap()])
        .args(auth)
        .env("JETBATCH_ACK_WAIT_SECS", "5")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("worker.log")).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn reply_to_cannot_make_the_worker_act_beyond_answering() {
    let dir = tempfile::tempdir().unwrap();
    let node = shipped_accounts_server(dir.path());
    let as_user = |user: &str, pw: &str| async_nats::ConnectOptions::with_user_and_password(user.into(), pw.into()).connect(node.url());
    let worker_client = as_user("worker", "work-pw").await.unwrap();
    let topology = jetbatch::config::ServeArgs::local(node.url(), dir.path().into(), None).topology;
    jetbatch::bus::setup(&jetstream::new(worker_client.clone()), &topology).await.unwrap();
    let mut worker = spawn_worker(dir.path(), &node.url(), &["--nats-user", "worker", "--nats-password", "work-pw"]);

    let producer = as_user("producer", "prod-pw").await.unwrap();
    let js = jetstream::new(producer.clone());
    let mut results = producer.subscribe("jetbatch.results.>").await.unwrap();
    let mut inbox = producer.subscribe("_INBOX.mine.>").await.unwrap();
    producer.flush().await.unwrap();
    // Another producer's work, answered and stored before the attack.
    for i in 0..10 {
        publish_json(&js, &mlp_job(&format!("keep-{i}"))).await;
    }
    let kept = collect(&mut results, 10, Duration::from_secs(60)).await;
    assert_eq!(kept.len(), 10);
    // Jobs of that producer still queued while the attack runs: the purge would lose them.
    for i in 0..5 {
        publish_json(&js, &json!({"id": format!("queued-{i}"), "model": "nope", "kind": "tensor", "input": {}})).await;
    }

    let hostile = [
        ("purge-results", "$JS.API.STREAM.PURGE.JETBATCH_RESULTS"),
        ("purge-jobs", "$JS.API.STREAM.PURGE.JETBATCH_JOBS"),
        ("delete-consumer", "$JS.API.CONSUMER.DELETE.JETBATCH_JOBS.jetbatch-workers"),
        ("forge-dead", "jetbatch.dead.x"),
        ("re-enqueue", "jetbatch.jobs.mlp"),
        ("overwrite", "jetbatch.results.keep-0"),
        ("system", "$SYS.REQ.SERVER.PING"),
        ("control-char", "_INBOX.a\u{b}b"),
        ("not-allowed", "elsewhere.inbox"),
    ];
    for (id, reply_to) in hostile {
        let mut job = mlp_job(id);
        job["reply_to"] = json!(reply_to);
        publish_json(&js, &job).await;
    }
    let mut allowed = mlp_job("allowed-1");
    allowed["reply_to"] = json!("_INBOX.mine.1");
    publish_json(&js, &allowed).await;

    let got = collect(&mut results, hostile.len() + 6, Duration::from_secs(60)).await;
    for (id, reply_to) in hostile {
        let r = &got.get(id).unwrap_or_else(|| panic!("no result for {id}"))[0];
        let (code, message) = error_of(r);
        assert_eq!(code, ErrorCode::BadRequest, "{id} ({reply_to:?}): {message}");
        assert!(message.starts_with("reply_to"), "{id}: {message}");
    }
    assert_eq!(got["allowed-1"][0].status, Status::Ok);
    // The allowed reply_to gets a copy; the stored result is on the job's own subject.
    let copy = tokio::time::timeout(Duration::from_secs(10), inbox.next()).await.expect("reply_to copy").unwrap();
    assert_eq!(JobResult::decode(&copy.payload).unwrap().id, "allowed-1");

    let wjs = jetstream::new(worker_client.clone());
    // Nothing purged, nothing forged, nothing re-enqueued: every job answered once, no dead letter.
    wait_messages(&wjs, "JETBATCH_JOBS", 0, Duration::from_secs(30)).await;
    assert_eq!(messages(&wjs, "JETBATCH_RESULTS").await, 10 + 5 + hostile.len() as u64 + 1);
    assert_eq!(messages(&wjs, "JETBATCH_DEAD").await, 0);
    let keep0 = wjs.get_stream("JETBATCH_RESULTS").await.unwrap().direct_get_last_for_subject("jetbatch.results.keep-0").await.unwrap();
    assert_eq!(JobResult::decode(&keep0.payload).unwrap().status, Status::Ok, "keep-0's answer is its own");
    // Defence in depth: the worker's own account may not purge or delete either.
    let purge = wjs.get_stream("JETBATCH_RESULTS").await.unwrap().purge().await;
    assert!(purge.is_err(), "the worker account must not purge streams");
    let _ = worker.kill();
    let _ = worker.wait();
}

/// A result stored on `jetbatch.results.<id>` by something other than this job's answer.
async fn forge(h: &Harness, id: &str) {
    let body = json!({"id": id, "model": "mlp", "kind": "tensor", "status": "ok", "output": {"outputs": []}, "cached": false,
                      "worker": "forger", "timing": {"queued_ms": 0.0, "compute_ms": 0.0, "batch_size": 1}});
    h.js.publish(format!("jetbatch.results.{id}"), body.to_string().into()).await.unwrap().await.unwrap();
}

#[tokio::test]
async fn a_stored_result_counts_only_if_it_answers_that_very_job() {
    let h = Harness::new().await;
    // The worker's answered-elsewhere check: a redelivered job whose id has a forged result stored.
    let mut topology = h.topology.clone();
    topology.ack_wait_secs = 1.0;
    let consumer = jetbatch::bus::setup(&h.js, &topology).await.unwrap().get(jetbatch::priority::Priority::Normal).clone();
    forge(&h, "victim-1").await;
    publish_json(&h.js, &mlp_job("victim-1")).await;
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let first = batch.next().await.expect("delivered").unwrap();
    assert_eq!(first.info().unwrap().delivered, 1);
    drop(first); // never acked: redelivered after ack_wait
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sub = h.subscribe_results().await;
    let w = h.worker("w1", &[]);
    let got = collect(&mut sub, 1, Duration::from_secs(30)).await;
    let answer = &got["victim-1"][0];
    assert_eq!((answer.status, answer.worker.as_str()), (Status::Ok, "w1"), "the job was computed, not acked as answered");
    assert_eq!(w.metric("jetbatch_duplicates_suppressed_total").await, 0.0);

    // A resumed `submit` does not take a forged result as its job's answer.
    forge(&h, "victim-2").await;
    let (jobs, out) = (h.dir.path().join("jobs.jsonl"), h.dir.path().join("results.jsonl"));
    std::fs::write(&jobs, format!("{}\n{}\n", mlp_job("done-1"), mlp_job("victim-2"))).unwrap();
    std::fs::write(&out, "{\"id\": \"done-1\"}\n").unwrap();
    let run = Command::new(BIN)
        .args(["submit", "--quiet", "--nats-url", &h.url(), "--idle-timeout-secs", "30", "-i", jobs.to_str().unwrap(), "-o", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(run.status.success(), "submit: {}", String::from_utf8_lossy(&run.stderr));
    let lines: Vec<JobResult> = std::fs::read_to_string(&out).unwrap().lines().skip(1).map(|l| JobResult::decode(l.as_bytes()).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0].id.as_str(), lines[0].worker.as_str(), lines[0].status), ("victim-2", "w1", Status::Ok));
}

#[tokio::test]
async fn dead_letters_and_refused_results_still_settle_every_job() {
    // A server whose max_payload a JSON result of a long sequence job exceeds.
    let h = Harness::with_conf("max_payload: 24576").await;
    let _w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    // No readable id, and a header that would make a copied dead-letter publish fail.
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Expected-Stream", "JETBATCH_JOBS");
    h.js.publish_with_headers("jetbatch.jobs.mlp", headers, "not a job".into()).await.unwrap().await.unwrap();
    // 1,024 rows of ones in (about 16 KB of JSON), 1,024 x 3 floats out (about 37 KB).
    let zeros = vec![1; 1024 * 8];
    let big = json!({"id": "too-big", "model": "seqproj", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [1024, 8], "data": zeros}]}});
    publish_json(&h.js, &big).await;
    publish_json(&h.js, &mlp_job("fine-1")).await;

    let got = collect(&mut sub, 2, Duration::from_secs(60)).await;
    assert_eq!(got["fine-1"][0].status, Status::Ok);
    let (code, message) = error_of(&got["too-big"][0]);
    assert_eq!(code, ErrorCode::ModelError);
    assert!(message.contains("could not be stored"), "{message}");
    h.wait_for_stored(2, Duration::from_secs(10)).await;
    wait_messages(&h.js, "JETBATCH_JOBS", 0, Duration::from_secs(30)).await;
    wait_messages(&h.js, "JETBATCH_DEAD", 2, Duration::from_secs(30)).await;
    let dead = h.js.get_stream("JETBATCH_DEAD").await.unwrap();
    let invalid = dead.get_last_raw_message_by_subject("jetbatch.dead.invalid").await.unwrap();
    assert_eq!(&invalid.payload[..], b"not a job");
    assert!(invalid.headers.get("Nats-Expected-Stream").is_none(), "only our own headers on dead letters");
    assert!(invalid.headers.get("Jetbatch-Error-Code").is_some());
    let refused = dead.get_last_raw_message_by_subject("jetbatch.dead.seqproj").await.unwrap();
    assert_eq!(refused.headers.get("Jetbatch-Job-Id").map(|v| v.as_str()), Some("too-big"));
}

#[tokio::test]
async fn ids_subjects_and_made_up_names_are_held_to_the_contract() {
    let h = Harness::new().await;
    let w = h.worker("w1", &[]);
    let mut sub = h.subscribe_results().await;
    // The body's id and the stream's Nats-Msg-Id disagree.
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "other-id");
    h.js.publish_with_headers("jetbatch.jobs.mlp", headers, mlp_job("msgid-1").to_string().into()).await.unwrap().await.unwrap();
    // A subject with extra tokens before the model, or a level we do not have: no stream takes
    // it, so the producer hears at once instead of the job waiting for a consumer.
    for subject in ["jetbatch.jobs.x.y.mlp", "jetbatch.jobs.mlp.urgent", "jetbatch.jobs.mlp.high.x"] {
        let stored = h.js.publish(subject, mlp_job("subject-1").to_string().into()).await.unwrap().await;
        assert!(stored.is_err(), "{subject}: {stored:?}");
    }
    // A `priority` field must say what the subject says, and be a level.
    let mut job = mlp_job("prio-1");
    job["priority"] = json!("low");
    h.js.publish("jetbatch.jobs.mlp.high", job.to_string().into()).await.unwrap().await.unwrap();
    let mut job = mlp_job("prio-2");
    job["priority"] = json!("urgent");
    h.js.publish("jetbatch.jobs.mlp", job.to_string().into()).await.unwrap().await.unwrap();
    // 60 made-up models and kinds: none may become a metric series.
    for i in 0..60 {
        let (model, kind) = (format!("madeup-model-{i}"), format!("madeup-kind-{i}"));
        publish_json(&h.js, &json!({"id": format!("made-{i}"), "model": model, "kind": kind, "input": {}})).await;
    }
    let got: HashMap<String, Vec<JobResult>> = collect(&mut sub, 63, Duration::from_secs(60)).await;
    let (code, message) = error_of(&got["msgid-1"][0]);
    assert!(code == ErrorCode::BadRequest && message.contains("Nats-Msg-Id"), "{message}");
    let (code, message) = error_of(&got["prio-1"][0]);
    assert_eq!(code, ErrorCode::BadRequest);
    assert_eq!(message, "priority: 'low' differs from the level of the subject it was published on ('high', jetbatch.jobs.mlp.high)");
    let (code, message) = error_of(&got["prio-2"][0]);
    assert_eq!((code, message), (ErrorCode::BadRequest, "priority: 'urgent' is not one of high, normal, low"));
    assert!(!got.contains_key("subject-1"));
    assert_eq!((0..60).filter(|i| got.contains_key(&format!("made-{i}"))).count(), 60);
    let metrics = w.http_get("/metrics").await;
    assert!(!metrics.contains("madeup"), "made-up names became series");
    assert!(w.metric("jetbatch_jobs_total{kind=\"invalid\",model=\"unknown\",status=\"error\"}").await >= 60.0, "{metrics}");
}

#[tokio::test]
async fn a_huge_job_does_not_hold_up_the_jobs_behind_it() {
    let h = Harness::new().await;
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    // Texts scored whole are tokenised whole (about 900k tokens each), which takes seconds.
    let text = "lorem ipsum dolor sit amet ".repeat(900 << 10 >> 5);
    for i in 0..3 {
        publish_json(&h.js, &json!({"id": format!("huge-{i}"), "model": "tiny-lm", "kind": "loglikelihood_rolling", "input": {"text": text}})).await;
    }
    let start = Instant::now();
    for i in 0..5 {
        publish_json(&h.js, &mlp_job(&format!("small-{i}"))).await;
    }
    let mut small = 0;
    while small < 5 {
        let msg = tokio::time::timeout(Duration::from_secs(60), sub.next()).await.expect("a result").unwrap();
        let r = JobResult::decode(&msg.payload).unwrap();
        assert!(r.id.starts_with("small-"), "{} was answered before the small jobs", r.id);
        assert_eq!(r.status, Status::Ok);
        small += 1;
    }
    let waited = start.elapsed();
    eprintln!("FIGURES small jobs behind 3 huge ones answered in {waited:?}");
    assert!(waited < Duration::from_secs(3), "small jobs waited {waited:?} behind the huge ones");
}

/// A chat template is code from a model folder, run for each `generate` job with `messages`. One
/// that loops or floods is stopped at its bounds and answers that job `model_error` naming it, off
/// the intake loop, while the other jobs of the burst are answered; one that loops on every
/// conversation is found when the model is loaded (`jetbatch models`, the `load` endpoint).
#[tokio::test]
async fn a_chat_template_that_loops_or_floods_answers_its_job_and_holds_up_no_other() {
    let h = Harness::new().await;
    let spin = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
    let chat_lm = |dir: &Path, template: &str| {
        jetbatch_testkit::write_tiny_lm(dir, 1, 32, 1).unwrap();
        std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
    };
    // Loops or floods only on some conversations, so the load probe passes it.
    let trap = format!(
        "{{% if messages[-1].content == 'spin' %}}{spin}{{% elif messages[-1].content == 'flood' %}}{{{{ 'x' * 100000000 }}}}{{% endif %}}\
         {{% for m in messages %}}<{{{{ m.role }}}}>{{{{ m.content }}}}{{% endfor %}}"
    );
    chat_lm(&h.models.join("trap-lm"), &trap);
    chat_lm(&h.models.join("loop-lm"), spin);
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let chat = |id: &str, model: &str, content: &str| {
        json!({"id": id, "model": model, "kind": "generate", "input": {"messages": [{"role": "user", "content": content}]}, "params": {"max_new_tokens": 2}})
    };
    let start = Instant::now();
    // The looping one first: rendered in line, it held every job behind it for good.
    for job in [chat("spin", "trap-lm", "spin"), mlp_job("other"), chat("fine", "trap-lm", "hi"), chat("flood", "trap-lm", "flood"), chat("loop", "loop-lm", "hi")] {
        publish_json(&h.js, &job).await;
    }
    let got = collect(&mut sub, 5, Duration::from_secs(30)).await;
    let took = start.elapsed();
    assert_eq!(got.len(), 5, "answered in {took:?}: {:?}; log:\n{}", got.keys().collect::<Vec<_>>(), w.log_text());
    eprintln!("FIGURES 5 jobs, 3 past their template's bounds, answered in {took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    for id in ["other", "fine"] {
        assert_eq!(got[id][0].status, Status::Ok, "{:?}", got[id]);
    }
    let err = |id: &str| got[id][0].error.clone().unwrap_or_else(|| panic!("{id} should fail: {:?}", got[id]));
    let fuel = "input.messages: the model's chat template (chat_template.jinja) ran more than 10000000 instructions (does it loop without end?)";
    for id in ["spin", "loop"] {
        assert_eq!((err(id).code, err(id).message.as_str()), (ErrorCode::ModelError, fuel), "{id}");
    }
    let cap = (1 << 20) + 256 + 4 * "userflood".len();
    assert_eq!(err("flood").code, ErrorCode::ModelError);
    assert_eq!(
        err("flood").message,
        format!("input.messages: the model's chat template (chat_template.jinja) wrote more than {cap} bytes (1 MiB, 256 a message and 4 times the conversation's text)")
    );

    // The worker stays healthy, and names the template that failed its probe at load.
    let instance = jetbatch::pool::find(&h.client, "jetbatch", "w1", jetbatch::pool::DISCOVERY_WINDOW).await.unwrap();
    let call = |verb: &str, body: serde_json::Value| {
        let (client, subject) = (h.client.clone(), instance.subject(verb));
        async move { jetbatch::pool::call::<serde_json::Value>(&client, subject, &body, jetbatch::pool::CALL_TIMEOUT).await.unwrap() }
    };
    let health = call(jetbatch::pool::verb::HEALTH, json!({})).await;
    assert_eq!((&health["ok"], &health["intake_stalled_secs"]), (&json!(true), &json!(null)), "{health}");
    let warning = format!("generate jobs with messages fail: {}", &fuel["input.messages: ".len()..]);
    let loaded = call(jetbatch::pool::verb::LOAD, json!({"model": "loop-lm"})).await;
    assert_eq!(loaded["warnings"], json!([warning]), "{loaded}");
    let loaded = call(jetbatch::pool::verb::LOAD, json!({"model": "trap-lm"})).await;
    assert_eq!(loaded.get("warnings"), None, "{loaded}");

    let only = h.dir.path().join("only-loop");
    std::fs::create_dir_all(&only).unwrap();
    std::os::unix::fs::symlink(h.models.join("loop-lm"), only.join("loop-lm")).unwrap();
    let out = Command::new(BIN).args(["models", "--load", "--models"]).arg(&only).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" loaded+warm\n"), "{stdout}");
    assert!(stdout.contains(&format!("\nwarning loop-lm  {warning}\n")), "{stdout}");
}
