//! Generation stepping: between commands the engine thread admits waiting `generate` jobs into
//! each model's running generation and runs one step of it; a step out of device memory shrinks
//! the batch (its rows wait, keeping what they generated), a panicking one drops the model.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use super::error::guarded;
use super::scheduler::GenQueue;
use super::slots::Slot;
use super::{Engine, EngineError, Event, Sink};
use crate::job::{JobInput, Output};
use crate::plan::ModelPlan;
use crate::stream::StreamChunk;

/// Where a running generation's job reports to.
pub(super) struct Route {
    /// The model generating it.
    pub(super) model: Arc<str>,
    pub(super) events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub(super) index: usize,
    pub(super) stream: bool,
    pub(super) started: Instant,
    /// The most rows of the running generation while this job was in it.
    pub(super) peak: usize,
}

/// A model's generate jobs: waiting to join, and running (engine job numbers).
pub(super) struct Waiting {
    pub(super) spec: Arc<ModelPlan>,
    pub(super) queue: GenQueue<JobInput>,
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

impl Engine {
    /// Admits waiting jobs into each model's running generation (within its batch cap and token
    /// budget) and runs one step of each; finished jobs report at once.
    pub(super) fn step_generations(&mut self) {
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
            let static_batches = matches!(spec.config.generation, crate::plan::Generation::Static);
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
            // Joined this step: their first token is chosen by this step.
            let mut joined_now = Vec::new();
            if !joining.is_empty() {
                let jobs: Vec<u64> = joining.iter().map(|(j, _, _)| *j).collect();
                let joined = guarded(&spec.name, "join", || slot.model.join(joining));
                slot.report_prefix(&spec.name, &self.metrics);
                match joined {
                    Ok(()) => joined_now = jobs,
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
                    Ok(done) => {
                        stepped = done;
                        let ttft = self.metrics.time_to_first_token_seconds.with_label_values(&[&spec.name]);
                        joined_now.iter().filter_map(|j| self.routes.get(j)).for_each(|r| ttft.observe(r.started.elapsed().as_secs_f64()));
                    }
                    // An allocation failed outside the rows' own handling: the batch is gone.
                    Err(e @ EngineError::OutOfMemory(_)) => stepped = queue.running_jobs().map(|j| (j, Err(e.clone()))).collect(),
                    Err(e) => panicked = Some(e),
                }
                self.metrics.model_forward_total.with_label_values(&[&spec.name]).inc();
                slot.report_speculation(&spec.name, &self.metrics);
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
                let waiting: HashSet<u64> = queue.waiting_jobs().collect();
                self.drop_model_except(&name, &e, &waiting);
                queue.clear_running();
            }
            if !queue.is_idle() {
                self.waiting.insert(name, Waiting { spec, queue });
            }
        }
    }
}

/// A running generation out of device memory: `jobs` (paused by the model) go back to the head of
/// the queue and the batch cap drops to `kept` rows (those still running) plus half of `jobs`, so
/// the oldest rejoin and the youngest wait. A job with no row beside it does not fit at all: it is
/// returned to be answered with `error`.
fn shrink(slot: &mut Slot, model: &str, queue: &mut GenQueue<JobInput>, kept: usize, jobs: Vec<u64>, error: &EngineError) -> Vec<(u64, Result<Output, EngineError>)> {
    slot.release_cache(model);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tracing::Span;

    use super::super::fakes::{drain, engine_with, gen_input, slot, FakeGen};
    use super::super::Command;
    use super::*;
    use crate::job::JobKind;

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
        engine.models.insert(spec.name.clone(), slot(Box::<FakeGen>::default()));
        engine.handle(run(vec![gen_input(3)], events));
        engine.step_generations();
        engine.step_generations();
        let done = drain(&mut rx);
        assert!(matches!(&done[..], [(0, Ok(_))]), "{done:?}");
    }

    fn generate(spec: &Arc<ModelPlan>, inputs: Vec<JobInput>, events: tokio::sync::mpsc::UnboundedSender<Event>) -> Command {
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
}
