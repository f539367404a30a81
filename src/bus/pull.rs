//! Pulling jobs. Pulls are sized by free in-flight permits, never more: a job sits in this
//! worker's buffer only while there is room to start it, so it cannot outlive `ack_wait` there and
//! be redelivered to another worker (the over-buffering duplicates of nats.go#1929). Each pulled
//! job holds a permit until it is acked or handed back, and [`keep_alive`] extends the lease of
//! every job held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, AckKind};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use super::BusError;
use crate::metrics::Metrics;

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
    /// Paused while a job this worker cannot serve waits for another worker of the pool.
    pub gate: super::PullGate,
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
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = opts.gate.wait() => {}
        }
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

