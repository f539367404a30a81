//! Fault tests: real processes killed, paused and restarted. Each publishes a bounded set of jobs
//! and checks at the end that every job has exactly one result and the jobs stream is empty. The
//! figures (jobs, kills, lost, duplicated, recovery time) are printed for the closing note.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use jetbatch::job::{Encoding, ErrorCode, JobResult, Status};

const MINUTE: Duration = Duration::from_secs(60);

/// Every job answered exactly once in the results stream, and nothing left in the jobs stream.
async fn assert_exactly_once(h: &Harness, prefix: &str, n: u64) -> (usize, usize) {
    let stored = h.stored_results().await;
    let mine: HashMap<_, _> = stored.iter().filter(|(id, _)| id.starts_with(prefix)).collect();
    let lost = (0..n).filter(|i| !mine.contains_key(&format!("{prefix}-{i}"))).count();
    let duplicated = mine.values().filter(|&&&c| c > 1).count();
    assert_eq!((lost, duplicated), (0, 0), "lost, duplicated");
    assert_eq!(h.stream_messages("JETBATCH_JOBS").await, 0, "jobs stream empty");
    (lost, duplicated)
}

/// Live answers per id (every publish, also ones the results stream deduplicated).
fn live_duplicates(live: &HashMap<String, Vec<JobResult>>) -> usize {
    live.values().filter(|rs| rs.len() > 1).count()
}

#[tokio::test]
async fn kill_9_of_one_of_three_workers_mid_batch() {
    let h = Harness::new().await;
    write_heavy_model(&h, 40, 512, 8);
    let args = ["--ack-wait-secs", "2", "--max-inflight", "32", "--pull-batch", "16"];
    let mut workers: Vec<_> = (1..=3).map(|i| h.worker(&format!("w{i}"), &args)).collect();
    for w in &workers {
        w.ready().await;
    }
    let mut sub = h.subscribe_results().await;
    burst(&h, &heavy_jobs("k9", 2000)).await;
    let mut live = collect(&mut sub, 400, MINUTE).await;
    let held = workers[0].metric("jetbatch_inflight_jobs").await;
    workers[0].signal("KILL");
    let killed_at = Instant::now();
    for (id, rs) in collect(&mut sub, 2000 - live.len(), 2 * MINUTE).await {
        live.entry(id).or_default().extend(rs);
    }
    let recovered = killed_at.elapsed();
    assert_eq!(live.len(), 2000, "every job answered");
    assert_eq!(live_duplicates(&live), 0, "no job answered twice, even on the live subject");
    assert_exactly_once(&h, "k9", 2000).await;
    let (mut suppressed, mut redelivered) = (0.0, 0.0);
    for w in &workers[1..] {
        suppressed += w.metric("jetbatch_duplicates_suppressed_total").await;
        redelivered += w.metric("jetbatch_redeliveries_total").await;
    }
    eprintln!(
        "FIGURES kill-9 worker: jobs=2000 kills=1 held_by_killed={held} redelivered={redelivered} lost=0 duplicated=0 \
         suppressed={suppressed} recovery_s={:.1}",
        recovered.as_secs_f64()
    );
    assert!(redelivered > 0.0, "the killed worker held jobs that were redelivered");
    workers.clear();
}

#[tokio::test]
async fn kill_9_of_one_nats_node_in_a_three_node_cluster() {
    let mut h = Harness::cluster().await;
    write_heavy_model(&h, 40, 512, 8);
    let args = ["--ack-wait-secs", "3", "--max-inflight", "32", "--pull-batch", "16"];
    let (w1, w2) = (h.worker("w1", &args), h.worker("w2", &args));
    w1.ready().await;
    w2.ready().await;
    burst(&h, &heavy_jobs("node", 2000)).await;
    h.wait_for_stored(400, MINUTE).await;
    // The node the workers (and this client) connected to first.
    h.nodes[0].kill();
    let killed_at = Instant::now();
    let recovered = h.wait_for_stored(2000, 3 * MINUTE).await;
    // Let in-flight acks land so the jobs stream drains.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_exactly_once(&h, "node", 2000).await;
    eprintln!("FIGURES kill-9 nats node (R3): jobs=2000 kills=1 lost=0 duplicated=0 recovery_s={:.1}", recovered.as_secs_f64().max(killed_at.elapsed().as_secs_f64() - 2.0));
    for w in [&w1, &w2] {
        assert!(w.log_text().contains("nats connection event"), "{}", w.log_text());
    }
}

#[tokio::test]
async fn restart_of_a_single_node_server_under_load() {
    let mut h = Harness::new().await;
    write_heavy_model(&h, 40, 512, 8);
    let w = h.worker("w1", &["--ack-wait-secs", "3", "--max-inflight", "32"]);
    w.ready().await;
    burst(&h, &heavy_jobs("rs", 2000)).await;
    h.wait_for_stored(400, MINUTE).await;
    h.nodes[0].kill();
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.nodes[0].start();
    let recovered = h.wait_for_stored(2000, 3 * MINUTE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_exactly_once(&h, "rs", 2000).await;
    let log = w.log_text();
    assert!(log.contains("disconnected") && log.matches("event=connected").count() >= 2, "the worker reconnected:\n{log}");
    eprintln!(
        "FIGURES nats restart: jobs=2000 restarts=1 downtime_s=1 lost=0 duplicated=0 recovery_s={:.1}",
        down_at.elapsed().as_secs_f64().min(recovered.as_secs_f64() + 1.0)
    );
}

#[tokio::test]
async fn a_paused_worker_does_not_answer_again_what_another_finished() {
    let h = Harness::new().await;
    // About 0.2 s a batch of 8 (40 GFLOP), so w1 is mid-work when paused.
    write_heavy_model(&h, 600, 2048, 8);
    let args = ["--ack-wait-secs", "2", "--max-inflight", "16", "--pull-batch", "16"];
    let w1 = h.worker("w1", &args);
    w1.ready().await;
    let mut sub = h.subscribe_results().await;
    burst(&h, &heavy_jobs("stop", 100)).await;
    // Pause w1 while it holds jobs (one batch computing, others queued).
    let mut live = collect(&mut sub, 8, MINUTE).await;
    w1.signal("STOP");
    let paused_at = Instant::now();
    let w2 = h.worker("w2", &args);
    for (id, rs) in collect(&mut sub, 100 - live.len(), 3 * MINUTE).await {
        live.entry(id).or_default().extend(rs);
    }
    assert_eq!(live.len(), 100, "w2 answered what w1 held once its lease lapsed");
    w1.signal("CONT");
    // w1 wakes up, finishes what it held and must notice those jobs were answered already.
    let deadline = Instant::now() + MINUTE;
    while w1.metric("jetbatch_inflight_jobs").await > 0.0 {
        assert!(Instant::now() < deadline, "w1 settles its held jobs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (id, rs) in collect(&mut sub, 0, Duration::from_secs(2)).await {
        live.entry(id).or_default().extend(rs);
    }
    assert_eq!(live_duplicates(&live), 0, "no second answer from the paused worker");
    let suppressed = w1.metric("jetbatch_duplicates_suppressed_total").await;
    assert!(suppressed > 0.0, "w1 held jobs and suppressed their late answers");
    assert_exactly_once(&h, "stop", 100).await;
    let w2_answered = live.values().filter(|r| r[0].worker == "w2").count();
    eprintln!(
        "FIGURES SIGSTOP worker past ack_wait: jobs=100 paused_s={:.1} answered_by_w2={w2_answered} late_answers_suppressed={suppressed} duplicated=0",
        paused_at.elapsed().as_secs_f64()
    );
    drop(w2);
}

/// `f32[4]` rows of a 10-row table, picked by an `i64[1]` index: index ≥ 10 fails in the model.
fn write_picky_model(h: &Harness) {
    let _g = tch::no_grad_guard();
    let table = tch::Tensor::arange(40, (tch::Kind::Float, tch::Device::Cpu)).reshape([10, 4]);
    let example = tch::Tensor::zeros([2, 1], (tch::Kind::Int64, tch::Device::Cpu));
    let module = tch::CModule::create_by_tracing("Picky", "forward", &[example], &mut |x| vec![table.index_select(0, &x[0].flatten(0, -1))]).unwrap();
    let toml = "backend = \"torchscript\"\nmax_batch_size = 16\nmax_wait_ms = 5\n[[inputs]]\nname = \"idx\"\ndtype = \"i64\"\nshape = [1]\n";
    jetbatch_testkit::write_model(&h.models.join("picky"), &module, toml).unwrap();
}

#[tokio::test]
async fn poison_jobs_are_dead_lettered_after_max_deliver_while_good_jobs_flow() {
    let h = Harness::new().await;
    write_picky_model(&h);
    let w = h.worker("w1", &["--max-deliver", "3"]);
    let mut sub = h.subscribe_results().await;
    let index = |i: i64| jetbatch::tensor::TensorData { dtype: jetbatch::tensor::DType::I64, shape: vec![1], data: i.to_le_bytes().to_vec() };
    let jobs: Vec<_> = (0..105i64)
        .map(|i| {
            let poison = i % 21 == 20;
            let id = if poison { format!("poison-{i}") } else { format!("good-{i}") };
            tensor_job(&id, "picky", &[index(if poison { 99 } else { i % 10 })], Encoding::MsgPack)
        })
        .collect();
    let started = Instant::now();
    burst(&h, &jobs).await;
    let got = collect(&mut sub, 105, MINUTE).await;
    assert_eq!(got.len(), 105);
    for (id, rs) in &got {
        assert_eq!(rs.len(), 1, "{id}");
        let r = &rs[0];
        if id.starts_with("good") {
            let i: i64 = id.trim_start_matches("good-").parse().unwrap();
            assert_eq!(r.status, Status::Ok, "{r:?}");
            let want: Vec<f64> = (0..4).map(|c| ((i % 10) * 4 + c) as f64).collect();
            assert_eq!(r.output_tensors().unwrap()[0].to_f64_vec(), want);
        } else {
            let err = r.error.as_ref().expect("error result");
            assert_eq!(err.code, ErrorCode::ModelError, "{err:?}");
            assert!(err.message.contains("index"), "{}", err.message);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.stream_messages("JETBATCH_DEAD").await, 5);
    let dead = h.js.get_stream("JETBATCH_DEAD").await.unwrap();
    let last = dead.get_last_raw_message_by_subject("jetbatch.dead.picky").await.unwrap();
    assert_eq!(last.headers.get("Jetbatch-Deliveries").map(|v| v.as_str().to_string()), Some("3".into()));
    assert_eq!(last.headers.get("Jetbatch-Error-Code").map(|v| v.as_str().to_string()), Some("model_error".into()));
    assert_eq!(h.stream_messages("JETBATCH_JOBS").await, 0);
    assert_eq!(w.metric("jetbatch_dead_letters_total").await, 5.0);
    eprintln!("FIGURES poison: jobs=105 poison=5 dead_lettered=5 good_ok=100 seconds={:.1}", started.elapsed().as_secs_f64());
}

/// Asks `worker` to drain through its service endpoint (what a Kubernetes preStop hook does).
async fn drain(h: &Harness, worker: &str) {
    use jetbatch::pool;
    let instance = pool::find(&h.client, "jetbatch", worker, pool::DISCOVERY_WINDOW).await.expect("the worker's service");
    let _: serde_json::Value = pool::call(&h.client, instance.subject(pool::verb::DRAIN), &serde_json::json!({}), pool::CALL_TIMEOUT).await.expect("drain");
}

/// A drain followed by SIGKILL (a preStop drain, then the grace-period kill) at several offsets,
/// each round with a new backlog and a new worker after the kill: every job is answered exactly
/// once, none left in the jobs stream. Before the fix, a drain's pull sweep went on taking the
/// jobs it had just handed back, spending a delivery each time, until the server stopped
/// redelivering them: they stayed in the stream for good, unanswered.
#[tokio::test]
async fn drain_then_kill_9_at_several_offsets_strands_no_job() {
    let h = Harness::new().await;
    write_heavy_model(&h, 40, 512, 8);
    let flags = ["--ack-wait-secs", "2", "--max-inflight", "32", "--pull-batch", "16"];
    let n = 300u64;
    let mut answered = 0;
    let started = Instant::now();
    for (round, offset_ms) in [0u64, 300, 1000].into_iter().enumerate() {
        let prefix = format!("dk{round}");
        let w = h.worker(&format!("w{round}"), &flags);
        w.ready().await;
        burst(&h, &heavy_jobs(&prefix, n)).await;
        h.wait_for_stored(answered + 20, MINUTE).await;
        drain(&h, &w.name).await;
        tokio::time::sleep(Duration::from_millis(offset_ms)).await;
        w.signal("KILL");
        drop(w);
        let fresh = h.worker(&format!("w{round}b"), &flags);
        answered += n;
        h.wait_for_stored(answered, MINUTE).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_exactly_once(&h, &prefix, n).await;
        drop(fresh);
    }
    eprintln!("FIGURES drain+kill: rounds=3 jobs={answered} lost=0 duplicated=0 seconds={:.1}", started.elapsed().as_secs_f64());
}

/// A worker killed on a job's last delivery (here the first: `--max-deliver 1`) does not strand
/// it: the consumer redelivers it, and the worker that gets it answers it with an error and
/// dead-letters it instead of starting it again. Before, the server stopped redelivering the jobs
/// the killed worker held: they stayed in the jobs stream, unanswered.
#[tokio::test]
async fn a_job_whose_worker_died_on_its_last_delivery_is_answered_and_dead_lettered() {
    let h = Harness::new().await;
    write_heavy_model(&h, 200, 1024, 4);
    let flags = ["--ack-wait-secs", "2", "--max-inflight", "8", "--pull-batch", "8", "--max-deliver", "1"];
    let n = 40u64;
    let w = h.worker("w1", &flags);
    w.ready().await;
    burst(&h, &heavy_jobs("last", n)).await;
    h.wait_for_stored(4, MINUTE).await;
    w.signal("KILL");
    drop(w);
    let fresh = h.worker("w2", &flags);
    h.wait_for_stored(n, MINUTE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&h, "last", n).await;
    let dead = h.stream_messages("JETBATCH_DEAD").await;
    assert!(dead >= 1, "the jobs the killed worker held were dead-lettered");
    let stream = h.js.get_stream("JETBATCH_DEAD").await.unwrap();
    let last = stream.get_last_raw_message_by_subject("jetbatch.dead.heavy").await.unwrap();
    assert_eq!(last.headers.get("Jetbatch-Deliveries").map(|v| v.as_str().to_string()), Some("2".into()));
    assert_eq!(fresh.metric("jetbatch_dead_letters_total").await, dead as f64);
}

/// SIGTERM under load, then the NATS server goes away for good: the worker exits within
/// `--shutdown-timeout-secs`, non-zero, saying what it left unacked; once a server and a new
/// worker are back, every job is answered exactly once. Before, it reconnected forever.
#[tokio::test]
async fn a_shutdown_whose_nats_server_is_gone_ends_within_its_bound_and_loses_nothing() {
    let mut h = Harness::new().await;
    write_heavy_model(&h, 200, 1024, 4);
    let flags = ["--ack-wait-secs", "2", "--max-inflight", "16", "--shutdown-timeout-secs", "3"];
    let n = 200u64;
    let mut w = h.worker("w1", &flags);
    w.ready().await;
    burst(&h, &heavy_jobs("gone", n)).await;
    h.wait_for_stored(8, MINUTE).await;
    h.nodes[0].kill();
    w.signal("TERM");
    let signalled = Instant::now();
    let status = w.wait(Duration::from_secs(15));
    let took = signalled.elapsed();
    assert!(!status.success(), "a shutdown that could not settle its jobs exits non-zero: {status:?}");
    assert!(took < Duration::from_secs(6), "gone within the 3 s bound (+ exit): {took:?}\n{}", w.log_text());
    assert!(w.log_text().contains("not done within --shutdown-timeout-secs"), "{}", w.log_text());
    h.nodes[0].start();
    let w2 = h.worker("w2", &flags);
    let deadline = Instant::now() + MINUTE;
    while h.stream_messages("JETBATCH_RESULTS").await < n {
        if Instant::now() > deadline {
            let tail: Vec<_> = w2.log_text().lines().rev().take(40).map(str::to_string).collect();
            panic!("not every job answered; consumer {:?}\nw2's log, newest first:\n{}", h.consumer_info().await, tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&h, "gone", n).await;
    drop(w2);
    eprintln!("FIGURES shutdown without nats: bound_s=3 exited_after_s={:.1} jobs={n} lost=0", took.as_secs_f64());
}

/// Issue #18: while the results stream was gone, every retry of a result's publish reached live
/// subscribers (the core message goes out whether or not a stream stores it): 11 copies of one
/// stored answer. A retry now first asks the stream, and sends nothing while it does not answer:
/// subscribers get the first try's copy and the stored one.
#[tokio::test]
async fn a_results_stream_outage_sends_live_subscribers_two_copies_not_one_per_retry() {
    use futures::StreamExt;
    let h = Harness::new().await;
    let w = h.worker("w1", &[]);
    w.ready().await;
    let config = h.js.get_stream("JETBATCH_RESULTS").await.unwrap().info().await.unwrap().config.clone();
    h.js.delete_stream("JETBATCH_RESULTS").await.unwrap();
    let mut sub = h.subscribe_results().await;
    h.publish(&tensor_job("outage-1", "mlp", &[mlp_input(1)], Encoding::MsgPack), Encoding::MsgPack).await;
    // A try waits 5 s for its ack, then 0.5 s, then 1 s: three tries before the stream is back.
    tokio::time::sleep(Duration::from_secs(12)).await;
    h.js.create_stream(config).await.unwrap();
    h.wait_for_stored(1, MINUTE).await;
    let mut copies = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
        copies += 1;
    }
    assert_eq!(copies, 2, "the first try's copy and the stored one");
    assert_eq!(h.stored_results().await.get("outage-1"), Some(&1));
    assert!(w.metric("jetbatch_errors_total{layer=\"bus\",type=\"publish\"}").await >= 1.0, "the first try failed");
}
