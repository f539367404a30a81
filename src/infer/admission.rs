//! What every adapter does with a job around the core, kept here so that each adapter (the
//! JetStream worker, the in-process [`super::Infer`], any later door) gets it by construction:
//! - [`admit`]: a decoded job validated for the model it names, with its cache key;
//! - [`late`]: the `timeout` answer of a job past its `deadline` or `timeout_ms` — asked at intake
//!   and again just before its batch goes to the engine;
//! - the two-tier cache around the engine: [`lookup`] answers a repeat before, [`store`] keeps a
//!   computed answer after;
//! - the job metrics of an answer: [`labels`] and [`count`].
//!
//! An adapter keeps only what is its transport's: where jobs come from, its own refusals (the
//! worker's `Nats-Msg-Id` and subject level) and how answers go out.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cache::{check, Cache};
use crate::job::{Envelope, ErrorCode, JobError, JobKind, Limits, Output, ValidJob};
use crate::metrics::Metrics;
use crate::priority::Priority;
use crate::plan::ModelPlan;
use crate::repository::Repository;

/// A valid job for a served model: what the core runs.
pub struct Admitted {
    pub job: ValidJob,
    pub spec: Arc<ModelPlan>,
    /// `None` when the job opted out of the cache (`use_cache: false`).
    pub cache_key: Option<[u8; 32]>,
}

/// Validates a decoded job for the model it names in `repository` (that model's own checks, its
/// tensors up to `limits.max_tensor_elements`).
pub fn admit(repository: &Repository, envelope: Envelope, limits: &Limits) -> Result<Admitted, JobError> {
    let (job, spec) = repository.admit(envelope, limits.max_tensor_elements)?;
    let cache_key = job.use_cache.then(|| job.cache_key());
    Ok(Admitted { job, spec, cache_key })
}

/// Why `job` may no longer start, `age` after its publish, at `now` (see
/// [`crate::deadline::late`]): the one place the core asks.
pub fn late(job: &ValidJob, age: Duration, now: SystemTime) -> Option<JobError> {
    crate::deadline::late(job.deadline, job.timeout, age, now)
}

/// The cached answer, from either tier, if [`check::check`] finds it can be this job's (the cache
/// counts hits, refused values, misses and its own failures).
pub async fn lookup(cache: Option<&Cache>, job: &ValidJob, spec: &ModelPlan, key: Option<&[u8; 32]>) -> Option<Output> {
    cache?.get(key?, |output| check::check(job, spec, output)).await
}

/// Stores a computed answer under its key. A generation its deadline cut short is not the job's
/// result: it is answered but never stored.
pub async fn store(cache: Option<&Cache>, key: Option<&[u8; 32]>, output: &Output) {
    if let (Some(cache), Some(key), true) = (cache, key, output.complete()) {
        cache.put(key, output).await;
    }
}

/// The `model` and `kind` labels of a job's metrics: a served model and a known kind, else
/// `unknown` / `invalid` (a producer's made-up names would otherwise each become a new series).
pub fn labels<'a>(repository: &Repository, model: &'a str, kind: &'a str) -> [&'a str; 2] {
    let model = if repository.get(model).is_some() { model } else { "unknown" };
    let kind = JobKind::parse(kind).map_or("invalid", JobKind::as_str);
    [model, kind]
}

/// Counts an answered job: by model, kind and status, an error also by its code, and its latency
/// since publish (`age`) by model and by level.
pub fn count(metrics: &Metrics, [model, kind]: [&str; 2], level: Priority, error: Option<ErrorCode>, age: Duration) {
    let status = if error.is_some() { "error" } else { "ok" };
    metrics.jobs_total.with_label_values(&[model, kind, status]).inc();
    if let Some(code) = error {
        metrics.job_errors_total.with_label_values(&[code.as_str()]).inc();
    }
    metrics.job_latency_seconds.with_label_values(&[model]).observe(age.as_secs_f64());
    metrics.priority_latency_seconds.with_label_values(&[level.as_str()]).observe(age.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_only_served_models_and_known_kinds() {
        let repository = Repository { dir: Default::default(), models: Default::default(), invalid: Default::default(), skipped: Default::default() };
        assert_eq!(labels(&repository, "made-up", "generate"), ["unknown", "generate"]);
        assert_eq!(labels(&repository, "made-up", "nonsense"), ["unknown", "invalid"]);
    }

    #[test]
    fn an_answer_is_counted_by_status_code_and_level() {
        let metrics = Metrics::new("test");
        count(&metrics, ["m", "generate"], Priority::default(), None, Duration::from_millis(5));
        count(&metrics, ["m", "generate"], Priority::default(), Some(ErrorCode::Timeout), Duration::from_millis(5));
        assert_eq!(metrics.jobs_answered(), (1, 1));
        assert_eq!(metrics.job_errors_total.with_label_values(&["timeout"]).get(), 1);
        assert_eq!(metrics.job_latency_seconds.with_label_values(&["m"]).get_sample_count(), 2);
    }
}
