//! The transport-neutral core: valid jobs in, outcomes out. It owns the batcher, the runner
//! and the engine thread's handle; it knows nothing of NATS.
//!
//! Two ways in, one pipeline:
//! - [`spawn`] wires the batcher and the runner for any [`Ticket`] type: an adapter (the
//!   JetStream worker in `crate::serve`) sends its tickets in and gets every one back as a
//!   [`Done`] on its own channel, with the job's output or why there is none. Streamed chunks go
//!   to the adapter's [`ChunkSink`].
//! - [`Infer`] is the in-process adapter (TEI's `Infer` is the model): `infer.run(payload)`
//!   decodes and validates a job as the worker does, answers it from the cache when it has one,
//!   and returns its output. Benchmarks, the loadtest and tests use it instead of reaching into
//!   the engine or the repository.
//!
//! What every adapter does around the pipeline — validation, the deadline at intake, the cache
//! before and after, the job metrics — is in [`admission`].
//!
//! ```text
//! ticket ──▶ batcher ──Batch(1 prefetched)──▶ runner ──▶ engine thread
//!               │ released at shutdown           │ Done (output, timeout, failure), chunks
//!               └───────────────Done─────────────┴──▶ the adapter's channel
//! ```

pub mod admission;
mod runner;

pub(crate) use runner::ms;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;

use self::admission::Admitted;
use crate::batcher::{self, Batchable};
use crate::cache::Cache;
use crate::engine::{EngineError, EngineHandle};
use crate::job::{self, ErrorCode, JobError, JobKind, Limits, Output, Timing, ValidJob};
use crate::metrics::Metrics;
use crate::priority::{Aging, Priority, DEFAULT_AGING};
use crate::plan::ModelPlan;
use crate::repository::{RepoError, Repository};
use crate::stream::StreamChunk;

/// A job on its way through the core, with whatever its adapter needs to answer it.
pub trait Ticket: Send + 'static {
    /// The model the job runs on.
    fn spec(&self) -> &Arc<ModelPlan>;
    fn job(&self) -> &ValidJob;
    fn job_mut(&mut self) -> &mut ValidJob;
    /// Time since the job arrived: its queue time, against which its `timeout_ms` counts.
    fn age(&self) -> Duration;
}

/// The batcher groups tickets by model and kind, under the model's budgets.
impl<T: Ticket> Batchable for T {
    fn model(&self) -> &Arc<ModelPlan> {
        self.spec()
    }
    fn kind(&self) -> JobKind {
        self.job().kind
    }
    fn cost(&self) -> usize {
        self.job().cost
    }
    fn priority(&self) -> Priority {
        self.job().priority
    }
}

/// Why a job has no output.
#[derive(Debug)]
pub enum Failure {
    /// Its `timeout_ms` or `deadline` passed before it could start (an answer, not a retry).
    Late(JobError),
    /// Never started: handed back at shutdown.
    Released,
    /// The engine failed it; the adapter decides whether to retry.
    Engine(EngineError),
}

impl Failure {
    fn from_engine(e: EngineError) -> Failure {
        match e {
            EngineError::Released => Failure::Released,
            // A generate job that waited in the engine's queue past its deadline: final.
            e @ EngineError::Expired => Failure::Late(JobError::new(ErrorCode::Timeout, e.to_string())),
            e => Failure::Engine(e),
        }
    }

    /// The error to answer with when no retry is left.
    pub fn to_job_error(&self) -> JobError {
        match self {
            Failure::Late(e) => e.clone(),
            Failure::Released => JobError::new(ErrorCode::ModelError, "handed back at shutdown"),
            Failure::Engine(e) => e.to_job_error(),
        }
    }
}

/// A ticket back from the core: every ticket sent in comes back exactly once.
pub struct Done<T> {
    pub ticket: T,
    pub timing: Timing,
    pub result: Result<Output, Failure>,
}

/// Where the chunks of streamed `generate` jobs go (the job's id and encoding are on `job`).
pub trait ChunkSink: Clone + Send + Sync + 'static {
    fn publish(&self, job: &ValidJob, chunk: &StreamChunk) -> impl Future<Output = ()> + Send;
}

/// Streaming is not offered: chunks are dropped (the job's result still has all of its text).
#[derive(Clone)]
pub struct NoStreaming;

impl ChunkSink for NoStreaming {
    async fn publish(&self, _: &ValidJob, _: &StreamChunk) {}
}

/// Where the core's answers go: every ticket back on `done`, streamed chunks to `chunks`.
pub struct Outlets<O, S> {
    pub done: mpsc::Sender<O>,
    pub chunks: S,
}

/// Starts the batcher and the runner on `tasks`: tickets in on `jobs`, each back on
/// `outlets.done` as a [`Done`]; batches age tickets by `aging` (see [`crate::priority`]). On
/// `shutdown`, queued tickets come back [`Failure::Released`], the batch in flight finishes, and
/// the tasks end once `jobs` is closed and drained.
pub fn spawn<T, O, S>(
    tasks: &mut JoinSet<()>,
    engine: EngineHandle,
    jobs: mpsc::Receiver<T>,
    outlets: Outlets<O, S>,
    metrics: Arc<Metrics>,
    aging: Aging,
    shutdown: &broadcast::Sender<()>,
) where
    T: Ticket,
    O: From<Done<T>> + Send + 'static,
    S: ChunkSink,
{
    let Outlets { done: out, chunks } = outlets;
    let (batches_tx, batches_rx) = mpsc::channel(1);
    let (release_tx, mut release_rx) = mpsc::channel::<Vec<T>>(4);
    tasks.spawn(batcher::run(jobs, batches_tx, release_tx, aging, shutdown.subscribe()));
    tasks.spawn(runner::runner(batches_rx, engine, chunks, out.clone(), metrics, shutdown.subscribe()));
    tasks.spawn(async move {
        while let Some(tickets) = release_rx.recv().await {
            for ticket in tickets {
                let _ = out.send(Done { ticket, timing: Timing::default(), result: Err(Failure::Released) }.into()).await;
            }
        }
    });
}

/// The in-process core: a repository of models, an engine thread and the batcher, answering
/// jobs given as payloads (JSON or MessagePack, as on the wire) without any broker; with a cache
/// ([`Infer::with_cache`]), a repeated job is answered from it.
pub struct Infer {
    repository: Arc<Repository>,
    engine: EngineHandle,
    cache: Option<Cache>,
    metrics: Arc<Metrics>,
    jobs: mpsc::Sender<Local>,
    limits: Limits,
    shutdown: broadcast::Sender<()>,
    tasks: JoinSet<()>,
    engine_thread: std::thread::JoinHandle<()>,
}

/// What [`Infer::run`] answers: the job's output, how long it queued and computed, and whether
/// it came from the cache (then it was not computed: no compute time, no batch).
#[derive(Debug)]
pub struct Answer {
    pub output: Output,
    pub timing: Timing,
    pub cached: bool,
}

/// The in-process adapter's ticket.
struct Local {
    job: ValidJob,
    spec: Arc<ModelPlan>,
    since: Instant,
    reply: oneshot::Sender<Result<Answer, JobError>>,
}

impl Ticket for Local {
    fn spec(&self) -> &Arc<ModelPlan> {
        &self.spec
    }
    fn job(&self) -> &ValidJob {
        &self.job
    }
    fn job_mut(&mut self) -> &mut ValidJob {
        &mut self.job
    }
    fn age(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Infer {
    /// Scans `models` (a repository folder, as `serve --models`) and starts the engine thread;
    /// `memory_budget` bounds the loaded models' summed size in bytes (0: none). Call from
    /// within a tokio runtime.
    pub fn start(models: &Path, memory_budget: u64, metrics: Arc<Metrics>) -> Result<Infer, RepoError> {
        let repository = Arc::new(Repository::scan(models)?);
        let (engine, engine_thread) = EngineHandle::start(metrics.clone(), memory_budget);
        let (jobs, jobs_rx) = mpsc::channel(1024);
        let (out, mut out_rx) = mpsc::channel::<Done<Local>>(1024);
        let (shutdown, _) = broadcast::channel(1);
        let mut tasks = JoinSet::new();
        spawn(&mut tasks, engine.clone(), jobs_rx, Outlets { done: out, chunks: NoStreaming }, metrics.clone(), Aging(DEFAULT_AGING), &shutdown);
        tasks.spawn(async move {
            while let Some(Done { ticket, timing, result }) = out_rx.recv().await {
                let answer = result.map(|output| Answer { output, timing, cached: false }).map_err(|f| f.to_job_error());
                let _ = ticket.reply.send(answer);
            }
        });
        let limits = Limits::new(usize::MAX, usize::MAX);
        Ok(Infer { repository, engine, cache: None, metrics, jobs, limits, shutdown, tasks, engine_thread })
    }

    /// Answers repeated jobs from `cache` and stores computed answers in it, as the worker does.
    pub fn with_cache(self, cache: Cache) -> Infer {
        Infer { cache: Some(cache), ..self }
    }

    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    /// Loads a model now rather than on its first job (for timings that leave loading out).
    pub async fn preload(&self, model: &str) -> Result<(), JobError> {
        let spec = self.repository.get(model).ok_or_else(|| self.repository.unknown(model))?;
        self.engine.load(spec.clone()).await.map_err(|e| e.to_job_error())
    }

    /// Decodes and validates `payload` as the worker does for a job published to `model`, and
    /// answers it: past its deadline, from the cache, or run. Counted in the job metrics.
    pub async fn run(&self, model: &str, payload: &[u8]) -> Result<Answer, JobError> {
        let since = Instant::now();
        let (kind, level, answer) = match job::decode(payload, None, model, &self.limits) {
            Err(rejection) => (rejection.kind.unwrap_or_default(), Priority::default(), Err(rejection.error)),
            Ok(envelope) => {
                let (kind, level) = (envelope.kind.as_str().to_string(), envelope.priority.unwrap_or_default());
                let answer = match admission::admit(&self.repository, envelope, &self.limits) {
                    Ok(admitted) => self.answer(admitted, since).await,
                    Err(e) => Err(e),
                };
                (kind, level, answer)
            }
        };
        let labels = admission::labels(&self.repository, model, &kind);
        admission::count(&self.metrics, labels, level, answer.as_ref().err().map(|e| e.code), since.elapsed());
        answer
    }

    /// Answers an admitted job that arrived at `since`, in the worker's order: past its deadline,
    /// from the cache, else run (and the answer stored).
    async fn answer(&self, Admitted { job, spec, cache_key }: Admitted, since: Instant) -> Result<Answer, JobError> {
        if let Some(err) = admission::late(&job, since.elapsed(), SystemTime::now()) {
            return Err(err);
        }
        if let Some(output) = admission::lookup(self.cache.as_ref(), &job, &spec, cache_key.as_ref()).await {
            let timing = Timing { queued_ms: ms(since.elapsed()), ..Timing::default() };
            return Ok(Answer { output, timing, cached: true });
        }
        let (reply, answer) = oneshot::channel();
        let stopped = || JobError::new(ErrorCode::ModelError, "the core has stopped");
        self.jobs.send(Local { job, spec, since, reply }).await.map_err(|_| stopped())?;
        let answer = answer.await.unwrap_or_else(|_| Err(stopped()))?;
        admission::store(self.cache.as_ref(), cache_key.as_ref(), &answer.output).await;
        Ok(answer)
    }

    /// Hands back queued jobs, finishes the batch in flight and stops the engine thread.
    pub async fn shutdown(self) {
        let Infer { jobs, engine, cache, shutdown, mut tasks, engine_thread, .. } = self;
        let _ = shutdown.send(());
        drop(jobs);
        drop(engine);
        while tasks.join_next().await.is_some() {}
        let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
        if let Some(Err(e)) = cache.as_ref().map(Cache::flush) {
            tracing::error!(error = %e, "cache flush");
        }
    }
}
