//! The backend trait: what a model loaded on the engine thread does ([`LoadedModel`]), and where
//! its streamed chunks go ([`Sink`]). The engine drives it; backends (`torchscript.rs`, `hf/`)
//! implement it.

use super::draft::SpeculationStats;
use super::prefix::PrefixStats;
use super::EngineError;
use crate::job::{JobInput, JobKind, Output};
use crate::stream::StreamChunk;

/// Where streamed chunks go, and which jobs want them.
pub trait Sink {
    fn wants(&self, job: usize) -> bool;
    fn emit(&mut self, chunk: StreamChunk);
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

    /// What the model's prefix cache did so far (none: it has none).
    fn prefix_stats(&self) -> Option<PrefixStats> {
        None
    }

    /// What greedy speculation drafted and accepted so far (none: the model does not speculate).
    fn speculation_stats(&self) -> Option<SpeculationStats> {
        None
    }

    /// Rows in the running generation.
    fn generating(&self) -> usize {
        0
    }
}
