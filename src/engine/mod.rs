//! The engine stage: one dedicated OS thread owns every `tch::Tensor` and loaded model (with
//! autograd off). Async code talks to it through [`EngineHandle`] with [`Command`]s that carry a
//! tracing span and a reply channel; only plain Rust values ([`Output`], [`EngineError`]) leave it.
//!
//! Backends implement [`LoadedModel`] for the job kinds they serve; the thread keeps an LRU of
//! loaded models under a memory budget, splits batches that hit CUDA out-of-memory (and lowers the
//! model's batch cap), shrinks a running generation that does (its rows go back to the head of the
//! queue, keeping what they generated; only a row that does not fit alone fails), and isolates
//! jobs that make a batch fail so one bad job cannot sink the rest.
//!
//! A panic in a model call (load, warmup, run, join, step) is caught and becomes
//! [`EngineError::Panic`] for the jobs of that call; the model is then dropped (its state may be
//! inconsistent) and loaded afresh on next use. A panic in the engine's own code ends the thread
//! (logged, `Metrics::engine_alive` cleared, the thread's `JoinHandle` finished), never silently.

pub mod hf;
mod scheduler;
mod torchscript;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{error, info, warn, Span};

use crate::config::TorchOpts;
use crate::job::{ErrorCode, JobError, JobInput, JobKind, Output};
use self::scheduler::GenQueue;
use crate::metrics::Metrics;
use crate::repository::{Backend, DeviceChoice, ModelSpec};
use crate::stream::StreamChunk;

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load model: {0}")]
    Load(String),
    #[error("model failed: {0}")]
    Model(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A model call panicked (the panic's message); the model is reloaded before its next use.
    #[error("model panicked: {0}")]
    Panic(String),
    #[error("engine stopped")]
    Stopped,
    /// Never started: handed back at shutdown (a generate job still waiting to join).
    #[error("handed back at shutdown")]
    Released,
    /// Its deadline passed while it waited to join a generation (or, paused out of memory, to
    /// rejoin one: what it had generated is dropped).
    #[error("its deadline passed while it waited to join a generation")]
    Expired,
}

impl EngineError {
    pub fn error_type(&self) -> &'static str {
        match self {
            EngineError::Load(_) => "load",
            EngineError::Model(_) => "model",
            EngineError::OutOfMemory(_) => "out_of_memory",
            EngineError::Panic(_) => "panic",
            EngineError::Stopped => "stopped",
            EngineError::Released => "shutdown",
            EngineError::Expired => "deadline",
        }
    }

    /// The error result reported once retries are exhausted.
    pub fn to_job_error(&self) -> JobError {
        let code = match self {
            EngineError::OutOfMemory(_) => ErrorCode::OutOfMemory,
            _ => ErrorCode::ModelError,
        };
        JobError::new(code, self.to_string())
    }

    fn from_tch(e: tch::TchError) -> EngineError {
        let msg = e.to_string();
        if is_oom(&msg) {
            EngineError::OutOfMemory(summary(&msg))
        } else {
            EngineError::Model(summary(&msg))
        }
    }
}

/// One line for an error result: libtorch puts the cause last (after a TorchScript traceback)
/// and a C++ backtrace after that, so keep the last line that names an error, else the first.
fn summary(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let cause = lines.iter().rev().find(|l| l.contains("Error:")).or(lines.first()).copied().unwrap_or_default();
    cause.chars().take(500).collect()
}

/// The message of a caught panic, one line.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    summary(&text)
}

/// Whether an error's text is libtorch's for an allocation that failed (CUDA's "CUDA out of
/// memory. Tried to allocate …", the CPU allocator's too): libtorch has no other signal.
fn is_oom(message: &str) -> bool {
    message.contains("out of memory")
}

/// Runs `f`, turning a failed allocation (which tch raises as a panic) into
/// [`EngineError::OutOfMemory`]; any other panic unwinds on. For model code that keeps its state
/// consistent across an out-of-memory error (a generation batch pausing its rows).
pub(crate) fn catch_oom<T>(f: impl FnOnce() -> T) -> Result<T, EngineError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| match panic_message(&*payload) {
        message if is_oom(&message) => EngineError::OutOfMemory(message),
        _ => std::panic::resume_unwind(payload),
    })
}

/// Runs a model call on the engine thread; a panic in it becomes [`EngineError::Panic`], or
/// [`EngineError::OutOfMemory`] where it was a failed allocation (the batch is split or shrunk
/// instead; the model is kept: the calls leave their state usable when an allocation fails, at
/// worst a generation batch that lost its rows, which the engine then requeues).
fn guarded<T>(model: &str, call: &str, f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = panic_message(&*payload);
            if is_oom(&message) {
                return Err(EngineError::OutOfMemory(message));
            }
            error!(model, call, panic = %message, "model call panicked: its jobs fail, the model is reloaded");
            Err(EngineError::Panic(format!("{call}: {message}")))
        }
    }
}

/// Clears `Metrics::engine_alive` when the engine thread exits, by return or by panic.
struct AliveGuard(Arc<Metrics>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.engine_alive.store(false, Ordering::SeqCst);
    }
}

/// Where streamed chunks go, and which jobs want them.
pub trait Sink {
    fn wants(&self, job: usize) -> bool;
    fn emit(&mut self, chunk: StreamChunk);
}

/// Streams of running generations: a chunk's `job` is the engine's job number.
struct RouteSink<'a> {
    routes: &'a HashMap<u64, Route>,
}

impl Sink for RouteSink<'_> {
    fn wants(&self, job: usize) -> bool {
        self.routes.get(&(job as u64)).is_some_and(|r| r.stream)
    }
    fn emit(&mut self, chunk: StreamChunk) {
        if let Some(r) = self.routes.get(&(chunk.job as u64)) {
            let _ = r.events.send(Event::Chunk { index: r.index, chunk });
        }
    }
}

/// A model loaded on the engine thread.
pub trait LoadedModel {
    /// Runs one batch of jobs of `kind` (not `generate`: see `join`), one output per input, in order.
    fn run(&mut self, kind: JobKind, inputs: &[&JobInput]) -> Result<Vec<Output>, EngineError>;
    /// A dummy batch, so the first real batch does not pay for lazy initialisation.
    fn warmup(&mut self) -> Result<(), EngineError>;
    /// Frees cached device memory after an out-of-memory error.
    fn release_cache(&mut self) {}

    /// Continuous batching: `jobs` (engine job number, input, streamed?) join the running
    /// generation at the next step boundary. A job the model paused (see `step`) resumes where it
    /// was. On [`EngineError::OutOfMemory`] the joining jobs are paused and the running rows
    /// untouched.
    fn join(&mut self, jobs: Vec<(u64, JobInput, bool)>) -> Result<(), EngineError> {
        let _ = jobs;
        Err(EngineError::Model("this model does not generate".into()))
    }

    /// One step of the running generation; returns the jobs that finished (or all, on failure).
    /// Rows answered [`EngineError::OutOfMemory`] left the batch paused, keeping what they
    /// generated: the engine joins them again (resumed) or, giving up, `forget`s them.
    fn step(&mut self, sink: &mut dyn Sink) -> Vec<(u64, Result<Output, EngineError>)> {
        let _ = sink;
        Vec::new()
    }

    /// Bytes of KV cache one token of a generation takes (0: the model does not generate).
    fn kv_bytes_per_token(&self) -> u64 {
        0
    }

    /// Runs about `tokens` tokens through the model at once (prefill-sized), so that the device
    /// memory it peaks at can be measured.
    fn probe(&mut self, tokens: usize) -> Result<(), EngineError> {
        let _ = tokens;
        Ok(())
    }

    /// Drops what a paused job had generated (it failed for good).
    fn forget(&mut self, job: u64) {
        let _ = job;
    }

    /// Running rows of `jobs` end at the next step, with what they generated so far and the
    /// finish reason `deadline`.
    fn stop(&mut self, jobs: &[u64]) {
        let _ = jobs;
    }

    /// Rows in the running generation.
    fn generating(&self) -> usize {
        0
    }
}

fn load(spec: &ModelSpec) -> Result<Box<dyn LoadedModel>, EngineError> {
    let device = resolve_device(spec.config.device)?;
    // `dtype` applies on every device (libtorch runs bf16/f16 on CPU too, which is how the
    // reduced-precision paths are tested without a GPU).
    let dtype = spec.config.dtype.map_or("f32", |d| d.name());
    info!(model = %spec.name, backend = ?spec.config.backend, device = ?device, dtype, "loading model");
    match spec.config.backend {
        Backend::Torchscript => Ok(Box::new(torchscript::TorchScript::load(spec, device)?)),
        Backend::Hf => Ok(Box::new(hf::Hf::load(spec, device)?)),
    }
}

/// Tokens of the probe batch that measures activation memory (TGI's default prefill is 4096).
const PROBE_TOKENS: usize = 2048;
/// Share of free device memory left unbudgeted: the allocator's fragmentation, cuBLAS workspaces.
const MEMORY_MARGIN: f64 = 0.1;

/// The generation token budget of a model just loaded: `max_batch_tokens` when set; unset, on
/// CUDA, derived from free device memory as TGI does at warmup (free memory, a probe batch's peak,
/// the KV cache a token takes; see [`scheduler::token_budget`]) and logged; on CPU, none.
fn generation_token_budget(spec: &ModelSpec, model: &mut dyn LoadedModel) -> Result<usize, EngineError> {
    let configured = spec.config.max_batch_tokens;
    let kv = model.kv_bytes_per_token();
    let index = match resolve_device(spec.config.device)? {
        tch::Device::Cuda(i) if configured == 0 && kv > 0 => i,
        _ => return Ok(configured),
    };
    let Some(free) = free_device_memory(index) else {
        warn!(model = %spec.name, "free device memory unknown (nvidia-smi did not answer): max_batch_tokens stays unlimited");
        return Ok(0);
    };
    model.probe(PROBE_TOKENS)?;
    // libtorch's caching allocator keeps the probe's peak reserved: what free memory lost is it.
    let probe = free.saturating_sub(free_device_memory(index).unwrap_or(free));
    let budget = scheduler::token_budget(free, probe, PROBE_TOKENS as u64, kv, MEMORY_MARGIN);
    info!(model = %spec.name, free_bytes = free, probe_bytes = probe, probe_tokens = PROBE_TOKENS, kv_bytes_per_token = kv, max_batch_tokens = budget, "max_batch_tokens derived from free device memory");
    Ok(budget)
}

/// Free memory of CUDA device `index` in bytes, as `nvidia-smi` reports it (libtorch's C API, as
/// tch exposes it, has no `cudaMemGetInfo`); `CUDA_VISIBLE_DEVICES` maps the index when it lists
/// numbers.
fn free_device_memory(index: usize) -> Option<u64> {
    let physical = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').nth(index)?.trim().parse::<usize>().ok()?,
        _ => index,
    };
    let out = std::process::Command::new("nvidia-smi").args(["--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", &physical.to_string()]).output().ok()?;
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(mib << 20)
}

fn resolve_device(choice: DeviceChoice) -> Result<tch::Device, EngineError> {
    let cuda = tch::Cuda::device_count() as usize;
    match choice {
        DeviceChoice::Cpu => Ok(tch::Device::Cpu),
        DeviceChoice::Auto if cuda > 0 => Ok(tch::Device::Cuda(0)),
        DeviceChoice::Auto => Ok(tch::Device::Cpu),
        DeviceChoice::Cuda(n) if n < cuda => Ok(tch::Device::Cuda(n)),
        DeviceChoice::Cuda(n) => Err(EngineError::Load(format!("device cuda:{n} requested, {cuda} CUDA device(s) present"))),
    }
}

/// What the engine reports about the jobs of a `Run`, `index` being a job's place in it. Every
/// job gets exactly one `Done`, after all of its chunks.
#[derive(Debug)]
pub enum Event {
    Chunk { index: usize, chunk: StreamChunk },
    /// `batch`: the jobs computed together with this one — its forward batch, or for `generate`
    /// the most rows of the running generation while it ran.
    Done { index: usize, result: Result<Output, EngineError>, compute: Duration, batch: usize },
}

/// Where a running generation's job reports to.
struct Route {
    /// The model generating it.
    model: Arc<str>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    index: usize,
    stream: bool,
    started: Instant,
    /// The most rows of the running generation while this job was in it.
    peak: usize,
}

pub enum Command {
    Run {
        model: Arc<ModelSpec>,
        kind: JobKind,
        inputs: Vec<JobInput>,
        /// Per job: whether its text is streamed.
        streaming: Vec<bool>,
        /// Per job: when a generation stops (finish reason `deadline`), or fails unstarted.
        deadlines: Vec<Option<Instant>>,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
        span: Span,
    },
    Load {
        model: Arc<ModelSpec>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Shutdown: generate jobs not yet in a running batch are answered `Released`; the running
    /// batches finish.
    ReleaseWaiting,
}

/// libtorch's thread counts for engine threads started from now on (`serve`'s flags, set by
/// `main` before it starts the worker); unset, libtorch's defaults.
static TORCH_THREADS: std::sync::OnceLock<TorchOpts> = std::sync::OnceLock::new();

/// Sets the thread counts engine threads apply (the first call wins).
pub fn configure_threads(opts: TorchOpts) {
    let _ = TORCH_THREADS.set(opts);
}

/// Applies the configured thread counts on this (the engine) thread, before its first op:
/// OpenMP's count is per calling thread, and libtorch takes the inter-op count once per process
/// (later calls fail), so that one is set only by the first engine.
fn apply_threads() {
    let Some(opts) = TORCH_THREADS.get() else { return };
    if opts.torch_threads > 0 {
        tch::set_num_threads(opts.torch_threads as i32);
    }
    static INTEROP: std::sync::Once = std::sync::Once::new();
    if opts.torch_interop_threads > 0 {
        INTEROP.call_once(|| {
            if catch_unwind(|| tch::set_num_interop_threads(opts.torch_interop_threads as i32)).is_err() {
                warn!("libtorch's inter-op threads were already started; --torch-interop-threads is not applied");
            }
        });
    }
    info!(threads = tch::get_num_threads(), interop_threads = tch::get_num_interop_threads(), "libtorch threads");
}

/// Cloneable handle to the engine thread; the thread stops when every handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::Sender<Command>,
}

impl EngineHandle {
    /// Starts the engine thread. `memory_budget` bounds the summed size of loaded models (0: none).
    pub fn start(metrics: Arc<Metrics>, memory_budget: u64) -> (EngineHandle, std::thread::JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        metrics.engine_alive.store(true, Ordering::SeqCst);
        let thread = std::thread::Builder::new()
            .name("jetbatch-engine".into())
            // libtorch's graph passes recurse over deep models; the 2 MiB default is not enough.
            .stack_size(64 << 20)
            .spawn(move || {
                let _alive = AliveGuard(metrics.clone());
                // Model calls catch their own panics; one escaping here is the engine's own bug.
                // The thread then ends (its JoinHandle finishes) and every later job gets `Stopped`.
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    apply_threads();
                    let _no_grad = tch::no_grad_guard();
                    let mut engine = Engine::new(memory_budget, metrics);
                    engine.serve(&rx);
                }));
                if let Err(payload) = outcome {
                    error!(panic = %panic_message(&*payload), "engine thread panicked and stopped: no job can run on this worker");
                }
            })
            .expect("spawn engine thread");
        (EngineHandle { tx }, thread)
    }

    /// Submits a batch; its jobs report on the returned channel (chunks, then one `Done` each).
    /// `generate` jobs join the model's running generation and finish one by one.
    /// `deadlines` (one per job, or empty: none) apply to `generate` jobs.
    pub fn run(&self, model: Arc<ModelSpec>, kind: JobKind, inputs: Vec<JobInput>, streaming: Vec<bool>, deadlines: Vec<Option<Instant>>) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let n = inputs.len();
        if let Err(std::sync::mpsc::SendError(Command::Run { events, .. })) =
            self.tx.send(Command::Run { model, kind, inputs, streaming, deadlines, events: events.clone(), span: Span::current() })
        {
            for index in 0..n {
                let _ = events.send(Event::Done { index, result: Err(EngineError::Stopped), compute: Duration::ZERO, batch: n });
            }
        }
        rx
    }

    /// Hands back the generate jobs still waiting to join a running batch (see [`Command::ReleaseWaiting`]).
    pub fn release_waiting(&self) {
        let _ = self.tx.send(Command::ReleaseWaiting);
    }

    pub async fn load(&self, model: Arc<ModelSpec>) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Load { model, reply }).map_err(|_| EngineError::Stopped)?;
        rx.await.unwrap_or(Err(EngineError::Stopped))
    }
}

struct Slot {
    model: Box<dyn LoadedModel>,
    fingerprint: Arc<str>,
    size: u64,
    last_used: u64,
    /// Largest batch known to fit; lowered on out-of-memory.
    cap: usize,
    /// A call panicked: the model is dropped once the current batch is done, and reloaded.
    poisoned: bool,
    /// Tokens a generation batch may hold (0: no limit): `max_batch_tokens`, or derived from
    /// free device memory at load when that is unset (see [`generation_token_budget`]).
    token_budget: usize,
}

struct Engine {
    models: HashMap<Arc<str>, Slot>,
    memory_budget: u64,
    clock: u64,
    metrics: Arc<Metrics>,
    next_job: u64,
    /// Jobs of running or waiting generations.
    routes: HashMap<u64, Route>,
    /// Per model with generate jobs: its scheduler (jobs waiting to join, rows running).
    waiting: HashMap<Arc<str>, Waiting>,
}

/// A model's generate jobs: waiting to join, and running (engine job numbers).
struct Waiting {
    spec: Arc<ModelSpec>,
    queue: GenQueue<JobInput>,
}

impl Engine {
    fn new(memory_budget: u64, metrics: Arc<Metrics>) -> Engine {
        Engine { models: HashMap::new(), memory_budget, clock: 0, metrics, next_job: 0, routes: HashMap::new(), waiting: HashMap::new() }
    }

    /// Serves commands, and between them steps every running generation. Blocks only when no
    /// generation runs; after the last handle is dropped, finishes what runs, then returns.
    fn serve(&mut self, rx: &std::sync::mpsc::Receiver<Command>) {
        let mut open = true;
        loop {
            let busy = !self.routes.is_empty();
            let cmd = match (busy, open) {
                (false, false) => return,
                (false, true) => rx.recv().ok(),
                (true, _) => rx.try_recv().ok(),
            };
            match cmd {
                Some(cmd) => self.handle(cmd),
                None if !busy => open = false,
                None => self.step_generations(),
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Run { model, kind: JobKind::Generate, inputs, streaming, deadlines, events, span: _ } => {
                let queue = &mut self.waiting.entry(model.name.clone()).or_insert_with(|| Waiting { spec: model.clone(), queue: Default::default() }).queue;
                for (index, (input, stream)) in inputs.into_iter().zip(streaming).enumerate() {
                    let deadline = deadlines.get(index).copied().flatten();
                    let job = self.next_job;
                    self.next_job += 1;
                    let cost = match &input {
                        JobInput::Generate(g) => g.prompt.len() + g.max_new_tokens,
                        _ => 1,
                    };
                    self.routes.insert(job, Route { model: model.name.clone(), events: events.clone(), index, stream, started: Instant::now(), peak: 0 });
                    queue.append(job, input, cost, deadline);
                }
            }
            Command::Run { model, kind, inputs, streaming: _, deadlines: _, events, span } => {
                let n = inputs.len();
                let _enter = span.enter();
                let start = Instant::now();
                let metrics = self.metrics.clone();
                let (outputs, poisoned) = match self.slot(&model) {
                    Ok(slot) => {
                        let outputs = run_adaptive(slot, &model, kind, &inputs, &metrics);
                        (outputs, slot.poisoned)
                    }
                    Err(e) => (vec![Err(e); inputs.len()], false),
                };
                for (index, result) in outputs.into_iter().enumerate() {
                    let _ = events.send(Event::Done { index, result, compute: start.elapsed(), batch: n });
                }
                if poisoned {
                    self.drop_model(&model.name, &EngineError::Panic("the model panicked in another batch".into()));
                }
            }
            Command::Load { model, reply } => {
                let _ = reply.send(self.slot(&model).map(|_| ()));
            }
            Command::ReleaseWaiting => {
                let waiting: Vec<u64> = self.waiting.values_mut().flat_map(|w| w.queue.drain_waiting()).collect();
                for job in waiting {
                    self.finish(job, Err(EngineError::Released));
                }
            }
        }
    }

    /// Admits waiting jobs into each model's running generation (within its batch cap and token
    /// budget) and runs one step of each; finished jobs report at once.
    fn step_generations(&mut self) {
        let names: Vec<Arc<str>> = self.waiting.keys().cloned().collect();
        for name in names {
            let Waiting { spec, mut queue } = self.waiting.remove(&name).expect("listed");
            if let Err(e) = self.slot(&spec) {
                for job in queue.drain_waiting() {
                    self.finish(job, Err(e.clone()));
                }
                continue;
            }
            // Out of the map while it steps, so the routes and metrics stay reachable.
            let mut slot = self.models.remove(&name).expect("just loaded");
            // One clock read a step; jobs without a deadline cost nothing more.
            let expired = queue.expire(Instant::now());
            for job in expired.waiting {
                slot.model.forget(job);
                self.finish(job, Err(EngineError::Expired));
            }
            if !expired.running.is_empty() {
                slot.model.stop(&expired.running);
            }
            let static_batches = matches!(spec.config.generation, crate::repository::Generation::Static);
            let cap = slot.cap.min(spec.config.max_batch_size);
            let joining: Vec<(u64, JobInput, bool)> = queue
                .admit(cap, slot.token_budget, static_batches)
                .into_iter()
                .map(|(job, input)| (job, input, self.routes.get(&job).is_some_and(|r| r.stream)))
                .collect();
            let rows = queue.running();
            for job in queue.running_jobs() {
                if let Some(r) = self.routes.get_mut(&job) {
                    r.peak = r.peak.max(rows);
                }
            }
            let mut failed = Vec::new();
            let mut panicked = None;
            if !joining.is_empty() {
                let jobs: Vec<u64> = joining.iter().map(|(j, _, _)| *j).collect();
                match guarded(&spec.name, "join", || slot.model.join(joining)) {
                    Ok(()) => {}
                    // The running rows fit: the joiners wait (paused) for a smaller batch.
                    Err(e @ EngineError::OutOfMemory(_)) => failed.extend(shrink(&mut slot, &spec.name, &mut queue, rows - jobs.len(), jobs, &e)),
                    Err(e) => {
                        failed.extend(jobs.into_iter().map(|j| (j, Err(e.clone()))));
                        if let EngineError::Panic(_) = e {
                            panicked = Some(e);
                        }
                    }
                }
            }
            let mut stepped = Vec::new();
            if panicked.is_none() {
                let mut sink = RouteSink { routes: &self.routes };
                match guarded(&spec.name, "step", || Ok(slot.model.step(&mut sink))) {
                    Ok(done) => stepped = done,
                    // An allocation failed outside the rows' own handling: the batch is gone.
                    Err(e @ EngineError::OutOfMemory(_)) => stepped = queue.running_jobs().map(|j| (j, Err(e.clone()))).collect(),
                    Err(e) => panicked = Some(e),
                }
                self.metrics.model_forward_total.with_label_values(&[&spec.name]).inc();
            }
            let (oom, stepped): (Vec<_>, Vec<_>) = stepped.into_iter().partition(|(_, r)| matches!(r, Err(EngineError::OutOfMemory(_))));
            if let Some((_, Err(e))) = oom.first() {
                let e = e.clone();
                let jobs: Vec<u64> = oom.iter().map(|(j, _)| *j).collect();
                let kept = queue.running() - jobs.len();
                failed.extend(shrink(&mut slot, &spec.name, &mut queue, kept, jobs, &e));
            }
            for (job, result) in failed.into_iter().chain(stepped) {
                queue.leave(job);
                if result.is_ok() {
                    self.metrics.engine_jobs_total.with_label_values(&[&spec.name]).inc();
                }
                self.finish(job, result);
            }
            self.models.insert(name.clone(), slot);
            if let Some(e) = panicked {
                // Every row of the running generation fails; jobs still waiting join a fresh load.
                let waiting: std::collections::HashSet<u64> = queue.waiting_jobs().collect();
                self.drop_model_except(&name, &e, &waiting);
                queue.clear_running();
            }
            if !queue.is_idle() {
                self.waiting.insert(name, Waiting { spec, queue });
            }
        }
    }

    /// Drops a model whose state may be inconsistent (a call panicked); every job of its running
    /// generation fails with `error`. It is loaded afresh on next use.
    fn drop_model(&mut self, name: &Arc<str>, error: &EngineError) {
        let waiting: std::collections::HashSet<u64> = self.waiting.get(name).map(|w| w.queue.waiting_jobs().collect()).unwrap_or_default();
        self.drop_model_except(name, error, &waiting);
        if let Some(w) = self.waiting.get_mut(name) {
            w.queue.clear_running();
        }
    }

    /// `drop_model`, where `waiting` are the model's generate jobs not yet in its running batch.
    fn drop_model_except(&mut self, name: &Arc<str>, error: &EngineError, waiting: &std::collections::HashSet<u64>) {
        if self.models.remove(name).is_some() {
            self.metrics.models_loaded.dec();
            warn!(model = %name, "model dropped after a panic; it is reloaded on next use");
        }
        let running: Vec<u64> = self.routes.iter().filter(|(job, r)| r.model == *name && !waiting.contains(job)).map(|(job, _)| *job).collect();
        for job in running {
            self.finish(job, Err(error.clone()));
        }
    }

    fn finish(&mut self, job: u64, result: Result<Output, EngineError>) {
        if let Some(r) = self.routes.remove(&job) {
            let _ = r.events.send(Event::Done { index: r.index, result, compute: r.started.elapsed(), batch: r.peak });
        }
    }

    /// The loaded model for `spec`, loading (and evicting least-recently-used models) as needed.
    fn slot(&mut self, spec: &ModelSpec) -> Result<&mut Slot, EngineError> {
        self.clock += 1;
        let stale = self.models.get(&spec.name).is_some_and(|s| s.fingerprint != spec.fingerprint);
        if stale {
            self.models.remove(&spec.name);
        }
        if !self.models.contains_key(&spec.name) {
            self.evict_for(spec.size_bytes);
            let start = Instant::now();
            let (model, token_budget) = guarded(&spec.name, "load", || {
                let mut model = load(spec)?;
                if spec.config.warmup {
                    model.warmup()?;
                }
                let budget = generation_token_budget(spec, model.as_mut())?;
                Ok((model, budget))
            })?;
            info!(model = %spec.name, secs = start.elapsed().as_secs_f64(), "model loaded");
            self.metrics.models_loaded.inc();
            let cap = spec.config.max_batch_size;
            self.models.insert(spec.name.clone(), Slot { model, fingerprint: spec.fingerprint.clone(), size: spec.size_bytes, last_used: 0, cap, poisoned: false, token_budget });
        }
        let slot = self.models.get_mut(&spec.name).expect("just inserted");
        slot.last_used = self.clock;
        Ok(slot)
    }

    fn evict_for(&mut self, incoming: u64) {
        if self.memory_budget == 0 {
            return;
        }
        while self.models.values().map(|s| s.size).sum::<u64>() + incoming > self.memory_budget {
            // A model with a running generation stays: its rows would never finish.
            let Some(victim) = self.models.iter().filter(|(_, s)| s.model.generating() == 0).min_by_key(|(_, s)| s.last_used).map(|(k, _)| k.clone())
            else {
                break;
            };
            info!(model = %victim, "evicting model to stay within the memory budget");
            self.models.remove(&victim);
            self.metrics.models_loaded.dec();
        }
    }
}

/// A running generation out of device memory: `jobs` (paused by the model) go back to the head of
/// the queue and the batch cap drops to `kept` rows (those still running) plus half of `jobs`, so
/// the oldest rejoin and the youngest wait. A job with no row beside it does not fit at all: it is
/// returned to be answered with `error`.
fn shrink(slot: &mut Slot, model: &str, queue: &mut GenQueue<JobInput>, kept: usize, jobs: Vec<u64>, error: &EngineError) -> Vec<(u64, Result<Output, EngineError>)> {
    if guarded(model, "release_cache", || {
        slot.model.release_cache();
        Ok(())
    })
    .is_err()
    {
        slot.poisoned = true;
    }
    if kept + jobs.len() <= 1 {
        warn!(model, "out of memory: a generation that does not fit alone fails");
        for &job in &jobs {
            slot.model.forget(job);
        }
        return jobs.into_iter().map(|j| (j, Err(error.clone()))).collect();
    }
    slot.cap = (kept + jobs.len() / 2).max(1);
    warn!(model, cap = slot.cap, requeued = jobs.len(), "out of memory: the generation batch shrinks, its youngest rows wait");
    queue.requeue(&jobs);
    Vec::new()
}

/// Runs `inputs` in chunks of the slot's cap. A failing chunk is split in halves and retried, so
/// out-of-memory shrinks the batch (and the cap) and a job that breaks the model fails alone.
fn run_adaptive(
    slot: &mut Slot,
    spec: &ModelSpec,
    kind: JobKind,
    inputs: &[JobInput],
    metrics: &Metrics,
) -> Vec<Result<Output, EngineError>> {
    let refs: Vec<&JobInput> = inputs.iter().collect();
    let mut out = Vec::with_capacity(inputs.len());
    while out.len() < refs.len() {
        let n = (refs.len() - out.len()).min(slot.cap);
        out.extend(run_split(slot, spec, kind, &refs[out.len()..out.len() + n], metrics));
    }
    out
}

fn run_split(
    slot: &mut Slot,
    spec: &ModelSpec,
    kind: JobKind,
    chunk: &[&JobInput],
    metrics: &Metrics,
) -> Vec<Result<Output, EngineError>> {
    metrics.model_forward_total.with_label_values(&[&spec.name]).inc();
    let result = guarded(&spec.name, "run", || {
        let outputs = slot.model.run(kind, chunk)?;
        if outputs.len() != chunk.len() {
            return Err(EngineError::Model(format!("{} outputs for {} inputs", outputs.len(), chunk.len())));
        }
        Ok(outputs)
    });
    if let Err(EngineError::Panic(_)) = &result {
        slot.poisoned = true;
    }
    let err = match result {
        Ok(outputs) => {
            metrics.engine_jobs_total.with_label_values(&[&spec.name]).inc_by(outputs.len() as u64);
            return outputs.into_iter().map(Ok).collect();
        }
        Err(e) => e,
    };
    if chunk.len() == 1 {
        return vec![Err(err)];
    }
    let half = chunk.len() / 2;
    if let EngineError::OutOfMemory(_) = err {
        if guarded(&spec.name, "release_cache", || {
            slot.model.release_cache();
            Ok(())
        })
        .is_err()
        {
            slot.poisoned = true;
        }
        slot.cap = half.max(1);
        warn!(model = %spec.name, cap = slot.cap, "out of memory: batch split, cap lowered");
    } else {
        warn!(model = %spec.name, error = %err, size = chunk.len(), "batch failed: splitting to isolate the job");
    }
    let mut out = run_split(slot, spec, kind, &chunk[..half], metrics);
    out.extend(run_split(slot, spec, kind, &chunk[half..], metrics));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorData;

    /// Fails batches containing a poison value, or larger than `fits` with out-of-memory.
    struct Fake {
        fits: usize,
        calls: Vec<usize>,
    }

    impl LoadedModel for Fake {
        fn run(&mut self, _: JobKind, inputs: &[&JobInput]) -> Result<Vec<Output>, EngineError> {
            self.calls.push(inputs.len());
            if inputs.len() > self.fits {
                return Err(EngineError::OutOfMemory("too big".into()));
            }
            inputs
                .iter()
                .map(|i| match i {
                    JobInput::Tensor(t) if t[0].data == [13] => Err(EngineError::Model("poison".into())),
                    JobInput::Tensor(t) if t[0].data == [66] => panic!("narrow(): start 66 out of range"),
                    JobInput::Tensor(t) => Ok(Output::Tensor(t.clone())),
                    other => Err(EngineError::Model(format!("unexpected {other:?}"))),
                })
                .collect()
        }
        fn warmup(&mut self) -> Result<(), EngineError> {
            Ok(())
        }
    }

    /// Generates: each row finishes on its second step; a step with a row prompting [66] panics.
    /// A join bringing the batch over `join_fits` rows, or a step of more than `step_fits`, is
    /// out of memory: its rows are paused (keeping their steps) until joined again.
    struct FakeGen {
        rows: Vec<(u64, crate::kinds::GenerateInput, usize)>,
        join_fits: usize,
        step_fits: usize,
        paused: HashMap<u64, (crate::kinds::GenerateInput, usize)>,
        /// Rows that rejoined with steps already taken.
        resumed: Arc<std::sync::atomic::AtomicUsize>,
        /// Rows told to stop (their deadline passed): they end at the next step.
        stopped: Vec<u64>,
    }

    impl Default for FakeGen {
        fn default() -> Self {
            FakeGen { rows: Vec::new(), join_fits: usize::MAX, step_fits: usize::MAX, paused: HashMap::new(), resumed: Default::default(), stopped: Vec::new() }
        }
    }

    impl LoadedModel for FakeGen {
        fn run(&mut self, _: JobKind, _: &[&JobInput]) -> Result<Vec<Output>, EngineError> {
            Err(EngineError::Model("generate only".into()))
        }
        fn warmup(&mut self) -> Result<(), EngineError> {
            Ok(())
        }
        fn join(&mut self, jobs: Vec<(u64, JobInput, bool)>) -> Result<(), EngineError> {
            let fits = self.rows.len() + jobs.len() <= self.join_fits;
            for (job, input, _) in jobs {
                let JobInput::Generate(g) = input else { panic!("not generate") };
                let (g, steps) = self.paused.remove(&job).unwrap_or((g, 0));
                match fits {
                    true => {
                        self.resumed.fetch_add((steps > 0) as usize, Ordering::SeqCst);
                        self.rows.push((job, g, steps));
                    }
                    false => drop(self.paused.insert(job, (g, steps))),
                }
            }
            if fits { Ok(()) } else { Err(EngineError::OutOfMemory("join".into())) }
        }
        fn step(&mut self, _: &mut dyn Sink) -> Vec<(u64, Result<Output, EngineError>)> {
            if self.rows.iter().any(|(_, g, _)| g.prompt == [66]) {
                panic!("index out of range in the KV cache");
            }
            if self.rows.len() > self.step_fits {
                return std::mem::take(&mut self.rows)
                    .into_iter()
                    .map(|(job, g, steps)| {
                        self.paused.insert(job, (g, steps));
                        (job, Err(EngineError::OutOfMemory("step".into())))
                    })
                    .collect();
            }
            for row in &mut self.rows {
                row.2 += 1;
            }
            let (done, live) = std::mem::take(&mut self.rows).into_iter().partition(|r| r.2 >= 2 || self.stopped.contains(&r.0));
            self.rows = live;
            done.into_iter()
                .map(|(job, g, _)| {
                    let finish_reason = if self.stopped.contains(&job) { crate::job::FinishReason::Deadline } else { crate::job::FinishReason::Length };
                    let out = Output::Generate { text: String::new(), tokens: g.prompt.clone(), finish_reason, prompt_tokens: 1, top: Vec::new() };
                    (job, Ok(out))
                })
                .collect()
        }
        fn generating(&self) -> usize {
            self.rows.len()
        }
        fn forget(&mut self, job: u64) {
            self.paused.remove(&job);
        }
        fn stop(&mut self, jobs: &[u64]) {
            self.stopped.extend(jobs);
        }
    }

    fn gen_input(token: u32) -> JobInput {
        JobInput::Generate(crate::kinds::GenerateInput {
            prompt: vec![token],
            max_new_tokens: 2,
            sampling: crate::kinds::Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None },
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            top_logprobs: 0,
        })
    }

    fn engine_with(model: Box<dyn LoadedModel>) -> (Engine, Arc<ModelSpec>) {
        let metrics = Arc::new(Metrics::new("t"));
        metrics.models_loaded.inc();
        let mut engine = Engine::new(0, metrics);
        let spec = Arc::new(spec());
        engine.models.insert(spec.name.clone(), Slot { model, fingerprint: "f".into(), size: 1, last_used: 0, cap: 8, poisoned: false, token_budget: 0 });
        (engine, spec)
    }

    fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Vec<(usize, Result<Output, EngineError>)> {
        let mut done = Vec::new();
        while let Ok(event) = rx.try_recv() {
            if let Event::Done { index, result, .. } = event {
                done.push((index, result));
            }
        }
        done.sort_by_key(|(i, _)| *i);
        done
    }

    #[test]
    fn a_panicking_job_fails_alone_and_the_model_is_reloaded() {
        let spec = spec();
        let mut slot = Slot { model: Box::new(Fake { fits: 100, calls: vec![] }), fingerprint: "f".into(), size: 1, last_used: 0, cap: 8, poisoned: false, token_budget: 0 };
        let inputs: Vec<JobInput> = [1, 2, 66, 4, 5].into_iter().map(input).collect();
        let out = run_adaptive(&mut slot, &spec, JobKind::Tensor, &inputs, &Metrics::new("t"));
        for (i, r) in out.iter().enumerate() {
            match (i, r) {
                (2, Err(EngineError::Panic(m))) => assert!(m.contains("narrow(): start 66 out of range"), "{m}"),
                (2, other) => panic!("the poison job: {other:?}"),
                (_, r) => assert!(r.is_ok(), "job {i}: {r:?}"),
            }
        }
        assert!(slot.poisoned, "the slot is marked for reload");
        assert_eq!(EngineError::Panic("x".into()).error_type(), "panic");

        // Through the engine: the batch is answered, then the model is dropped (reloaded on next use).
        let (mut engine, spec) = engine_with(Box::new(Fake { fits: 100, calls: vec![] }));
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let inputs: Vec<JobInput> = [1, 66, 3].into_iter().map(input).collect();
        engine.handle(Command::Run { model: spec.clone(), kind: JobKind::Tensor, inputs, streaming: vec![false; 3], deadlines: Vec::new(), events, span: Span::none() });
        let done = drain(&mut rx);
        assert_eq!(done.iter().map(|(_, r)| r.is_ok()).collect::<Vec<_>>(), vec![true, false, true]);
        assert!(engine.models.is_empty(), "the poisoned model was dropped");
        assert_eq!(engine.metrics.models_loaded.get(), 0);
    }

    #[test]
    fn a_panicking_generation_step_fails_its_rows_and_drops_the_model() {
        let (mut engine, spec) = engine_with(Box::<FakeGen>::default());
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = |inputs: Vec<JobInput>, events| Command::Run {
            model: spec.clone(),
            kind: JobKind::Generate,
            streaming: vec![false; inputs.len()],
            deadlines: Vec::new(),
            inputs,
            events,
            span: Span::none(),
        };
        // Two good rows start; a poison row joins the running batch at the next step.
        engine.handle(run(vec![gen_input(1), gen_input(2)], events.clone()));
        engine.step_generations();
        assert_eq!(engine.models[&spec.name].model.generating(), 2);
        engine.handle(run(vec![gen_input(66)], events.clone()));
        engine.step_generations();
        let done = drain(&mut rx);
        assert_eq!(done.len(), 3, "every row of the running generation is answered: {done:?}");
        assert!(done.iter().all(|(_, r)| matches!(r, Err(EngineError::Panic(m)) if m.contains("KV cache"))), "{done:?}");
        assert!(engine.routes.is_empty() && engine.waiting.is_empty());
        assert!(engine.models.is_empty(), "the model is dropped");
        // The next generation loads afresh (here: a fresh fake put back by hand) and runs.
        engine.models.insert(spec.name.clone(), Slot { model: Box::<FakeGen>::default(), fingerprint: "f".into(), size: 1, last_used: 0, cap: 8, poisoned: false, token_budget: 0 });
        engine.handle(run(vec![gen_input(3)], events));
        engine.step_generations();
        engine.step_generations();
        let done = drain(&mut rx);
        assert!(matches!(&done[..], [(0, Ok(_))]), "{done:?}");
    }

    fn generate(spec: &Arc<ModelSpec>, inputs: Vec<JobInput>, events: tokio::sync::mpsc::UnboundedSender<Event>) -> Command {
        Command::Run { model: spec.clone(), kind: JobKind::Generate, streaming: vec![false; inputs.len()], deadlines: Vec::new(), inputs, events, span: Span::none() }
    }

    /// Steps until no generation runs or waits (at most `limit` steps).
    fn settle(engine: &mut Engine, limit: usize) {
        for _ in 0..limit {
            if engine.routes.is_empty() {
                return;
            }
            engine.step_generations();
        }
        panic!("generations still running after {limit} steps");
    }

    fn generated(done: &[(usize, Result<Output, EngineError>)]) -> Vec<Vec<u32>> {
        done.iter()
            .map(|(i, r)| match r {
                Ok(Output::Generate { tokens, .. }) => tokens.clone(),
                other => panic!("job {i}: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_generation_step_out_of_memory_shrinks_the_batch_and_every_job_finishes_as_alone() {
        let resumed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut engine, spec) = engine_with(Box::new(FakeGen { step_fits: 2, resumed: resumed.clone(), ..Default::default() }));
        let ((events, mut rx), (later, mut later_rx)) = (tokio::sync::mpsc::unbounded_channel(), tokio::sync::mpsc::unbounded_channel());
        // Two rows take a step; three join them, and the step of five is out of memory.
        engine.handle(generate(&spec, vec![gen_input(1), gen_input(2)], events));
        engine.step_generations();
        engine.handle(generate(&spec, vec![gen_input(3), gen_input(4), gen_input(5)], later));
        engine.step_generations();
        assert_eq!(engine.models[&spec.name].cap, 2, "the cap halves");
        assert_eq!(engine.waiting[&spec.name].queue.waiting_jobs().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4], "requeued, oldest first");
        settle(&mut engine, 20);
        assert_eq!(generated(&drain(&mut rx)), vec![vec![1], vec![2]], "every job answered, as alone");
        assert_eq!(generated(&drain(&mut later_rx)), vec![vec![3], vec![4], vec![5]]);
        assert_eq!(resumed.load(Ordering::SeqCst), 2, "the two rows that had stepped resumed where they were");
        assert!(engine.waiting.is_empty() && engine.routes.is_empty());
        assert_eq!(engine.models.len(), 1, "the model is kept");
    }

    #[test]
    fn a_join_out_of_memory_waits_for_a_smaller_batch_and_a_row_alone_that_does_not_fit_fails() {
        let (mut engine, spec) = engine_with(Box::new(FakeGen { join_fits: 1, ..Default::default() }));
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine.handle(generate(&spec, (1..=3).map(gen_input).collect(), events));
        settle(&mut engine, 20);
        assert_eq!(generated(&drain(&mut rx)), vec![vec![1], vec![2], vec![3]]);
        assert_eq!(engine.models[&spec.name].cap, 1);

        let (mut engine, spec) = engine_with(Box::new(FakeGen { join_fits: 0, ..Default::default() }));
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine.handle(generate(&spec, vec![gen_input(1), gen_input(2)], events));
        settle(&mut engine, 10);
        let done = drain(&mut rx);
        assert!(matches!(&done[..], [(0, Err(EngineError::OutOfMemory(_))), (1, Err(EngineError::OutOfMemory(_)))]), "{done:?}");
        assert!(engine.waiting.is_empty() && engine.routes.is_empty());
    }

    #[test]
    fn an_allocation_panic_is_out_of_memory_and_other_panics_unwind_on() {
        let oom = catch_oom(|| -> () { panic!("CUDA out of memory. Tried to allocate 2.00 GiB") });
        assert!(matches!(oom, Err(EngineError::OutOfMemory(m)) if m.contains("Tried to allocate")));
        assert_eq!(catch_oom(|| 7).unwrap(), 7);
        assert!(catch_unwind(|| catch_oom(|| -> () { panic!("index out of range") })).is_err());
        let r: Result<(), _> = guarded("m", "run", || panic!("CUDA out of memory."));
        assert!(matches!(r, Err(EngineError::OutOfMemory(_))), "not a panic that reloads the model: {r:?}");
    }

    #[test]
    fn past_its_deadline_a_waiting_generation_fails_unstarted_and_a_running_one_stops_marked() {
        let (mut engine, spec) = engine_with(Box::<FakeGen>::default());
        engine.models.get_mut(&spec.name).unwrap().cap = 1;
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let now = Instant::now();
        let deadlines = vec![Some(now + Duration::from_millis(30)), None, Some(now - Duration::from_millis(1))];
        let inputs = vec![gen_input(1), gen_input(2), gen_input(3)];
        engine.handle(Command::Run { model: spec.clone(), kind: JobKind::Generate, streaming: vec![false; 3], deadlines, inputs, events, span: Span::none() });
        engine.step_generations();
        let done = drain(&mut rx);
        assert!(matches!(&done[..], [(2, Err(EngineError::Expired))]), "the job already late never ran: {done:?}");
        assert_eq!(EngineError::Expired.error_type(), "deadline");
        std::thread::sleep(Duration::from_millis(40));
        engine.step_generations();
        settle(&mut engine, 10);
        let done = drain(&mut rx);
        let reasons: Vec<_> = done.iter().map(|(i, r)| (*i, matches!(r, Ok(Output::Generate { finish_reason, .. }) if *finish_reason == crate::job::FinishReason::Deadline))).collect();
        assert_eq!(reasons, vec![(0, true), (1, false)], "the running row stopped at its deadline; the other ran to its length: {done:?}");
        assert!(engine.routes.is_empty() && engine.waiting.is_empty());
    }

    #[test]
    fn at_shutdown_waiting_generations_are_handed_back_and_running_ones_finish() {
        let (mut engine, spec) = engine_with(Box::<FakeGen>::default());
        engine.models.get_mut(&spec.name).unwrap().cap = 1;
        let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let inputs = vec![gen_input(1), gen_input(2), gen_input(3)];
        engine.handle(Command::Run { model: spec.clone(), kind: JobKind::Generate, streaming: vec![false; 3], deadlines: Vec::new(), inputs, events, span: Span::none() });
        engine.step_generations();
        engine.handle(Command::ReleaseWaiting);
        engine.step_generations();
        let done = drain(&mut rx);
        assert!(matches!(&done[..], [(0, Ok(_)), (1, Err(EngineError::Released)), (2, Err(EngineError::Released))]), "{done:?}");
        assert!(engine.routes.is_empty() && engine.waiting.is_empty());
    }

    #[test]
    fn the_alive_flag_follows_the_engine_thread_even_through_a_panic() {
        let metrics = Arc::new(Metrics::new("t"));
        metrics.engine_alive.store(true, Ordering::SeqCst);
        let m = metrics.clone();
        let thread = std::thread::spawn(move || {
            let _alive = AliveGuard(m);
            panic!("a bug in the engine's own code");
        });
        assert!(thread.join().is_err());
        assert!(!metrics.engine_alive.load(Ordering::SeqCst), "a panicking engine thread clears engine_alive");

        // The real thread: alive while it runs; when it ends, the flag clears and the handle finishes.
        let metrics = Arc::new(Metrics::new("t"));
        let (handle, thread) = EngineHandle::start(metrics.clone(), 0);
        assert!(metrics.engine_alive.load(Ordering::SeqCst));
        drop(handle);
        thread.join().unwrap();
        assert!(!metrics.engine_alive.load(Ordering::SeqCst));
    }

    fn input(v: u8) -> JobInput {
        JobInput::Tensor(vec![TensorData { dtype: crate::tensor::DType::U8, shape: vec![1], data: vec![v] }])
    }

    fn spec() -> ModelSpec {
        let config = toml::from_str("backend = \"torchscript\"\nmax_batch_size = 8\n[[inputs]]\nname=\"x\"\ndtype=\"u8\"\nshape=[1]").unwrap();
        ModelSpec { name: "fake".into(), dir: ".".into(), config, fingerprint: "f".into(), size_bytes: 1, lm: None }
    }

    #[test]
    fn out_of_memory_splits_the_batch_and_lowers_the_cap() {
        let spec = spec();
        let mut slot = Slot { model: Box::new(Fake { fits: 2, calls: vec![] }), fingerprint: "f".into(), size: 1, last_used: 0, cap: 8, poisoned: false, token_budget: 0 };
        let inputs: Vec<JobInput> = (0..8).map(input).collect();
        let out = run_adaptive(&mut slot, &spec, JobKind::Tensor, &inputs, &Metrics::new("t"));
        assert!(out.iter().all(|r| r.is_ok()));
        assert_eq!(slot.cap, 2, "cap follows the largest batch that fit");
        let outs: Vec<Output> = out.into_iter().map(Result::unwrap).collect();
        assert_eq!(outs, inputs.iter().map(|i| match i { JobInput::Tensor(t) => Output::Tensor(t.clone()), _ => unreachable!() }).collect::<Vec<_>>());
    }

    #[test]
    fn loaded_models_stay_within_the_memory_budget_least_recently_used_first() {
        let metrics = Arc::new(Metrics::new("t"));
        let mut engine = Engine::new(250, metrics);
        for (name, used) in [("a", 3), ("b", 1), ("c", 2)] {
            let slot = Slot { model: Box::new(Fake { fits: 1, calls: vec![] }), fingerprint: "f".into(), size: 100, last_used: used, cap: 1, poisoned: false, token_budget: 0 };
            engine.models.insert(name.into(), slot);
        }
        engine.evict_for(100);
        let mut left: Vec<&str> = engine.models.keys().map(|k| &**k).collect();
        left.sort();
        assert_eq!(left, vec!["a"], "b then c were least recently used; 100 + 100 fits 250");
    }

    #[test]
    fn a_poison_job_fails_alone() {
        let spec = spec();
        let mut slot = Slot { model: Box::new(Fake { fits: 100, calls: vec![] }), fingerprint: "f".into(), size: 1, last_used: 0, cap: 8, poisoned: false, token_budget: 0 };
        let inputs: Vec<JobInput> = [1, 2, 13, 4, 5].into_iter().map(input).collect();
        let out = run_adaptive(&mut slot, &spec, JobKind::Tensor, &inputs, &Metrics::new("t"));
        let failed: Vec<usize> = out.iter().enumerate().filter(|(_, r)| r.is_err()).map(|(i, _)| i).collect();
        assert_eq!(failed, vec![2]);
        assert_eq!(slot.cap, 8, "model errors do not lower the cap");
    }
}
