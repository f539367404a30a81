//! The bus: everything JetStream. Connecting, creating the streams and the workers' consumers
//! (here); pulling jobs and the [`Delivery`] handle through which a job is acked, nak'ed, termed
//! or extended ([`pull`]); publishing results, dead letters, streamed chunks and metric snapshots,
//! and looking up whether a job was answered already ([`publish`]). The serve stages decide what
//! becomes of a job; this module carries it out.

mod gate;
mod publish;
mod pull;

use std::time::Duration;

use async_nats::jetstream::{consumer, kv, stream, Context};
use async_nats::{Client, ServerAddr};
use tracing::info;

use crate::config::{CacheOpts, NatsOpts, Topology};
use crate::priority::Priority;

pub use publish::{job_hash, publish_stored, result_msg_id, snapshots, stored_answer, Publisher, Streamer, JOB_HASH_HEADER};
pub use gate::PullGate;
pub use pull::{keep_alive, pull, watch_consumer, Delivery, Held, PullOpts};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
    #[error("stream or consumer setup: {0}")]
    Setup(String),
    /// `permanent`: the server refused this message for good (too large, a header it rejects), so
    /// publishing it again cannot succeed.
    #[error("publish: {message}")]
    Publish { message: String, permanent: bool },
    #[error("pull: {0}")]
    Pull(String),
    #[error("ack: {0}")]
    Ack(String),
}

impl BusError {
    /// A publish that can never succeed as it is: the caller falls back to a smaller message.
    pub fn is_permanent(&self) -> bool {
        matches!(self, BusError::Publish { permanent: true, .. })
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            BusError::Connect { .. } => "connect",
            BusError::Setup(_) => "setup",
            BusError::Publish { permanent: true, .. } => "publish_refused",
            BusError::Publish { .. } => "publish",
            BusError::Pull(_) => "pull",
            BusError::Ack(_) => "ack",
        }
    }
}

/// Connects with the configured auth and TLS; reconnects forever with backoff once connected.
pub async fn connect(opts: &NatsOpts, name: &str) -> Result<Client, BusError> {
    let urls = opts.urls.join(",");
    let err = |message: String| BusError::Connect { urls: urls.clone(), message };
    let addrs: Vec<ServerAddr> =
        opts.urls.iter().map(|u| u.parse::<ServerAddr>().map_err(|e| err(format!("{u}: {e}")))).collect::<Result<_, _>>()?;
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempt| Duration::from_millis((100 * 2u64.pow(attempt.min(6) as u32)).min(5_000)))
        .event_callback(|event| async move { info!(%event, "nats connection event") });
    if let Some(token) = &opts.token {
        options = options.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&opts.user, &opts.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(path) = &opts.nkey {
        let seed = std::fs::read_to_string(path).map_err(|e| err(format!("nkey seed file {}: {e}", path.display())))?;
        options = options.nkey(seed.trim().to_string());
    }
    if let Some(creds) = &opts.creds {
        options = options.credentials_file(creds).await.map_err(|e| err(format!("credentials file {}: {e}", creds.display())))?;
    }
    if let Some(ca) = &opts.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    async_nats::connect_with_options(addrs, options).await.map_err(|e| err(e.to_string()))
}

/// Creates or updates the jobs, results and dead-letter streams and the workers' consumers.
/// Safe to run from every worker at start: the same configuration is a no-op.
pub async fn setup(js: &Context, t: &Topology) -> Result<Consumers, BusError> {
    setup_streams(js, t).await?;
    setup_consumer(js, t).await
}

/// Creates or updates the three streams (producers may call this; it leaves the consumer alone).
pub async fn setup_streams(js: &Context, t: &Topology) -> Result<(), BusError> {
    let setup_err = |what: &str, e: &dyn std::fmt::Display| BusError::Setup(format!("{what}: {e}"));
    let dup = Duration::from_secs(t.duplicate_window_secs);
    let streams = [
        // Jobs: deleted once acked; the duplicate window drops re-published job ids.
        stream::Config {
            name: t.jobs_stream.clone(),
            // Exactly the subjects of the levels: a publish on any other `jobs.` subject fails at
            // the producer (no stream) instead of waiting for a consumer that never comes.
            subjects: Priority::ALL.iter().map(|p| format!("{}.jobs.*{}", t.prefix, p.subject_suffix())).collect(),
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: t.replicas,
            duplicate_window: dup,
            ..Default::default()
        },
        // Results: kept for a while so producers can collect them late; ids dedup double answers.
        stream::Config {
            name: t.results_stream.clone(),
            subjects: vec![format!("{}.results.>", t.prefix)],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: t.replicas,
            max_age: Duration::from_secs(t.results_max_age_secs),
            duplicate_window: dup,
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: t.dead_stream.clone(),
            subjects: vec![format!("{}.dead.>", t.prefix)],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: t.replicas,
            duplicate_window: dup,
            ..Default::default()
        },
    ];
    for config in streams {
        let name = config.name.clone();
        js.create_or_update_stream(config).await.map_err(|e| setup_err(&format!("stream {name}"), &e))?;
    }
    Ok(())
}

/// The pool's durable consumers, one per level (WorkQueue streams forbid overlapping filters).
#[derive(Clone)]
pub struct Consumers([consumer::PullConsumer; 3]);

impl Consumers {
    pub fn get(&self, level: Priority) -> &consumer::PullConsumer {
        &self.0[level as usize]
    }
}

/// Creates the workers' durable consumers (see [`crate::priority`]), or updates those whose
/// settings changed.
pub async fn setup_consumer(js: &Context, t: &Topology) -> Result<Consumers, BusError> {
    let setup_err = |what: &str, e: &dyn std::fmt::Display| BusError::Setup(format!("{what}: {e}"));
    let jobs = js.get_stream(&t.jobs_stream).await.map_err(|e| setup_err("jobs stream", &e))?;
    let mut consumers = Vec::with_capacity(Priority::ALL.len());
    // Normal first: a stream set up before levels existed has one consumer on `jobs.>`, which
    // would overlap the other levels' filters until it is narrowed to `jobs.*`.
    for level in [Priority::Normal, Priority::High, Priority::Low] {
        let filter_subjects = t.filter_subjects(level);
        let name = level.consumer(&t.consumer);
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: t.ack_wait(),
            // Unlimited on the server: a job the server stops redelivering is stranded for good
            // (never answered, left in the work queue), and a worker killed on a job's last
            // delivery, or a hand-back on it, would do that. Workers enforce `max_deliver`
            // themselves: the delivery after the last is answered and dead-lettered.
            max_deliver: -1,
            max_ack_pending: t.max_ack_pending,
            filter_subjects: filter_subjects.clone(),
            ..Default::default()
        };
        // create_consumer is idempotent for an identical config; a changed one (new ack wait, filter) is an update.
        let made = match jobs.create_consumer(config.clone()).await {
            Ok(c) => c,
            Err(created) => match jobs.update_consumer(config).await {
                Ok(c) => c,
                // No such consumer: the update's "does not exist" would hide why the create was refused.
                Err(_) if jobs.consumer_info(&name).await.is_err() => {
                    let why = format!("{created}; {}", overlap_hint(&jobs, t, &filter_subjects).await);
                    return Err(setup_err(&format!("consumer {name}"), &why));
                }
                Err(e) => return Err(setup_err(&format!("consumer {name}"), &e)),
            },
        };
        consumers.push((level, made));
    }
    consumers.sort_by_key(|(level, _)| *level);
    let consumers: Vec<_> = consumers.into_iter().map(|(_, c)| c).collect();
    Ok(Consumers(consumers.try_into().unwrap_or_else(|_| unreachable!("one consumer per level"))))
}

/// How to fix a consumer the work-queue jobs stream refused: its filter overlaps another's.
async fn overlap_hint(jobs: &stream::Stream, t: &Topology, filter: &[String]) -> String {
    use futures::StreamExt;
    let mut others = Vec::new();
    let mut consumers = jobs.consumers();
    while let Some(listed) = consumers.next().await {
        let Ok(info) = listed else {
            others.push("(not listable with these credentials)".to_string());
            break;
        };
        let c = &info.config;
        let filters = if c.filter_subjects.is_empty() { vec![c.filter_subject.clone()] } else { c.filter_subjects.clone() };
        others.push(format!("{} [{}]", info.name, filters.join(", ")));
    }
    format!(
        "the jobs stream {} is a work queue, where no two consumers may filter the same subjects; this pool's filter is [{}], the consumers now are {}: give each pool disjoint --serve-models (an empty one takes every model), or join the existing pool with its --consumer",
        t.jobs_stream,
        filter.join(", "),
        if others.is_empty() { "none".to_string() } else { others.join("; ") }
    )
}

/// The shared cache's key-value bucket, as `setup` creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheBucket {
    pub name: String,
    /// As the streams' (`--replicas`).
    pub replicas: usize,
    /// The cache TTL (`--cache-ttl-secs`); `None`: entries never expire.
    pub max_age: Option<Duration>,
    /// `--shared-cache-max-mb`; 0: no cap.
    pub max_bytes: u64,
}

impl CacheBucket {
    /// The bucket configured by `opts`; `None` where the shared tier is off.
    pub fn of(opts: &CacheOpts, replicas: usize) -> Option<CacheBucket> {
        let name = opts.shared_bucket()?.to_string();
        Some(CacheBucket { name, replicas, max_age: opts.ttl(), max_bytes: opts.shared_cache_max_mb << 20 })
    }

    pub fn stream_name(&self) -> String {
        format!("KV_{}", self.name)
    }
}

/// Creates or updates the shared cache's bucket and opens it. It is made as the stream a KV
/// bucket is (`KV_<name>` on `$KV.<name>.>`, one value a key) but with one setting a KV client
/// does not offer: a full bucket drops its oldest entries (discard old) where a plain KV bucket
/// refuses new ones, for a cache should evict rather than fail.
pub async fn setup_cache_bucket(js: &Context, b: &CacheBucket) -> Result<kv::Store, BusError> {
    let setup_err = |e: &dyn std::fmt::Display| BusError::Setup(format!("cache bucket {}: {e}", b.name));
    js.create_or_update_stream(cache_bucket_config(b)).await.map_err(|e| setup_err(&e))?;
    js.get_key_value(&b.name).await.map_err(|e| setup_err(&e))
}

fn cache_bucket_config(b: &CacheBucket) -> stream::Config {
    stream::Config {
        name: b.stream_name(),
        subjects: vec![format!("$KV.{}.>", b.name)],
        max_messages_per_subject: 1,
        max_age: b.max_age.unwrap_or_default(),
        max_bytes: if b.max_bytes == 0 { -1 } else { b.max_bytes as i64 },
        storage: stream::StorageType::File,
        num_replicas: b.replicas,
        discard: stream::DiscardPolicy::Old,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    }
}

/// Where the bucket's stream exists with settings other than `b`'s (made by hand, say, or by
/// another version): what differs, as `setting: theirs (ours)`. `None` when it does not exist,
/// does not answer, or has `b`'s settings (then a failed setup is worth retrying).
pub async fn cache_bucket_conflict(js: &Context, b: &CacheBucket) -> Option<String> {
    let mut stream = js.get_stream(b.stream_name()).await.ok()?;
    let (have, want) = (&stream.info().await.ok()?.config, cache_bucket_config(b));
    let differences: Vec<String> = [
        ("subjects", format!("{:?}", have.subjects), format!("{:?}", want.subjects)),
        ("storage", format!("{:?}", have.storage), format!("{:?}", want.storage)),
        ("replicas", have.num_replicas.to_string(), want.num_replicas.to_string()),
        ("max_age", format!("{:?}", have.max_age), format!("{:?}", want.max_age)),
        ("max_bytes", have.max_bytes.to_string(), want.max_bytes.to_string()),
        ("max_messages_per_subject", have.max_messages_per_subject.to_string(), want.max_messages_per_subject.to_string()),
        ("discard", format!("{:?}", have.discard), format!("{:?}", want.discard)),
        ("retention", format!("{:?}", have.retention), format!("{:?}", want.retention)),
    ]
    .into_iter()
    .filter(|(_, theirs, ours)| theirs != ours)
    .map(|(setting, theirs, ours)| format!("{setting}: {theirs} ({ours})"))
    .collect();
    (!differences.is_empty()).then(|| differences.join(", "))
}
