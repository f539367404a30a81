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
//!
//! # Layout
//! - `mod.rs`: the seam — [`EngineHandle`], the [`Command`]s it sends and the [`Event`]s it gets
//!   back — and the thread's command loop.
//! - `error.rs`: [`EngineError`], and how a model call's panics and failed allocations become one.
//! - `model.rs`: the backend trait [`LoadedModel`] and the [`Sink`] streamed chunks go to.
//! - `slots.rs`: the loaded models — loading, the LRU under the memory budget, dropping.
//! - `batch.rs`: running one batch, split on out-of-memory or to isolate a failing job.
//! - `generation.rs`: stepping the running generations, shrinking one out of memory;
//!   `scheduler.rs` decides who joins, as a plain state machine.
//! - `device.rs`: which device a model runs on, and its generation token budget from free memory.
//! - `threads.rs`: libtorch's thread counts from the CLI.
//! - `draft.rs`: prompt-lookup drafts for exact greedy speculation (a row's next tokens guessed
//!   from its own sequence, verified by the model in one forward); plain Rust.
//! - `prefix.rs`: the prefix cache, a radix tree of token sequences whose computed state (keys
//!   and values) later jobs reuse; plain Rust, its payload is the backend's.
//! - Backends: `torchscript.rs`, and `hf/` (see its own layout).

mod batch;
mod device;
pub mod draft;
mod error;
#[cfg(test)]
mod fakes;
mod generation;
pub mod hf;
mod model;
pub mod prefix;
mod scheduler;
mod slots;
mod threads;
mod torchscript;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{error, Span};

pub(crate) use self::error::catch_oom;
pub use self::error::EngineError;
use self::error::panic_message;
use self::generation::{Route, Waiting};
pub use self::model::{LoadedModel, Sink};
use self::slots::Slot;
pub use self::threads::{configure_threads, Threads};
use crate::job::{JobInput, JobKind, Output};
use crate::metrics::Metrics;
use crate::plan::ModelPlan;
use crate::stream::StreamChunk;

/// Clears `Metrics::engine_alive` when the engine thread exits, by return or by panic.
struct AliveGuard(Arc<Metrics>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.engine_alive.store(false, Ordering::SeqCst);
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

pub enum Command {
    Run {
        model: Arc<ModelPlan>,
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
        model: Arc<ModelPlan>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Shutdown: generate jobs not yet in a running batch are answered `Released`; the running
    /// batches finish.
    ReleaseWaiting,
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
                    threads::apply_threads();
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
    pub fn run(&self, model: Arc<ModelPlan>, kind: JobKind, inputs: Vec<JobInput>, streaming: Vec<bool>, deadlines: Vec<Option<Instant>>) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
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

    pub async fn load(&self, model: Arc<ModelPlan>) -> Result<(), EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Load { model, reply }).map_err(|_| EngineError::Stopped)?;
        rx.await.unwrap_or(Err(EngineError::Stopped))
    }
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
                        let outputs = batch::run_adaptive(slot, &model, kind, &inputs, &metrics);
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
    fn finish(&mut self, job: u64, result: Result<Output, EngineError>) {
        if let Some(r) = self.routes.remove(&job) {
            let _ = r.events.send(Event::Done { index: r.index, result, compute: r.started.elapsed(), batch: r.peak });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
