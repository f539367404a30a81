//! Dynamic batching. [`State`] is the queue of one (model, kind): plain data, unit-tested without
//! NATS or torch. [`run`] is the task loop that feeds it from the edge, closes batches when they are
//! full or their first job has waited `max_wait`, and hands them to the engine stage through a
//! channel of capacity one — exactly one batch prefetched while the device works on the previous.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::job::JobKind;
use crate::kinds::Batching;
use crate::priority::{Aging, Priority, DEFAULT_AGING};
use crate::plan::ModelPlan;

/// Limits of one batch.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_size: usize,
    /// Padded cost (`largest job cost × jobs`); 0 means unlimited.
    pub max_tokens: usize,
}

struct Entry<T> {
    item: T,
    cost: usize,
    level: Priority,
    enqueued: Instant,
}

/// The queue of one (model, kind). Batches take jobs highest level first, oldest first within a
/// level, where a job's level is raised by the aging rule ([`Aging::effective`]) for the time it
/// has queued here.
pub struct State<T> {
    entries: VecDeque<Entry<T>>,
    max_wait: Duration,
    aging: Aging,
    /// Group by length: the oldest job goes with the queued jobs (within a window of
    /// 4 × `max_size`) closest to it in cost, so rows of a batch pad little.
    by_length: bool,
}

impl<T> State<T> {
    pub fn new(max_wait: Duration) -> Self {
        State { entries: VecDeque::new(), max_wait, aging: Aging(DEFAULT_AGING), by_length: false }
    }

    pub fn by_length(max_wait: Duration) -> Self {
        State { by_length: true, ..State::new(max_wait) }
    }

    /// Sets the aging period of priorities (see [`crate::priority`]).
    pub fn aging(self, aging: Aging) -> Self {
        State { aging, ..self }
    }

    pub fn append(&mut self, item: T, cost: usize, level: Priority, now: Instant) {
        self.entries.push_back(Entry { item, cost, level, enqueued: now });
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// When the oldest job has waited long enough to go in a batch of any size.
    pub fn deadline(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.enqueued + self.max_wait)
    }

    /// The level the job at `i` counts as at `now`.
    fn rank(&self, i: usize, now: Instant) -> Priority {
        let e = &self.entries[i];
        self.aging.effective(e.level, now.saturating_duration_since(e.enqueued))
    }

    /// The job the next batch is built around: the highest (aged) level, then the oldest.
    pub fn head(&self, now: Instant) -> Option<(Priority, Instant)> {
        (0..self.entries.len()).map(|i| (self.rank(i, now), self.entries[i].enqueued)).min()
    }

    /// Which queued jobs make the next batch (queue indices, in queue order): by level, then
    /// oldest first, or with `by_length` the head job and those of its level nearest to it in
    /// cost. At least one: a job larger than the token budget still runs, alone.
    fn select(&self, budget: &Budget, now: Instant) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by_cached_key(|&i| (self.rank(i, now), i));
        if self.by_length && !order.is_empty() {
            order.truncate(budget.max_size.saturating_mul(4));
            let c0 = self.entries[order[0]].cost;
            order.sort_by_cached_key(|&i| (self.rank(i, now), self.entries[i].cost.abs_diff(c0), i));
        }
        let mut picked = Vec::new();
        let mut largest = 0;
        for i in order.into_iter().take(budget.max_size) {
            let cost = largest.max(self.entries[i].cost);
            if budget.max_tokens > 0 && !picked.is_empty() && cost * (picked.len() + 1) > budget.max_tokens {
                break;
            }
            largest = cost;
            picked.push(i);
        }
        picked.sort_unstable();
        picked
    }

    /// The batch due now, if one is: the budget is filled, or the oldest job reached its deadline.
    fn due_batch(&self, budget: &Budget, now: Instant) -> Option<Vec<usize>> {
        let picked = self.select(budget, now);
        let full = picked.len() < self.entries.len() || picked.len() >= budget.max_size;
        let late = self.deadline().is_some_and(|d| d <= now);
        (!picked.is_empty() && (full || late)).then_some(picked)
    }

    pub fn is_due(&self, budget: &Budget, now: Instant) -> bool {
        self.due_batch(budget, now).is_some()
    }

    pub fn next_batch(&mut self, budget: &Budget, now: Instant) -> Option<Vec<T>> {
        let picked = self.due_batch(budget, now)?;
        let mut batch = Vec::with_capacity(picked.len());
        for (removed, i) in picked.into_iter().enumerate() {
            batch.push(self.entries.remove(i - removed).expect("picked index").item);
        }
        Some(batch)
    }

    pub fn drain(&mut self) -> Vec<T> {
        self.entries.drain(..).map(|e| e.item).collect()
    }
}

/// What the batcher needs to know of a queued item.
pub trait Batchable {
    fn model(&self) -> &Arc<ModelPlan>;
    fn kind(&self) -> JobKind;
    fn cost(&self) -> usize;
    fn priority(&self) -> Priority;
}

/// A closed batch: jobs of one model and kind.
pub struct Batch<T> {
    pub model: Arc<ModelPlan>,
    pub kind: JobKind,
    pub items: Vec<T>,
}

type Key = (Arc<str>, JobKind);

/// The batcher task: `jobs` in, batches out on `batches` (capacity 1), queued jobs handed to
/// `release` when shutdown is signalled so the bus stage can `nak` them at once.
pub async fn run<T: Batchable + Send + 'static>(
    mut jobs: mpsc::Receiver<T>,
    batches: mpsc::Sender<Batch<T>>,
    release: mpsc::Sender<Vec<T>>,
    aging: Aging,
    mut shutdown: broadcast::Receiver<()>,
) {
    let mut queues: HashMap<Key, (Arc<ModelPlan>, State<T>)> = HashMap::new();
    // `Continuous` kinds pass straight through (see [`Batching::Continuous`]).
    let budget = |m: &ModelPlan, kind: JobKind| match kind.batching() {
        Batching::Continuous => Budget { max_size: m.config.max_batch_size, max_tokens: 0 },
        _ => Budget { max_size: m.config.max_batch_size, max_tokens: m.config.max_batch_tokens },
    };
    loop {
        // The queue to serve next: among those with a due batch, the one whose head has the
        // highest level, then is oldest.
        let now = Instant::now();
        let next = queues
            .iter()
            .filter(|((_, kind), (m, s))| s.is_due(&budget(m, *kind), now))
            .min_by_key(|(_, (_, s))| s.head(now))
            .map(|(k, _)| k.clone());
        let wake = queues.values().filter_map(|(_, s)| s.deadline()).min();
        tokio::select! {
            biased;
            _ = shutdown.recv() => break,
            permit = batches.reserve(), if next.is_some() => {
                let Ok(permit) = permit else { break };
                let key = next.expect("guarded");
                let (model, state) = queues.get_mut(&key).expect("present");
                if let Some(items) = state.next_batch(&budget(model, key.1), Instant::now()) {
                    permit.send(Batch { model: model.clone(), kind: key.1, items });
                }
            }
            job = jobs.recv() => {
                let Some(job) = job else { break };
                let key = (job.model().name.clone(), job.kind());
                let scoring = key.1.batching() == Batching::ByLength;
                let generate = key.1.batching() == Batching::Continuous;
                let (_, state) = queues.entry(key).or_insert_with(|| {
                    let wait = if generate { Duration::ZERO } else { Duration::from_millis(job.model().config.max_wait_ms) };
                    (job.model().clone(), if scoring { State::by_length(wait) } else { State::new(wait) }.aging(aging))
                });
                let (cost, level) = (job.cost(), job.priority());
                state.append(job, cost, level, Instant::now());
            }
            _ = sleep_until_opt(wake), if next.is_none() => {}
        }
    }
    // Jobs still queued, or arriving while we stop, were never started: release them.
    jobs.close();
    let mut rest: Vec<T> = queues.values_mut().flat_map(|(_, s)| s.drain()).collect();
    while let Ok(job) = jobs.try_recv() {
        rest.push(job);
    }
    if !rest.is_empty() {
        let _ = release.send(rest).await;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Priority::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn closes_at_max_size_before_the_deadline() {
        let t0 = Instant::now();
        let mut s = State::new(10 * MS);
        let budget = Budget { max_size: 3, max_tokens: 0 };
        for i in 0..4 {
            s.append(i, 1, Normal, t0);
        }
        assert_eq!(s.next_batch(&budget, t0), Some(vec![0, 1, 2]));
        assert_eq!(s.next_batch(&budget, t0), None, "one job waits for company");
        assert_eq!(s.deadline(), Some(t0 + 10 * MS));
        assert_eq!(s.next_batch(&budget, t0 + 10 * MS), Some(vec![3]));
        assert!(s.is_empty());
    }

    #[test]
    fn token_budget_counts_padding() {
        let t0 = Instant::now();
        let mut s = State::new(MS);
        let budget = Budget { max_size: 10, max_tokens: 100 };
        // Padded cost: 10, then 2 × 40 = 80, then 3 × 40 = 120 > 100.
        for cost in [10, 40, 5, 5] {
            s.append(cost, cost, Normal, t0);
        }
        assert_eq!(s.next_batch(&budget, t0), Some(vec![10, 40]), "full by tokens, not by time");
        assert_eq!(s.next_batch(&budget, t0), None);
        assert_eq!(s.next_batch(&budget, t0 + MS), Some(vec![5, 5]));
    }

    #[test]
    fn by_length_groups_the_oldest_job_with_its_nearest_lengths() {
        let t0 = Instant::now();
        let mut s = State::by_length(MS);
        for cost in [100, 5, 98, 7, 103, 6] {
            s.append(cost, cost, Normal, t0);
        }
        // Padded cost: 100, 200, 309, then 412 with a short one — over the budget.
        let budget = Budget { max_size: 4, max_tokens: 320 };
        assert_eq!(s.next_batch(&budget, t0), Some(vec![100, 98, 103]), "the oldest and its neighbours in length");
        assert_eq!(s.next_batch(&budget, t0), None, "three short ones wait: not full, not late");
        assert_eq!(s.next_batch(&budget, t0 + MS), Some(vec![5, 7, 6]));
        // FIFO without by_length.
        let mut f = State::new(MS);
        for cost in [100, 5, 98] {
            f.append(cost, cost, Normal, t0);
        }
        assert_eq!(f.next_batch(&Budget { max_size: 2, max_tokens: 0 }, t0), Some(vec![100, 5]));
    }

    #[test]
    fn a_job_over_the_token_budget_runs_alone() {
        let t0 = Instant::now();
        let mut s = State::new(MS);
        s.append("big", 500, Normal, t0);
        s.append("small", 1, Normal, t0);
        let budget = Budget { max_size: 8, max_tokens: 100 };
        assert_eq!(s.next_batch(&budget, t0), Some(vec!["big"]));
        assert_eq!(s.drain(), vec!["small"]);
    }

    #[test]
    fn batches_take_the_highest_level_first_then_the_oldest() {
        let t0 = Instant::now();
        let mut s = State::new(MS);
        for (item, level) in [("low-1", Low), ("normal-1", Normal), ("low-2", Low), ("high-1", High), ("normal-2", Normal), ("high-2", High)] {
            s.append(item, 1, level, t0);
        }
        let budget = Budget { max_size: 3, max_tokens: 0 };
        assert_eq!(s.head(t0), Some((High, t0)));
        // A batch keeps queue order; its members are the two high jobs and the oldest normal one.
        assert_eq!(s.next_batch(&budget, t0), Some(vec!["normal-1", "high-1", "high-2"]));
        assert_eq!(s.next_batch(&budget, t0 + MS), Some(vec!["low-1", "low-2", "normal-2"]));
        // By length, the head's level comes before nearness in cost.
        let mut s = State::by_length(MS);
        s.append("low-10", 10, Low, t0);
        s.append("high-100", 100, High, t0);
        s.append("high-5", 5, High, t0);
        s.append("low-99", 99, Low, t0);
        assert_eq!(s.next_batch(&Budget { max_size: 2, max_tokens: 0 }, t0), Some(vec!["high-100", "high-5"]));
    }

    #[test]
    fn a_waiting_job_counts_one_level_higher_per_aging_period() {
        let t0 = Instant::now();
        let mut s = State::new(MS).aging(Aging(Duration::from_secs(10)));
        let budget = Budget { max_size: 1, max_tokens: 0 };
        s.append("low", 1, Low, t0);
        s.append("normal", 1, Normal, t0 + Duration::from_secs(8));
        // At 15 s the low job counts as normal and is older: it goes before the normal job.
        s.append("high", 1, High, t0 + Duration::from_secs(15));
        assert_eq!(s.next_batch(&budget, t0 + Duration::from_secs(15)), Some(vec!["high"]));
        assert_eq!(s.head(t0 + Duration::from_secs(15)), Some((Normal, t0)));
        assert_eq!(s.next_batch(&budget, t0 + Duration::from_secs(15)), Some(vec!["low"]));
        // A low job that waited two periods counts as high and goes before a newer high job.
        let mut s = State::new(MS).aging(Aging(Duration::from_secs(10)));
        s.append("low", 1, Low, t0);
        s.append("high", 1, High, t0 + Duration::from_secs(19));
        assert_eq!(s.next_batch(&budget, t0 + Duration::from_secs(19)), Some(vec!["high"]), "at 19 s low counts as normal");
        s.append("high-2", 1, High, t0 + Duration::from_secs(19));
        assert_eq!(s.next_batch(&budget, t0 + Duration::from_secs(20)), Some(vec!["low"]), "at 20 s low counts as high, and is older");
    }
}
