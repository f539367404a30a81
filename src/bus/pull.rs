//! Pulling jobs, highest level first (see [`crate::priority`]). Pulls are sized by free in-flight
//! permits, never more: a job sits in this worker's buffer only while there is room to start it,
//! so it cannot outlive `ack_wait` there and be redelivered to another worker (the over-buffering
//! duplicates of nats.go#1929). Each pulled job holds a permit until it is acked or handed back,
//! and [`keep_alive`] extends the lease of every job held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, AckKind};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use super::{BusError, Consumers};
use crate::metrics::Metrics;
use crate::priority::{Priority, Sweep};

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

    /// How many jobs are held.
    pub fn count(&self) -> usize {
        self.jobs.lock().expect("held lock").len()
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

    /// The model (its token decoded, see [`crate::job::model_token`]) and the priority level of the
    /// job's subject `<prefix>.jobs.<model token>[.high|.low]`. The jobs stream takes no other
    /// subjects; were one to come, its extra tokens stay in the model, so the job is refused for
    /// not naming its model.
    pub fn subject_job(&self, prefix: &str) -> (std::borrow::Cow<'_, str>, Priority) {
        let rest = self.subject.strip_prefix(prefix).and_then(|s| s.strip_prefix(".jobs.")).unwrap_or(&self.subject);
        let (token, level) = Priority::split_subject(rest);
        (crate::job::token_model(token), level)
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
    /// A level not asked for jobs this long is asked first (see [`crate::priority`]).
    pub aging: Duration,
    /// Paused while a job this worker cannot serve waits for another worker of the pool.
    pub gate: super::PullGate,
}

/// How long a no-wait pull may take to answer before it is taken for lost (it answers at once).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a pull request waits for a job on an idle worker before it is renewed; shutdown
/// waits for the open ones, so this also bounds how long it waits for them.
const LONG_POLL: Duration = Duration::from_secs(1);

/// The pull loop: fetches as many jobs as there are free permits, highest level first, and
/// sends them to `out`. While permits are free it asks the levels in turn without waiting
/// ([`Puller::sweep`]); once every level was empty, it waits with one long poll per level, each
/// holding one permit, so the first job of any level is taken at once and nothing arrives
/// without a permit for it (with fewer free permits than levels, the levels first in the sweep's
/// order get the polls and the others are asked again when one ends, within [`LONG_POLL`]). On shutdown it stops asking, waits for the open polls and sends what
/// still arrives to `release`, so those jobs are handed back at once instead of waiting out
/// `ack_wait`.
pub async fn pull(
    consumers: Consumers,
    opts: PullOpts,
    held: Held,
    out: mpsc::Sender<Delivery>,
    release: mpsc::Sender<Vec<Delivery>>,
    metrics: Arc<Metrics>,
    shutdown: broadcast::Receiver<()>,
) {
    let permits = Arc::new(Semaphore::new(opts.max_inflight));
    let mut p = Puller {
        consumers,
        permits: permits.clone(),
        pull_batch: opts.pull_batch.max(1),
        order: Sweep::new(opts.aging, Instant::now()),
        held,
        out,
        release,
        metrics: metrics.clone(),
        shutdown,
        stopping: false,
    };
    let mut polls = FuturesUnordered::new();
    let mut polling = [false; 3];
    // Every level was empty at the last sweep: wait on long polls instead of sweeping again.
    let mut idle = false;
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    loop {
        // Paused after handing back a job for another worker of the pool: ask for nothing new.
        let paused = opts.gate.is_paused();
        if !p.stopping && !paused && !idle && permits.available_permits() > 0 {
            idle = p.sweep().await;
        }
        if !p.stopping && !paused && idle {
            let now = Instant::now();
            for level in p.order.order(now) {
                if polling[level as usize] {
                    continue;
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else { break };
                p.order.asked(level, now);
                polling[level as usize] = true;
                polls.push(long_poll(p.consumers.get(level).clone(), level, permit, p.metrics.clone()));
            }
        }
        if p.stopping && polls.is_empty() {
            break;
        }
        let lacking_poll = idle && polling.contains(&false);
        tokio::select! {
            _ = p.shutdown.recv(), if !p.stopping => p.stopping = true,
            _ = opts.gate.wait(), if paused && !p.stopping => {}
            Some((level, got, permit)) = polls.next(), if !polls.is_empty() => {
                polling[level as usize] = false;
                if let Some(msg) = got {
                    p.forward(msg, permit).await;
                }
                // Sweep again: a job that woke a poll may have company, and higher levels go first.
                idle = false;
            }
            // A permit came free: sweep, or open the poll a level lacked for want of one.
            free = permits.acquire(), if !p.stopping && !paused && (!idle || lacking_poll) => drop(free),
        }
    }
    metrics.ready.store(false, std::sync::atomic::Ordering::Relaxed);
    info!("pull loop stopped");
}

/// Waits up to [`LONG_POLL`] for one job of `level`; gives back the permit it holds for it.
async fn long_poll(
    consumer: consumer::PullConsumer,
    level: Priority,
    permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
) -> (Priority, Option<jetstream::Message>, OwnedSemaphorePermit) {
    // One message satisfies the request, so the server holds no request for this inbox after it.
    let got = match consumer.batch().max_messages(1).expires(LONG_POLL).messages().await {
        Ok(mut batch) => match batch.next().await {
            Some(Ok(msg)) => Some(msg),
            Some(Err(e)) => {
                pull_failed(e.to_string(), &metrics).await;
                None
            }
            None => None,
        },
        Err(e) => {
            pull_failed(e.to_string(), &metrics).await;
            None
        }
    };
    (level, got, permit)
}

/// Counts a failed pull and pauses, so a broken connection is not asked again in a tight loop.
async fn pull_failed(e: String, metrics: &Metrics) {
    warn!(error = %e, "pull request failed; retrying");
    metrics.errors_total.with_label_values(&["bus", "pull"]).inc();
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// The pull loop's state between rounds.
struct Puller {
    consumers: Consumers,
    permits: Arc<Semaphore>,
    pull_batch: usize,
    order: Sweep,
    held: Held,
    out: mpsc::Sender<Delivery>,
    release: mpsc::Sender<Vec<Delivery>>,
    metrics: Arc<Metrics>,
    shutdown: broadcast::Receiver<()>,
    stopping: bool,
}

impl Puller {
    /// Whether shutdown has begun. Checked between the pulls of a sweep, not only between sweeps:
    /// a sweep goes on while its pulls fill, and once shutdown began every job it takes is handed
    /// back at once and is free again, so a sweep that did not stop would take the same jobs over
    /// and over, spending a delivery each time, until they ran out of deliveries.
    fn stop_requested(&mut self) -> bool {
        if !self.stopping && !matches!(self.shutdown.try_recv(), Err(broadcast::error::TryRecvError::Empty)) {
            self.stopping = true;
        }
        self.stopping
    }

    /// Asks the levels for jobs without waiting, in [`Sweep::order`], until the free permits are
    /// used. True when permits are left: every level was emptied.
    async fn sweep(&mut self) -> bool {
        let now = Instant::now();
        for level in self.order.order(now) {
            loop {
                let want = self.permits.available_permits().min(self.pull_batch);
                if want == 0 || self.stop_requested() {
                    return false;
                }
                let slots = self.permits.clone().try_acquire_many_owned(want as u32).expect("only the pull loop takes permits");
                self.order.asked(level, now);
                if self.fetch(level, slots).await < want {
                    break;
                }
            }
        }
        self.permits.available_permits() > 0
    }

    /// One no-wait pull of as many jobs of `level` as `slots` has permits; returns how many came.
    async fn fetch(&mut self, level: Priority, mut slots: OwnedSemaphorePermit) -> usize {
        let want = slots.num_permits();
        let mut batch = match self.consumers.get(level).fetch().max_messages(want).messages().await {
            Ok(b) => b,
            Err(e) => {
                pull_failed(e.to_string(), &self.metrics).await;
                return 0;
            }
        };
        let mut got = 0;
        loop {
            // A no-wait pull has no expiry, so async-nats sets no timer: a request lost with the
            // connection (a server restart) would be waited for forever.
            let next = match tokio::time::timeout(FETCH_TIMEOUT, batch.next()).await {
                Ok(Some(next)) => next,
                Ok(None) => break,
                Err(_) => {
                    warn!(%level, "no answer to a pull request; asking again");
                    self.metrics.errors_total.with_label_values(&["bus", "pull"]).inc();
                    break;
                }
            };
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, %level, "pull batch error");
                    self.metrics.errors_total.with_label_values(&["bus", "pull"]).inc();
                    break;
                }
            };
            let Some(permit) = slots.split(1) else { break };
            got += 1;
            self.forward(msg, permit).await;
        }
        got
    }

    /// Hands a pulled job on with its permit: to intake, or to `release` once stopping.
    async fn forward(&mut self, msg: jetstream::Message, permit: OwnedSemaphorePermit) {
        let delivery = match Delivery::new(msg, permit, &self.metrics.inflight_jobs, &self.held) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "dropping a non-JetStream message");
                return;
            }
        };
        if delivery.delivered > 1 {
            self.metrics.redeliveries_total.inc();
        }
        let sent = if self.stop_requested() { self.release.send(vec![delivery]).await.is_ok() } else { self.out.send(delivery).await.is_ok() };
        if !sent {
            self.stopping = true;
        }
    }
}

/// Keeps `jetbatch_consumer_pending` and `_ack_pending` (summed over the levels) and
/// `jetbatch_priority_pending{priority}` current.
pub async fn watch_consumer(consumers: Consumers, metrics: Arc<Metrics>, mut shutdown: broadcast::Receiver<()>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        let (mut pending, mut ack_pending) = (0, 0);
        for level in Priority::ALL {
            match consumers.get(level).clone().info().await {
                Ok(info) => {
                    metrics.priority_pending.with_label_values(&[level.as_str()]).set(info.num_pending as i64);
                    pending += info.num_pending as i64;
                    ack_pending += info.num_ack_pending as i64;
                }
                Err(e) => warn!(error = %e, %level, "consumer info"),
            }
        }
        metrics.consumer_pending.set(pending);
        metrics.consumer_ack_pending.set(ack_pending);
    }
}
