//! One batch of a kind other than `generate`: run in chunks of the model's batch cap, a failing
//! chunk split in halves and retried, so out-of-memory lowers the cap and a job that breaks the
//! model fails alone.

use tracing::warn;

use super::error::guarded;
use super::slots::Slot;
use super::EngineError;
use crate::job::{JobInput, JobKind, Output};
use crate::metrics::Metrics;
use crate::plan::ModelPlan;

/// Runs `inputs` in chunks of the slot's cap. A failing chunk is split in halves and retried, so
/// out-of-memory shrinks the batch (and the cap) and a job that breaks the model fails alone.
pub(super) fn run_adaptive(
    slot: &mut Slot,
    spec: &ModelPlan,
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
    spec: &ModelPlan,
    kind: JobKind,
    chunk: &[&JobInput],
    metrics: &Metrics,
) -> Vec<Result<Output, EngineError>> {
    metrics.model_forward_total.with_label_values(&[&spec.name]).inc();
    let result = guarded(&spec.name, "run", || {
        let outputs = slot.model.run(kind, chunk);
        slot.report_prefix(&spec.name, metrics);
        let outputs = outputs?;
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
        slot.release_cache(&spec.name);
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
    use tracing::Span;

    use super::super::fakes::{drain, engine_with, input, slot, spec, Fake};
    use super::super::Command;
    use super::*;

    #[test]
    fn a_panicking_job_fails_alone_and_the_model_is_reloaded() {
        let spec = spec();
        let mut slot = slot(Box::new(Fake { fits: 100, calls: vec![] }));
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
    fn out_of_memory_splits_the_batch_and_lowers_the_cap() {
        let spec = spec();
        let mut slot = slot(Box::new(Fake { fits: 2, calls: vec![] }));
        let inputs: Vec<JobInput> = (0..8).map(input).collect();
        let out = run_adaptive(&mut slot, &spec, JobKind::Tensor, &inputs, &Metrics::new("t"));
        assert!(out.iter().all(|r| r.is_ok()));
        assert_eq!(slot.cap, 2, "cap follows the largest batch that fit");
        let outs: Vec<Output> = out.into_iter().map(Result::unwrap).collect();
        assert_eq!(outs, inputs.iter().map(|i| match i { JobInput::Tensor(t) => Output::Tensor(t.clone()), _ => unreachable!() }).collect::<Vec<_>>());
    }

    #[test]
    fn a_poison_job_fails_alone() {
        let spec = spec();
        let mut slot = slot(Box::new(Fake { fits: 100, calls: vec![] }));
        let inputs: Vec<JobInput> = [1, 2, 13, 4, 5].into_iter().map(input).collect();
        let out = run_adaptive(&mut slot, &spec, JobKind::Tensor, &inputs, &Metrics::new("t"));
        let failed: Vec<usize> = out.iter().enumerate().filter(|(_, r)| r.is_err()).map(|(i, _)| i).collect();
        assert_eq!(failed, vec![2]);
        assert_eq!(slot.cap, 8, "model errors do not lower the cap");
    }
}
