//! libtorch's thread counts (`serve`'s `--torch-threads` and `--torch-interop-threads`): set once
//! from the CLI, applied by each engine thread as it starts.

use std::panic::catch_unwind;

use tracing::{info, warn};

use crate::config::TorchOpts;

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
pub(super) fn apply_threads() {
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
