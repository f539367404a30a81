//! libtorch's thread counts (`serve`'s `--torch-threads` and `--torch-interop-threads`): set once
//! from the CLI, applied by each engine thread as it starts.

use std::panic::catch_unwind;

use tracing::{info, warn};

/// libtorch's thread counts, as the engine applies them: 0 keeps libtorch's default.
#[derive(Debug, Clone, Copy)]
pub struct Threads {
    /// Intra-op (OpenMP) threads of each engine thread.
    pub intra_op: usize,
    /// Inter-op threads, per process.
    pub inter_op: usize,
}

/// libtorch's thread counts for engine threads started from now on (`serve`'s flags, set before
/// it starts the worker); unset, libtorch's defaults.
static TORCH_THREADS: std::sync::OnceLock<Threads> = std::sync::OnceLock::new();

/// Sets the thread counts engine threads apply (the first call wins).
pub fn configure_threads(threads: Threads) {
    let _ = TORCH_THREADS.set(threads);
}

/// Applies the configured thread counts on this (the engine) thread, before its first op:
/// OpenMP's count is per calling thread, and libtorch takes the inter-op count once per process
/// (later calls fail), so that one is set only by the first engine.
pub(super) fn apply_threads() {
    let Some(opts) = TORCH_THREADS.get() else { return };
    if opts.intra_op > 0 {
        tch::set_num_threads(opts.intra_op as i32);
    }
    static INTEROP: std::sync::Once = std::sync::Once::new();
    if opts.inter_op > 0 {
        INTEROP.call_once(|| {
            if catch_unwind(|| tch::set_num_interop_threads(opts.inter_op as i32)).is_err() {
                warn!("libtorch's inter-op threads were already started; --torch-interop-threads is not applied");
            }
        });
    }
    info!(threads = tch::get_num_threads(), interop_threads = tch::get_num_interop_threads(), "libtorch threads");
}
