//! Fake models for the engine's unit tests: [`Fake`] runs batches (and fails some on purpose),
//! [`FakeGen`] generates (and runs out of memory or panics on purpose).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::slots::Slot;
use super::{Engine, EngineError, Event, LoadedModel, Sink};
use crate::job::{JobInput, JobKind, Output};
use crate::metrics::Metrics;
use crate::plan::ModelPlan;
use crate::tensor::TensorData;

/// Fails batches containing a poison value, or larger than `fits` with out-of-memory.
pub(super) struct Fake {
    pub(super) fits: usize,
    pub(super) calls: Vec<usize>,
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
pub(super) struct FakeGen {
    pub(super) rows: Vec<(u64, crate::kinds::GenerateInput, usize)>,
    pub(super) join_fits: usize,
    pub(super) step_fits: usize,
    pub(super) paused: HashMap<u64, (crate::kinds::GenerateInput, usize)>,
    /// Rows that rejoined with steps already taken.
    pub(super) resumed: Arc<std::sync::atomic::AtomicUsize>,
    /// Rows told to stop (their deadline passed): they end at the next step.
    pub(super) stopped: Vec<u64>,
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

pub(super) fn gen_input(token: u32) -> JobInput {
    JobInput::Generate(crate::kinds::GenerateInput {
        prompt: vec![token],
        max_new_tokens: 2,
        sampling: crate::kinds::Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None },
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        top_logprobs: 0,
    })
}

/// A slot for `model`, as `spec` would load it: batch cap 8, no token budget.
pub(super) fn slot(model: Box<dyn LoadedModel>) -> Slot {
    Slot { model, fingerprint: "f".into(), size: 1, last_used: 0, cap: 8, poisoned: false, token_budget: 0, prefix_seen: Default::default(), speculation_seen: Default::default() }
}

pub(super) fn engine_with(model: Box<dyn LoadedModel>) -> (Engine, Arc<ModelPlan>) {
    let metrics = Arc::new(Metrics::new("t"));
    metrics.models_loaded.inc();
    let mut engine = Engine::new(0, metrics);
    let spec = Arc::new(spec());
    engine.models.insert(spec.name.clone(), slot(model));
    (engine, spec)
}

pub(super) fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Vec<(usize, Result<Output, EngineError>)> {
    let mut done = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let Event::Done { index, result, .. } = event {
            done.push((index, result));
        }
    }
    done.sort_by_key(|(i, _)| *i);
    done
}

pub(super) fn input(v: u8) -> JobInput {
    JobInput::Tensor(vec![TensorData { dtype: crate::tensor::DType::U8, shape: vec![1], data: vec![v] }])
}

pub(super) fn spec() -> ModelPlan {
    let config = toml::from_str("backend = \"torchscript\"\nmax_batch_size = 8\n[[inputs]]\nname=\"x\"\ndtype=\"u8\"\nshape=[1]").unwrap();
    ModelPlan { name: "fake".into(), dir: ".".into(), config, fingerprint: "f".into(), size_bytes: 1, lm: None }
}
