//! Job priorities: three levels, the subjects and consumers that carry them, and the aging rule
//! that keeps low jobs from starving.
//!
//! A job's level is the subject it is published on: `<prefix>.jobs.<model>` is `normal` (so
//! producers that know nothing of levels keep working), `<prefix>.jobs.<model>.high` and
//! `<prefix>.jobs.<model>.low` are the others. A WorkQueue stream forbids consumers with
//! overlapping filters, so each level has its own durable consumer, shared by the pool:
//! `<consumer>` (normal), `<consumer>-high`, `<consumer>-low`.
//!
//! A worker serves the highest level first at both places where jobs wait:
//! - in the stream, the pull loop asks the levels for jobs in [`Sweep::order`]: highest first,
//!   except that a level not asked for `aging` goes first. Every level is asked at least once per
//!   `aging` while the worker has free room, so a low job reaches a worker however many high jobs
//!   keep coming.
//! - in the worker, the batcher picks jobs by [`Aging::effective`] level, then oldest first: a job
//!   counts one level higher for each full `aging` it has waited there, so a low job waiting in a
//!   worker counts as high after `2 × aging` and then, being older, goes before every high job
//!   that came after it.

use std::time::{Duration, Instant};

/// A job's level. The order is the order of service: `High` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// Every level, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// What follows `<prefix>.jobs.<model>` in the subject of a job of this level.
    pub fn subject_suffix(self) -> &'static str {
        match self {
            Priority::High => ".high",
            Priority::Normal => "",
            Priority::Low => ".low",
        }
    }

    /// Splits what follows `<prefix>.jobs.` into the model token and the level. A suffix that is
    /// not a level stays part of the model token, so the job is refused for not naming its model.
    pub fn split_subject(rest: &str) -> (&str, Priority) {
        for level in [Priority::High, Priority::Low] {
            if let Some(model) = rest.strip_suffix(level.subject_suffix()) {
                return (model, level);
            }
        }
        (rest, Priority::Normal)
    }

    /// The durable consumer of this level, given the pool's consumer name.
    pub fn consumer(self, base: &str) -> String {
        match self {
            Priority::Normal => base.to_string(),
            other => format!("{base}-{}", other.as_str()),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The default of `--priority-aging-secs`.
pub const DEFAULT_AGING: Duration = Duration::from_secs(30);

/// The aging rule inside a worker: a job counts one level higher for each full period it waited.
#[derive(Debug, Clone, Copy)]
pub struct Aging(pub Duration);

impl Aging {
    /// The level a job of level `level` that has waited `waited` counts as.
    pub fn effective(self, level: Priority, waited: Duration) -> Priority {
        let steps = if self.0.is_zero() { usize::MAX } else { (waited.as_nanos() / self.0.as_nanos()).min(2) as usize };
        Priority::ALL[level.index().saturating_sub(steps)]
    }
}

/// The pull loop's order of asking the levels for jobs, with the time each was last asked.
#[derive(Debug, Clone)]
pub struct Sweep {
    aging: Duration,
    asked: [Instant; 3],
}

impl Sweep {
    pub fn new(aging: Duration, now: Instant) -> Sweep {
        Sweep { aging, asked: [now; 3] }
    }

    /// The levels in the order to ask them now: those not asked for `aging` first, longest
    /// unasked first; then the rest, highest first.
    pub fn order(&self, now: Instant) -> [Priority; 3] {
        let mut order = Priority::ALL;
        order.sort_by_key(|p| {
            let since = self.asked[p.index()];
            let overdue = now.saturating_duration_since(since) >= self.aging;
            (!overdue, if overdue { Some(since) } else { None }, *p)
        });
        order
    }

    /// `level` was asked for jobs at `now` (whatever it answered).
    pub fn asked(&mut self, level: Priority, now: Instant) {
        self.asked[level.index()] = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Priority::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn subjects_name_the_level_and_normal_is_the_plain_subject() {
        assert_eq!(Priority::split_subject("mlp"), ("mlp", Normal));
        assert_eq!(Priority::split_subject("mlp.high"), ("mlp", High));
        assert_eq!(Priority::split_subject("mlp.low"), ("mlp", Low));
        // Not a level: the whole rest is the model token, which no valid model name matches.
        assert_eq!(Priority::split_subject("x.mlp"), ("x.mlp", Normal));
        assert_eq!(Priority::split_subject("mlp.urgent"), ("mlp.urgent", Normal));
        for p in Priority::ALL {
            assert_eq!(Priority::split_subject(&format!("m{}", p.subject_suffix())), ("m", p));
            assert_eq!(Priority::parse(p.as_str()), Some(p));
        }
        assert_eq!(Priority::parse("HIGH"), None);
        assert_eq!([High.consumer("w"), Normal.consumer("w"), Low.consumer("w")], ["w-high", "w", "w-low"]);
    }

    #[test]
    fn a_job_counts_one_level_higher_per_aging_period_waited() {
        let aging = Aging(30 * S);
        assert_eq!(aging.effective(Low, 29 * S), Low);
        assert_eq!(aging.effective(Low, 30 * S), Normal);
        assert_eq!(aging.effective(Low, 60 * S), High);
        assert_eq!(aging.effective(Low, 3600 * S), High, "never above high");
        assert_eq!(aging.effective(Normal, 30 * S), High);
        assert_eq!(aging.effective(High, Duration::ZERO), High);
        assert_eq!(Aging(Duration::ZERO).effective(Low, Duration::ZERO), High, "no aging period: every job is equal");
    }

    #[test]
    fn the_sweep_asks_highest_first_and_a_level_left_unasked_for_the_aging_period_first() {
        let t0 = Instant::now();
        let mut sweep = Sweep::new(30 * S, t0);
        assert_eq!(sweep.order(t0), [High, Normal, Low]);
        // High keeps every permit busy: only high is asked for a while.
        for t in 1..30 {
            sweep.asked(High, t0 + t * S);
            assert_eq!(sweep.order(t0 + t * S), [High, Normal, Low]);
        }
        // Normal and low have not been asked for 30 s: they go first, longest unasked first.
        sweep.asked(Normal, t0 + 10 * S);
        assert_eq!(sweep.order(t0 + 30 * S), [Low, High, Normal]);
        assert_eq!(sweep.order(t0 + 40 * S), [Low, Normal, High]);
        sweep.asked(Low, t0 + 40 * S);
        assert_eq!(sweep.order(t0 + 40 * S), [Normal, High, Low]);
    }

    #[test]
    fn under_a_steady_stream_of_high_jobs_every_level_is_asked_once_per_aging_period() {
        // One free permit a second, high always has a job: the loop asks the first level of the
        // order, which takes the permit. Each level must be asked within aging + 1 s.
        let t0 = Instant::now();
        let mut sweep = Sweep::new(5 * S, t0);
        let mut last = [t0; 3];
        for t in 1..100 {
            let now = t0 + t * S;
            let first = sweep.order(now)[0];
            sweep.asked(first, now);
            last[first.index()] = now;
            for p in Priority::ALL {
                assert!(now - last[p.index()] <= 6 * S, "{p} not asked since {:?} at {t} s", last[p.index()] - t0);
            }
        }
    }
}
