//! Where the machine's CPU time went during a run, read from `/proc` (Linux): the model's compute
//! threads, the workers' I/O runtimes, the load generator, nats-server and any other process named
//! (the Python baseline). On a machine where all of them share a few cores, this is the profile
//! that explains an end-to-end rate below the engine's own.

use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on every Linux ABI).
const TICKS_PER_S: f64 = 100.0;

/// The machine's cores, which the shares below are fractions of.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Shares as a report prints them: `group N%`, comma-separated.
pub fn describe(shares: &BTreeMap<String, f64>) -> String {
    shares.iter().map(|(group, share)| format!("{group} {:.0}%", share * 100.0)).collect::<Vec<_>>().join(", ")
}

/// CPU ticks by group at one instant.
pub struct Snapshot {
    at: Instant,
    ticks: BTreeMap<String, u64>,
}

/// Groups of this process's threads, by the names jetbatch gives them.
fn group_of(thread: &str) -> &'static str {
    if thread.starts_with("jetbatch-engine") {
        // The engine thread and the libtorch (OpenMP) threads it spawned, which inherit its name.
        "model compute"
    } else if thread.starts_with("jb-") || thread.starts_with("sled") {
        "worker I/O"
    } else {
        "load generator"
    }
}

/// user + system ticks of one `/proc/.../stat` file (fields 14 and 15, after the `(comm)`).
fn stat_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

impl Snapshot {
    /// This process's threads by group, and each of `others` (label, pid) as a whole.
    pub fn take(others: &[(&str, u32)]) -> Snapshot {
        let mut ticks = BTreeMap::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let dir = task.path();
                let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                if let Some(t) = stat_ticks(&dir.join("stat").to_string_lossy()) {
                    *ticks.entry(group_of(name.trim()).to_string()).or_default() += t;
                }
            }
        }
        for (label, pid) in others {
            if let Some(t) = stat_ticks(&format!("/proc/{pid}/stat")) {
                *ticks.entry(label.to_string()).or_default() += t;
            }
        }
        Snapshot { at: Instant::now(), ticks }
    }

    /// Each group's share of the machine's CPU (all cores) from `earlier` to this snapshot, and
    /// the idle rest. Threads that ended in between are not counted (none do during a run).
    pub fn shares_since(&self, earlier: &Snapshot) -> BTreeMap<String, f64> {
        let capacity = self.at.duration_since(earlier.at).as_secs_f64() * cores() as f64 * TICKS_PER_S;
        let mut shares: BTreeMap<String, f64> = self
            .ticks
            .iter()
            .map(|(group, &t)| (group.clone(), t.saturating_sub(earlier.ticks.get(group).copied().unwrap_or(0)) as f64 / capacity.max(1.0)))
            .collect();
        let busy: f64 = shares.values().sum();
        shares.insert("idle".into(), (1.0 - busy).max(0.0));
        shares
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_thread_shows_in_its_group() {
        let before = Snapshot::take(&[]);
        let spin = std::thread::Builder::new()
            .name("jetbatch-engine".into())
            .spawn(|| {
                let start = Instant::now();
                let mut x = 0u64;
                while start.elapsed().as_millis() < 300 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                // Keep the thread alive past the snapshot: ended threads leave /proc/self/task.
                std::thread::sleep(std::time::Duration::from_millis(300));
            })
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(400));
        let shares = Snapshot::take(&[]).shares_since(&before);
        spin.join().unwrap();
        // 300 ms of one core in ~400 ms of wall time.
        let compute = shares["model compute"] * cores() as f64;
        assert!((0.5..=1.0).contains(&compute), "model compute {compute} cores: {shares:?}");
        assert!(shares.contains_key("idle"), "{shares:?}");
    }
}
