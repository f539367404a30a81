//! The model slots: loading a model (warmup and token budget included) into the engine's cache,
//! the LRU that keeps loaded models within the memory budget, and dropping a model whose call
//! panicked.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::device::{generation_token_budget, resolve_device};
use super::error::guarded;
use super::draft::SpeculationStats;
use super::prefix::PrefixStats;
use super::{hf, torchscript, Engine, EngineError, LoadedModel};
use crate::plan::{Backend, ModelPlan};

/// A loaded model and what the engine learnt of it.
pub(super) struct Slot {
    pub(super) model: Box<dyn LoadedModel>,
    pub(super) fingerprint: Arc<str>,
    pub(super) size: u64,
    pub(super) last_used: u64,
    /// Largest batch known to fit; lowered on out-of-memory.
    pub(super) cap: usize,
    /// A call panicked: the model is dropped once the current batch is done, and reloaded.
    pub(super) poisoned: bool,
    /// Tokens a generation batch may hold (0: no limit): `max_batch_tokens`, or derived from
    /// free device memory at load when that is unset (see [`generation_token_budget`]).
    pub(super) token_budget: usize,
    /// The model's prefix cache counters already added to the metrics.
    pub(super) prefix_seen: PrefixStats,
    /// The model's speculation counters already added to the metrics.
    pub(super) speculation_seen: SpeculationStats,
}

impl Slot {
    /// Adds what the model's prefix cache did since last time to `metrics`.
    pub(super) fn report_prefix(&mut self, model: &str, metrics: &crate::metrics::Metrics) {
        let Some(now) = self.model.prefix_stats() else { return };
        let seen = std::mem::replace(&mut self.prefix_seen, now);
        metrics.prefix_lookup_tokens_total.with_label_values(&[model]).inc_by(now.looked_up.saturating_sub(seen.looked_up));
        metrics.prefix_hit_tokens_total.with_label_values(&[model]).inc_by(now.hit.saturating_sub(seen.hit));
        metrics.prefix_evicted_tokens_total.with_label_values(&[model]).inc_by(now.evicted.saturating_sub(seen.evicted));
        metrics.prefix_cache_bytes.with_label_values(&[model]).set(now.bytes as i64);
    }

    /// Adds what the model's greedy speculation did since last time to `metrics`.
    pub(super) fn report_speculation(&mut self, model: &str, metrics: &crate::metrics::Metrics) {
        let Some(now) = self.model.speculation_stats() else { return };
        let seen = std::mem::replace(&mut self.speculation_seen, now);
        metrics.speculated_tokens_total.with_label_values(&[model]).inc_by(now.drafted.saturating_sub(seen.drafted));
        metrics.speculated_accepted_tokens_total.with_label_values(&[model]).inc_by(now.accepted.saturating_sub(seen.accepted));
    }

    /// Frees cached device memory after out-of-memory; a panic in it marks the slot for reload.
    pub(super) fn release_cache(&mut self, model: &str) {
        if guarded(model, "release_cache", || {
            self.model.release_cache();
            Ok(())
        })
        .is_err()
        {
            self.poisoned = true;
        }
    }
}

fn load(spec: &ModelPlan) -> Result<Box<dyn LoadedModel>, EngineError> {
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

impl Engine {
    /// Drops a model whose state may be inconsistent (a call panicked); every job of its running
    /// generation fails with `error`. It is loaded afresh on next use.
    pub(super) fn drop_model(&mut self, name: &Arc<str>, error: &EngineError) {
        let waiting: HashSet<u64> = self.waiting.get(name).map(|w| w.queue.waiting_jobs().collect()).unwrap_or_default();
        self.drop_model_except(name, error, &waiting);
        if let Some(w) = self.waiting.get_mut(name) {
            w.queue.clear_running();
        }
    }

    /// `drop_model`, where `waiting` are the model's generate jobs not yet in its running batch.
    pub(super) fn drop_model_except(&mut self, name: &Arc<str>, error: &EngineError, waiting: &HashSet<u64>) {
        if self.models.remove(name).is_some() {
            self.metrics.models_loaded.dec();
            warn!(model = %name, "model dropped after a panic; it is reloaded on next use");
        }
        let running: Vec<u64> = self.routes.iter().filter(|(job, r)| r.model == *name && !waiting.contains(job)).map(|(job, _)| *job).collect();
        for job in running {
            self.finish(job, Err(error.clone()));
        }
    }

    /// The loaded model for `spec`, loading (and evicting least-recently-used models) as needed.
    pub(super) fn slot(&mut self, spec: &ModelPlan) -> Result<&mut Slot, EngineError> {
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
            self.models.insert(spec.name.clone(), Slot { model, fingerprint: spec.fingerprint.clone(), size: spec.size_bytes, last_used: 0, cap, poisoned: false, token_budget, prefix_seen: PrefixStats::default(), speculation_seen: SpeculationStats::default() });
        }
        let slot = self.models.get_mut(&spec.name).expect("just inserted");
        slot.last_used = self.clock;
        Ok(slot)
    }

    pub(super) fn evict_for(&mut self, incoming: u64) {
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

#[cfg(test)]
mod tests {
    use super::super::fakes::Fake;
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn loaded_models_stay_within_the_memory_budget_least_recently_used_first() {
        let metrics = Arc::new(Metrics::new("t"));
        let mut engine = Engine::new(250, metrics);
        for (name, used) in [("a", 3), ("b", 1), ("c", 2)] {
            let slot = Slot { model: Box::new(Fake { fits: 1, calls: vec![] }), fingerprint: "f".into(), size: 100, last_used: used, cap: 1, poisoned: false, token_budget: 0, prefix_seen: PrefixStats::default(), speculation_seen: SpeculationStats::default() };
            engine.models.insert(name.into(), slot);
        }
        engine.evict_for(100);
        let mut left: Vec<&str> = engine.models.keys().map(|k| &**k).collect();
        left.sort();
        assert_eq!(left, vec!["a"], "b then c were least recently used; 100 + 100 fits 250");
    }
}
