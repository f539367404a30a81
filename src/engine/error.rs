//! What can go wrong on the engine thread: [`EngineError`], the one error that leaves it, and how
//! a model call's panics and failed allocations (which tch raises as panics) become one.

use std::panic::{catch_unwind, AssertUnwindSafe};

use tracing::error;

use crate::job::{ErrorCode, JobError};

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

    pub(super) fn from_tch(e: tch::TchError) -> EngineError {
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
pub(super) fn summary(s: &str) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let cause = lines.iter().rev().find(|l| l.contains("Error:")).or(lines.first()).copied().unwrap_or_default();
    cause.chars().take(500).collect()
}

/// The message of a caught panic, one line.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
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
pub(super) fn guarded<T>(model: &str, call: &str, f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, EngineError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allocation_panic_is_out_of_memory_and_other_panics_unwind_on() {
        let oom = catch_oom(|| -> () { panic!("CUDA out of memory. Tried to allocate 2.00 GiB") });
        assert!(matches!(oom, Err(EngineError::OutOfMemory(m)) if m.contains("Tried to allocate")));
        assert_eq!(catch_oom(|| 7).unwrap(), 7);
        assert!(catch_unwind(|| catch_oom(|| -> () { panic!("index out of range") })).is_err());
        let r: Result<(), _> = guarded("m", "run", || panic!("CUDA out of memory."));
        assert!(matches!(r, Err(EngineError::OutOfMemory(_))), "not a panic that reloads the model: {r:?}");
    }
}
