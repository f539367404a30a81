//! The worker's NATS service: service `jetbatch` (version = the crate's), so
//! `$SRV.PING|INFO|STATS.jetbatch` find every worker, with its metadata (worker id, host, prefix,
//! consumer, cache folder, endpoint subject) and endpoints on `<prefix>.svc.<worker>.<verb>`:
//! `info`, `stats`, `health`, `load`, `unload`, `cache.stats`, `cache.clear`, `drain`. JSON in and
//! out (`schemas/service.schema.json`; the shapes are in [`crate::pool`]); a refused request is
//! answered with the services framework's error headers (`Nats-Service-Error`, `-Code`).
//!
//! Every answer fits the connection's max_payload: one that does not is never delivered, and a
//! worker whose `info` is lost drops out of `jetbatch pool list` and of its peers' view. So the
//! lists that grow with the repository are cut to fit, with a count of what was left out, and
//! quoted reasons are cut to [`MAX_REASON`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_nats::service::{self, ServiceExt};
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use prometheus::core::Collector;
use tokio::sync::{broadcast, Notify};
use tracing::{info, warn};

use super::flow::Ctx;
use crate::pool::{self, meta, verb, BatchStats, CacheRatio, Draining, Health, InvalidModel, ModelInfo, ModelRequest, Unloaded, WorkerInfo, WorkerStats};
use crate::plan::{DeviceChoice, ModelPlan};
use crate::repository::RepoError;

/// What the endpoints read and change.
pub(crate) struct Control {
    pub ctx: Arc<Ctx>,
    pub host: String,
    pub models_dir: PathBuf,
    /// Absolute, so `jetbatch cache` on this host can find the worker that holds it.
    pub cache_dir: Option<PathBuf>,
    pub max_inflight: usize,
    pub started: Instant,
    pub draining: AtomicBool,
    /// Notified once by `drain`: `serve` then shuts down as on SIGTERM.
    pub drain: Notify,
    /// One load or unload at a time, so none is lost to another's swap.
    changing: tokio::sync::Mutex<()>,
}

/// An endpoint's refusal: the services framework's error code (HTTP-like) and text.
type Refusal = (usize, String);

/// Room left under max_payload for an answer's fields besides its lists, and the message headers.
const HEADROOM: usize = 4096;
/// The most characters of a reason an answer quotes: an invalid folder's error, a refusal.
const MAX_REASON: usize = 512;

/// The leading items whose JSON fits in `budget` bytes, and how many were left out.
fn fit<T: serde::Serialize>(items: impl IntoIterator<Item = T>, budget: usize) -> (Vec<T>, usize) {
    let (mut kept, mut used, mut left) = (Vec::new(), 0, 0);
    for item in items {
        // The separator is the byte counted past the item's own JSON.
        let size = serde_json::to_vec(&item).map_or(0, |v| v.len()) + 1;
        if left == 0 && used + size <= budget {
            used += size;
            kept.push(item);
        } else {
            left += 1;
        }
    }
    (kept, left)
}

/// The first [`MAX_REASON`] characters of `text`.
fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_REASON) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

impl Control {
    pub fn new(ctx: Arc<Ctx>, models_dir: PathBuf, cache_dir: Option<PathBuf>, max_inflight: usize) -> Control {
        Control {
            ctx,
            host: pool::host_name(),
            models_dir,
            cache_dir: cache_dir.map(|d| std::fs::canonicalize(&d).unwrap_or(d)),
            max_inflight,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            drain: Notify::new(),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// `info`, its lists cut to fit `budget` bytes (half each).
    fn info(&self, budget: usize) -> WorkerInfo {
        let repository = self.ctx.repository.current();
        let t = &self.ctx.topology;
        let (models, models_omitted) = fit(repository.models.values().map(|s| model_info(s)), budget / 2);
        let invalid = repository.invalid.iter().map(|(name, e)| InvalidModel { name: name.clone(), error: clip(&e.to_string()) });
        let (invalid, invalid_omitted) = fit(invalid, budget / 2);
        WorkerInfo {
            worker: self.ctx.worker.clone(),
            host: self.host.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            prefix: t.prefix.clone(),
            consumer: t.consumer.clone(),
            filter: crate::priority::Priority::ALL.iter().flat_map(|l| t.filter_subjects(*l)).collect(),
            models_dir: self.models_dir.display().to_string(),
            cache_dir: self.cache_dir.as_ref().map(|d| d.display().to_string()),
            max_inflight: self.max_inflight,
            uptime_secs: self.started.elapsed().as_secs(),
            models,
            invalid,
            models_omitted,
            invalid_omitted,
        }
    }

    /// `stats`, its per-model maps cut to fit `budget` bytes (half each).
    pub fn stats(&self, budget: usize) -> WorkerStats {
        let m = &self.ctx.metrics;
        let hits = ["local", "shared"].iter().map(|tier| m.cache_hits_total.with_label_values(&[tier]).get()).sum::<u64>();
        let misses = m.cache_misses_total.get();
        let mut batches = std::collections::BTreeMap::new();
        for family in m.batch_size.collect() {
            for metric in family.get_metric() {
                let model = metric.get_label().iter().find(|l| l.name() == "model").map_or("", |l| l.value()).to_string();
                let h = metric.get_histogram();
                let n = h.get_sample_count();
                let get = |c: &prometheus::IntCounterVec| c.with_label_values(&[&model]).get();
                let stats = BatchStats {
                    batches: n,
                    mean_size: if n == 0 { 0.0 } else { h.get_sample_sum() / n as f64 },
                    generated_tokens: get(&m.generated_tokens_total),
                    prefix_lookup_tokens: get(&m.prefix_lookup_tokens_total),
                    prefix_hit_tokens: get(&m.prefix_hit_tokens_total),
                    time_to_first_token_ms: {
                        let t = m.time_to_first_token_seconds.with_label_values(&[&model]);
                        if t.get_sample_count() == 0 { 0.0 } else { 1e3 * t.get_sample_sum() / t.get_sample_count() as f64 }
                    },
                };
                batches.insert(model, stats);
            }
        }
        let (queued, queued_left) = fit(self.ctx.queues.snapshot(), budget / 2);
        let (batches, batches_left) = fit(batches, budget / 2);
        WorkerStats {
            worker: self.ctx.worker.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            draining: self.draining.load(Ordering::Relaxed),
            inflight: m.inflight_jobs.get().max(0) as u64,
            queued: queued.into_iter().collect(),
            batches: batches.into_iter().collect(),
            cache: CacheRatio { hits, misses, hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64) },
            jobs: counts_by(&m.jobs_total, "status"),
            handed_back: counts_by(&m.naks_total, "reason"),
            consumer_pending: m.consumer_pending.get().max(0) as u64,
            omitted: queued_left + batches_left,
        }
    }

    fn health(&self) -> Health {
        let m = &self.ctx.metrics;
        let consuming = m.ready.load(Ordering::Relaxed);
        let engine_alive = m.engine_alive.load(Ordering::Relaxed);
        let draining = self.draining.load(Ordering::Relaxed);
        let stalled = m.intake.stalled();
        Health {
            worker: self.ctx.worker.clone(),
            ok: consuming && engine_alive && stalled.is_none() && !draining,
            consuming,
            engine_alive,
            draining,
            models: self.ctx.repository.current().models.len(),
            intake_stalled_secs: stalled.map(|d| d.as_secs()),
        }
    }

    /// Reads the folder `model` again and swaps the result in: a model already served is reloaded
    /// in place (the version served answers its jobs until then, and stays when the folder does
    /// not read), so a reload never leaves its jobs without the model.
    async fn load(&self, model: String) -> Result<ModelInfo, Refusal> {
        let _one = self.changing.lock().await;
        let current = self.ctx.repository.current();
        let name = model.clone();
        // Fingerprinting reads every file of the folder.
        let (next, outcome) = tokio::task::spawn_blocking(move || current.reload(&model)).await.map_err(|e| (500, format!("load: {e}")))?;
        let e = match outcome {
            Ok(spec) => {
                self.ctx.repository.replace(next);
                info!(model = %spec.name, fingerprint = %spec.fingerprint, "model loaded into the repository");
                return Ok(model_info(&spec));
            }
            Err(e) => e,
        };
        match &*e {
            RepoError::BadName { .. } => Err((400, format!("load: {e}"))),
            RepoError::NoFolder { .. } => Err((404, format!("load: {e}"))),
            _ => {
                let kept = next.get(&name).map(|s| format!("; still serving {} {}", s.name, s.fingerprint)).unwrap_or_default();
                // Recorded unless a version is served: its jobs are answered with the reason.
                self.ctx.repository.replace(next);
                Err((422, format!("load: {e}{kept}")))
            }
        }
    }

    async fn unload(&self, model: String) -> Result<Unloaded, Refusal> {
        let _one = self.changing.lock().await;
        let next = self.ctx.repository.current().without(&model).ok_or_else(|| (404, format!("unload: model '{model}' is not in this worker's repository")))?;
        let models = next.models.keys().cloned().collect();
        self.ctx.repository.replace(next);
        info!(%model, "model unloaded from the repository");
        Ok(Unloaded { model, models })
    }

    async fn cache(&self, clear: bool) -> Result<serde_json::Value, Refusal> {
        let cache = self.ctx.cache.clone().ok_or((409, "this worker runs without a cache (no --cache-dir, shared bucket off)".to_string()))?;
        if clear {
            cache.clear().await.map_err(|e| (500, e.to_string()))?;
        }
        let stats = cache.stats().await.map_err(|e| (500, e.to_string()))?;
        Ok(serde_json::to_value(stats).expect("json"))
    }

    /// Answers one request; `budget`: the bytes its lists may take.
    async fn answer(&self, verb: &str, body: &[u8], budget: usize) -> Result<serde_json::Value, Refusal> {
        let model = || {
            serde_json::from_slice::<ModelRequest>(body).map(|r| r.model).map_err(|e| (400, format!("{verb}: expected {{\"model\": NAME}}: {e}")))
        };
        match verb {
            verb::INFO => json(self.info(budget)),
            verb::STATS => json(self.stats(budget)),
            verb::HEALTH => json(self.health()),
            verb::LOAD => json(self.load(model()?).await?),
            verb::UNLOAD => json(self.unload(model()?).await?),
            verb::CACHE_STATS => self.cache(false).await,
            verb::CACHE_CLEAR => self.cache(true).await,
            verb::DRAIN => {
                self.draining.store(true, Ordering::Relaxed);
                json(Draining { worker: self.ctx.worker.clone(), inflight: self.ctx.metrics.inflight_jobs.get().max(0) as u64 })
            }
            other => Err((404, format!("no endpoint '{other}'"))),
        }
    }
}

fn json(answer: impl serde::Serialize) -> Result<serde_json::Value, Refusal> {
    Ok(serde_json::to_value(answer).expect("json"))
}

/// A labelled counter summed per value of `label`.
fn counts_by(counter: &prometheus::IntCounterVec, label: &str) -> std::collections::BTreeMap<String, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for family in counter.collect() {
        for m in family.get_metric() {
            let key = m.get_label().iter().find(|l| l.name() == label).map_or("", |l| l.value()).to_string();
            *counts.entry(key).or_default() += m.get_counter().get_value() as u64;
        }
    }
    counts
}

fn model_info(spec: &ModelPlan) -> ModelInfo {
    let c = &spec.config;
    ModelInfo {
        name: spec.name.to_string(),
        fingerprint: spec.fingerprint.to_string(),
        kinds: spec.kinds().iter().map(|k| k.as_str().to_string()).collect(),
        backend: format!("{:?}", c.backend).to_lowercase(),
        device: match c.device {
            DeviceChoice::Auto => "auto".to_string(),
            DeviceChoice::Cpu => "cpu".to_string(),
            DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        },
        dtype: c.dtype.map_or("f32", |d| d.name()).to_string(),
        max_batch_size: c.max_batch_size,
        max_batch_tokens: c.max_batch_tokens,
        warnings: spec.lm.as_ref().map(|lm| lm.warnings()).unwrap_or_default(),
    }
}

/// The bytes an answer's lists may take on `client`'s connection.
fn answer_budget(client: &Client) -> usize {
    client.server_info().max_payload.saturating_sub(HEADROOM)
}

#[derive(Debug, thiserror::Error)]
#[error("service registration: {0}")]
pub struct ServiceError(String);

/// Registers the service and answers its endpoints until shutdown, then deregisters.
pub(crate) async fn serve(client: Client, control: Arc<Control>, mut shutdown: broadcast::Receiver<()>) -> Result<impl std::future::Future<Output = ()>, ServiceError> {
    let ctx = &control.ctx;
    let root = pool::endpoints_subject(&ctx.topology.prefix, &ctx.worker);
    let mut metadata = std::collections::HashMap::from([
        (meta::WORKER.to_string(), ctx.worker.clone()),
        (meta::HOST.to_string(), control.host.clone()),
        (meta::PREFIX.to_string(), ctx.topology.prefix.clone()),
        (meta::CONSUMER.to_string(), ctx.topology.consumer.clone()),
        (meta::ENDPOINTS.to_string(), root.clone()),
    ]);
    if let Some(dir) = &control.cache_dir {
        metadata.insert(meta::CACHE_DIR.to_string(), dir.display().to_string());
    }
    let (for_stats, stats_client) = (control.clone(), client.clone());
    let svc = client
        .service_builder()
        .description("jetbatch worker: batched ML inference from JetStream")
        .metadata(metadata)
        // `$SRV.STATS` carries the live figures as the `stats` endpoint's data.
        // A quarter of the budget: `$SRV.STATS` carries every endpoint's figures beside it.
        .stats_handler(move |endpoint, _| {
            if endpoint == verb::STATS {
                serde_json::to_value(for_stats.stats(answer_budget(&stats_client) / 4)).expect("json")
            } else {
                serde_json::Value::Null
            }
        })
        .start(pool::SERVICE, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| ServiceError(e.to_string()))?;
    let group = svc.group(&root);
    let mut endpoints = Vec::new();
    for v in verb::ALL {
        // Endpoint names are `[A-Za-z0-9_-]` in the services protocol; the subject keeps the dot.
        let endpoint = group.endpoint_builder().name(v.replace('.', "_")).add(v).await.map_err(|e| ServiceError(format!("{root}.{v}: {e}")))?;
        endpoints.push(endpoint.map(move |request| (v, request)));
    }
    info!(subject = %root, "service endpoints ready");
    let mut requests = futures::stream::select_all(endpoints);
    Ok(async move {
        loop {
            let (verb, request) = tokio::select! {
                _ = shutdown.recv() => break,
                r = requests.next() => match r { Some(r) => r, None => break },
            };
            let (control, client) = (control.clone(), client.clone());
            tokio::spawn(async move {
                let max_payload = client.server_info().max_payload;
                let answer = control.answer(verb, &request.message.payload, answer_budget(&client)).await;
                let answer = answer.and_then(|v| {
                    let bytes = serde_json::to_vec(&v).expect("json");
                    // Cut lists keep answers well under; this bounds what they do not cover
                    // (a quarter of the headroom is left for the headers).
                    if bytes.len() > max_payload.saturating_sub(HEADROOM / 4) {
                        return Err((500, format!("{verb}: the answer of {} bytes is over the connection's max_payload ({max_payload})", bytes.len())));
                    }
                    Ok(bytes)
                });
                let response = match answer {
                    Ok(bytes) => Ok(Bytes::from(bytes)),
                    // A header value is one line; reasons (a TOML parse error) may span several.
                    Err((code, status)) => Err(service::error::Error { code, status: clip(&status.split_whitespace().collect::<Vec<_>>().join(" ")) }),
                };
                // A request without a reply subject has nobody to answer; the worker goes on.
                if let Err(e) = request.respond(response).await {
                    warn!(verb, error = %e, "service answer");
                }
                // Answered first, then stopped: the caller learns the drain began.
                if verb == verb::DRAIN {
                    control.drain.notify_one();
                }
            });
        }
        let _ = svc.stop().await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_cut_to_their_budget_with_the_count_left_out() {
        // Each name is 12 bytes of JSON plus its separator.
        let names: Vec<String> = (0..10).map(|i| format!("model-{i:04}")).collect();
        assert_eq!(fit(&names, 1000), (names.iter().collect::<Vec<_>>(), 0));
        let (kept, left) = fit(&names, 40);
        assert_eq!((kept, left), (vec![&names[0], &names[1], &names[2]], 7));
        assert_eq!(fit(&names, 0).1, 10);
        // Later items never fill the room an earlier one did not fit in: the list stays a prefix.
        let mixed = ["a".repeat(30), "b".to_string()];
        assert_eq!(fit(&mixed, 10), (vec![], 2));
        assert_eq!(clip(&"é".repeat(600)).chars().count(), MAX_REASON + 1);
        assert_eq!(clip("short"), "short");
    }
}
