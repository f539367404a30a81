//! `jetbatch serve`: wires the stages together and runs them until shutdown.
//!
//! ```text
//! bus::pull ──Delivery──▶ intake ──Pending──▶ batcher ──Batch(1 prefetched)──▶ runner ──▶ engine thread
//!                           │ invalid / cache hit                                 │
//!                           └──────────────────────Finished──────────────────────┴──▶ results ──▶ publish, ack
//! ```
//! Every channel is bounded. The results stage is the only one that acks: a job is acked after its
//! result is stored in the cache and its publish is acknowledged by the results stream.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, Context};
use async_nats::HeaderMap;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::batcher::{self, Batch, Batchable};
use crate::bus::{self, BusError, Delivery, PullOpts};
use crate::cache::Cache;
use crate::config::{ServeArgs, Topology};
use crate::engine::{EngineError, EngineHandle};
use crate::job::{self, Encoding, ErrorCode, JobError, JobKind, JobResult, Limits, Output, Status, Timing, ValidJob};
use crate::metrics::Metrics;
use crate::repository::{ModelSpec, RepoError, Repository};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Repository(#[from] RepoError),
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    #[error("--reply-prefix {pattern}: {message}")]
    ReplyPrefix { pattern: String, message: String },
    /// The engine thread died (a bug, not a job: model failures are caught on it). The worker
    /// hands its jobs back and exits non-zero so that its supervisor starts a fresh one.
    #[error("the engine thread stopped unexpectedly")]
    EngineStopped,
}

/// A valid job on its way to the engine.
pub struct Pending {
    pub job: ValidJob,
    pub spec: Arc<ModelSpec>,
    pub cache_key: Option<[u8; 32]>,
    pub delivery: Delivery,
}

impl Batchable for Pending {
    fn model(&self) -> &Arc<ModelSpec> {
        &self.spec
    }
    fn kind(&self) -> JobKind {
        self.job.kind
    }
    fn cost(&self) -> usize {
        self.job.cost
    }
}

/// What became of a job; the results stage turns it into a publish and an ack.
pub enum Outcome {
    /// Answer and ack (an error result here is final: the message is termed).
    Answer(Result<Output, JobError>),
    /// A transient failure: nak with backoff, or dead-letter when deliveries are used up.
    Retry(EngineError),
    /// Never started (shutdown): hand back at once.
    Release,
    /// Its result is already in the results stream (an earlier delivery was answered): ack only.
    AlreadyAnswered,
}

/// Everything the results stage needs of a job, with the outcome.
pub struct Finished {
    pub delivery: Delivery,
    pub header: Header,
    pub outcome: Outcome,
}

/// The parts of a job that go into its result.
pub struct Header {
    pub id: Option<String>,
    pub model: String,
    pub kind: String,
    pub encoding: Encoding,
    pub reply_to: Option<String>,
    pub cache_key: Option<[u8; 32]>,
    pub cached: bool,
    pub stream: bool,
    pub timing: Timing,
}

impl Header {
    fn of(p: &Pending) -> Header {
        header_of(&p.job, p.cache_key)
    }
}

fn header_of(job: &ValidJob, cache_key: Option<[u8; 32]>) -> Header {
    Header {
        id: Some(job.id.clone()),
        model: job.model.to_string(),
        kind: job.kind.as_str().to_string(),
        encoding: job.encoding,
        reply_to: job.reply_to.clone(),
        cache_key,
        cached: false,
        stream: job.stream,
        timing: Timing::default(),
    }
}

/// Shared, read-only context of the stages.
struct Ctx {
    topology: Topology,
    worker: String,
    metrics: Arc<Metrics>,
    cache: Option<Arc<Cache>>,
    /// The models served, so metric labels name only these (a producer's made-up model names and
    /// kinds would otherwise each become a new series).
    repository: Arc<Repository>,
    /// The results stream, to look up whether a job was answered by an earlier delivery.
    results: jetstream::stream::Stream<()>,
    streamer: bus::Streamer,
}

impl Ctx {
    /// Whether the results stream already holds this job's answer. Asked only for redeliveries
    /// and for jobs held past `ack_wait` — the cases where another worker may have answered — so
    /// the common path pays nothing. Only an answer to this very job counts (see
    /// [`bus::stored_answer`]): a result stored by another job with the same id does not.
    async fn already_answered(&self, h: &Header, hash: &str) -> bool {
        let Some(id) = h.id.as_deref() else { return false };
        match bus::stored_answer(&self.results, self.topology.result_subject(id), id, hash).await {
            Ok(found) => found.is_some(),
            Err(e) => {
                warn!(id, error = %e, "results lookup failed; answering anyway (deduplicated by id)");
                false
            }
        }
    }

    /// `model` and `kind` labels: a served model and a known kind, else `unknown` / `invalid`.
    fn labels<'a>(&self, h: &'a Header) -> [&'a str; 2] {
        let model = if self.repository.get(&h.model).is_some() { h.model.as_str() } else { "unknown" };
        let kind = JobKind::parse(&h.kind).map_or("invalid", JobKind::as_str);
        [model, kind]
    }
}

/// Runs the worker until `shutdown` completes, then stops fetching, hands back unstarted jobs,
/// finishes the batch in flight and returns once every pulled job is acked or handed back.
pub async fn run(args: ServeArgs, shutdown: impl Future) -> Result<(), WorkerError> {
    for pattern in &args.reply_prefixes {
        job::check_reply_prefix(pattern, &args.topology.prefix)
            .map_err(|message| WorkerError::ReplyPrefix { pattern: pattern.clone(), message })?;
    }
    let worker = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let metrics = Arc::new(Metrics::new(&worker));
    let repository = Arc::new(Repository::scan(&args.models)?);
    for (name, e) in &repository.invalid {
        error!(model = %name, error = %e, "model skipped");
    }
    info!(models = ?repository.models.keys().collect::<Vec<_>>(), %worker, "starting");
    let cache = args.cache.cache_dir.as_ref().and_then(|dir| {
        match Cache::open(dir, args.cache.ttl(), args.cache.cache_max_mb << 20) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                // A broken cache costs speed, not correctness: run without it.
                error!(error = %e, dir = %dir.display(), "cache unavailable; running without cache");
                metrics.errors_total.with_label_values(&["cache", e.error_type()]).inc();
                None
            }
        }
    });

    let client = bus::connect(&args.nats, &format!("jetbatch-worker {worker}")).await?;
    let js = jetstream::new(client.clone());
    let consumer = bus::setup(&js, &args.topology).await?;

    let (engine, engine_thread) = EngineHandle::start(metrics.clone(), args.model_memory_mb << 20);
    for spec in repository.models.values().filter(|s| s.config.preload) {
        if let Err(e) = engine.load(spec.clone()).await {
            error!(model = %spec.name, error = %e, "preload failed");
        }
    }

    let (notify, _) = broadcast::channel::<()>(1);
    if let Some(addr) = args.metrics_addr {
        let bound = crate::metrics::serve(metrics.clone(), addr, notify.subscribe()).await.map_err(WorkerError::Metrics)?;
        info!(%bound, "metrics endpoint");
    }
    let results_stream = js.get_stream_no_info(&args.topology.results_stream).await.map_err(|e| BusError::Setup(e.to_string()))?;
    let streamer = bus::Streamer { client: client.clone(), prefix: args.topology.prefix.clone() };
    let ctx = Arc::new(Ctx {
        topology: args.topology.clone(),
        worker,
        metrics: metrics.clone(),
        cache,
        repository: repository.clone(),
        results: results_stream,
        streamer: streamer.clone(),
    });
    let mut limits = Limits::new(args.max_payload_bytes, args.max_tensor_elements);
    limits.prefix = args.topology.prefix.clone();
    limits.reply_prefixes = args.reply_prefixes.clone();

    let (deliveries_tx, deliveries_rx) = mpsc::channel(args.pull_batch);
    let (release_tx, release_rx) = mpsc::channel::<Vec<Delivery>>(16);
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(args.max_inflight);
    let (batch_release_tx, mut batch_release_rx) = mpsc::channel::<Vec<Pending>>(4);
    let (batches_tx, batches_rx) = mpsc::channel::<Batch<Pending>>(1);
    let (finished_tx, finished_rx) = mpsc::channel::<Finished>(args.max_inflight);

    let held = bus::Held::default();
    // Runs until every held job is settled, past the shutdown signal: the last batch keeps its lease.
    let keep_alive = tokio::spawn(bus::keep_alive(client.clone(), held.clone(), args.topology.ack_wait(), metrics.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(bus::pull(
        consumer.clone(),
        PullOpts { max_inflight: args.max_inflight, pull_batch: args.pull_batch.clamp(1, args.max_inflight) },
        held,
        deliveries_tx,
        release_tx,
        metrics.clone(),
        notify.subscribe(),
    ));
    tasks.spawn(bus::watch_consumer(consumer, metrics.clone(), notify.subscribe()));
    tasks.spawn(intake(deliveries_rx, pending_tx, finished_tx.clone(), repository, limits, ctx.clone()));
    tasks.spawn(batcher::run(pending_rx, batches_tx, batch_release_tx, notify.subscribe()));
    tasks.spawn(runner(batches_rx, engine, streamer, finished_tx.clone(), metrics.clone(), notify.subscribe()));
    {
        // Batched jobs handed back at shutdown join the results stage as releases.
        let finished_tx = finished_tx.clone();
        tasks.spawn(async move {
            while let Some(jobs) = batch_release_rx.recv().await {
                for p in jobs {
                    let header = Header::of(&p);
                    let _ = finished_tx.send(Finished { delivery: p.delivery, header, outcome: Outcome::Release }).await;
                }
            }
        });
    }
    drop(finished_tx);
    tasks.spawn(snapshots(client.clone(), ctx.clone(), args.metrics_interval_secs, notify.subscribe()));
    let results_task = tokio::spawn(results(finished_rx, release_rx, js, ctx.clone()));

    let engine_died = async {
        while !engine_thread.is_finished() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let died = tokio::select! {
        _ = shutdown => false,
        _ = engine_died => true,
    };
    if died {
        error!("the engine thread stopped: handing jobs back and exiting");
    }
    info!("shutdown: stop fetching, hand back queued jobs, finish the batch in flight");
    let _ = notify.send(());
    while tasks.join_next().await.is_some() {}
    let _ = results_task.await;
    keep_alive.abort();
    // The engine handle was moved into the runner, which has returned: the thread's queue is closed.
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    if let Some(cache) = &ctx.cache {
        if let Err(e) = cache.flush() {
            error!(error = %e, "cache flush");
        }
    }
    let _ = client.flush().await;
    let handed_back = metrics.naks_total.with_label_values(&["shutdown"]).get();
    info!(handed_back, "stopped");
    if died {
        return Err(WorkerError::EngineStopped);
    }
    Ok(())
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Payloads at least this large are parsed on the blocking pool: decoding and tokenising them
/// takes long enough to hold up the jobs behind them on the intake loop.
const HEAVY_PAYLOAD: usize = 16 << 10;
/// Most heavy payloads parsed at once (each may hold a few times its size in memory meanwhile).
const HEAVY_PARSERS: usize = 4;

/// Parses each delivery into a job; answers invalid jobs and cache hits straight away. Small
/// payloads are parsed in line; large ones on the blocking pool, so one huge job cannot stall
/// the jobs behind it.
async fn intake(
    mut deliveries: mpsc::Receiver<Delivery>,
    pending: mpsc::Sender<Pending>,
    finished: mpsc::Sender<Finished>,
    repository: Arc<Repository>,
    limits: Limits,
    ctx: Arc<Ctx>,
) {
    let limits = Arc::new(limits);
    let mut heavy = FuturesUnordered::new();
    let mut open = true;
    while open || !heavy.is_empty() {
        let (delivery, parsed) = tokio::select! {
            d = deliveries.recv(), if open && heavy.len() < HEAVY_PARSERS => match d {
                None => { open = false; continue }
                Some(d) if d.payload.len() >= HEAVY_PAYLOAD => {
                    let (repository, limits, prefix) = (repository.clone(), limits.clone(), ctx.topology.prefix.clone());
                    heavy.push(tokio::task::spawn_blocking(move || {
                        let parsed = parse(&d, &repository, &limits, &prefix);
                        (d, parsed)
                    }));
                    continue;
                }
                Some(d) => {
                    let parsed = parse(&d, &repository, &limits, &ctx.topology.prefix);
                    (d, parsed)
                }
            },
            Some(done) = heavy.next(), if !heavy.is_empty() => match done {
                Ok(pair) => pair,
                // The parse panicked: the job is dropped with its permit and redelivered after
                // ack_wait; the decoder's fuzz tests exist so that this does not happen.
                Err(e) => { error!(error = %e, "job parsing failed"); continue }
            },
        };
        let Some(item) = admit(delivery, parsed, &pending, &ctx).await else { continue };
        if finished.send(item).await.is_err() {
            return;
        }
    }
}

/// Routes a parsed delivery: an error answer, an answer from the cache, an ack of a job already
/// answered, or on to the batcher (`None`).
async fn admit(delivery: Delivery, parsed: Result<Parsed, (Header, JobError)>, pending: &mpsc::Sender<Pending>, ctx: &Ctx) -> Option<Finished> {
    let (job, spec, cache_key) = match parsed {
        Err((header, error)) => return Some(Finished { delivery, header, outcome: Outcome::Answer(Err(error)) }),
        Ok(parsed) => parsed,
    };
    let header = header_of(&job, cache_key);
    if delivery.delivered > 1 && ctx.already_answered(&header, &bus::job_hash(&delivery.payload)).await {
        return Some(Finished { delivery, header, outcome: Outcome::AlreadyAnswered });
    }
    if let Some(output) = lookup(ctx, cache_key.as_ref()) {
        let mut header = header;
        header.cached = true;
        header.timing.queued_ms = ms(delivery.age());
        return Some(Finished { delivery, header, outcome: Outcome::Answer(Ok(output)) });
    }
    match pending.send(Pending { job, spec, cache_key, delivery }).await {
        Ok(()) => None,
        // The batcher has stopped: this job was never started.
        Err(mpsc::error::SendError(p)) => Some(Finished { header: Header::of(&p), delivery: p.delivery, outcome: Outcome::Release }),
    }
}

type Parsed = (ValidJob, Arc<ModelSpec>, Option<[u8; 32]>);

/// Decodes and validates a delivery; on failure, the header of the error result.
fn parse(d: &Delivery, repository: &Repository, limits: &Limits, prefix: &str) -> Result<Parsed, (Header, JobError)> {
    let env = job::decode(&d.payload, d.header("Content-Type"), d.subject_model(prefix), limits).map_err(|r| {
        let header = Header {
            id: r.id,
            model: r.model.unwrap_or_default(),
            kind: r.kind.unwrap_or_default(),
            encoding: r.encoding,
            reply_to: None,
            cache_key: None,
            cached: false,
            stream: false,
            timing: Timing::default(),
        };
        (header, r.error)
    })?;
    let header = |env: &job::Envelope| Header {
        id: Some(env.id.clone()),
        model: env.model.clone(),
        kind: env.kind.as_str().to_string(),
        encoding: env.encoding,
        reply_to: env.reply_to.clone(),
        cache_key: None,
        cached: false,
        stream: false,
        timing: Timing::default(),
    };
    // The stream deduplicates jobs by Nats-Msg-Id; an id in the body that differs would let one
    // job pass the stream's dedup under one name and be answered under another's.
    if let Some(msg_id) = d.header("Nats-Msg-Id").filter(|m| *m != env.id) {
        let msg = format!("id: '{}' differs from the Nats-Msg-Id header '{}'", env.id, msg_id.chars().take(64).collect::<String>());
        return Err((header(&env), JobError::bad_request(msg)));
    }
    let Some(spec) = repository.get(&env.model) else {
        let msg = format!("model: '{}' is not in this worker's repository", env.model);
        return Err((header(&env), JobError::new(ErrorCode::UnknownModel, msg)));
    };
    let h = header(&env);
    let job = spec.validate(env, limits.max_tensor_elements).map_err(|e| (h, e))?;
    let cache_key = job.use_cache.then(|| job.cache_key());
    Ok((job, spec.clone(), cache_key))
}

fn lookup(ctx: &Ctx, key: Option<&[u8; 32]>) -> Option<Output> {
    let (cache, key) = (ctx.cache.as_ref()?, key?);
    match cache.get(key) {
        Ok(Some(output)) => {
            ctx.metrics.cache_hits_total.inc();
            Some(output)
        }
        Ok(None) => {
            ctx.metrics.cache_misses_total.inc();
            None
        }
        Err(e) => {
            warn!(error = %e, "cache read");
            ctx.metrics.errors_total.with_label_values(&["cache", e.error_type()]).inc();
            None
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs batches on the engine. Scoring batches are awaited here, so exactly one more waits in
/// the channel (prefetch); `generate` batches join the model's running generation and are
/// collected by their own task, so later jobs can join while earlier ones still generate.
/// Batches that arrive after shutdown was signalled were never started and are released.
async fn runner(
    mut batches: mpsc::Receiver<Batch<Pending>>,
    engine: EngineHandle,
    streamer: bus::Streamer,
    finished: mpsc::Sender<Finished>,
    metrics: Arc<Metrics>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let mut stopping = false;
    while let Some(batch) = batches.recv().await {
        stopping |= shutdown.try_recv().is_ok();
        if stopping {
            for p in batch.items {
                let header = Header::of(&p);
                let _ = finished.send(Finished { delivery: p.delivery, header, outcome: Outcome::Release }).await;
            }
            continue;
        }
        let span = info_span!("batch", model = %batch.model.name, kind = batch.kind.as_str(), size = batch.items.len());
        let generate = batch.kind == JobKind::Generate;
        let Some(run) = submit(batch, &engine, &finished, &metrics).await else { continue };
        let collect = collect(run, streamer.clone(), finished.clone(), metrics.clone()).instrument(span);
        if generate {
            tokio::spawn(collect);
        } else {
            collect.await;
        }
    }
}

/// A batch handed to the engine: its jobs (with their queue time) and the engine's events.
struct Submitted {
    model: Arc<str>,
    items: Vec<Option<(Pending, f64)>>,
    events: mpsc::UnboundedReceiver<crate::engine::Event>,
}

/// Answers jobs past their deadline, and submits the rest to the engine.
async fn submit(batch: Batch<Pending>, engine: &EngineHandle, finished: &mpsc::Sender<Finished>, metrics: &Metrics) -> Option<Submitted> {
    let Batch { model, kind, items } = batch;
    let (mut items, late): (Vec<Pending>, Vec<Pending>) =
        items.into_iter().partition(|p| p.job.timeout.is_none_or(|t| p.delivery.age() <= t));
    for p in late {
        let mut header = Header::of(&p);
        header.timing.queued_ms = ms(p.delivery.age());
        let err = JobError::new(ErrorCode::Timeout, format!("waited {:.0} ms, over the job's timeout_ms", header.timing.queued_ms));
        let _ = finished.send(Finished { delivery: p.delivery, header, outcome: Outcome::Answer(Err(err)) }).await;
    }
    if items.is_empty() {
        return None;
    }
    metrics.batch_size.with_label_values(&[&model.name]).observe(items.len() as f64);
    let inputs = items.iter_mut().map(|p| std::mem::replace(&mut p.job.input, job::JobInput::Tensor(Vec::new()))).collect();
    let streaming = items.iter().map(|p| p.job.stream).collect();
    let events = engine.run(model.clone(), kind, inputs, streaming);
    let items = items
        .into_iter()
        .map(|p| {
            let queued_ms = ms(p.delivery.age());
            Some((p, queued_ms))
        })
        .collect();
    Some(Submitted { model: model.name.clone(), items, events })
}

/// Publishes streamed chunks as they come and passes each job on as soon as it is done.
async fn collect(mut run: Submitted, streamer: bus::Streamer, finished: mpsc::Sender<Finished>, metrics: Arc<Metrics>) {
    let size = run.items.len();
    let mut left = size;
    let mut slowest = Duration::ZERO;
    while left > 0 {
        match run.events.recv().await {
            Some(crate::engine::Event::Chunk { index, chunk }) => {
                if let Some((p, _)) = &run.items[index] {
                    streamer.publish(&p.job.id, p.job.encoding, &chunk).await;
                }
            }
            Some(crate::engine::Event::Done { index, result, compute }) => {
                let Some((p, queued_ms)) = run.items[index].take() else { continue };
                left -= 1;
                slowest = slowest.max(compute);
                let mut header = Header::of(&p);
                header.timing = Timing { queued_ms, compute_ms: ms(compute), batch_size: size };
                let outcome = match result {
                    Ok(output) => Outcome::Answer(Ok(output)),
                    Err(e) => Outcome::Retry(e),
                };
                let _ = finished.send(Finished { delivery: p.delivery, header, outcome }).await;
            }
            None => break,
        }
    }
    // The engine went away before answering: retry elsewhere.
    for (p, _) in run.items.into_iter().flatten() {
        let header = Header::of(&p);
        let _ = finished.send(Finished { delivery: p.delivery, header, outcome: Outcome::Retry(EngineError::Stopped) }).await;
    }
    metrics.batch_compute_seconds.with_label_values(&[&run.model]).observe(slowest.as_secs_f64());
}

/// Most result publishes awaiting their stream ack at once.
const MAX_PUBLISHING: usize = 4096;

/// Publishes results and acks jobs: store in cache → publish → await the stream's ack → ack job.
async fn results(
    mut finished: mpsc::Receiver<Finished>,
    mut released: mpsc::Receiver<Vec<Delivery>>,
    js: Context,
    ctx: Arc<Ctx>,
) {
    let mut publishing = FuturesUnordered::new();
    let (mut finished_open, mut released_open) = (true, true);
    while finished_open || released_open || !publishing.is_empty() {
        let room = publishing.len() < MAX_PUBLISHING;
        tokio::select! {
            item = finished.recv(), if finished_open && room => match item {
                Some(f) => publishing.push(settle(f, js.clone(), ctx.clone())),
                None => finished_open = false,
            },
            item = released.recv(), if released_open => match item {
                Some(ds) => {
                    for d in ds {
                        hand_back(&d, None, "shutdown", &ctx).await;
                    }
                }
                None => released_open = false,
            },
            Some(()) = publishing.next(), if !publishing.is_empty() => {}
        }
    }
}

async fn hand_back(d: &Delivery, delay: Option<Duration>, reason: &str, ctx: &Ctx) {
    ctx.metrics.naks_total.with_label_values(&[reason]).inc();
    if let Err(e) = d.nak(delay).await {
        warn!(error = %e, "nak failed; the job is redelivered after ack_wait");
    }
}

/// Redelivery delay after the `delivered`-th failed attempt: 1 s doubling to at most 60 s.
fn backoff(delivered: i64) -> Duration {
    Duration::from_secs(1u64 << (delivered.clamp(1, 7) - 1)).min(Duration::from_secs(60))
}

async fn settle(f: Finished, js: Context, ctx: Arc<Ctx>) {
    let Finished { delivery, header, outcome } = f;
    let hash = bus::job_hash(&delivery.payload);
    // A redelivery, or a job held past ack_wait (say the process was paused): another worker may
    // have answered it meanwhile.
    let contested = delivery.delivered > 1 || delivery.received.elapsed() >= ctx.topology.ack_wait();
    let settling = matches!(outcome, Outcome::Answer(_) | Outcome::Retry(_));
    let outcome = if contested && settling && ctx.already_answered(&header, &hash).await { Outcome::AlreadyAnswered } else { outcome };
    let (answer, dead) = match outcome {
        Outcome::Release => return hand_back(&delivery, None, "shutdown", &ctx).await,
        Outcome::AlreadyAnswered => {
            debug!(id = ?header.id, "already answered by an earlier delivery; ack without a second answer");
            ctx.metrics.duplicates_suppressed_total.inc();
            if let Err(e) = delivery.ack().await {
                warn!(error = %e, "ack failed");
            }
            return;
        }
        Outcome::Retry(e) if delivery.delivered < ctx.topology.max_deliver || ctx.topology.max_deliver <= 0 => {
            warn!(id = ?header.id, error = %e, delivered = delivery.delivered, "job failed; will retry");
            ctx.metrics.errors_total.with_label_values(&["engine", e.error_type()]).inc();
            return hand_back(&delivery, Some(backoff(delivery.delivered)), e.error_type(), &ctx).await;
        }
        Outcome::Retry(e) => {
            let err = e.to_job_error();
            (Err(err.clone()), Some(err))
        }
        Outcome::Answer(Ok(output)) => (Ok(output), None),
        // Without an id no result can be addressed: the payload goes to the dead letters.
        Outcome::Answer(Err(err)) if header.id.is_none() => {
            info!(subject = %delivery.subject, error = %err, "job without a readable id: dead-lettered");
            return dead_letter_then_term(&delivery, &header, &err, &js, &ctx).await;
        }
        Outcome::Answer(Err(err)) => (Err(err), None),
    };
    if let Err(err) = &answer {
        info!(id = ?header.id, model = ctx.labels(&header)[0], error = %err, "job answered with an error");
    }
    if let (Ok(output), Some(cache), Some(key), false) = (&answer, &ctx.cache, &header.cache_key, header.cached) {
        if let Err(e) = cache.put(key, output) {
            warn!(error = %e, "cache write");
            ctx.metrics.errors_total.with_label_values(&["cache", e.error_type()]).inc();
        }
    }
    if let (true, true, Ok(Output::Generate { text, tokens, .. })) = (header.stream, header.cached, &answer) {
        // A cached generation streams as one chunk with the whole text, then done.
        let id = header.id.as_deref().expect("valid jobs have ids");
        let chunk = crate::engine::StreamChunk { job: 0, index: 0, text: text.clone(), token: tokens.last().copied().unwrap_or(0), done: false };
        ctx.streamer.publish(id, header.encoding, &chunk).await;
        ctx.streamer.publish(id, header.encoding, &crate::engine::StreamChunk { done: true, ..chunk }).await;
    }
    let mut status = if answer.is_ok() { "ok" } else { "error" };
    let mut dead = dead;
    if let Err(e) = publish_result(&js, &ctx, &header, &hash, answer).await {
        ctx.metrics.errors_total.with_label_values(&["bus", e.error_type()]).inc();
        if !e.is_permanent() {
            // Nothing is acked without a stored result: the job comes back after a delay.
            error!(id = ?header.id, error = %e, "result publish failed; the job will be redelivered");
            return hand_back(&delivery, Some(Duration::from_secs(1)), "publish", &ctx).await;
        }
        // This result can never be stored (say it is over the server's max payload): a short
        // error result takes its place, and the job goes to the dead letters.
        error!(id = ?header.id, error = %e, "result refused by the server; answering with an error instead");
        let err = JobError::new(ErrorCode::ModelError, format!("the result could not be stored: {e}"));
        match publish_result(&js, &ctx, &header, &hash, Err(err.clone())).await {
            Err(e) if !e.is_permanent() => return hand_back(&delivery, Some(Duration::from_secs(1)), "publish", &ctx).await,
            Err(e) => error!(id = ?header.id, error = %e, "error result refused as well; dead letter only"),
            Ok(()) => {}
        }
        status = "error";
        dead = Some(err);
    }
    let [model, kind] = ctx.labels(&header);
    ctx.metrics.jobs_total.with_label_values(&[model, kind, status]).inc();
    ctx.metrics.job_latency_seconds.with_label_values(&[model]).observe(delivery.age().as_secs_f64());
    match dead {
        Some(err) => dead_letter_then_term(&delivery, &header, &err, &js, &ctx).await,
        None => {
            let done = if status == "ok" { delivery.ack().await } else { delivery.term().await };
            if let Err(e) = done {
                warn!(id = ?header.id, error = %e, "ack failed; the job may be answered again (deduplicated by id)");
            }
        }
    }
}

/// Stores the result on the job's own subject `<prefix>.results.<id>` — whatever the job asked —
/// and then, if the job named a `reply_to` (which the decoder allowed: only under the configured
/// reply prefixes, never a system subject or one of ours), sends a copy there.
async fn publish_result(js: &Context, ctx: &Ctx, h: &Header, hash: &str, answer: Result<Output, JobError>) -> Result<(), BusError> {
    let id = h.id.clone().expect("results are addressed by id");
    let (status, output, error) = match answer {
        Ok(o) => (Status::Ok, Some(o.to_wire(h.encoding)), None),
        Err(e) => (Status::Error, None, Some(e)),
    };
    let result = JobResult {
        id: id.clone(),
        model: h.model.clone(),
        kind: h.kind.clone(),
        status,
        output,
        error,
        cached: h.cached,
        worker: ctx.worker.clone(),
        timing: h.timing.clone(),
    };
    let payload = bytes::Bytes::from(h.encoding.encode(&result));
    let mut headers = content_type(h.encoding);
    headers.insert("Nats-Msg-Id", bus::result_msg_id(&id, hash).as_str());
    headers.insert(bus::JOB_HASH_HEADER, hash);
    let ack = bus::publish_stored(js, ctx.topology.result_subject(&id), headers.clone(), payload.clone()).await?;
    if ack.duplicate {
        debug!(%id, "result already published (duplicate delivery)");
    }
    if let Some(reply_to) = &h.reply_to {
        // A copy for the producer's inbox; the stored result is the answer, so a failure here
        // (the inbox is gone, the copy too large) only loses the copy.
        if let Err(e) = js.client().publish_with_headers(reply_to.clone(), headers, payload).await {
            warn!(%id, error = %e, "reply_to copy not sent");
        }
    }
    Ok(())
}

fn content_type(e: Encoding) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Content-Type", e.content_type());
    h
}

/// Header-safe text: printable characters only, at most `max` of them.
fn header_text(s: &str, max: usize) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(max).collect()
}

/// Copies the original payload to `<prefix>.dead.<model|invalid>` with the error in headers, then
/// terms. Only our own headers go with it: the producer's (say `Nats-Expected-Stream`) would be
/// read by the dead-letter stream as instructions. A payload the server refuses there for good is
/// dropped, and the dead letter says so.
async fn dead_letter_then_term(d: &Delivery, h: &Header, err: &JobError, js: &Context, ctx: &Ctx) {
    let token = if job::valid_model_name(&h.model) && h.id.is_some() { h.model.as_str() } else { "invalid" };
    let mut headers = HeaderMap::new();
    headers.insert("Jetbatch-Error-Code", err.code.as_str());
    headers.insert("Jetbatch-Error", header_text(&err.message, 512).as_str());
    headers.insert("Jetbatch-Subject", d.subject.as_str());
    headers.insert("Jetbatch-Stream-Seq", d.stream_seq.to_string().as_str());
    headers.insert("Jetbatch-Deliveries", d.delivered.to_string().as_str());
    headers.insert("Nats-Msg-Id", format!("dead-{}", d.stream_seq).as_str());
    if let Some(ct) = d.header("Content-Type") {
        headers.insert("Jetbatch-Content-Type", header_text(ct, 128).as_str());
    }
    if let Some(id) = &h.id {
        headers.insert("Jetbatch-Job-Id", id.as_str());
    }
    let subject = format!("{}.dead.{token}", ctx.topology.prefix);
    let mut published = bus::publish_stored(js, subject.clone(), headers.clone(), d.payload.clone()).await;
    if matches!(&published, Err(e) if e.is_permanent()) {
        headers.insert("Jetbatch-Payload-Dropped", d.payload.len().to_string().as_str());
        published = bus::publish_stored(js, subject, headers, bytes::Bytes::new()).await;
    }
    match published {
        Ok(_) => {
            ctx.metrics.dead_letters_total.inc();
            if let Err(e) = d.term().await {
                warn!(error = %e, "term failed");
            }
        }
        Err(e) => {
            error!(error = %e, "dead-letter publish failed; job will be redelivered");
            hand_back(d, Some(Duration::from_secs(1)), "publish", ctx).await;
        }
    }
}

/// Publishes the metrics snapshot on `<prefix>.metrics.<worker>` every `interval_secs`.
async fn snapshots(client: async_nats::Client, ctx: Arc<Ctx>, interval_secs: u64, mut shutdown: broadcast::Receiver<()>) {
    if interval_secs == 0 {
        return;
    }
    let subject = format!("{}.metrics.{}", ctx.topology.prefix, ctx.worker.replace(['.', '*', '>', ' '], "_"));
    let mut tick = tokio::time::interval(Duration::from_secs(interval_secs));
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        let body = serde_json::to_vec(&ctx.metrics.snapshot()).expect("json");
        if let Err(e) = client.publish(subject.clone(), body.into()).await {
            warn!(error = %e, "metrics snapshot publish");
        }
    }
}
