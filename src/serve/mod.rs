//! `jetbatch serve`: the JetStream adapter on the core (`crate::infer`). It wires the stages
//! together and runs them until shutdown: [`intake`], the core (batcher, runner, engine) and
//! [`results`]; the types that flow between them are in [`flow`]. JetStream is behind `crate::bus`.
//!
//! ```text
//! bus::pull ──Delivery──▶ intake ──Pending──▶ core: batcher ─▶ runner ─▶ engine thread
//!                           │ invalid / cache hit                  │ Done<Pending> (as Finished)
//!                           └──────────────Finished────────────────┴──▶ results ──▶ publish, ack
//! ```
//! Every channel is bounded. The results stage is the only one that acks: a job is acked after its
//! result is stored in the cache and its publish is acknowledged by the results stream.



mod flow;
mod intake;
mod peers;
mod results;
mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{broadcast, mpsc};
use tracing::{error, info};

use self::flow::{Ctx, Finished, Pending};
use crate::bus::{self, BusError, Delivery, PullOpts};
use crate::cache::Cache;
use crate::config::ServeArgs;
use crate::engine::EngineHandle;
use crate::job::{self, Limits};
use crate::metrics::Metrics;
use crate::priority::Aging;
use crate::repository::{LiveRepository, RepoError, Repository};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Repository(#[from] RepoError),
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    #[error("--reply-prefix {pattern}: {message}")]
    ReplyPrefix { pattern: String, message: String },
    /// Nothing to serve: a worker without models would only take its pool's jobs from it.
    #[error("no model can be served from {dir}: {why}; serve needs at least one (`jetbatch models --models DIR` checks a repository)")]
    NoModels { dir: String, why: String },
    #[error(transparent)]
    Service(#[from] service::ServiceError),
    /// The engine thread died (a bug, not a job: model failures are caught on it). The worker
    /// hands its jobs back and exits non-zero so that its supervisor starts a fresh one.
    #[error("the engine thread stopped unexpectedly")]
    EngineStopped,
    /// Shutdown did not finish within its bound; the worker exits anyway (non-zero).
    #[error("shutdown not done within {secs} s: {unsettled} job(s) left unacked, redelivered after ack_wait")]
    ShutdownTimedOut { secs: f64, unsettled: usize },
}


/// Runs the worker until `shutdown` completes, then stops fetching, hands back unstarted jobs,
/// finishes the batch in flight and returns once every pulled job is acked or handed back.
pub async fn run(args: ServeArgs, shutdown: impl Future) -> Result<(), ServeError> {
    for pattern in &args.reply_prefixes {
        job::check_reply_prefix(pattern, &args.topology.prefix)
            .map_err(|message| ServeError::ReplyPrefix { pattern: pattern.clone(), message })?;
    }
    let worker = args.worker_id.clone().unwrap_or_else(default_worker_id);
    let metrics = Arc::new(Metrics::new(&worker));
    let repository = Repository::scan(&args.models)?;
    for (name, e) in &repository.invalid {
        error!(model = %name, error = %e, "model cannot be served; its jobs are answered with this error");
    }
    for (name, why) in &repository.skipped {
        info!(entry = %name, why, "not a model folder; skipped");
    }
    if repository.models.is_empty() {
        let why = if repository.invalid.is_empty() {
            "the folder holds no model folder (a jetbatch.toml or a Hugging Face config.json)".to_string()
        } else {
            repository.invalid.iter().map(|(name, e)| format!("{name}: {e}")).collect::<Vec<_>>().join("; ")
        };
        return Err(ServeError::NoModels { dir: args.models.display().to_string(), why });
    }
    info!(models = ?repository.models.keys().collect::<Vec<_>>(), %worker, "starting");
    let client = bus::connect(&args.nats, &format!("jetbatch-worker {worker}")).await?;
    let js = jetstream::new(client.clone());
    let consumers = bus::setup(&js, &args.topology).await?;
    let cache = Cache::for_worker(&args.cache, &client, args.topology.replicas, metrics.clone()).await.map(Arc::new);

    // libtorch's threads, as configured (the first worker of a process decides: they are per process).
    crate::engine::prefix::configure_prefix_cache(args.prefix_cache_mb << 20);
    crate::engine::draft::configure_speculation(args.speculate_tokens);
    crate::engine::configure_threads(crate::engine::Threads { intra_op: args.torch.torch_threads, inter_op: args.torch.torch_interop_threads });
    let (engine, engine_thread) = EngineHandle::start(metrics.clone(), args.model_memory_mb << 20);
    for spec in repository.models.values().filter(|s| s.config.preload) {
        if let Err(e) = engine.load(spec.clone()).await {
            error!(model = %spec.name, error = %e, "preload failed");
        }
    }

    let (notify, _) = broadcast::channel::<()>(1);
    if let Some(addr) = args.metrics_addr {
        let bound = crate::metrics::serve(metrics.clone(), addr, notify.subscribe()).await.map_err(ServeError::Metrics)?;
        info!(%bound, "metrics endpoint");
    }
    let streamer = bus::Streamer { client: client.clone(), prefix: args.topology.prefix.clone() };
    let snapshot_subject = format!("{}.metrics.{}", args.topology.prefix, crate::pool::subject_token(&worker));
    let live = Arc::new(LiveRepository::new(repository));
    let peers = Arc::new(peers::Peers::new(client.clone(), args.topology.prefix.clone(), args.topology.consumer.clone(), worker.clone()));
    let ctx = Arc::new(Ctx {
        topology: args.topology.clone(),
        worker,
        metrics: metrics.clone(),
        cache,
        repository: live.clone(),
        peers: peers.clone(),
        queues: Default::default(),
        publisher: bus::Publisher::new(js, args.topology.clone()).await?,
        streamer: streamer.clone(),
    });
    let mut limits = Limits::new(args.max_payload_bytes, args.max_tensor_elements);
    limits.prefix = args.topology.prefix.clone();
    limits.reply_prefixes = args.reply_prefixes.clone();

    let (deliveries_tx, deliveries_rx) = mpsc::channel(args.pull_batch);
    let (release_tx, release_rx) = mpsc::channel::<Vec<Delivery>>(16);
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(args.max_inflight);
    let (finished_tx, finished_rx) = mpsc::channel::<Finished>(args.max_inflight);

    let mut tasks = tokio::task::JoinSet::new();
    // Registered before the first pull, so a worker that consumes (`/healthz`) is discoverable.
    let control = Arc::new(service::Control::new(ctx.clone(), args.models.clone(), args.cache.cache_dir.clone(), args.max_inflight));
    tasks.spawn(service::serve(client.clone(), control.clone(), notify.subscribe()).await?);
    let (refresh, gate) = (Duration::from_secs(args.pool_refresh_secs), peers.gate.clone());
    let peers_shutdown = notify.subscribe();
    tasks.spawn(async move { peers.watch(refresh, peers_shutdown).await });

    let held = bus::Held::default();
    // Runs until every held job is settled, past the shutdown signal: the last batch keeps its lease.
    let keep_alive = tokio::spawn(bus::keep_alive(client.clone(), held.clone(), args.topology.ack_wait(), metrics.clone()));
    let aging = Duration::from_secs_f64(args.priority_aging_secs);
    tasks.spawn(bus::pull(
        consumers.clone(),
        PullOpts { max_inflight: args.max_inflight, pull_batch: args.pull_batch.clamp(1, args.max_inflight), aging, gate },
        held.clone(),
        deliveries_tx,
        release_tx,
        metrics.clone(),
        notify.subscribe(),
    ));
    tasks.spawn(bus::watch_consumer(consumers, metrics.clone(), notify.subscribe()));
    tasks.spawn(intake::intake(deliveries_rx, pending_tx, finished_tx.clone(), live, limits, ctx.clone()));
    let outlets = crate::infer::Outlets { done: finished_tx.clone(), chunks: streamer };
    crate::infer::spawn(&mut tasks, engine, pending_rx, outlets, metrics.clone(), Aging(aging), &notify);
    drop(finished_tx);
    tasks.spawn(bus::snapshots(client.clone(), snapshot_subject, metrics.clone(), args.metrics_interval_secs, notify.subscribe()));
    tasks.spawn(throughput(metrics.clone(), THROUGHPUT_EVERY, notify.subscribe()));
    let results_task = tokio::spawn(results::results(finished_rx, release_rx, ctx.clone()));

    let engine_died = async {
        while !engine_thread.is_finished() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let died = tokio::select! {
        _ = shutdown => false,
        _ = control.drain.notified() => {
            info!("drain requested through the service endpoint");
            false
        }
        _ = engine_died => true,
    };
    if died {
        error!("the engine thread stopped: handing jobs back and exiting");
    }
    let bound = Duration::from_secs_f64(args.shutdown_timeout_secs);
    info!(within_secs = bound.as_secs_f64(), "shutdown: stop fetching, hand back queued jobs, finish the batch in flight");
    let _ = notify.send(());
    let graceful = async {
        while tasks.join_next().await.is_some() {}
        let _ = results_task.await;
        // The engine handle was moved into the runner, which has returned: the thread's queue is closed.
        let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
        if let Some(cache) = &ctx.cache {
            if let Err(e) = cache.flush() {
                error!(error = %e, "cache flush");
            }
        }
        let _ = client.flush().await;
    };
    // Bounded whatever a stage is waiting for (a NATS server gone for good, a batch longer than
    // the grace period): what is not settled by then stays unacked, and JetStream redelivers it
    // after ack_wait — nothing is lost, it only waits.
    let finished = tokio::time::timeout(bound, graceful).await.is_ok();
    keep_alive.abort();
    let handed_back = metrics.naks_total.with_label_values(&["shutdown"]).get();
    if !finished {
        let unsettled = held.count();
        error!(unsettled, handed_back, "shutdown: not done within --shutdown-timeout-secs; the unsettled jobs stay unacked and are redelivered after ack_wait");
        return Err(ServeError::ShutdownTimedOut { secs: bound.as_secs_f64(), unsettled });
    }
    info!(handed_back, "stopped");
    if died {
        return Err(ServeError::EngineStopped);
    }
    Ok(())
}

/// How often the worker logs its throughput at info.
const THROUGHPUT_EVERY: Duration = Duration::from_secs(60);

/// Logs the jobs answered (ok and error) and the rate every `every`, while there was work.
async fn throughput(metrics: Arc<Metrics>, every: Duration, mut shutdown: broadcast::Receiver<()>) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last = metrics.jobs_answered();
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        let now = metrics.jobs_answered();
        let (ok, errors) = (now.0 - last.0, now.1 - last.1);
        if ok + errors > 0 {
            info!(ok, errors, jobs_per_s = (ok + errors) as f64 / every.as_secs_f64(), inflight = metrics.inflight_jobs.get(), "throughput");
        }
        last = now;
    }
}

fn default_worker_id() -> String {
    format!("{}-{}", crate::pool::host_name(), std::process::id())
}

