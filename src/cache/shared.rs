//! The shared tier: a JetStream key-value bucket the whole pool reads and writes, so a repeat is a
//! hit whichever worker it lands on. Keys are the 32-byte cache key in hex (content-addressed:
//! every worker computes the same key for the same job); values are a format byte, the store time,
//! a digest binding the value to its key, and the answer in MessagePack, as the local tier stores
//! it. An entry whose digest is not its key's (copied under another key, or cut short) is refused
//! and counted (`jetbatch_cache_rejected_total{tier="shared"}`); the facade then checks the answer
//! against the job ([`super::check`]).
//!
//! Every call is bounded by [`CALL_TIMEOUT`]. A failed call (server down, bucket deleted, a
//! timeout) is a miss: it is counted (`jetbatch_errors_total{layer="cache"}`), warned about at
//! most every [`WARN_EVERY`], and the tier is skipped for [`RETRY_AFTER`], after which the next
//! call re-creates the bucket if need be and carries on. Reads do not see every write at once (a
//! replica may lag on R3): a miss right after a put only costs a computation.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use async_nats::Client;
use tracing::{debug, info, warn};

use super::check::Mismatch;
use super::{CacheError, Tier};
use crate::bus::{self, CacheBucket};
use crate::job::Output;
use crate::metrics::{now_ms, Metrics};

/// Longest a cache call may hold up a job: a local server answers in well under a millisecond,
/// a loaded R3 cluster in tens.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a worker keeps trying to create the bucket at start, before any job waits on it: a
/// new R3 stream elects its own leader, and workers starting together race to create it, which
/// has taken over 5 s on a busy 3-node test cluster.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the tier is skipped after a failure, so an outage costs one timeout per period
/// instead of one per job.
const RETRY_AFTER: Duration = Duration::from_secs(3);
/// Pause between attempts to create the bucket at start.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// At most one outage warning this often (the rest are counted in the next one).
const WARN_EVERY: Duration = Duration::from_secs(30);
/// Room left under the server's max payload for the put's subject and headers.
const PUT_OVERHEAD: usize = 512;
/// First byte of every value; an entry with another (written by an incompatible version, or
/// format 1, which had no key digest) is a miss, and overwritten once computed.
const FORMAT: u8 = 2;
/// Format byte, store time (ms since the epoch, big-endian), [`digest`].
const HEADER: usize = 1 + 8 + 32;

pub struct Shared {
    client: Client,
    js: jetstream::Context,
    bucket: CacheBucket,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The open bucket; `None` before the first call and after a failure.
    store: Option<kv::Store>,
    /// While set and in the future, the tier is skipped.
    retry_at: Option<Instant>,
    /// Whether the last call failed (so the next success is logged as a recovery).
    degraded: bool,
    last_warning: Option<Instant>,
    /// Failures since the last warning.
    unwarned: u64,
    /// The bucket exists with other settings ([`bus::cache_bucket_conflict`]): the tier is off.
    conflict: bool,
}

/// The bucket's figures (`jetbatch cache stats`).
#[derive(Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SharedStats {
    Ok { bucket: String, entries: u64, bytes: u64, max_bytes: i64, max_age_secs: u64, replicas: usize },
    Unreachable { bucket: String, error: String },
}

impl SharedStats {
    pub fn unreachable(bucket: &str, error: &str) -> SharedStats {
        SharedStats::Unreachable { bucket: bucket.to_string(), error: error.to_string() }
    }
}

impl Shared {
    /// The tier on `bucket`; nothing is asked of the server until the first call.
    pub fn new(client: Client, bucket: CacheBucket, metrics: Arc<Metrics>) -> Shared {
        let js = jetstream::new(client.clone());
        Shared { client, js, bucket, metrics, state: Mutex::new(State::default()) }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket.name
    }

    /// Creates (or updates) and opens the bucket now, trying for up to [`START_TIMEOUT`]; a
    /// failure leaves the tier degraded (retried by the next call after [`RETRY_AFTER`]).
    pub async fn connect(&self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, bus::setup_cache_bucket(&self.js, &self.bucket)).await {
                Ok(Ok(store)) => {
                    self.state.lock().expect("cache state").store = Some(store);
                    self.succeeded();
                    return true;
                }
                Ok(Err(e)) => {
                    // A bucket made with other settings than this worker's is refused at once, and
                    // for as long as this process runs: retrying cannot change it.
                    if let Some(difference) = bus::cache_bucket_conflict(&self.js, &self.bucket).await {
                        warn!(bucket = %self.bucket.name, stream = %self.bucket.stream_name(), difference, error = %e,
                            "shared cache bucket exists with other settings (theirs (ours)); running without the shared tier: delete the bucket or match its settings, then restart");
                        self.metrics.errors_total.with_label_values(&["cache", "shared_conflict"]).inc();
                        self.metrics.cache_shared_up.set(0);
                        self.state.lock().expect("cache state").conflict = true;
                        return false;
                    }
                    if left <= RETRY_PAUSE {
                        return self.failed(self.error(format!("open: {e}"), false));
                    }
                    debug!(error = %e, "shared cache bucket not ready; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(_) => return self.failed(self.error(format!("open: not ready in {START_TIMEOUT:?}"), true)),
            }
        }
    }

    /// The answer stored under `key` and its store time (ms since the epoch); `None` for a miss,
    /// a stale or incompatible entry, or a failure.
    pub async fn get(&self, key: &[u8; 32]) -> Option<(Output, u64)> {
        let store = self.store().await?;
        let value = self.call("read", CALL_TIMEOUT, store.get(hex(key))).await?;
        let ttl = self.bucket.max_age;
        let entry = match value.map(|v| decode(&v, key, ttl, now_ms() as u64)) {
            Some(Err(e)) => {
                super::rejected(&self.metrics, Tier::Shared, key, &e);
                None
            }
            Some(Ok(entry)) => entry,
            None => None,
        };
        if entry.is_none() {
            debug!(key = %hex(key), "shared cache miss");
        }
        entry
    }

    /// Stores a computed answer, unless it would not fit in one message.
    pub async fn put(&self, key: &[u8; 32], output: &Output) {
        let value = encode(key, output, now_ms() as u64);
        let max_payload = self.client.server_info().max_payload;
        if value.len() + PUT_OVERHEAD > max_payload {
            debug!(bytes = value.len(), max_payload, "answer larger than the server's max payload: cached locally only");
            return;
        }
        if let Some(store) = self.store().await {
            self.call("write", CALL_TIMEOUT, store.put(hex(key), value.into())).await;
        }
    }

    /// The open bucket, opening it first if need be; `None` while the tier is skipped.
    async fn store(&self) -> Option<kv::Store> {
        {
            let mut s = self.state.lock().expect("cache state");
            if let Some(store) = &s.store {
                return Some(store.clone());
            }
            if s.conflict || s.retry_at.is_some_and(|at| Instant::now() < at) {
                return None;
            }
            // Claims this attempt: calls meanwhile skip the tier instead of opening it too.
            s.retry_at = Some(Instant::now() + RETRY_AFTER);
        }
        let store = self.call("open", CALL_TIMEOUT, bus::setup_cache_bucket(&self.js, &self.bucket)).await?;
        self.state.lock().expect("cache state").store = Some(store.clone());
        Some(store)
    }

    /// Runs one call under `timeout`; on failure degrades the tier and returns `None`.
    async fn call<T, E: std::fmt::Display>(&self, what: &str, timeout: Duration, call: impl std::future::Future<Output = Result<T, E>>) -> Option<T> {
        let failure = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => {
                self.succeeded();
                return Some(value);
            }
            Ok(Err(e)) => self.error(format!("{what}: {e}"), false),
            Err(_) => self.error(format!("{what}: no answer in {timeout:?}"), true),
        };
        self.failed(failure);
        None
    }

    fn error(&self, message: String, timed_out: bool) -> CacheError {
        CacheError::Shared { bucket: self.bucket.name.clone(), message, timed_out }
    }

    fn succeeded(&self) {
        let mut s = self.state.lock().expect("cache state");
        s.retry_at = None;
        if std::mem::take(&mut s.degraded) {
            info!(bucket = %self.bucket.name, "shared cache answers again");
        }
        self.metrics.cache_shared_up.set(1);
    }

    /// Degrades the tier after `e`; always `false` (what [`Shared::connect`] answers then).
    fn failed(&self, e: CacheError) -> bool {
        self.metrics.errors_total.with_label_values(&["cache", e.error_type()]).inc();
        self.metrics.cache_shared_up.set(0);
        let mut s = self.state.lock().expect("cache state");
        s.store = None;
        s.retry_at = Some(Instant::now() + RETRY_AFTER);
        s.degraded = true;
        s.unwarned += 1;
        if s.last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            let failures = std::mem::take(&mut s.unwarned);
            s.last_warning = Some(Instant::now());
            warn!(error = %e, failures, retry_in = ?RETRY_AFTER, "shared cache unavailable: caching locally only");
        }
        false
    }

    /// The bucket's figures, asked of the server now (without creating the bucket).
    pub async fn stats(&self) -> Result<SharedStats, CacheError> {
        let mut stream = self.bounded(self.js.get_stream(self.bucket.stream_name())).await?;
        let info = self.bounded(stream.info()).await?;
        Ok(SharedStats::Ok {
            bucket: self.bucket.name.clone(),
            entries: info.state.messages,
            bytes: info.state.bytes,
            max_bytes: info.config.max_bytes,
            max_age_secs: info.config.max_age.as_secs(),
            replicas: info.config.num_replicas,
        })
    }

    /// Removes every entry (the bucket stays).
    pub async fn clear(&self) -> Result<(), CacheError> {
        let stream = self.bounded(self.js.get_stream(self.bucket.stream_name())).await?;
        self.bounded(stream.purge().into_future()).await.map(|_| ())
    }

    /// One operator call under [`CALL_TIMEOUT`], its failure returned (not degrading the tier).
    async fn bounded<T, E: std::fmt::Display>(&self, call: impl std::future::Future<Output = Result<T, E>>) -> Result<T, CacheError> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(result) => result.map_err(|e| self.error(e.to_string(), false)),
            Err(_) => Err(self.error(format!("no answer in {CALL_TIMEOUT:?}"), true)),
        }
    }
}

fn hex(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn encode(key: &[u8; 32], output: &Output, stored_ms: u64) -> Vec<u8> {
    let body = rmp_serde::to_vec(output).expect("encoding into a Vec");
    let mut value = Vec::with_capacity(HEADER + body.len());
    value.push(FORMAT);
    value.extend_from_slice(&stored_ms.to_be_bytes());
    value.extend_from_slice(&digest(key, &stored_ms.to_be_bytes(), &body));
    value.extend_from_slice(&body);
    value
}

/// Binds a value to the key it was stored under: blake3 of the key, the store time and the body.
/// Not a signature (anyone who can write the bucket can compute it): it refuses an entry copied
/// under another key, or damaged, and leaves forged answers to the checks against the job.
fn digest(key: &[u8; 32], stored: &[u8], body: &[u8]) -> [u8; 32] {
    *blake3::Hasher::new().update(key).update(stored).update(body).finalize().as_bytes()
}

/// The answer stored under `key` and its store time; `Ok(None)` for another format, an entry
/// older than `ttl` (a worker with a shorter TTL than the bucket's), or bytes that do not decode;
/// [`Mismatch::Key`] for an entry whose digest is not `key`'s.
fn decode(value: &[u8], key: &[u8; 32], ttl: Option<Duration>, now_ms: u64) -> Result<Option<(Output, u64)>, Mismatch> {
    if value.len() < HEADER || value[0] != FORMAT {
        return Ok(None);
    }
    let (stored, body) = (&value[1..9], &value[HEADER..]);
    if value[9..HEADER] != digest(key, stored, body) {
        return Err(Mismatch::Key);
    }
    let stored = u64::from_be_bytes(stored.try_into().expect("header"));
    if ttl.is_some_and(|ttl| u128::from(now_ms.saturating_sub(stored)) > ttl.as_millis()) {
        return Ok(None);
    }
    Ok(rmp_serde::from_slice(body).ok().map(|output| (output, stored)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_output as output;

    #[test]
    fn values_round_trip_and_reject_stale_foreign_or_copied_entries() {
        let key = [7; 32];
        let value = encode(&key, &output(2.0), 1_000);
        assert_eq!(decode(&value, &key, None, 5_000), Ok(Some((output(2.0), 1_000))));
        assert_eq!(decode(&value, &key, Some(Duration::from_secs(4)), 5_000), Ok(Some((output(2.0), 1_000))));
        assert_eq!(decode(&value, &key, Some(Duration::from_secs(3)), 5_000), Ok(None), "older than the TTL");
        let mut other = value.clone();
        other[0] = FORMAT + 1;
        assert_eq!(decode(&other, &key, None, 5_000), Ok(None), "another format");
        other[0] = 1;
        assert_eq!(decode(&other, &key, None, 5_000), Ok(None), "format 1, without a key digest");
        assert_eq!(decode(&[FORMAT], &key, None, 5_000), Ok(None), "no header");
        assert_eq!(decode(&value, &[8; 32], None, 5_000), Err(Mismatch::Key), "copied under another key");
        assert_eq!(decode(&value[..value.len() - 3], &key, None, 5_000), Err(Mismatch::Key), "truncated");
        let mut younger = value.clone();
        younger[8] ^= 1;
        assert_eq!(decode(&younger, &key, None, 5_000), Err(Mismatch::Key), "store time changed");
        assert_eq!(hex(&[0xab; 32]), "ab".repeat(32));
    }

    fn bucket(name: &str) -> CacheBucket {
        CacheBucket { name: name.into(), replicas: 1, max_age: None, max_bytes: 1 << 20 }
    }

    /// A real server: a put is read back; with the server gone, calls fail within the timeout,
    /// count, and the tier is then skipped without waiting; a new server on the same port brings
    /// it back once the retry period has passed.
    #[tokio::test]
    async fn an_outage_degrades_to_misses_and_the_tier_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let server = jetbatch_testkit::NatsServer::start(&jetbatch_testkit::NatsServer::find_binary(), dir.path()).unwrap();
        let client = async_nats::ConnectOptions::new().max_reconnects(None).connect(server.url()).await.unwrap();
        let metrics = Arc::new(Metrics::new("t"));
        let shared = Shared::new(client.clone(), bucket("T"), metrics.clone());
        assert!(shared.connect().await);
        shared.put(&[1; 32], &output(1.0)).await;
        assert_eq!(shared.get(&[1; 32]).await.map(|(o, _)| o), Some(output(1.0)));
        assert_eq!(shared.get(&[2; 32]).await, None);
        assert!(matches!(shared.stats().await.unwrap(), SharedStats::Ok { entries: 1, max_bytes: 1048576, .. }));

        // The bucket deleted under it: a miss at once, counted; then re-created after RETRY_AFTER.
        jetstream::new(client.clone()).delete_stream("KV_T").await.unwrap();
        let started = Instant::now();
        assert_eq!(shared.get(&[1; 32]).await, None);
        assert!(started.elapsed() <= CALL_TIMEOUT + Duration::from_millis(200), "{:?}", started.elapsed());
        let errors = || metrics.errors_total.with_label_values(&["cache", "shared_unavailable"]).get()
            + metrics.errors_total.with_label_values(&["cache", "shared_timeout"]).get();
        assert_eq!((errors(), metrics.cache_shared_up.get()), (1, 0));
        let skipped = Instant::now();
        shared.put(&[1; 32], &output(1.0)).await;
        assert_eq!(shared.get(&[1; 32]).await, None);
        assert!(skipped.elapsed() < Duration::from_millis(50), "skipped while degraded: {:?}", skipped.elapsed());
        assert_eq!(errors(), 1, "skipped calls are not failures");
        tokio::time::sleep(RETRY_AFTER).await;
        shared.put(&[3; 32], &output(3.0)).await;
        assert_eq!(shared.get(&[3; 32]).await.map(|(o, _)| o), Some(output(3.0)), "bucket re-created");
        assert_eq!(metrics.cache_shared_up.get(), 1);

        // The server gone: every call is bounded.
        drop(server);
        let started = Instant::now();
        assert_eq!(shared.get(&[3; 32]).await, None);
        shared.put(&[4; 32], &output(4.0)).await;
        assert!(started.elapsed() <= CALL_TIMEOUT + Duration::from_millis(200), "{:?}", started.elapsed());
        assert!(errors() >= 2);
        assert!(matches!(shared.stats().await, Err(CacheError::Shared { .. })));
    }
}
