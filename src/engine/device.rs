//! Device memory: which device a model runs on, and how many tokens its generation batches may
//! hold, from free device memory as `nvidia-smi` reports it when `max_batch_tokens` is unset.

use tracing::{info, warn};

use super::{scheduler, EngineError, LoadedModel};
use crate::plan::{DeviceChoice, ModelPlan};

/// Tokens of the probe batch that measures activation memory (TGI's default prefill is 4096).
const PROBE_TOKENS: usize = 2048;
/// Share of free device memory left unbudgeted: the allocator's fragmentation, cuBLAS workspaces.
const MEMORY_MARGIN: f64 = 0.1;

/// The generation token budget of a model just loaded: `max_batch_tokens` when set; unset, on
/// CUDA, derived from free device memory as TGI does at warmup (free memory, a probe batch's peak,
/// the KV cache a token takes; see [`scheduler::token_budget`]) and logged; on CPU, none.
pub(super) fn generation_token_budget(spec: &ModelPlan, model: &mut dyn LoadedModel) -> Result<usize, EngineError> {
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

pub(super) fn resolve_device(choice: DeviceChoice) -> Result<tch::Device, EngineError> {
    let cuda = tch::Cuda::device_count() as usize;
    match choice {
        DeviceChoice::Cpu => Ok(tch::Device::Cpu),
        DeviceChoice::Auto if cuda > 0 => Ok(tch::Device::Cuda(0)),
        DeviceChoice::Auto => Ok(tch::Device::Cpu),
        DeviceChoice::Cuda(n) if n < cuda => Ok(tch::Device::Cuda(n)),
        DeviceChoice::Cuda(n) => Err(EngineError::Load(format!("device cuda:{n} requested, {cuda} CUDA device(s) present"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_that_is_not_there_is_refused_at_load() {
        assert_eq!(resolve_device(DeviceChoice::Cpu).unwrap(), tch::Device::Cpu);
        let err = resolve_device(DeviceChoice::Cuda(1 << 20)).unwrap_err();
        assert!(matches!(&err, EngineError::Load(m) if m.contains("device cuda:1048576 requested")), "{err:?}");
    }
}
