//! Worker pools against real nats-servers: the service endpoints (discovery, info, stats, health,
//! load/unload, cache, drain) and `jetbatch pool`, a partial worker beside a healthy one, `serve`
//! without models, and a second pool whose filter overlaps the first.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use jetbatch::job::{Encoding, ErrorCode, Status};
use jetbatch::pool::{self, verb, Health, WorkerInfo, WorkerStats, CALL_TIMEOUT};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

/// The schema of one endpoint answer (`$defs/<def>` of `schemas/service.schema.json`).
fn schema(def: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/service.schema.json");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    schema["$ref"] = json!(format!("#/$defs/{def}"));
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn assert_valid(def: &str, doc: &Value) {
    let errors: Vec<String> = schema(def).iter_errors(doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{def}: {errors:?}\n{doc}");
}

/// `jetbatch pool ARGS` against the harness's server.
fn pool_cli(h: &Harness, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jetbatch")).arg("pool").args(["--nats-url", &h.url()]).args(args).output().expect("run jetbatch pool")
}

fn stdout_json(out: &Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A model repository holding only `models` of the harness's (linked, so fingerprints match).
fn partial_repository(h: &Harness, name: &str, models: &[&str]) -> std::path::PathBuf {
    let dir = h.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for m in models {
        std::os::unix::fs::symlink(h.models.join(m), dir.join(m)).unwrap();
    }
    dir
}

async fn call<T: serde::de::DeserializeOwned>(h: &Harness, worker: &str, verb: &str, body: Value) -> Result<T, pool::PoolError> {
    let instance = pool::find(&h.client, "jetbatch", worker, pool::DISCOVERY_WINDOW).await?;
    pool::call(&h.client, instance.subject(verb), &body, CALL_TIMEOUT).await
}

async fn publish_mlp(h: &Harness, ids: impl IntoIterator<Item = String>) {
    for (i, id) in ids.into_iter().enumerate() {
        h.publish(&tensor_job(&id, "mlp", &[mlp_input(i as u64)], Encoding::MsgPack), Encoding::MsgPack).await;
    }
}

#[tokio::test]
async fn list_without_workers_shows_the_backlog_per_level() {
    let h = Harness::new().await;
    let before = String::from_utf8_lossy(&pool_cli(&h, &["list"]).stdout).into_owned();
    assert!(before.contains("0 worker(s)") && before.contains("backlog: no jobs stream or consumers yet"), "{before}");
    jetbatch::bus::setup(&h.js, &h.topology).await.unwrap();
    publish_mlp(&h, (0..3).map(|i| format!("backlog-{i}"))).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "backlog-high");
    let job = rmp_serde::to_vec_named(&tensor_job("backlog-high", "mlp", &[mlp_input(9)], Encoding::MsgPack)).unwrap();
    h.js.publish_with_headers("jetbatch.jobs.mlp.high", headers, job.into()).await.unwrap().await.unwrap();
    let out = pool_cli(&h, &["list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("0 worker(s)\nbacklog: high 1, normal 3, low 0 job(s) waiting; 0 being worked on"), "{table}");
}

#[tokio::test]
async fn discovery_lists_the_workers_with_their_models_stats_and_health() {
    let h = Harness::new().await;
    let cache = h.dir.path().join("cache-w1");
    let w1 = h.worker("w1", &["--cache-dir", cache.to_str().unwrap()]);
    let w2 = h.worker_on("w2", &partial_repository(&h, "w2-models", &["mlp"]), &[]);
    w1.ready().await;
    w2.ready().await;

    // A PING without a reply subject must not stop the workers answering the service verbs.
    h.client.publish("$SRV.PING.jetbatch", "".into()).await.unwrap();
    let inbox = h.client.new_inbox();
    let mut pongs = h.client.subscribe(inbox.clone()).await.unwrap();
    h.client.publish_with_reply("$SRV.PING.jetbatch", inbox, "".into()).await.unwrap();
    let mut pinged = BTreeSet::new();
    while let Ok(Some(pong)) = tokio::time::timeout(Duration::from_secs(5), pongs.next()).await {
        let pong: Value = serde_json::from_slice(&pong.payload).unwrap();
        assert_eq!(pong["version"], env!("CARGO_PKG_VERSION"));
        pinged.insert(pong["metadata"]["worker"].as_str().unwrap().to_string());
        if pinged.len() == 2 {
            break;
        }
    }
    assert_eq!(pinged, BTreeSet::from(["w1".to_string(), "w2".to_string()]));

    let list = stdout_json(&pool_cli(&h, &["--json", "list"]));
    let rows = list.as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["worker"].as_str().unwrap()).collect::<Vec<_>>(), vec!["w1", "w2"]);
    let models = |row: &Value| row["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(models(&rows[0]), vec!["mlp", "seqproj", "tiny-lm"]);
    assert_eq!(models(&rows[1]), vec!["mlp"]);
    let table = pool_cli(&h, &["list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("w1") && table.contains("mlp,seqproj,tiny-lm") && table.contains("2 worker(s)"), "{table}");

    let info: Value = call(&h, "w1", verb::INFO, json!({})).await.unwrap();
    assert_valid("info", &info);
    let info: WorkerInfo = serde_json::from_value(info).unwrap();
    let mlp = info.models.iter().find(|m| m.name == "mlp").unwrap();
    let spec = jetbatch::plan::ModelPlan::load(&h.models.join("mlp")).unwrap();
    assert_eq!((mlp.fingerprint.as_str(), mlp.kinds.as_slice(), mlp.max_batch_size), (&*spec.fingerprint, &["tensor".to_string()][..], spec.config.max_batch_size));
    assert_eq!((info.consumer.as_str(), info.filter.as_slice()), ("jetbatch-workers", &["jetbatch.jobs.*.high", "jetbatch.jobs.*", "jetbatch.jobs.*.low"].map(String::from)[..]));
    assert_eq!(info.cache_dir.as_deref(), Some(std::fs::canonicalize(&cache).unwrap().to_str().unwrap()));

    // Work, then the figures: every job answered ok once, counted by the worker that answered it.
    let mut sub = h.subscribe_results().await;
    publish_mlp(&h, (0..6).map(|i| format!("d{i}"))).await;
    publish_mlp(&h, ["d0".to_string()]).await; // a duplicate id: dropped by the stream
    let got = collect(&mut sub, 6, MINUTE).await;
    let mut by_worker: HashMap<String, u64> = HashMap::new();
    for rs in got.values() {
        assert_eq!(rs[0].status, Status::Ok);
        *by_worker.entry(rs[0].worker.clone()).or_default() += 1;
    }
    for w in ["w1", "w2"] {
        // A job is counted, then acked, just after its result is published: wait for both.
        let want = (by_worker.get(w).copied().unwrap_or(0), 0, 0, false);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats: Value = call(&h, w, verb::STATS, json!({})).await.unwrap();
            assert_valid("stats", &stats);
            let stats: WorkerStats = serde_json::from_value(stats).unwrap();
            let got = (stats.jobs.get("ok").copied().unwrap_or(0), stats.inflight, stats.queued.len(), stats.draining);
            if got == want {
                break;
            }
            assert!(Instant::now() < deadline, "{w}: {got:?} != {want:?}: {stats:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let health: Value = call(&h, w, verb::HEALTH, json!({})).await.unwrap();
        assert_valid("health", &health);
        let health: Health = serde_json::from_value(health).unwrap();
        assert!(health.ok && health.consuming && health.engine_alive, "{health:?}");
    }
    // w1 computed its jobs with a cache: a miss each.
    let w1_stats: WorkerStats = call(&h, "w1", verb::STATS, json!({})).await.unwrap();
    assert_eq!(w1_stats.cache.misses, by_worker.get("w1").copied().unwrap_or(0));

    // `$SRV.STATS` carries the same figures as the stats endpoint's data.
    let reply = h.client.request("$SRV.STATS.jetbatch", "".into()).await.unwrap();
    let srv: Value = serde_json::from_slice(&reply.payload).unwrap();
    let data = srv["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == "stats").unwrap()["data"].clone();
    assert_valid("stats", &data);

    // The cache of a running worker, through its endpoint (sled keeps the folder locked).
    let stats = pool::cache_via_worker(&h.client, "jetbatch", &cache, false).await.unwrap().expect("w1 holds the cache");
    assert_valid("cache_stats", &stats);
    assert_eq!(stats["local"]["entries"], by_worker.get("w1").copied().unwrap_or(0));
    // `jetbatch cache stats` on that folder goes through the worker too.
    let command = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
        .args(["cache", "--nats-url", &h.url(), "--shared-cache-bucket", "", "--cache-dir"])
        .arg(&cache)
        .arg("stats")
        .output()
        .expect("run cache stats");
    assert!(command.status.success(), "{}", String::from_utf8_lossy(&command.stderr));
    assert_eq!(stdout_json(&command)["local"]["entries"], stats["local"]["entries"]);
    let cleared = stdout_json(&pool_cli(&h, &["--json", "cache-clear", "--worker", "w1"]));
    assert_eq!(cleared["local"]["entries"], 0);
    assert!(pool::cache_via_worker(&h.client, "jetbatch", h.dir.path(), false).await.unwrap().is_none(), "no worker holds that folder");

    // Refusals come as the services framework's errors, with the reason.
    match call::<Value>(&h, "w2", verb::CACHE_STATS, json!({})).await {
        Err(pool::PoolError::Service { code: 409, status, .. }) => assert!(status.contains("without a cache"), "{status}"),
        other => panic!("{other:?}"),
    }
    match call::<Value>(&h, "w2", verb::UNLOAD, json!({"model": "seqproj"})).await {
        Err(pool::PoolError::Service { code: 404, status, .. }) => assert!(status.contains("'seqproj' is not in this worker's repository"), "{status}"),
        other => panic!("{other:?}"),
    }
    match call::<Value>(&h, "w2", verb::LOAD, json!({"name": "seqproj"})).await {
        Err(pool::PoolError::Service { code: 400, status, .. }) => assert!(status.contains("expected {\"model\": NAME}"), "{status}"),
        other => panic!("{other:?}"),
    }
    let missing = pool_cli(&h, &["info", "--worker", "w9"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no worker 'w9'"), "{}", String::from_utf8_lossy(&missing.stderr));
}

#[tokio::test]
async fn load_serves_a_model_added_after_start_and_unload_stops_it() {
    let h = Harness::new().await;
    let repo = partial_repository(&h, "w-models", &["mlp"]);
    let w = h.worker_on("w", &repo, &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let seq = seq_input(3, 4);
    h.publish(&tensor_job("before", "seqproj", std::slice::from_ref(&seq), Encoding::Json), Encoding::Json).await;
    let before = &collect(&mut sub, 1, MINUTE).await["before"][0];
    assert_eq!(before.error.as_ref().unwrap().code, ErrorCode::UnknownModel, "no worker of the pool serves it: {before:?}");

    std::os::unix::fs::symlink(h.models.join("seqproj"), repo.join("seqproj")).unwrap();
    let loaded = stdout_json(&pool_cli(&h, &["--json", "load", "--worker", "w", "--model", "seqproj"]));
    assert_valid("model", &loaded);
    let spec = jetbatch::plan::ModelPlan::load(&h.models.join("seqproj")).unwrap();
    assert_eq!((loaded["name"].as_str(), loaded["fingerprint"].as_str()), (Some("seqproj"), Some(&*spec.fingerprint)));
    h.publish(&tensor_job("after", "seqproj", std::slice::from_ref(&seq), Encoding::Json), Encoding::Json).await;
    let after = &collect(&mut sub, 1, MINUTE).await["after"][0];
    let want = direct_forward(&h.models.join("seqproj/model.pt"), std::slice::from_ref(&seq));
    assert_close(&after.output_tensors().expect("ok")[0].to_f64_vec(), &want[0], 1e-6, "after load");

    // A folder that cannot be served: the load says why, and so do its jobs.
    std::fs::create_dir(repo.join("broken")).unwrap();
    std::fs::write(repo.join("broken/jetbatch.toml"), "backend = \"onnx\"\n").unwrap();
    let refused = pool_cli(&h, &["load", "--worker", "w", "--model", "broken"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("422") && stderr.contains("onnx"), "{stderr}");
    h.publish(&tensor_job("broken-job", "broken", std::slice::from_ref(&seq), Encoding::Json), Encoding::Json).await;
    let broken = &collect(&mut sub, 1, MINUTE).await["broken-job"][0];
    let err = broken.error.as_ref().unwrap();
    assert!(err.code == ErrorCode::ModelError && err.message.contains("onnx"), "{err:?}");

    let unloaded = stdout_json(&pool_cli(&h, &["--json", "unload", "--worker", "w", "--model", "seqproj"]));
    assert_valid("unloaded", &unloaded);
    assert_eq!(unloaded["models"], json!(["mlp"]));
    h.publish(&tensor_job("unloaded", "seqproj", std::slice::from_ref(&seq), Encoding::Json), Encoding::Json).await;
    let gone = &collect(&mut sub, 1, MINUTE).await["unloaded"][0];
    assert_eq!(gone.error.as_ref().unwrap().code, ErrorCode::UnknownModel);
}

/// The case: a worker lacking a model beside one that serves it answered a third of the
/// jobs `unknown_model`. The healthy worker is paused while the jobs arrive, so the partial one
/// takes every one of them first.
#[tokio::test]
async fn a_partial_worker_hands_jobs_back_to_the_worker_that_serves_them() {
    let h = Harness::new().await;
    let healthy = h.worker("healthy", &[]);
    healthy.ready().await;
    let partial = h.worker_on("partial", &partial_repository(&h, "partial-models", &["mlp"]), &["--pool-refresh-secs", "60"]);
    partial.ready().await;
    // The partial worker's first look at the pool found the healthy one.
    sees_peers(&partial).await;
    healthy.signal("STOP");
    // Its open pull request expires (1 s) so that only the partial worker pulls.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sub = h.subscribe_results().await;
    let n = 20;
    let seqs: Vec<_> = (0..n).map(|i| seq_input(i, 3)).collect();
    for (i, s) in seqs.iter().enumerate() {
        h.publish(&tensor_job(&format!("s{i}"), "seqproj", std::slice::from_ref(s), Encoding::MsgPack), Encoding::MsgPack).await;
    }
    publish_mlp(&h, (0..n).map(|i| format!("m{i}"))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    healthy.signal("CONT");
    let got = collect(&mut sub, 2 * n as usize, MINUTE).await;
    assert_eq!(got.len(), 2 * n as usize, "{:?}", got.keys());
    for (id, rs) in &got {
        assert_eq!(rs.len(), 1, "{id} answered once");
        assert_eq!(rs[0].status, Status::Ok, "{id}: {:?}", rs[0].error);
        if id.starts_with('s') {
            assert_eq!(rs[0].worker, "healthy", "{id}");
        }
    }
    let want = direct_forward(&h.models.join("seqproj/model.pt"), std::slice::from_ref(&seqs[7]));
    assert_close(&got["s7"][0].output_tensors().unwrap()[0].to_f64_vec(), &want[0], 1e-6, "s7");
    let handed_back = partial.metric("jetbatch_naks_total{reason=\"elsewhere\"}").await;
    assert!(handed_back >= 1.0, "the partial worker took seqproj jobs and handed them back: {handed_back}");
}

/// Waits until `w` has seen another worker of the pool serve a model.
async fn sees_peers(w: &Worker) {
    let deadline = Instant::now() + MINUTE;
    while !w.log_text().contains("models served by the other workers of the pool") {
        assert!(Instant::now() < deadline, "{}", w.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The worker that serves the model never pulls (it is stopped): the partial worker hands the
/// job back until its last delivery, then answers it rather than leave it unanswered.
#[tokio::test]
async fn a_job_handed_back_until_its_last_delivery_is_answered_with_the_reason() {
    let h = Harness::new().await;
    let healthy = h.worker("healthy", &[]);
    healthy.ready().await;
    let partial = h.worker_on("partial", &partial_repository(&h, "partial-models", &["mlp"]), &["--pool-refresh-secs", "60", "--max-deliver", "2"]);
    partial.ready().await;
    sees_peers(&partial).await;
    healthy.signal("STOP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sub = h.subscribe_results().await;
    h.publish(&tensor_job("lost", "seqproj", &[seq_input(1, 2)], Encoding::Json), Encoding::Json).await;
    let r = &collect(&mut sub, 1, MINUTE).await["lost"][0];
    healthy.signal("CONT");
    assert_eq!(r.worker, "partial");
    let err = r.error.as_ref().expect("an error answer");
    assert_eq!(err.code, ErrorCode::ModelError);
    assert!(err.message.contains("served by other workers of this pool (healthy)") && err.message.contains("max_deliver 2"), "{err:?}");
    assert_eq!(partial.metric("jetbatch_naks_total{reason=\"elsewhere\"}").await, 1.0, "handed back once, answered on the second delivery");
}

#[tokio::test]
async fn drain_finishes_the_batch_in_flight_and_exits_zero_while_the_other_worker_goes_on() {
    let h = Harness::new().await;
    // About 0.1 s a batch of 4 on one core: the pool is still busy when the drain comes.
    write_heavy_model(&h, 200, 1024, 4);
    let mut sub = h.subscribe_results().await;
    let n = 600;
    burst(&h, &heavy_jobs("drain", n)).await;
    let flags = ["--max-inflight", "16", "--pull-batch", "8", "--ack-wait-secs", "120"];
    let mut w1 = h.worker("w1", &flags);
    let early = collect(&mut sub, 8, MINUTE).await;
    let w2 = h.worker("w2", &flags);
    w2.ready().await;
    let drained = stdout_json(&pool_cli(&h, &["--json", "drain", "--worker", "w1"]));
    assert_valid("draining", &drained);
    assert_eq!(drained["worker"], "w1");
    let status = w1.wait(MINUTE);
    assert!(status.success(), "drain exits 0: {status:?}\n{}", w1.log_text());
    assert!(w1.log_text().contains("drain requested"), "{}", w1.log_text());
    let after_drain = h.stream_messages("JETBATCH_RESULTS").await;
    assert!(after_drain < n, "drained mid-load ({after_drain} of {n} done)");

    let mut got = collect(&mut sub, n as usize - early.len(), 3 * MINUTE).await;
    for (id, rs) in early {
        got.entry(id).or_default().extend(rs);
    }
    assert_eq!(got.len(), n as usize, "every job answered");
    let mut by_w2 = 0;
    for (id, rs) in &got {
        assert_eq!(rs.len(), 1, "{id} answered once");
        assert_eq!(rs[0].status, Status::Ok, "{id}");
        by_w2 += (rs[0].worker == "w2") as usize;
    }
    assert!(by_w2 > 0, "w2 went on with the jobs w1 handed back and the rest");
    assert_eq!(h.stream_messages("JETBATCH_RESULTS").await, n);
    assert_eq!(h.stream_messages("JETBATCH_JOBS").await, 0);
}

#[tokio::test]
async fn serve_refuses_a_repository_without_a_valid_model() {
    let h = Harness::new().await;
    let empty = h.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let broken = partial_repository(&h, "broken", &[]);
    std::fs::create_dir(broken.join("onnx")).unwrap();
    std::fs::write(broken.join("onnx/jetbatch.toml"), "backend = \"onnx\"\n").unwrap();
    for (name, dir, why) in [("empty", &empty, "holds no model folder"), ("broken", &broken, "onnx")] {
        let mut w = h.worker_on(name, dir, &[]);
        let status = w.wait(MINUTE);
        let log = w.log_text();
        assert!(!status.success(), "{name}: {log}");
        assert!(log.contains("no model can be served from") && log.contains(why), "{name}: {log}");
    }
}

#[tokio::test]
async fn a_second_pool_whose_filter_overlaps_the_first_gets_the_servers_reason_and_the_fix() {
    let h = Harness::new().await;
    let setup = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_jetbatch")).args(["setup", "--nats-url", &h.url()]).args(extra).output().expect("run setup")
    };
    let first = setup(&[]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = setup(&["--consumer", "gpu-pool", "--serve-models", "mlp"]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(!stderr.contains("does not exist"), "{stderr}");
    assert!(stderr.contains("filtered consumer not unique on workqueue stream"), "the server's reason: {stderr}");
    assert!(stderr.contains("jetbatch-workers [jetbatch.jobs.*]") && stderr.contains("disjoint --serve-models"), "the fix: {stderr}");
    // Disjoint filters are fine.
    let narrowed = setup(&["--serve-models", "seqproj"]);
    assert!(narrowed.status.success(), "{}", String::from_utf8_lossy(&narrowed.stderr));
    let second = setup(&["--consumer", "gpu-pool", "--serve-models", "mlp"]);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
}

/// A model whose folder reads well but whose weights do not load: its jobs are retried (another
/// worker may load it), then answered with the reason.
#[tokio::test]
async fn a_model_that_fails_to_load_says_why_in_the_result() {
    let h = Harness::new().await;
    let repo = partial_repository(&h, "garbled-models", &["mlp"]);
    std::fs::create_dir(repo.join("garbled")).unwrap();
    std::fs::copy(h.models.join("mlp/jetbatch.toml"), repo.join("garbled/jetbatch.toml")).unwrap();
    std::fs::write(repo.join("garbled/model.pt"), b"not a TorchScript archive").unwrap();
    let w = h.worker_on("w", &repo, &["--max-deliver", "2"]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    h.publish(&tensor_job("garbled-1", "garbled", &[mlp_input(1)], Encoding::Json), Encoding::Json).await;
    let r = &collect(&mut sub, 1, MINUTE).await["garbled-1"][0];
    let err = r.error.as_ref().expect("an error answer");
    assert_eq!(err.code, ErrorCode::ModelError);
    assert!(err.message.contains("cannot load model"), "{err:?}");
}

/// The case: every `load` of a name without a folder was kept in the invalid list, so
/// thirteen 100 KB names pushed `info` over max_payload and the worker vanished from `pool
/// list`. Loads of such names are answered and not recorded, and `info` stays within the
/// server's max_payload however many folders cannot be served: the lists are cut, with a count
/// of what was left out.
#[tokio::test]
async fn info_stays_within_max_payload_and_loads_of_names_without_a_folder_are_not_recorded() {
    let max_payload = 65_536;
    let h = Harness::with_conf(&format!("max_payload: {max_payload}")).await;
    let repo = partial_repository(&h, "many-models", &["mlp"]);
    let folders = 300;
    for i in 0..folders {
        let dir = repo.join(format!("{i:03}-{}", "b".repeat(56)));
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("jetbatch.toml"), "backend = \"onnx\"\n").unwrap();
    }
    let w = h.worker_on("w", &repo, &[]);
    w.ready().await;
    for i in 0..13 {
        let name = format!("{i}{}", "n".repeat(30_000));
        match call::<Value>(&h, "w", verb::LOAD, json!({ "model": name })).await {
            Err(pool::PoolError::Service { code: 400, status, .. }) => assert!(status.len() < 1_100 && status.contains("is not 1-64 of [A-Za-z0-9_.-]"), "{}", &status[..200.min(status.len())]),
            other => panic!("{}", format!("{other:?}").chars().take(300).collect::<String>()),
        }
    }
    match call::<Value>(&h, "w", verb::LOAD, json!({"model": "absent"})).await {
        Err(pool::PoolError::Service { code: 404, status, .. }) => assert!(status.contains("no such model folder"), "{status}"),
        other => panic!("{other:?}"),
    }
    let info: Value = call(&h, "w", verb::INFO, json!({})).await.unwrap();
    assert_valid("info", &info);
    assert!(serde_json::to_vec(&info).unwrap().len() < max_payload);
    let info: WorkerInfo = serde_json::from_value(info).unwrap();
    assert_eq!(info.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), vec!["mlp"]);
    assert!(info.invalid_omitted > 0 && !info.invalid.is_empty(), "cut, with the count: {} listed, {} left out", info.invalid.len(), info.invalid_omitted);
    assert_eq!(info.invalid.len() + info.invalid_omitted, folders, "only the folders, none of the loaded names");
    assert!(info.invalid.iter().all(|m| m.name.len() == 60 && m.error.contains("onnx")));
    let list = stdout_json(&pool_cli(&h, &["--json", "list"]));
    assert_eq!(list[0]["worker"], "w", "{list}");
}

/// `load` of a served model reads its folder again and swaps the new version in; the version
/// served goes on serving until then, and when the folder does not read (mid-edit) it stays,
/// and the load says so. Jobs that arrive meanwhile are all answered by the model.
#[tokio::test]
async fn a_reload_swaps_in_place_and_jobs_meanwhile_are_answered_by_the_model() {
    let h = Harness::new().await;
    let repo = partial_repository(&h, "w-models", &["mlp"]);
    // A copy, not a link: the test edits it.
    let folder = repo.join("seqproj");
    std::fs::create_dir(&folder).unwrap();
    for f in std::fs::read_dir(h.models.join("seqproj")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, folder.join(f.file_name().unwrap())).unwrap();
    }
    let spec = jetbatch::plan::ModelPlan::load(&h.models.join("seqproj")).unwrap();
    let w = h.worker_on("w", &repo, &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let input = seq_input(3, 4);
    let n = 40;
    let jobs = async {
        for i in 0..n {
            h.publish(&tensor_job(&format!("r{i}"), "seqproj", std::slice::from_ref(&input), Encoding::Json), Encoding::Json).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let operator = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reloaded: pool::ModelInfo = call(&h, "w", verb::LOAD, json!({"model": "seqproj"})).await.unwrap();
        assert_eq!(reloaded.fingerprint, &*spec.fingerprint);
        let good = std::fs::read(folder.join("jetbatch.toml")).unwrap();
        std::fs::write(folder.join("jetbatch.toml"), "backend = \"onnx\"\n").unwrap();
        match call::<Value>(&h, "w", verb::LOAD, json!({"model": "seqproj"})).await {
            Err(pool::PoolError::Service { code: 422, status, .. }) => {
                assert!(status.contains("onnx") && status.contains(&format!("still serving seqproj {}", spec.fingerprint)), "{status}")
            }
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        std::fs::write(folder.join("jetbatch.toml"), good).unwrap();
        let back: pool::ModelInfo = call(&h, "w", verb::LOAD, json!({"model": "seqproj"})).await.unwrap();
        assert_eq!(back.fingerprint, &*spec.fingerprint);
    };
    futures::join!(jobs, operator);
    let got = collect(&mut sub, n, MINUTE).await;
    assert_eq!(got.len(), n);
    let want = direct_forward(&h.models.join("seqproj/model.pt"), std::slice::from_ref(&input));
    for (id, rs) in &got {
        assert_eq!(rs[0].status, Status::Ok, "{id}: {:?}", rs[0].error);
        assert_close(&rs[0].output_tensors().unwrap()[0].to_f64_vec(), &want[0], 1e-6, id);
    }
}

/// A worker that answers discovery but never its endpoint: `jetbatch pool info` says so in one
/// line and exits non-zero, with no backtrace even under RUST_BACKTRACE=1.
#[tokio::test]
async fn pool_info_without_an_answer_is_one_line_and_exits_non_zero() {
    let h = Harness::new().await;
    let mut discovery = h.client.subscribe("$SRV.INFO.jetbatch").await.unwrap();
    let _mute = h.client.subscribe("jetbatch.svc.mute.info").await.unwrap();
    h.client.flush().await.unwrap();
    let client = h.client.clone();
    tokio::spawn(async move {
        let instance = json!({"id": "x", "version": "0", "metadata": {"worker": "mute", "prefix": "jetbatch", "endpoints": "jetbatch.svc.mute"}});
        while let Some(m) = discovery.next().await {
            client.publish(m.reply.unwrap(), instance.to_string().into()).await.unwrap();
        }
    });
    let url = h.url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_jetbatch")).env("RUST_BACKTRACE", "1").env("JETBATCH_LOG", "error").args(["pool", "--nats-url", &url, "info", "--worker", "mute"]).output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: jetbatch.svc.mute.info: "), "{stderr}");
}
