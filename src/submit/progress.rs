//! Progress where standard error is not a terminal (CI, a log file): plain lines instead of a
//! bar, one per tenth of the results, at most one every [`PlainProgress::EVERY`] (the last one
//! always), so a log shows the run moving without a line per result.

use std::time::{Duration, Instant};

pub struct PlainProgress {
    total: usize,
    started: Instant,
    /// The tenth last reported, and when.
    last: Option<(usize, Instant)>,
}

impl PlainProgress {
    pub const EVERY: Duration = Duration::from_secs(5);

    pub fn new(total: usize, now: Instant) -> PlainProgress {
        PlainProgress { total, started: now, last: None }
    }

    /// The line to print now that `done` results are in, if one is due.
    pub fn on_result(&mut self, done: usize, now: Instant) -> Option<String> {
        let tenth = done * 10 / self.total.max(1);
        let due = match self.last {
            None => true,
            Some((last, at)) => tenth > last && (done == self.total || now.duration_since(at) >= Self::EVERY),
        };
        if !due {
            return None;
        }
        self.last = Some((tenth, now));
        let secs = now.duration_since(self.started).as_secs_f64();
        Some(format!("{done}/{} results ({}%) after {secs:.1} s", self.total, done * 100 / self.total.max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_per_tenth_at_most_every_five_seconds_and_always_the_last() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut p = PlainProgress::new(100, t0);
        assert_eq!(p.on_result(1, t0).as_deref(), Some("1/100 results (1%) after 0.0 s"));
        assert_eq!(p.on_result(2, t0 + s), None, "the same tenth");
        assert_eq!(p.on_result(15, t0 + 2 * s), None, "a new tenth, but too soon");
        assert_eq!(p.on_result(16, t0 + 6 * s).as_deref(), Some("16/100 results (16%) after 6.0 s"));
        assert_eq!(p.on_result(17, t0 + 20 * s), None, "time passed, but still that tenth");
        assert_eq!(p.on_result(100, t0 + 21 * s).as_deref(), Some("100/100 results (100%) after 21.0 s"), "the last at once");
    }
}
