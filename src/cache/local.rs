//! The local tier: sled at `--cache-dir`, keyed by [`crate::job::ValidJob::cache_key`]. Values
//! carry their store time (for the TTL) and an insertion sequence; a second tree orders keys by
//! that sequence so the size cap evicts oldest-first.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::CacheError;
use crate::job::Output;
use crate::metrics::now_ms;

pub struct Local {
    db: sled::Db,
    results: sled::Tree,
    order: sled::Tree,
    ttl: Option<Duration>,
    max_bytes: u64,
    bytes: AtomicU64,
}

/// Header of a stored value: store time (ms since the epoch) and insertion sequence, big-endian.
const HEADER: usize = 16;

#[derive(Debug, PartialEq, Eq, serde::Serialize)]
pub struct LocalStats {
    pub entries: usize,
    pub bytes: u64,
    pub size_on_disk: u64,
}

impl Local {
    /// Opens (or creates) the cache. `max_bytes` 0 means no cap.
    pub fn open(dir: &Path, ttl: Option<Duration>, max_bytes: u64) -> Result<Local, CacheError> {
        // sled releases its folder lock from a background thread after the last handle is
        // dropped: a reopen right after a close (a restart in the same process) waits for it.
        Local::open_waiting(dir, ttl, max_bytes, Duration::from_secs(5))
    }

    /// Opens a cache that must exist already (`jetbatch cache stats|clear`): a mistyped folder is
    /// an error, not a new empty cache; a folder a worker holds is [`CacheError::Locked`] at once.
    pub fn open_existing(dir: &Path, ttl: Option<Duration>, max_bytes: u64) -> Result<Local, CacheError> {
        if !dir.is_dir() {
            return Err(CacheError::NotFound(dir.to_path_buf()));
        }
        // sled writes both files when it creates a folder; a folder without them is something else.
        if !dir.join("conf").is_file() || !dir.join("db").is_file() {
            return Err(CacheError::NotACache(dir.to_path_buf()));
        }
        Local::open_waiting(dir, ttl, max_bytes, Duration::ZERO)
    }

    fn open_waiting(dir: &Path, ttl: Option<Duration>, max_bytes: u64, lock_wait: Duration) -> Result<Local, CacheError> {
        let deadline = std::time::Instant::now() + lock_wait;
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    return Err(CacheError::Locked(dir.to_path_buf()));
                }
                other => break other?,
            }
        };
        let results = db.open_tree("results")?;
        let order = db.open_tree("order")?;
        let bytes = results.iter().values().map(|v| v.map(|v| v.len() as u64)).sum::<Result<u64, _>>()?;
        Ok(Local { db, results, order, ttl, max_bytes, bytes: AtomicU64::new(bytes) })
    }

    pub fn get(&self, key: &[u8; 32]) -> Result<Option<Output>, CacheError> {
        let Some(value) = self.results.get(key)? else { return Ok(None) };
        let expired = self.ttl.is_some_and(|ttl| {
            let stored = u64::from_be_bytes(value[..8].try_into().expect("header")) as u128;
            now_ms().saturating_sub(stored) > ttl.as_millis()
        });
        match rmp_serde::from_slice::<Output>(&value[HEADER..]) {
            Ok(output) if !expired => Ok(Some(output)),
            // Expired or written by an incompatible version: drop it and recompute.
            _ => {
                self.remove(key, &value)?;
                Ok(None)
            }
        }
    }

    pub fn put(&self, key: &[u8; 32], output: &Output) -> Result<(), CacheError> {
        self.put_at(key, output, now_ms() as u64)
    }

    /// Stores `output` as if stored at `stored_ms` (a copy of a shared-tier entry keeps its age,
    /// so the TTL counts from the first computation).
    pub fn put_at(&self, key: &[u8; 32], output: &Output, stored_ms: u64) -> Result<(), CacheError> {
        let seq = self.db.generate_id()?;
        let mut value = Vec::with_capacity(HEADER + 256);
        value.extend_from_slice(&stored_ms.to_be_bytes());
        value.extend_from_slice(&seq.to_be_bytes());
        rmp_serde::encode::write(&mut value, output).expect("encoding into a Vec");
        let len = value.len() as u64;
        if let Some(old) = self.results.insert(key, value)? {
            self.order.remove(&old[8..HEADER])?;
            self.bytes.fetch_sub(old.len() as u64, Ordering::Relaxed);
        }
        self.order.insert(seq.to_be_bytes(), key)?;
        let total = self.bytes.fetch_add(len, Ordering::Relaxed) + len;
        if self.max_bytes > 0 && total > self.max_bytes {
            self.evict()?;
        }
        Ok(())
    }

    /// Removes oldest entries until the cache is at 90% of its cap (so eviction is not per insert).
    fn evict(&self) -> Result<(), CacheError> {
        let target = self.max_bytes / 10 * 9;
        while self.bytes.load(Ordering::Relaxed) > target {
            let Some((seq, key)) = self.order.pop_min()? else { break };
            if let Some(old) = self.results.remove(&key)? {
                debug_assert_eq!(&old[8..HEADER], &seq[..], "put removes the order record it replaces");
                self.bytes.fetch_sub(old.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn remove(&self, key: &[u8; 32], value: &[u8]) -> Result<(), CacheError> {
        if self.results.remove(key)?.is_some() {
            self.order.remove(&value[8..HEADER])?;
            self.bytes.fetch_sub(value.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn stats(&self) -> Result<LocalStats, CacheError> {
        Ok(LocalStats { entries: self.results.len(), bytes: self.bytes.load(Ordering::Relaxed), size_on_disk: self.db.size_on_disk()? })
    }

    pub fn clear(&self) -> Result<(), CacheError> {
        self.results.clear()?;
        self.order.clear()?;
        self.bytes.store(0, Ordering::Relaxed);
        self.flush()
    }

    pub fn flush(&self) -> Result<(), CacheError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_output as output;

    #[test]
    fn survives_reopen_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Local::open(dir.path(), None, 0).unwrap();
            c.put(&[1; 32], &output(1.0)).unwrap();
            c.flush().unwrap();
        }
        let c = Local::open(dir.path(), None, 0).unwrap();
        assert_eq!(c.get(&[1; 32]).unwrap(), Some(output(1.0)));
        assert_eq!(c.get(&[2; 32]).unwrap(), None);
        assert_eq!(c.stats().unwrap().entries, 1);
        c.clear().unwrap();
        assert_eq!((c.get(&[1; 32]).unwrap(), c.stats().unwrap().bytes), (None, 0));
    }

    #[test]
    fn open_existing_refuses_a_mistyped_or_foreign_folder_and_a_locked_one() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(Local::open_existing(&missing, None, 0), Err(CacheError::NotFound(p)) if p == missing));
        assert!(!missing.exists(), "not created");
        assert!(matches!(Local::open_existing(dir.path(), None, 0), Err(CacheError::NotACache(_))));
        let held = Local::open(&dir.path().join("c"), None, 0).unwrap();
        held.put(&[1; 32], &output(1.0)).unwrap();
        held.flush().unwrap();
        let started = std::time::Instant::now();
        let locked = Local::open_existing(&dir.path().join("c"), None, 0).err().expect("locked");
        assert_eq!((locked.error_type(), started.elapsed() < Duration::from_secs(1)), ("locked", true), "{locked}");
        drop(held);
        let c = Local::open(&dir.path().join("c"), None, 0).unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(Local::open_existing(&dir.path().join("c"), None, 0).unwrap().get(&[1; 32]).unwrap(), Some(output(1.0)));
    }

    #[test]
    fn a_copy_keeps_its_store_time_for_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let c = Local::open(dir.path(), Some(Duration::from_secs(60)), 0).unwrap();
        c.put_at(&[1; 32], &output(1.0), now_ms() as u64 - 61_000).unwrap();
        c.put_at(&[2; 32], &output(2.0), now_ms() as u64 - 59_000).unwrap();
        assert_eq!((c.get(&[1; 32]).unwrap(), c.get(&[2; 32]).unwrap()), (None, Some(output(2.0))));
    }

    #[test]
    fn ttl_expires_entries() {
        let dir = tempfile::tempdir().unwrap();
        let c = Local::open(dir.path(), Some(Duration::ZERO), 0).unwrap();
        c.put(&[1; 32], &output(1.0)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.get(&[1; 32]).unwrap(), None);
        assert_eq!(c.stats().unwrap().entries, 0);
    }

    #[test]
    fn size_cap_evicts_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = Local::open(dir.path(), None, 1000).unwrap();
        for i in 0..20u8 {
            c.put(&[i; 32], &output(i as f32)).unwrap();
        }
        let s = c.stats().unwrap();
        assert!(s.bytes <= 1000 && s.entries < 20 && s.entries > 0, "{s:?}");
        assert_eq!(c.get(&[0; 32]).unwrap(), None, "oldest evicted");
        assert_eq!(c.get(&[19; 32]).unwrap(), Some(output(19.0)), "newest kept");
        // Overwriting a key does not double-count it.
        let before = c.stats().unwrap().bytes;
        c.put(&[19; 32], &output(19.0)).unwrap();
        assert_eq!(c.stats().unwrap().bytes, before);
    }
}
