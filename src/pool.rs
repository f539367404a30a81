//! The pool as NATS services see it: every `jetbatch serve` registers as service `jetbatch`
//! (`$SRV.PING|INFO|STATS.jetbatch` find it) with endpoints on `<prefix>.svc.<worker>.<verb>`.
//! This module holds the wire shapes of those endpoints (`schemas/service.schema.json`), the
//! client side — discovery and calls — and the `jetbatch pool` command. The worker's side is
//! `serve/service.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::{PoolAction, PoolArgs};
use crate::priority::Priority;

/// The service name every worker registers.
pub const SERVICE: &str = "jetbatch";

/// Service metadata keys a worker registers (`$SRV.INFO` and `$SRV.PING` carry them).
pub mod meta {
    pub const WORKER: &str = "worker";
    pub const HOST: &str = "host";
    pub const PREFIX: &str = "prefix";
    pub const CONSUMER: &str = "consumer";
    /// The subject its endpoints hang off (`<prefix>.svc.<worker>`).
    pub const ENDPOINTS: &str = "endpoints";
    /// Its sled cache folder, absolute; absent without a cache.
    pub const CACHE_DIR: &str = "cache_dir";
}

/// The endpoint verbs, as the last subject token.
pub mod verb {
    pub const INFO: &str = "info";
    pub const STATS: &str = "stats";
    pub const HEALTH: &str = "health";
    pub const LOAD: &str = "load";
    pub const UNLOAD: &str = "unload";
    pub const CACHE_STATS: &str = "cache.stats";
    pub const CACHE_CLEAR: &str = "cache.clear";
    pub const DRAIN: &str = "drain";
    pub const ALL: [&str; 8] = [INFO, STATS, HEALTH, LOAD, UNLOAD, CACHE_STATS, CACHE_CLEAR, DRAIN];
}

/// A worker id as one subject token (dots, wildcards and spaces would split or widen it).
pub fn subject_token(worker: &str) -> String {
    worker.replace(['.', '*', '>', ' '], "_")
}

/// `<prefix>.svc.<worker>`: where a worker's endpoints are.
pub fn endpoints_subject(prefix: &str, worker: &str) -> String {
    format!("{prefix}.svc.{}", subject_token(worker))
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// A model as `info` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub fingerprint: String,
    pub kinds: Vec<String>,
    pub backend: String,
    /// `auto`, `cpu` or `cuda:N`, as configured.
    pub device: String,
    pub dtype: String,
    pub max_batch_size: usize,
    /// 0: no budget besides `max_batch_size`.
    pub max_batch_tokens: usize,
    /// What the operator should hear of the model (a chat template past its bounds on the load
    /// probe); absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A model folder the worker cannot serve, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvalidModel {
    pub name: String,
    pub error: String,
}

/// The `info` endpoint's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker: String,
    pub host: String,
    pub version: String,
    pub prefix: String,
    pub consumer: String,
    /// The consumer's filter subjects.
    pub filter: Vec<String>,
    pub models_dir: String,
    pub cache_dir: Option<String>,
    pub max_inflight: usize,
    pub uptime_secs: u64,
    pub models: Vec<ModelInfo>,
    pub invalid: Vec<InvalidModel>,
    /// Served models left out of `models` to keep the answer within the connection's max_payload.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub models_omitted: usize,
    /// Entries left out of `invalid`, likewise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub invalid_omitted: usize,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// Jobs and mean size of a model's engine batches so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Engine batches; for `generate`, jobs (each joins the running generation).
    pub batches: u64,
    /// Jobs per batch; for `generate`, the most rows the running generation held beside each job.
    pub mean_size: f64,
    /// Tokens its `generate` jobs generated.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generated_tokens: u64,
    /// Prefix tokens (contexts, prompts) looked up in its prefix cache, and found there (not
    /// recomputed).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prefix_lookup_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prefix_hit_tokens: u64,
    /// Mean time from a `generate` job reaching the engine to its first token, in ms.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub time_to_first_token_ms: f64,
}

/// Cache lookups of this worker since it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheRatio {
    pub hits: u64,
    pub misses: u64,
    /// hits / (hits + misses); `None` before the first lookup.
    pub hit_ratio: Option<f64>,
}

/// The `stats` endpoint's answer (also the `data` of `$SRV.STATS` for that endpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub worker: String,
    pub uptime_secs: u64,
    pub draining: bool,
    /// Jobs pulled and not yet acked or handed back.
    pub inflight: u64,
    /// Valid jobs waiting for or in the engine, per model.
    pub queued: BTreeMap<String, u64>,
    pub batches: BTreeMap<String, BatchStats>,
    pub cache: CacheRatio,
    /// Jobs answered, by status (`ok`, `error`).
    pub jobs: BTreeMap<String, u64>,
    /// Jobs handed back, by reason (`elsewhere`: another worker of the pool serves its model).
    pub handed_back: BTreeMap<String, u64>,
    /// The consumer's messages not yet delivered, as last seen.
    pub consumer_pending: u64,
    /// Entries left out of `queued` and `batches` to keep the answer within max_payload.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: usize,
}

/// The `health` endpoint's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub worker: String,
    /// Consuming, engine alive, intake not stalled, not draining.
    pub ok: bool,
    pub consuming: bool,
    pub engine_alive: bool,
    pub draining: bool,
    pub models: usize,
    /// How long intake has held jobs without finishing any, once over
    /// [`crate::metrics::INTAKE_STALL`]; `None` while it keeps up.
    pub intake_stalled_secs: Option<u64>,
}

/// The request of `load` and `unload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRequest {
    pub model: String,
}

/// The `unload` endpoint's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unloaded {
    pub model: String,
    pub models: Vec<String>,
}

/// The `drain` endpoint's answer, sent before the worker stops pulling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Draining {
    pub worker: String,
    /// Jobs it held when asked: the batch in flight is finished and acked, the others handed back.
    pub inflight: u64,
}

/// One worker as `$SRV.INFO.jetbatch` describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Instance {
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
}

impl Instance {
    pub fn meta(&self, key: &str) -> &str {
        self.metadata.get(key).map_or("", String::as_str)
    }

    pub fn worker(&self) -> &str {
        self.meta(meta::WORKER)
    }

    /// The subject of one of its endpoints.
    pub fn subject(&self, verb: &str) -> String {
        format!("{}.{verb}", self.meta(meta::ENDPOINTS))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{subject}: {message}")]
    Request { subject: String, message: String },
    /// The worker answered with the services framework's error headers.
    #[error("{worker}: {status} (code {code})")]
    Service { worker: String, code: u16, status: String },
    #[error("{subject}: cannot read the answer: {message}")]
    Answer { subject: String, message: String },
    #[error("no worker '{worker}' answered discovery under prefix '{prefix}' (jetbatch pool list shows the workers)")]
    NoWorker { worker: String, prefix: String },
}

/// Every worker that answers `$SRV.INFO.jetbatch` within `window` under `prefix` (and of
/// `consumer`, when given), ordered by worker id.
pub async fn discover(client: &Client, prefix: &str, consumer: Option<&str>, window: Duration) -> Result<Vec<Instance>, PoolError> {
    let subject = format!("$SRV.INFO.{SERVICE}");
    let request_err = |e: &dyn std::fmt::Display| PoolError::Request { subject: subject.clone(), message: e.to_string() };
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.map_err(|e| request_err(&e))?;
    client.publish_with_reply(subject.clone(), inbox, "".into()).await.map_err(|e| request_err(&e))?;
    client.flush().await.map_err(|e| request_err(&e))?;
    let mut found = Vec::new();
    let deadline = tokio::time::sleep(window);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            msg = replies.next() => match msg {
                None => break,
                // A reply that is not an instance (another service framework's) is not ours.
                Some(msg) => found.extend(serde_json::from_slice::<Instance>(&msg.payload).ok()),
            },
        }
    }
    found.retain(|i| i.meta(meta::PREFIX) == prefix && consumer.is_none_or(|c| i.meta(meta::CONSUMER) == c));
    found.sort_by(|a, b| a.worker().cmp(b.worker()));
    Ok(found)
}

/// Calls one endpoint: `body` as JSON, the answer read as `T`; an answer with the services
/// framework's error headers becomes [`PoolError::Service`].
pub async fn call<T: DeserializeOwned>(client: &Client, subject: String, body: &impl Serialize, timeout: Duration) -> Result<T, PoolError> {
    let request_err = |message: String| PoolError::Request { subject: subject.clone(), message };
    let payload = serde_json::to_vec(body).expect("json");
    let reply = tokio::time::timeout(timeout, client.request(subject.clone(), payload.into()))
        .await
        .map_err(|_| request_err(format!("no answer within {timeout:?}")))?
        .map_err(|e| request_err(e.to_string()))?;
    if let Some(headers) = &reply.headers {
        if let Some(status) = headers.get(async_nats::service::NATS_SERVICE_ERROR) {
            let code = headers.get(async_nats::service::NATS_SERVICE_ERROR_CODE).and_then(|c| c.as_str().parse().ok()).unwrap_or(500);
            let worker = subject.rsplit_once(".svc.").map_or(subject.as_str(), |(_, rest)| rest).to_string();
            return Err(PoolError::Service { worker, code, status: status.to_string() });
        }
    }
    serde_json::from_slice(&reply.payload).map_err(|e| PoolError::Answer { subject, message: e.to_string() })
}

/// The instance of worker `id`, found by discovery.
pub async fn find(client: &Client, prefix: &str, id: &str, window: Duration) -> Result<Instance, PoolError> {
    let all = discover(client, prefix, None, window).await?;
    all.into_iter().find(|i| i.worker() == id).ok_or_else(|| PoolError::NoWorker { worker: id.to_string(), prefix: prefix.to_string() })
}

/// `jetbatch cache stats|clear` while a worker holds the sled folder: asks the worker of this host
/// whose cache is `cache_dir` (its `cache.stats` or, with `clear`, `cache.clear` endpoint).
/// `Ok(None)` when no such worker answers discovery.
pub async fn cache_via_worker(client: &Client, prefix: &str, cache_dir: &Path, clear: bool) -> Result<Option<serde_json::Value>, PoolError> {
    let dir = std::fs::canonicalize(cache_dir).unwrap_or_else(|_| cache_dir.to_path_buf());
    let host = host_name();
    let workers = discover(client, prefix, None, DISCOVERY_WINDOW).await?;
    let Some(owner) = workers.iter().find(|i| i.meta(meta::HOST) == host && Path::new(i.meta(meta::CACHE_DIR)) == dir) else {
        return Ok(None);
    };
    let verb = if clear { verb::CACHE_CLEAR } else { verb::CACHE_STATS };
    call(client, owner.subject(verb), &serde_json::json!({}), CALL_TIMEOUT).await.map(Some)
}

/// How long discovery collects answers by default.
pub const DISCOVERY_WINDOW: Duration = Duration::from_millis(500);
/// How long one endpoint call waits for its answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `jetbatch pool …`: prints a table or JSON (`--json`).
pub async fn run(args: PoolArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = crate::bus::connect(&args.nats, "jetbatch-pool").await?;
    let window = Duration::from_millis(args.wait_ms);
    let prefix = args.prefix.as_str();
    let single = |worker: &Option<String>| worker.clone().ok_or("--worker is required (jetbatch pool list shows the workers)");
    let (worker, verb, body) = match &args.action {
        PoolAction::List => return list(&client, &args, window).await,
        PoolAction::Info { worker } => (single(worker)?, verb::INFO, serde_json::json!({})),
        PoolAction::Stats { worker } => (single(worker)?, verb::STATS, serde_json::json!({})),
        PoolAction::Health { worker } => (single(worker)?, verb::HEALTH, serde_json::json!({})),
        PoolAction::CacheStats { worker } => (single(worker)?, verb::CACHE_STATS, serde_json::json!({})),
        PoolAction::CacheClear { worker } => (single(worker)?, verb::CACHE_CLEAR, serde_json::json!({})),
        PoolAction::Drain { worker } => (single(worker)?, verb::DRAIN, serde_json::json!({})),
        PoolAction::Load { worker, model } => (single(worker)?, verb::LOAD, serde_json::to_value(ModelRequest { model: model.clone() })?),
        PoolAction::Unload { worker, model } => (single(worker)?, verb::UNLOAD, serde_json::to_value(ModelRequest { model: model.clone() })?),
    };
    let instance = find(&client, prefix, &worker, window).await?;
    let answer: serde_json::Value = call(&client, instance.subject(verb), &body, CALL_TIMEOUT).await?;
    // One JSON document either way: the answers are small and nested.
    println!("{}", if args.json { answer.to_string() } else { serde_json::to_string_pretty(&answer)? });
    Ok(())
}

/// A worker's row of `pool list`.
#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    info: WorkerInfo,
    stats: WorkerStats,
}

async fn list(client: &Client, args: &PoolArgs, window: Duration) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let empty = serde_json::json!({});
    let instances = discover(client, &args.prefix, None, window).await?;
    let answers = futures::future::join_all(instances.iter().map(|instance| async {
        let info = call::<WorkerInfo>(client, instance.subject(verb::INFO), &empty, CALL_TIMEOUT);
        let stats = call::<WorkerStats>(client, instance.subject(verb::STATS), &empty, CALL_TIMEOUT);
        (instance.worker(), futures::join!(info, stats))
    }))
    .await;
    let mut rows = Vec::new();
    for (worker, answer) in answers {
        match answer {
            (Ok(info), Ok(stats)) => rows.push(Row { info, stats }),
            // A worker that stopped between discovery and the call: listed on stderr only.
            (Err(e), _) | (_, Err(e)) => eprintln!("{worker}: {e}"),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!("{:<24} {:<16} {:<10} {:>8} {:>6} {:>6} {:>9}  MODELS", "WORKER", "HOST", "CONSUMER", "INFLIGHT", "QUEUE", "HIT%", "UPTIME");
    for Row { info, stats } in &rows {
        let queue: u64 = stats.queued.values().sum();
        let hit = stats.cache.hit_ratio.map_or("-".to_string(), |r| format!("{:.1}", r * 100.0));
        let models: Vec<&str> = info.models.iter().map(|m| m.name.as_str()).collect();
        let drain = if stats.draining { " (draining)" } else { "" };
        println!(
            "{:<24} {:<16} {:<10} {:>8} {:>6} {:>6} {:>8}s  {}{drain}",
            info.worker, info.host, info.consumer, stats.inflight, queue, hit, info.uptime_secs, models.join(",")
        );
    }
    println!("{} worker(s)", rows.len());
    // What waits for the pool, workers or not (with none, this is the line that matters).
    let js = async_nats::jetstream::new(client.clone());
    println!("{}", backlog_line(&backlog(&js, &args.jobs_stream, &args.consumer).await));
    Ok(())
}

/// A priority level's consumer as `pool list` reports it: jobs not yet delivered, and delivered
/// but not yet acked (being worked on); `None` where the consumer does not exist (yet).
pub type LevelBacklog = (Priority, Option<(u64, usize)>);

/// The backlog of each priority level's consumer, highest level first.
pub async fn backlog(js: &async_nats::jetstream::Context, jobs_stream: &str, consumer: &str) -> Vec<LevelBacklog> {
    let stream = js.get_stream(jobs_stream).await.ok();
    let mut levels = Vec::new();
    for level in Priority::ALL {
        let info = match &stream {
            Some(stream) => match stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>(&level.consumer(consumer)).await {
                Ok(mut c) => c.info().await.ok().map(|i| (i.num_pending, i.num_ack_pending)),
                Err(_) => None,
            },
            None => None,
        };
        levels.push((level, info));
    }
    levels
}

/// `backlog: high 0, normal 41, low 3 job(s) waiting; 2 being worked on`.
pub fn backlog_line(levels: &[LevelBacklog]) -> String {
    if levels.iter().all(|(_, b)| b.is_none()) {
        return "backlog: no jobs stream or consumers yet (jetbatch setup, or a worker's start, creates them)".into();
    }
    let waiting: Vec<String> = levels.iter().map(|(level, b)| format!("{level} {}", b.map_or("-".to_string(), |(p, _)| p.to_string()))).collect();
    let working: usize = levels.iter().filter_map(|(_, b)| b.map(|(_, a)| a)).sum();
    format!("backlog: {} job(s) waiting; {working} being worked on", waiting.join(", "))
}
