//! The bus: everything JetStream. Connecting, creating the streams and the workers' consumer
//! (here); pulling jobs and the [`Delivery`] handle through which a job is acked, nak'ed, termed
//! or extended ([`pull`]); publishing results, dead letters, streamed chunks and metric snapshots,
//! and looking up whether a job was answered already ([`publish`]). The serve stages decide what
//! becomes of a job; this module carries it out.

mod gate;
mod publish;
mod pull;

use std::time::Duration;

use async_nats::jetstream::{consumer, stream, Context};
use async_nats::{Client, ServerAddr};
use tracing::info;

use crate::config::{NatsOpts, Topology};

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

/// Creates or updates the jobs, results and dead-letter streams and the workers' consumer.
/// Safe to run from every worker at start: the same configuration is a no-op.
pub async fn setup(js: &Context, t: &Topology) -> Result<consumer::PullConsumer, BusError> {
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
            subjects: vec![format!("{}.jobs.>", t.prefix)],
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

/// Creates the workers' durable consumer, or updates it when its settings changed.
pub async fn setup_consumer(js: &Context, t: &Topology) -> Result<consumer::PullConsumer, BusError> {
    let setup_err = |what: &str, e: &dyn std::fmt::Display| BusError::Setup(format!("{what}: {e}"));
    let config = consumer::pull::Config {
        durable_name: Some(t.consumer.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: t.ack_wait(),
        max_deliver: t.max_deliver,
        max_ack_pending: t.max_ack_pending,
        filter_subjects: t.filter_subjects(),
        ..Default::default()
    };
    let jobs = js.get_stream(&t.jobs_stream).await.map_err(|e| setup_err("jobs stream", &e))?;
    // create_consumer is idempotent for an identical config; a changed one (new ack wait, filter) is an update.
    let created = match jobs.create_consumer(config.clone()).await {
        Ok(c) => return Ok(c),
        Err(e) => e,
    };
    match jobs.update_consumer(config).await {
        Ok(c) => Ok(c),
        // No such consumer: the update's "does not exist" would hide why the create was refused.
        Err(_) if jobs.consumer_info(&t.consumer).await.is_err() => {
            Err(setup_err(&format!("consumer {}", t.consumer), &format!("{created}; {}", overlap_hint(&jobs, t).await)))
        }
        Err(e) => Err(setup_err(&format!("consumer {}", t.consumer), &e)),
    }
}

/// How to fix a consumer the work-queue jobs stream refused: its filter overlaps another's.
async fn overlap_hint(jobs: &stream::Stream, t: &Topology) -> String {
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
        t.filter_subjects().join(", "),
        if others.is_empty() { "none".to_string() } else { others.join("; ") }
    )
}
