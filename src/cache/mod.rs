//! The result cache beside the pipeline, in two tiers keyed by
//! [`crate::job::ValidJob::cache_key`]: a worker's own sled folder ([`local`], `--cache-dir`)
//! and a JetStream key-value bucket that the whole pool shares ([`shared`],
//! `--shared-cache-bucket`). A lookup asks the local tier, then the bucket (a hit there is copied
//! to the local tier); a computed result goes to both. Either tier may be absent.
//!
//! A hit is served only after [`check`] found it can be the job's answer (its kind, its shape for
//! the model, finite numbers; for the bucket also the key digest inside the value): whoever can
//! write the bucket could otherwise answer every repeat of a job with anything. A refused value is
//! a miss, counted in `jetbatch_cache_rejected_total{tier}`, and overwritten once computed.
//!
//! The cache costs speed, never correctness: a failing tier is a miss, logged and counted, and
//! the job is computed. The shared tier bounds every call with a short timeout and, after a
//! failure, is skipped for a few seconds, so an outage of the bucket (server down, bucket
//! deleted) degrades the pool to local caching instead of delaying its jobs.
//!
//! # Layout
//! - `mod.rs`: the two-tier facade [`Cache`], its [`Stats`] and [`CacheError`].
//! - [`check`]: whether a cached value can be a job's answer ([`check::Mismatch`]).
//! - [`local`]: the sled tier (TTL, size cap evicting oldest-first).
//! - [`shared`]: the bucket tier (value format, timeouts, degradation).

pub mod check;
pub mod local;
pub mod shared;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, warn};

pub use self::local::{Local, LocalStats};
pub use self::shared::{Shared, SharedStats};
use crate::bus::{self, CacheBucket};
use crate::config::{CacheOpts, NatsOpts};
use crate::job::Output;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache storage: {0}")]
    Storage(#[from] sled::Error),
    #[error("cache folder {} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("{} is not a jetbatch cache (no sled database in it)", .0.display())]
    NotACache(PathBuf),
    /// sled lets one process open a folder; a running worker holds its own.
    #[error("cache folder {} is locked by a running worker; ask that worker (or stop it first)", .0.display())]
    Locked(PathBuf),
    #[error("shared cache bucket {bucket}: {message}")]
    Shared { bucket: String, message: String, timed_out: bool },
}

impl CacheError {
    pub fn error_type(&self) -> &'static str {
        match self {
            CacheError::Storage(_) => "storage",
            CacheError::NotFound(_) => "not_found",
            CacheError::NotACache(_) => "not_a_cache",
            CacheError::Locked(_) => "locked",
            CacheError::Shared { timed_out: true, .. } => "shared_timeout",
            CacheError::Shared { .. } => "shared_unavailable",
        }
    }
}

/// How long `jetbatch cache` waits for NATS before reporting the shared tier unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a hit came from: the `tier` label of `jetbatch_cache_hits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Local,
    Shared,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Shared => "shared",
        }
    }
}

/// The shared tier as a command sees it: off, configured but not reachable, or there.
pub enum SharedTier {
    Off,
    Unreachable { bucket: String, error: String },
    /// Boxed: the open bucket's handle carries its stream's whole info.
    On(Box<Shared>),
}

/// Both tiers' figures (`jetbatch cache stats`); `null` for a tier that is not configured.
#[derive(Debug, serde::Serialize)]
pub struct Stats {
    pub local: Option<LocalStats>,
    pub shared: Option<SharedStats>,
}

pub struct Cache {
    local: Option<Local>,
    shared: SharedTier,
    metrics: Arc<Metrics>,
}

impl Cache {
    pub fn new(local: Option<Local>, shared: SharedTier, metrics: Arc<Metrics>) -> Cache {
        // Each tier's hit series from the start, so a dashboard's ratio has both terms at 0.
        let tiers = [(local.is_some(), Tier::Local), (matches!(shared, SharedTier::On(_)), Tier::Shared)];
        for (_, tier) in tiers.iter().filter(|(present, _)| *present) {
            metrics.cache_hits_total.with_label_values(&[tier.as_str()]);
            metrics.cache_rejected_total.with_label_values(&[tier.as_str()]);
        }
        Cache { local, shared, metrics }
    }

    /// The cache as `jetbatch cache stats|clear` sees it: the local folder must be a cache already
    /// (a mistyped `--cache-dir` is an error, not a new empty cache); a bucket whose server does
    /// not answer is reported as unreachable.
    pub async fn for_command(opts: &CacheOpts, nats: &NatsOpts) -> Result<Cache, CacheError> {
        let local = opts.cache_dir.as_ref().map(|dir| Local::open_existing(dir, opts.ttl(), opts.cache_max_mb << 20)).transpose()?;
        // A command's own figures, never shown: the facade counts into one.
        let metrics = Arc::new(Metrics::new("cache"));
        // Replicas matter only where the bucket is created, which a command does not do.
        let shared = match CacheBucket::of(opts, 1) {
            None => SharedTier::Off,
            Some(bucket) => match tokio::time::timeout(CONNECT_TIMEOUT, bus::connect(nats, "jetbatch-cache")).await {
                Ok(Ok(client)) => SharedTier::On(Box::new(Shared::new(client, bucket, metrics.clone()))),
                Ok(Err(e)) => SharedTier::Unreachable { bucket: bucket.name, error: e.to_string() },
                Err(_) => SharedTier::Unreachable { bucket: bucket.name, error: format!("no connection in {CONNECT_TIMEOUT:?}") },
            },
        };
        Ok(Cache::new(local, shared, metrics))
    }

    /// A worker's cache: the local tier at `--cache-dir` (a folder that cannot be opened is
    /// logged and left out) and the shared tier on `client`. `None` when neither is configured.
    pub async fn for_worker(opts: &CacheOpts, client: &async_nats::Client, replicas: usize, metrics: Arc<Metrics>) -> Option<Cache> {
        let local = opts.cache_dir.as_ref().and_then(|dir| match Local::open(dir, opts.ttl(), opts.cache_max_mb << 20) {
            Ok(local) => Some(local),
            Err(e) => {
                error!(error = %e, dir = %dir.display(), "local cache unavailable; running without it");
                metrics.errors_total.with_label_values(&["cache", e.error_type()]).inc();
                None
            }
        });
        let shared = match CacheBucket::of(opts, replicas) {
            Some(bucket) => {
                let shared = Shared::new(client.clone(), bucket, metrics.clone());
                // Creates the bucket now, so a misconfiguration shows in the log at start; a
                // failure here only means the tier starts degraded and retries.
                shared.connect().await;
                SharedTier::On(Box::new(shared))
            }
            None => SharedTier::Off,
        };
        (local.is_some() || !matches!(shared, SharedTier::Off)).then(|| Cache::new(local, shared, metrics))
    }

    /// The cached answer for `key` that `fits` the job: the local tier's, else the bucket's (then
    /// copied to the local tier). Counts a hit by tier, a refused value by tier, or a miss.
    pub async fn get(&self, key: &[u8; 32], fits: impl Fn(&Output) -> Result<(), check::Mismatch>) -> Option<Output> {
        let accept = |output: Output, tier: Tier| match fits(&output) {
            Ok(()) => Some(output),
            Err(e) => {
                rejected(&self.metrics, tier, key, &e);
                None
            }
        };
        let found = match self.local.as_ref().map(|l| l.get(key)) {
            Some(Ok(Some(output))) => accept(output, Tier::Local).map(|output| (output, Tier::Local)),
            Some(Err(e)) => {
                self.local_failed("cache read", &e);
                None
            }
            _ => None,
        };
        let found = match (found, &self.shared) {
            (None, SharedTier::On(shared)) => shared.get(key).await.and_then(|(output, stored_ms)| {
                let output = accept(output, Tier::Shared)?;
                if let Some(Err(e)) = self.local.as_ref().map(|l| l.put_at(key, &output, stored_ms)) {
                    self.local_failed("cache write", &e);
                }
                Some((output, Tier::Shared))
            }),
            (found, _) => found,
        };
        match found {
            Some((output, tier)) => {
                self.metrics.cache_hits_total.with_label_values(&[tier.as_str()]).inc();
                Some(output)
            }
            None => {
                self.metrics.cache_misses_total.inc();
                None
            }
        }
    }

    /// Stores a computed answer in both tiers (the bucket only when it fits the server's max
    /// payload).
    pub async fn put(&self, key: &[u8; 32], output: &Output) {
        if let Some(Err(e)) = self.local.as_ref().map(|l| l.put(key, output)) {
            self.local_failed("cache write", &e);
        }
        if let SharedTier::On(shared) = &self.shared {
            shared.put(key, output).await;
        }
    }

    fn local_failed(&self, what: &str, e: &CacheError) {
        warn!(error = %e, "{what}");
        self.metrics.errors_total.with_label_values(&["cache", e.error_type()]).inc();
    }

    /// Both tiers' figures. A shared tier that does not answer is reported as unreachable, not
    /// as an error: the local figures are still worth having.
    pub async fn stats(&self) -> Result<Stats, CacheError> {
        let local = self.local.as_ref().map(Local::stats).transpose()?;
        let shared = match &self.shared {
            SharedTier::Off => None,
            SharedTier::Unreachable { bucket, error } => Some(SharedStats::unreachable(bucket, error)),
            SharedTier::On(shared) => Some(shared.stats().await.unwrap_or_else(|e| SharedStats::unreachable(shared.bucket(), &e.to_string()))),
        };
        Ok(Stats { local, shared })
    }

    /// Empties both tiers: the local one first, so an unreachable bucket still leaves it cleared
    /// (and is then the error).
    pub async fn clear(&self) -> Result<(), CacheError> {
        if let Some(local) = &self.local {
            local.clear()?;
        }
        match &self.shared {
            SharedTier::Off => Ok(()),
            SharedTier::Unreachable { bucket, error } => {
                Err(CacheError::Shared { bucket: bucket.clone(), message: error.clone(), timed_out: false })
            }
            SharedTier::On(shared) => shared.clear().await,
        }
    }

    /// Writes the local tier to disk (at shutdown); the bucket has nothing to flush.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.local.as_ref().map_or(Ok(()), Local::flush)
    }
}

/// A cached value refused for `key`: counted and logged (it is recomputed and overwritten).
fn rejected(metrics: &Metrics, tier: Tier, key: &[u8; 32], e: &check::Mismatch) {
    metrics.cache_rejected_total.with_label_values(&[tier.as_str()]).inc();
    let key: String = key.iter().take(8).map(|b| format!("{b:02x}")).collect();
    warn!(tier = tier.as_str(), key, reason = %e, "cached value refused: not this job's answer; recomputing");
}

/// A small answer for the tiers' tests.
#[cfg(test)]
fn test_output(v: f32) -> Output {
    Output::Tensor(vec![crate::tensor::TensorData::from((&[v; 16][..], vec![16]))])
}
