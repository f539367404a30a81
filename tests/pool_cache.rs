//! The shared cache tier against real nats-servers: a repeat is a hit on another worker of the
//! pool, a server restart loses nothing and the tier works again after it, the same on a 3-node
//! cluster (bucket at R3), a deleted bucket degrades to computing, and `jetbatch cache stats|clear`
//! covers both tiers, and forged bucket entries are refused.

mod common;
mod lm_fixture;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use jetbatch::job::{Encoding, JobResult, Status};
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);
const SHARED: [&str; 2] = ["--shared-cache-bucket", "JETBATCH_CACHE"];

/// Publishes an `mlp` job of input `seed` under `id` and waits for its answer.
async fn answer(h: &Harness, sub: &mut async_nats::Subscriber, id: &str, seed: u64) -> JobResult {
    h.publish(&tensor_job(id, "mlp", &[mlp_input(seed)], Encoding::MsgPack), Encoding::MsgPack).await;
    let r = collect(sub, 1, MINUTE).await.remove(id).unwrap_or_else(|| panic!("{id} answered")).remove(0);
    assert_eq!(r.status, Status::Ok, "{r:?}");
    r
}

/// The shared tier alone on `client`: bucket `JETBATCH_CACHE` (R1, 1 MiB), its own metrics.
fn shared_tier(client: &async_nats::Client) -> (jetbatch::cache::Shared, Arc<jetbatch::metrics::Metrics>) {
    let metrics = Arc::new(jetbatch::metrics::Metrics::new("t"));
    let bucket = jetbatch::bus::CacheBucket { name: "JETBATCH_CACHE".into(), replicas: 1, max_age: None, max_bytes: 1 << 20 };
    (jetbatch::cache::Shared::new(client.clone(), bucket, metrics.clone()), metrics)
}

/// Sends input `seed` under new ids `<prefix>-<n>` until an answer is `cached` (the shared tier
/// is skipped for a few seconds after a failure, so the first may be computed); how many were not.
async fn computed_until_cached(h: &Harness, sub: &mut async_nats::Subscriber, prefix: &str, seed: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while !answer(h, sub, &format!("{prefix}-{n}"), seed).await.cached {
        assert!(Instant::now() < deadline, "{prefix}: no cache hit in 30 s");
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    n
}

/// `jetbatch cache <args>`: exit success, stdout as JSON (null when it is not), stderr.
fn cache_cli(args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_jetbatch")).arg("cache").args(args).output().expect("jetbatch cache");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), json, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Two workers on one consumer, each with its own `--cache-dir`: the first one's answer, repeated
/// under a new id once it has stopped, is a shared-tier hit on the second (then a local one).
#[tokio::test]
async fn a_repeat_is_a_hit_on_another_worker_and_cache_stats_clear_cover_both_tiers() {
    let h = Harness::new().await;
    let dir = |name: &str| h.dir.path().join(format!("cache-{name}")).to_string_lossy().into_owned();
    let mut workers: Vec<Worker> = ["w1", "w2"].iter().map(|n| h.worker(n, &[&["--cache-dir", &dir(n)][..], &SHARED].concat())).collect();
    for w in &workers {
        w.ready().await;
    }
    let mut sub = h.subscribe_results().await;
    let first = answer(&h, &mut sub, "a1", 7).await;
    assert!(!first.cached);
    let i = workers.iter().position(|w| w.name == first.worker).expect("answered by a worker of the pool");
    let mut computed = workers.remove(i);
    computed.signal("TERM");
    assert!(computed.wait(MINUTE).success());
    let other = &workers[0];

    let again = answer(&h, &mut sub, "a2", 7).await;
    assert_eq!((again.worker.as_str(), again.cached, &again.output), (other.name.as_str(), true, &first.output));
    assert_eq!(other.metric("jetbatch_cache_hits_total{tier=\"shared\"}").await, 1.0);
    assert_eq!(other.metric("jetbatch_engine_jobs_total{model=\"mlp\"}").await, 0.0, "nothing computed");
    let third = answer(&h, &mut sub, "a3", 7).await;
    assert!(third.cached);
    assert_eq!(other.metric("jetbatch_cache_hits_total{tier=\"local\"}").await, 1.0, "the shared hit was copied to the local tier");
    assert_eq!(other.metric("jetbatch_cache_shared_up").await, 1.0);

    // `jetbatch cache`: the stopped worker's folder and the bucket.
    let url = h.url();
    let (ok, stats, err) = cache_cli(&["--cache-dir", &dir(&computed.name), "--nats-url", &url, "stats"]);
    assert!(ok, "{err}");
    assert_eq!((&stats["local"]["entries"], &stats["shared"]["status"], &stats["shared"]["entries"]), (&1.into(), &"ok".into(), &1.into()), "{stats}");
    assert_eq!(stats["shared"]["bucket"], "JETBATCH_CACHE");
    // A folder a running worker holds (sled locks it) is answered by that worker's endpoint.
    let (ok, held, err) = cache_cli(&["--cache-dir", &dir(&other.name), "--nats-url", &url, "stats"]);
    assert!(ok, "{err}");
    assert_eq!(held["local"]["entries"], 1, "the shared hit copied to its folder: {held}");
    // A mistyped folder, one that is not a cache: errors.
    let (ok, _, err) = cache_cli(&["--cache-dir", &format!("{}-typo", dir("w1")), "--nats-url", &url, "stats"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    assert!(!std::path::Path::new(&format!("{}-typo", dir("w1"))).exists(), "no new empty cache");
    let (ok, _, err) = cache_cli(&["--cache-dir", h.models.to_str().unwrap(), "--nats-url", &url, "stats"]);
    assert!(!ok && err.contains("not a jetbatch cache"), "{err}");
    // No NATS: the local tier is still reported.
    let nowhere = format!("nats://127.0.0.1:{}", free_port());
    let (ok, stats, err) = cache_cli(&["--cache-dir", &dir(&computed.name), "--nats-url", &nowhere, "stats"]);
    assert!(ok, "{err}");
    assert_eq!((&stats["local"]["entries"], &stats["shared"]["status"]), (&1.into(), &"unreachable".into()), "{stats}");
    let (ok, stats, err) = cache_cli(&["--cache-dir", &dir(&computed.name), "--nats-url", &url, "clear"]);
    assert!(ok, "{err}");
    assert_eq!((&stats["local"]["entries"], &stats["shared"]["entries"]), (&0.into(), &0.into()), "{stats}");
    let (ok, _, err) = cache_cli(&["--cache-dir", &dir(&computed.name), "--nats-url", &nowhere, "clear"]);
    assert!(!ok && err.contains("JETBATCH_CACHE"), "clearing an unreachable bucket fails: {err}");
}

/// A nats-server `kill -9` and restart while two shared-only workers (no `--cache-dir`) run
/// jobs, half of them repeats: every job answered exactly once; then the tier answers again.
#[tokio::test]
async fn a_server_restart_mid_run_loses_nothing_and_the_shared_tier_comes_back() {
    let mut h = Harness::new().await;
    write_heavy_model(&h, 40, 512, 8);
    let args = [&SHARED[..], &["--ack-wait-secs", "3", "--max-inflight", "32", "--pull-batch", "16"]].concat();
    let workers = [h.worker("w1", &args), h.worker("w2", &args)];
    for w in &workers {
        w.ready().await;
    }
    // 400 jobs on 200 inputs: the second half repeats the first.
    let jobs: Vec<_> = (0..400u64).map(|i| tensor_job(&format!("rs-{i}"), "heavy", &[mlp_input(i % 200)], Encoding::MsgPack)).collect();
    burst(&h, &jobs).await;
    h.wait_for_stored(100, MINUTE).await;
    h.nodes[0].kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.nodes[0].start();
    h.wait_for_stored(400, 2 * MINUTE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = h.stored_results().await;
    let lost = (0..400).filter(|i| !stored.contains_key(&format!("rs-{i}"))).count();
    let duplicated = stored.values().filter(|&&c| c > 1).count();
    assert_eq!((lost, duplicated), (0, 0), "lost, duplicated");
    assert_eq!(h.stream_messages("JETBATCH_JOBS").await, 0, "jobs stream empty");

    // After the restart: a new input, then repeats until one is a (shared) hit. The tier is
    // skipped for a few seconds after its last failure, so the first ones may be computed.
    let mut sub = h.subscribe_results().await;
    let n = computed_until_cached(&h, &mut sub, "after", 999).await;
    let mut shared_hits = 0.0;
    for w in &workers {
        shared_hits += w.metric("jetbatch_cache_hits_total{tier=\"shared\"}").await;
    }
    assert!(shared_hits >= 1.0);
    eprintln!("FIGURES shared cache, nats restart: jobs=400 lost=0 duplicated=0 shared_hits={shared_hits} computed_after_restart_before_a_hit={n}");
}

/// The cross-worker hit on a 3-node cluster, the bucket at R3 like the streams.
#[tokio::test]
async fn a_repeat_is_a_hit_on_another_worker_of_a_three_node_cluster() {
    let h = Harness::cluster().await;
    let mut workers: Vec<Worker> = ["w1", "w2"].iter().map(|n| h.worker(n, &SHARED)).collect();
    for w in &workers {
        w.ready().await;
    }
    let info = h.js.get_stream("KV_JETBATCH_CACHE").await.expect("bucket created by the workers").info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3);
    let mut sub = h.subscribe_results().await;
    let first = answer(&h, &mut sub, "c1", 11).await;
    assert!(!first.cached);
    let i = workers.iter().position(|w| w.name == first.worker).unwrap();
    let mut computed = workers.remove(i);
    computed.signal("TERM");
    assert!(computed.wait(MINUTE).success());
    let again = answer(&h, &mut sub, "c2", 11).await;
    let logs = format!("{}:\n{}\n{}:\n{}", computed.name, computed.log_text(), workers[0].name, workers[0].log_text());
    assert_eq!((again.worker.as_str(), again.cached, &again.output), (workers[0].name.as_str(), true, &first.output), "{logs}");
}

/// The bucket deleted under a running worker: jobs are still answered (computed), the failure
/// is counted and warned about, and the worker re-creates the bucket and caches again.
#[tokio::test]
async fn a_deleted_bucket_degrades_to_computing_and_is_recreated() {
    let h = Harness::new().await;
    let w = h.worker("w1", &SHARED);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    assert!(!answer(&h, &mut sub, "d1", 3).await.cached);
    assert!(answer(&h, &mut sub, "d2", 3).await.cached);
    h.js.delete_stream("KV_JETBATCH_CACHE").await.unwrap();
    let started = Instant::now();
    let r = answer(&h, &mut sub, "d3", 3).await;
    assert!(!r.cached && started.elapsed() < Duration::from_secs(5), "computed, promptly: {:?}", started.elapsed());
    assert!(w.metric("jetbatch_errors_total{layer=\"cache\",type=\"shared_unavailable\"}").await >= 1.0);
    assert_eq!(w.metric("jetbatch_cache_shared_up").await, 0.0);
    assert!(w.log_text().contains("shared cache unavailable"), "{}", w.log_text());
    // Once the retry period is over, the next write re-creates the bucket.
    computed_until_cached(&h, &mut sub, "d-again", 4).await;
    assert!(h.js.get_stream("KV_JETBATCH_CACHE").await.is_ok());
    assert_eq!(w.metric("jetbatch_cache_shared_up").await, 1.0);
}

/// An answer above the server's max payload is not offered to the bucket (it could only fail,
/// and a failure would have the tier skipped for a while); smaller ones are stored.
#[tokio::test]
async fn an_answer_above_the_max_payload_is_not_put_in_the_bucket() {
    use jetbatch::job::Output;
    let h = Harness::with_conf("max_payload: 4096").await;
    let (shared, metrics) = shared_tier(&h.client);
    let tensor = |n: usize| Output::Tensor(vec![f32_tensor(vec![0.5; n], vec![n as i64])]);
    shared.put(&[1; 32], &tensor(2000)).await;
    shared.put(&[2; 32], &tensor(100)).await;
    assert_eq!(shared.get(&[1; 32]).await, None);
    assert_eq!(shared.get(&[2; 32]).await.map(|(o, _)| o), Some(tensor(100)));
    let kv = h.js.get_key_value("JETBATCH_CACHE").await.unwrap();
    assert_eq!(kv.keys().await.unwrap().count().await, 1, "only the small answer");
    assert_eq!(metrics.cache_shared_up.get(), 1, "not a failure");
}

/// The shipped accounts (`deploy/nats`) let the worker user create the bucket (`setup`), read
/// and write entries, and show and clear it (`jetbatch cache`).
#[tokio::test]
async fn the_shipped_accounts_let_workers_use_the_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let node = shipped_accounts_server(dir.path());
    let auth = ["--nats-url", &node.url(), "--nats-user", "worker", "--nats-password", "work-pw"];
    let setup = Command::new(env!("CARGO_BIN_EXE_jetbatch")).arg("setup").args(auth).output().unwrap();
    let stdout = String::from_utf8_lossy(&setup.stdout);
    assert!(setup.status.success() && stdout.contains("shared cache bucket JETBATCH_CACHE is ready"), "{stdout}{}", String::from_utf8_lossy(&setup.stderr));

    let client = async_nats::ConnectOptions::with_user_and_password("worker".into(), "work-pw".into()).connect(node.url()).await.unwrap();
    let (shared, metrics) = shared_tier(&client);
    assert!(shared.connect().await);
    let output = jetbatch::job::Output::Tensor(vec![mlp_input(1)]);
    shared.put(&[9; 32], &output).await;
    assert_eq!(shared.get(&[9; 32]).await.map(|(o, _)| o), Some(output));
    assert_eq!(metrics.cache_shared_up.get(), 1);

    let (ok, stats, err) = cache_cli(&[&auth[..], &["stats"]].concat());
    assert!(ok && stats["shared"]["entries"] == 1, "{stats} {err}");
    let (ok, stats, err) = cache_cli(&[&auth[..], &["clear"]].concat());
    assert!(ok && stats["shared"]["entries"] == 0, "{stats} {err}");
}

/// Issue #18: a bucket made beforehand with settings a worker cannot update (memory storage)
/// held every start for 30 s. Now the worker says so once, naming the bucket and the setting, and
/// starts at once with its local tier.
#[tokio::test]
async fn a_bucket_with_other_settings_is_reported_once_and_the_worker_starts_on_its_local_tier() {
    use async_nats::jetstream::stream;
    let h = Harness::new().await;
    h.js.create_stream(stream::Config {
        name: "KV_JETBATCH_CACHE".into(),
        subjects: vec!["$KV.JETBATCH_CACHE.>".into()],
        storage: stream::StorageType::Memory,
        max_messages_per_subject: 1,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    let dir = h.dir.path().join("cache-w1");
    let w = h.worker("w1", &[&["--cache-dir", dir.to_str().unwrap()][..], &SHARED].concat());
    w.ready().await;
    assert!(started.elapsed() < Duration::from_secs(10), "ready in {:?}", started.elapsed());
    let mut sub = h.subscribe_results().await;
    assert!(!answer(&h, &mut sub, "c1", 3).await.cached);
    assert!(answer(&h, &mut sub, "c2", 3).await.cached, "the local tier answers");
    assert_eq!(w.metric("jetbatch_cache_hits_total{tier=\"local\"}").await, 1.0);
    assert_eq!(w.metric("jetbatch_cache_shared_up").await, 0.0);
    let log = w.log_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("exists with other settings")).collect();
    assert_eq!(warnings.len(), 1, "said once: {log}");
    assert!(warnings[0].contains("JETBATCH_CACHE") && warnings[0].contains("storage: Memory (File)"), "{}", warnings[0]);
    assert!(!log.contains("shared cache unavailable"), "no outage warnings after it: {log}");
}

/// The bucket's key (hex) of the one entry not in `known`.
async fn new_key(kv: &async_nats::jetstream::kv::Store, known: &[String]) -> String {
    let keys: Vec<String> = kv.keys().await.unwrap().map(Result::unwrap).collect().await;
    let mut fresh: Vec<String> = keys.into_iter().filter(|k| !known.contains(k)).collect();
    assert_eq!(fresh.len(), 1, "one new entry: {fresh:?}");
    fresh.remove(0)
}

fn key_bytes(hex: &str) -> [u8; 32] {
    std::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
}

/// Issue #18: whoever can write the bucket put a `generate` answer under an `embed` job's key, a
/// 3-value embedding for a 384-dim model, NaNs, or another job's entry under this one's key, and
/// every repeat was answered `ok, cached: true` with it. Each forgery is now refused: the job is
/// computed (`cached` false, the true embedding), the metric counts it, and the entry is
/// overwritten (the next repeat is a hit with the true embedding).
#[tokio::test]
async fn forged_bucket_entries_are_refused_recomputed_and_overwritten() {
    use jetbatch::job::Output;
    let (models, _) = lm_fixture::fixture();
    let h = Harness::new().await;
    std::os::unix::fs::symlink(models.join("models/minilm"), h.models.join("minilm")).unwrap();
    let w = h.worker("w1", &SHARED);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let mut embed = async |id: &str, text: &str| {
        let job = serde_json::json!({"id": id, "model": "minilm", "kind": "embed", "input": {"text": text}});
        h.publish(&rmpv::ext::to_value(job).unwrap(), Encoding::MsgPack).await;
        let r = collect(&mut sub, 1, MINUTE).await.remove(id).unwrap_or_else(|| panic!("{id} answered")).remove(0);
        assert_eq!(r.status, Status::Ok, "{r:?}");
        r
    };
    let kv = h.js.get_key_value("JETBATCH_CACHE").await.unwrap();
    let truth = embed("cat-0", "the cat sat").await;
    let cat = new_key(&kv, &[]).await;
    let dog = embed("dog-0", "a dog ran").await;
    let dog_key = new_key(&kv, std::slice::from_ref(&cat)).await;
    assert_ne!(truth.output, dog.output);
    let dim = truth.output.as_ref().unwrap().as_map().unwrap().iter().find(|(k, _)| k.as_str() == Some("dim")).unwrap().1.as_u64().unwrap();
    assert_eq!(dim, 384);

    // Forged through the tier's own writer, so each entry is well-formed for this version.
    let (forger, _) = shared_tier(&h.client);
    let generated = Output::Generate { text: "pwned".into(), tokens: vec![1], finish_reason: jetbatch::kinds::FinishReason::Eos, prompt_tokens: 1, top: vec![] };
    let forgeries = [("kind", Some(generated)), ("dim", Some(Output::Embedding { embedding: vec![0.5; 3], tokens: 3 })), ("nan", Some(Output::Embedding { embedding: vec![f32::NAN; 384], tokens: 3 })), ("copied", None)];
    for (n, (what, output)) in forgeries.into_iter().enumerate() {
        match output {
            Some(output) => forger.put(&key_bytes(&cat), &output).await,
            None => {
                kv.put(&cat, kv.get(&dog_key).await.unwrap().unwrap()).await.unwrap();
            }
        }
        let forged = kv.get(&cat).await.unwrap().unwrap();
        let r = embed(&format!("cat-{what}"), "the cat sat").await;
        assert_eq!((r.cached, &r.output), (false, &truth.output), "{what}: computed, not the forged entry");
        assert_eq!(w.metric("jetbatch_cache_rejected_total{tier=\"shared\"}").await, (n + 1) as f64, "{what}");
        assert_ne!(kv.get(&cat).await.unwrap().unwrap(), forged, "{what}: overwritten");
        let again = embed(&format!("cat-{what}-again"), "the cat sat").await;
        assert_eq!((again.cached, &again.output), (true, &truth.output), "{what}: the computed answer is served again");
    }
    assert!(w.log_text().contains("cached value refused"), "logged");
}

/// FIGURES: the hit ratio of a 3-worker pool on `mlp` jobs of which 30 % repeat an earlier input
/// under a new id, local tier only (each worker its own `--cache-dir`) against both tiers. Jobs
/// go out in rounds of 50, a repeat naming an input of an earlier round (so its first answer is
/// in, and the best a cache can do is every repeat a hit); small pulls spread each round over the
/// workers, as a loaded pool does. `cargo test --test pool_cache -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "figures for loadtest/README.md"]
async fn figures_hit_ratio_of_a_three_worker_pool_with_30_percent_repeats() {
    const ROUNDS: u64 = 12;
    const ROUND: u64 = 50;
    // One job list for both runs: (id suffix, input seed, is a repeat).
    let mut x: u64 = 42;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        x >> 33
    };
    let mut fresh = 0u64;
    let mut jobs = Vec::new();
    for round in 0..ROUNDS {
        let earlier = fresh;
        for _ in 0..ROUND {
            if round > 0 && next() % 100 < 30 {
                jobs.push((round, next() % earlier, true));
            } else {
                jobs.push((round, fresh, false));
                fresh += 1;
            }
        }
    }
    let repeats = jobs.iter().filter(|j| j.2).count();
    for (label, shared) in [("local only", false), ("local + shared", true)] {
        let h = Harness::new().await;
        let workers: Vec<Worker> = (1..=3)
            .map(|i| {
                let dir = h.dir.path().join(format!("cache-{i}"));
                let bucket = if shared { "JETBATCH_CACHE" } else { "" };
                let args = ["--cache-dir", dir.to_str().unwrap(), "--shared-cache-bucket", bucket, "--pull-batch", "2", "--max-inflight", "4"];
                h.worker(&format!("w{i}"), &args)
            })
            .collect();
        for w in &workers {
            w.ready().await;
        }
        let mut sub = h.subscribe_results().await;
        let (mut cached, mut by_worker) = (0, std::collections::BTreeMap::<String, usize>::new());
        for round in 0..ROUNDS {
            let batch: Vec<_> = jobs
                .iter()
                .enumerate()
                .filter(|(_, j)| j.0 == round)
                .map(|(i, j)| tensor_job(&format!("f-{i}"), "mlp", &[mlp_input(j.1)], Encoding::MsgPack))
                .collect();
            burst(&h, &batch).await;
            let answers = collect(&mut sub, batch.len(), MINUTE).await;
            assert_eq!(answers.len(), batch.len());
            for r in answers.values().map(|rs| &rs[0]) {
                cached += r.cached as usize;
                *by_worker.entry(r.worker.clone()).or_default() += 1;
            }
        }
        let total = jobs.len();
        let mut tiers = String::new();
        for tier in ["local", "shared"] {
            let mut n = 0.0;
            for w in &workers {
                n += w.metric(&format!("jetbatch_cache_hits_total{{tier=\"{tier}\"}}")).await;
            }
            tiers += &format!(" hits_{tier}={n}");
        }
        eprintln!(
            "FIGURES pool cache ({label}): workers=3 jobs={total} repeats={repeats} cached={cached} hit_ratio={:.1}% \
             of_repeats={:.1}%{tiers} answered_by={by_worker:?}",
            100.0 * cached as f64 / total as f64,
            100.0 * cached as f64 / repeats as f64
        );
    }

    // What the tier adds to a job it misses: a bucket read in the intake stage (one job after
    // another) and a write in the results stage (jobs side by side).
    let h = Harness::new().await;
    let (shared, _) = shared_tier(&h.client);
    assert!(shared.connect().await);
    let output = jetbatch::job::Output::Tensor(vec![mlp_input(1)]);
    let key = |i: u32| {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        k
    };
    let started = Instant::now();
    for i in 0..1000 {
        assert_eq!(shared.get(&key(i)).await, None);
    }
    let read = started.elapsed() / 1000;
    let started = Instant::now();
    for i in 0..1000 {
        shared.put(&key(i), &output).await;
    }
    let write = started.elapsed() / 1000;
    eprintln!("FIGURES shared tier per call (loopback nats-server, debug build, one after another): read_miss_us={} write_us={}", read.as_micros(), write.as_micros());
}
