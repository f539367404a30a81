//! The bus stage: connecting to NATS, creating streams and the consumer, pulling jobs, and the
//! [`Delivery`] handle through which the results stage acks, naks, terms or extends a job.
//!
//! Pulls are sized by free in-flight permits, never more: a job sits in this worker's buffer only
//! while there is room to start it, so it cannot outlive `ack_wait` there and be redelivered to
//! another worker (the over-buffering duplicates of nats.go#1929). Each pulled job holds a permit
//! until it is acked or handed back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, stream, AckKind, Context};
use async_nats::{Client, HeaderMap, ServerAddr};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::config::{NatsOpts, Topology};
use crate::metrics::Metrics;

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

/// Header of every result: [`job_hash`] of the job it answers. A result is trusted as a job's
/// answer only when its body's id and this header both match the job (see [`stored_answer`]).
pub const JOB_HASH_HEADER: &str = "Jetbatch-Job-Hash";

/// A job's fingerprint on the wire: the hash of its payload as published. Two jobs that share an
/// id but not their input (a careless or hostile producer) never take each other's answer.
pub fn job_hash(payload: &[u8]) -> String {
    blake3::hash(payload).to_hex()[..32].to_string()
}

/// The `Nats-Msg-Id` of a job's result: the results stream keeps one answer per (id, job) within
/// its duplicate window, so a redelivered job is not answered twice, and a second job reusing an
/// id cannot have its answer dropped as a duplicate of the first one's.
pub fn result_msg_id(id: &str, hash: &str) -> String {
    format!("{id}:{hash}")
}

/// Publishes into a stream and awaits the stream's ack.
pub async fn publish_stored(js: &Context, subject: String, headers: HeaderMap, payload: Bytes) -> Result<jetstream::publish::PublishAck, BusError> {
    js.publish_with_headers(subject, headers, payload).await.map_err(publish_error)?.await.map_err(publish_error)
}

/// JetStream API errors that a message causes by itself, so that sending it again cannot succeed:
/// over the stream's maximum message size, an expected stream / last id / last sequence that does
/// not hold, a per-message TTL the stream refuses. Everything else (leader elections, timeouts,
/// a stream that is briefly missing) may pass on a later try: naming the permanent ones instead of
/// taking every 4xx keeps a cluster failover from turning good results into dead letters.
const PERMANENT_API_ERRORS: [u64; 6] = [10054, 10060, 10070, 10071, 10164, 10165];

/// Sorts a publish failure into transient (retry later) and permanent: a message over the
/// server's max payload or one of [`PERMANENT_API_ERRORS`].
fn publish_error(e: jetstream::context::PublishError) -> BusError {
    use jetstream::context::PublishErrorKind as Kind;
    let permanent = match e.kind() {
        Kind::MaxPayloadExceeded | Kind::WrongLastMessageId | Kind::WrongLastSequence => true,
        Kind::Other => std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|api| PERMANENT_API_ERRORS.contains(&api.error_code().0)),
        _ => false,
    };
    BusError::Publish { message: e.to_string(), permanent }
}

/// What the results stream holds under a job's own subject, if it is that job's answer: the
/// body's id and the [`JOB_HASH_HEADER`] must both match. Anything else stored there (a result of
/// another job that reused the id) is not an answer, and the job is computed.
pub async fn stored_answer<I>(results: &stream::Stream<I>, subject: String, id: &str, hash: &str) -> Result<Option<Bytes>, BusError> {
    match results.direct_get_last_for_subject(subject).await {
        Ok(m) => {
            let same_job = m.headers.get(JOB_HASH_HEADER).map(|v| v.as_str()) == Some(hash);
            let same_id = crate::job::JobResult::decode(&m.payload).is_ok_and(|r| r.id == id);
            Ok((same_job && same_id).then_some(m.payload))
        }
        Err(e) if matches!(e.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => Ok(None),
        Err(e) => Err(BusError::Pull(format!("results lookup: {e}"))),
    }
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
    let filter_subjects = if t.serve_models.is_empty() {
        vec![format!("{}.jobs.>", t.prefix)]
    } else {
        t.serve_models.iter().map(|m| t.jobs_subject(m)).collect()
    };
    let config = consumer::pull::Config {
        durable_name: Some(t.consumer.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: t.ack_wait(),
        max_deliver: t.max_deliver,
        max_ack_pending: t.max_ack_pending,
        filter_subjects,
        ..Default::default()
    };
    let jobs = js.get_stream(&t.jobs_stream).await.map_err(|e| setup_err("jobs stream", &e))?;
    // create_consumer is idempotent for an identical config; a changed one (new ack wait, filter) is an update.
    match jobs.create_consumer(config.clone()).await {
        Ok(c) => Ok(c),
        Err(_) => jobs.update_consumer(config).await.map_err(|e| setup_err(&format!("consumer {}", t.consumer), &e)),
    }
}

/// The jobs this worker holds (pulled, not yet acked or handed back), so [`keep_alive`] can extend
/// the lease of every one of them — queued, prefetched or computing — not only the running batch.
#[derive(Clone, Default)]
pub struct Held {
    next: Arc<AtomicU64>,
    jobs: Arc<Mutex<HashMap<u64, (async_nats::Subject, Instant)>>>,
}

impl Held {
    fn insert(&self, reply: async_nats::Subject) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.jobs.lock().expect("held lock").insert(key, (reply, Instant::now()));
        key
    }

    fn remove(&self, key: u64) {
        self.jobs.lock().expect("held lock").remove(&key);
    }

    /// Reply subjects of jobs held longer than `age`; their lease clock restarts now.
    fn due(&self, age: Duration) -> Vec<async_nats::Subject> {
        let now = Instant::now();
        let mut jobs = self.jobs.lock().expect("held lock");
        jobs.values_mut()
            .filter(|(_, since)| now.duration_since(*since) >= age)
            .map(|(reply, since)| {
                *since = now;
                reply.clone()
            })
            .collect()
    }
}

/// Sends `+WPI` (in progress) for every job held longer than a third of `ack_wait`, so no job this
/// worker will answer is redelivered to another while it waits or computes. Runs until aborted.
pub async fn keep_alive(client: Client, held: Held, ack_wait: Duration, metrics: Arc<Metrics>) {
    let period = ack_wait / 3;
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        for reply in held.due(period) {
            if let Err(e) = client.publish(reply, Bytes::from_static(b"+WPI")).await {
                warn!(error = %e, "progress ack");
            }
            metrics.progress_acks_total.inc();
        }
    }
}

/// One pulled job, until it is acked, nak'ed or termed. Holds its in-flight permit.
pub struct Delivery {
    acker: jetstream::message::Acker,
    pub subject: async_nats::Subject,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    pub stream_seq: u64,
    pub delivered: i64,
    /// When the producer's publish reached the stream.
    pub published: SystemTime,
    pub received: Instant,
    _permit: OwnedSemaphorePermit,
    inflight: prometheus::IntGauge,
    held: (Held, u64),
}

impl Drop for Delivery {
    fn drop(&mut self) {
        self.inflight.dec();
        self.held.0.remove(self.held.1);
    }
}

impl Delivery {
    fn new(msg: jetstream::Message, permit: OwnedSemaphorePermit, inflight: &prometheus::IntGauge, held: &Held) -> Result<Delivery, BusError> {
        let (stream_seq, delivered, published) = {
            let info = msg.info().map_err(|e| BusError::Pull(format!("not a JetStream message: {e}")))?;
            (info.stream_sequence, info.delivered, SystemTime::from(info.published))
        };
        let reply = msg.reply.clone().ok_or_else(|| BusError::Pull("message without reply subject".into()))?;
        let (msg, acker) = msg.split();
        Ok(Delivery {
            acker,
            subject: msg.subject,
            payload: msg.payload,
            headers: msg.headers,
            stream_seq,
            delivered,
            published,
            received: Instant::now(),
            _permit: permit,
            inflight: {
                inflight.inc();
                inflight.clone()
            },
            held: (held.clone(), held.insert(reply)),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.as_ref()?.get(name).map(|v| v.as_str())
    }

    /// What follows `<prefix>.jobs.`: a model name when the subject is well formed. A subject
    /// with extra tokens (`jobs.x.y.mlp`) keeps them, so the job is refused for not naming its model.
    pub fn subject_model(&self, prefix: &str) -> &str {
        self.subject.strip_prefix(prefix).and_then(|s| s.strip_prefix(".jobs.")).unwrap_or(&self.subject)
    }

    /// Time since the producer published the job.
    pub fn age(&self) -> Duration {
        SystemTime::now().duration_since(self.published).unwrap_or_default()
    }

    pub async fn ack(&self) -> Result<(), BusError> {
        self.send(AckKind::Ack).await
    }

    /// Hands the job back for redelivery after `delay`.
    pub async fn nak(&self, delay: Option<Duration>) -> Result<(), BusError> {
        self.send(AckKind::Nak(delay)).await
    }

    /// Never redeliver: the job is invalid or has been dead-lettered.
    pub async fn term(&self) -> Result<(), BusError> {
        self.send(AckKind::Term).await
    }

    async fn send(&self, kind: AckKind) -> Result<(), BusError> {
        self.acker.ack_with(kind).await.map_err(|e| BusError::Ack(e.to_string()))
    }
}

/// Pull settings of the loop.
pub struct PullOpts {
    pub max_inflight: usize,
    pub pull_batch: usize,
}

/// The pull loop: fetches as many jobs as there are free permits and sends them to `out`. On
/// shutdown it stops asking, finishes the open pull request and sends what still arrives to
/// `release`, so those jobs are handed back at once instead of waiting out `ack_wait`.
pub async fn pull(
    consumer: consumer::PullConsumer,
    opts: PullOpts,
    held: Held,
    out: mpsc::Sender<Delivery>,
    release: mpsc::Sender<Vec<Delivery>>,
    metrics: Arc<Metrics>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(opts.max_inflight));
    let mut stopping = false;
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    while !stopping {
        let mut slots = tokio::select! {
            _ = shutdown.recv() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let extra = permits.available_permits().min(opts.pull_batch - 1);
        if extra > 0 {
            if let Ok(more) = permits.clone().try_acquire_many_owned(extra as u32) {
                slots.merge(more);
            }
        }
        let want = slots.num_permits();
        let mut batch = match consumer.batch().max_messages(want).expires(Duration::from_secs(1)).messages().await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "pull request failed; retrying");
                metrics.errors_total.with_label_values(&["bus", "pull"]).inc();
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.recv(), if !stopping => { stopping = true; continue }
                m = batch.next() => m,
            };
            let msg = match next {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    warn!(error = %e, "pull batch error");
                    metrics.errors_total.with_label_values(&["bus", "pull"]).inc();
                    break;
                }
            };
            let Some(permit) = slots.split(1) else { break };
            let delivery = match Delivery::new(msg, permit, &metrics.inflight_jobs, &held) {
                Ok(d) => d,
                Err(e) => {
                    warn!(error = %e, "dropping a non-JetStream message");
                    continue;
                }
            };
            if delivery.delivered > 1 {
                metrics.redeliveries_total.inc();
            }
            let sent = if stopping { release.send(vec![delivery]).await.is_ok() } else { out.send(delivery).await.is_ok() };
            if !sent {
                stopping = true;
            }
        }
    }
    metrics.ready.store(false, std::sync::atomic::Ordering::Relaxed);
    info!("pull loop stopped");
}

/// Keeps `jetbatch_consumer_pending` and `_ack_pending` current.
pub async fn watch_consumer(mut consumer: consumer::PullConsumer, metrics: Arc<Metrics>, mut shutdown: broadcast::Receiver<()>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        match consumer.info().await {
            Ok(info) => {
                metrics.consumer_pending.set(info.num_pending as i64);
                metrics.consumer_ack_pending.set(info.num_ack_pending as i64);
            }
            Err(e) => warn!(error = %e, "consumer info"),
        }
    }
}

/// Publishes streamed `generate` chunks on core NATS `<prefix>.stream.<id>`. Core publishes on the
/// worker's one connection keep their order, and the runner publishes a job's chunks before its
/// result goes to the results stage, so subscribers see every chunk before the result.
#[derive(Clone)]
pub struct Streamer {
    pub client: Client,
    pub prefix: String,
}

#[derive(serde::Serialize)]
struct Chunk<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    done: bool,
}

impl Streamer {
    pub async fn publish(&self, id: &str, encoding: crate::job::Encoding, c: &crate::engine::StreamChunk) {
        let chunk = if c.done {
            Chunk { id, index: None, text: None, token: None, done: true }
        } else {
            Chunk { id, index: Some(c.index), text: Some(&c.text), token: Some(c.token), done: false }
        };
        let payload = Bytes::from(encoding.encode(&chunk));
        if let Err(e) = self.client.publish(format!("{}.stream.{id}", self.prefix), payload).await {
            warn!(%id, error = %e, "stream chunk publish");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetstream::context::{PublishError, PublishErrorKind};

    #[test]
    fn publish_failures_that_cannot_succeed_later_are_permanent() {
        let api = |code: u16, err_code: u64| -> jetstream::Error {
            serde_json::from_value(serde_json::json!({"code": code, "err_code": err_code, "description": "refused"})).unwrap()
        };
        let permanent = |e: PublishError| publish_error(e).is_permanent();
        assert!(permanent(PublishError::new(PublishErrorKind::MaxPayloadExceeded)));
        assert!(permanent(PublishError::new(PublishErrorKind::WrongLastSequence)));
        assert!(permanent(PublishError::with_source(PublishErrorKind::Other, api(400, 10054))), "message over the stream's max size");
        assert!(permanent(PublishError::with_source(PublishErrorKind::Other, api(400, 10060))), "expected stream mismatch");
        assert!(!permanent(PublishError::with_source(PublishErrorKind::Other, api(503, 10008))), "JetStream temporarily unavailable");
        assert!(!permanent(PublishError::with_source(PublishErrorKind::Other, api(404, 10059))), "stream not found during a failover");
        assert!(!permanent(PublishError::new(PublishErrorKind::TimedOut)));
        assert!(!permanent(PublishError::new(PublishErrorKind::BrokenPipe)));
        assert!(!permanent(PublishError::new(PublishErrorKind::StreamNotFound)));
    }

    #[test]
    fn results_are_keyed_by_id_and_job() {
        let (a, b) = (job_hash(b"{\"id\":\"x\",\"n\":1}"), job_hash(b"{\"id\":\"x\",\"n\":2}"));
        assert_ne!(result_msg_id("x", &a), result_msg_id("x", &b), "two jobs that share an id keep two answers");
        assert_eq!(result_msg_id("x", &a), result_msg_id("x", &job_hash(b"{\"id\":\"x\",\"n\":1}")), "a redelivery is deduplicated");
    }
}
