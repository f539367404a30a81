//! The generation scheduler of one model: the one queue a `generate` job waits in, and the one
//! token budget of its running batch. Jobs join at step boundaries, oldest first, while the batch
//! has a free row and the tokens its rows may occupy (prompt + `max_new_tokens` each) stay within
//! `max_batch_tokens`; they leave the moment they finish, or go back to the head of the queue when
//! the batch ran out of device memory. A job past its deadline leaves too: unstarted, it is
//! answered without compute; running, it ends at the next step with what it generated
//! ([`GenQueue::expire`]). Plain data, unit-tested without torch (as TGI's
//! `backends/v3/src/queue.rs`); the engine thread only runs the steps.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Behind a backlog, rows join a running batch when a `1/JOIN_GROUP` of its rows is free.
const JOIN_GROUP: usize = 8;

pub(crate) struct GenQueue<I> {
    waiting: VecDeque<(u64, I, usize)>,
    /// Rows of the running batch: the tokens each may occupy, and its input (to requeue it).
    running: HashMap<u64, (usize, I)>,
    /// Deadlines of the jobs that have one and were not yet reported past it.
    deadlines: HashMap<u64, Instant>,
    /// No deadline falls before this: until then a step's check is one comparison. It may be
    /// early (a job with the earliest deadline left) — the next scan moves it on.
    earliest: Option<Instant>,
}

impl<I> Default for GenQueue<I> {
    fn default() -> Self {
        GenQueue { waiting: VecDeque::new(), running: HashMap::new(), deadlines: HashMap::new(), earliest: None }
    }
}

/// Jobs past their deadline at a step boundary (see [`GenQueue::expire`]).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Expired {
    /// They never joined (or wait to rejoin after out of memory): they left the queue.
    pub waiting: Vec<u64>,
    /// Running rows: they end at this step, marked as stopped by their deadline.
    pub running: Vec<u64>,
}

impl<I: Clone> GenQueue<I> {
    pub fn append(&mut self, job: u64, input: I, cost: usize, deadline: Option<Instant>) {
        self.waiting.push_back((job, input, cost));
        if let Some(d) = deadline {
            self.deadlines.insert(job, d);
            self.earliest = Some(self.earliest.map_or(d, |e| e.min(d)));
        }
    }

    /// The jobs whose deadline passed by `now`, each reported once: waiting jobs are taken out of
    /// the queue; running rows stay until the step that ends them reports them (`leave`).
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut expired = Expired::default();
        if self.earliest.is_none_or(|e| e > now) {
            return expired;
        }
        let mut due: Vec<u64> = self.deadlines.iter().filter(|(_, d)| **d <= now).map(|(j, _)| *j).collect();
        self.earliest = self.deadlines.values().filter(|d| **d > now).min().copied();
        // Job numbers grow with arrival: reported oldest first.
        due.sort_unstable();
        for job in due {
            self.deadlines.remove(&job);
            match self.running.contains_key(&job) {
                true => expired.running.push(job),
                false => expired.waiting.push(job),
            }
        }
        if !expired.waiting.is_empty() {
            self.waiting.retain(|(job, _, _)| !expired.waiting.contains(job));
        }
        expired
    }

    /// The jobs that join the running batch now. Oldest first and in order (a long job at the
    /// head is not overtaken for ever by short ones); at most `cap` rows in all; within
    /// `token_budget` (0: none) counting the rows already running. A job over the budget still
    /// runs, alone. `static_batches`: nothing joins a batch that runs.
    ///
    /// Behind a backlog, joiners come in groups: a running batch takes them once `cap /`
    /// [`JOIN_GROUP`] rows are free (or every waiting job fits). Each join is a prefill forward of
    /// its own; one of eight rows instead of eight of one costs the same arithmetic with a
    /// seventh of the fixed cost and bigger GEMMs, and a decode step's cost follows its rows, so
    /// the free rows meanwhile cost no throughput (lm-generate: see `loadtest/README.md`).
    pub fn admit(&mut self, cap: usize, token_budget: usize, static_batches: bool) -> Vec<(u64, I)> {
        if static_batches && !self.running.is_empty() {
            return Vec::new();
        }
        let free = cap.max(1).saturating_sub(self.running.len());
        if !self.running.is_empty() && free < (cap / JOIN_GROUP).max(1).min(self.waiting.len()) {
            return Vec::new();
        }
        let mut used: usize = self.running.values().map(|(cost, _)| cost).sum();
        let mut joining = Vec::new();
        while self.running.len() < cap.max(1) {
            let Some(&(_, _, cost)) = self.waiting.front() else { break };
            if token_budget > 0 && !self.running.is_empty() && used + cost > token_budget {
                break;
            }
            let (job, input, cost) = self.waiting.pop_front().expect("non-empty");
            used += cost;
            self.running.insert(job, (cost, input.clone()));
            joining.push((job, input));
        }
        joining
    }

    /// A row finished (or failed): its tokens are free for the next step's joiners.
    pub fn leave(&mut self, job: u64) {
        self.running.remove(&job);
        self.deadlines.remove(&job);
    }

    /// Running rows that did not fit in device memory go back to the head of the queue, oldest
    /// first, before every job that never ran: with the batch cap lowered, the oldest rejoin
    /// and the youngest wait.
    pub fn requeue(&mut self, jobs: &[u64]) {
        let mut back: Vec<(u64, I, usize)> = jobs.iter().filter_map(|j| self.running.remove(j).map(|(cost, input)| (*j, input, cost))).collect();
        // Job numbers grow with arrival.
        back.sort_by_key(|(job, _, _)| std::cmp::Reverse(*job));
        for entry in back {
            self.waiting.push_front(entry);
        }
    }

    /// The running batch is gone (its model was dropped): every row left.
    pub fn clear_running(&mut self) {
        for job in self.running.keys() {
            self.deadlines.remove(job);
        }
        self.running.clear();
    }

    /// Takes every waiting job out (its model cannot be loaded).
    pub fn drain_waiting(&mut self) -> Vec<u64> {
        let jobs: Vec<u64> = self.waiting.drain(..).map(|(job, _, _)| job).collect();
        for job in &jobs {
            self.deadlines.remove(job);
        }
        jobs
    }

    pub fn waiting_jobs(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting.iter().map(|(job, _, _)| *job)
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn running_jobs(&self) -> impl Iterator<Item = u64> + '_ {
        self.running.keys().copied()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }
}

/// A generation batch's token budget from free device memory, as TGI derives its
/// `max_batch_total_tokens` at warmup: `free` bytes after the weights loaded, less a `margin`
/// share for the allocator's fragmentation and other users, divided by what a token costs — its
/// KV cache in every layer plus its share of a probe batch's activations (`probe` bytes measured
/// running `probe_tokens` tokens). At least 1.
pub(crate) fn token_budget(free: u64, probe: u64, probe_tokens: u64, kv_per_token: u64, margin: f64) -> usize {
    let usable = free as f64 * (1.0 - margin);
    let per_token = kv_per_token as f64 + probe as f64 / probe_tokens.max(1) as f64;
    if per_token <= 0.0 {
        return 1;
    }
    (usable / per_token).floor().max(1.0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(costs: &[usize]) -> GenQueue<()> {
        let mut q = GenQueue::default();
        for (job, &cost) in costs.iter().enumerate() {
            q.append(job as u64, (), cost, None);
        }
        q
    }

    fn ids(joined: Vec<(u64, ())>) -> Vec<u64> {
        joined.into_iter().map(|(j, _)| j).collect()
    }

    #[test]
    fn joins_oldest_first_up_to_the_row_cap() {
        let mut q = queue(&[10, 10, 10, 10, 10]);
        assert_eq!(ids(q.admit(3, 0, false)), vec![0, 1, 2]);
        assert!(q.admit(3, 0, false).is_empty(), "the batch is full");
        q.leave(1);
        assert_eq!(ids(q.admit(3, 0, false)), vec![3], "a row that left makes room at the next step");
        assert_eq!(q.running(), 3);
    }

    #[test]
    fn behind_a_backlog_rows_join_in_groups() {
        let mut q = queue(&[1; 40]);
        assert_eq!(q.admit(16, 0, false).len(), 16, "an idle batch takes what fits at once");
        q.leave(0);
        assert!(q.admit(16, 0, false).is_empty(), "1 row free of 16: fewer than 16/8");
        q.leave(1);
        q.leave(2);
        assert_eq!(ids(q.admit(16, 0, false)), vec![16, 17, 18], "3 free: all that fit join");
        // A backlog of one joins as soon as a row is free.
        let mut q = queue(&[1; 17]);
        q.admit(16, 0, false);
        q.leave(0);
        assert_eq!(ids(q.admit(16, 0, false)), vec![16]);
    }

    #[test]
    fn one_token_budget_counts_the_running_rows() {
        let mut q = queue(&[40, 40, 40]);
        assert_eq!(ids(q.admit(8, 100, false)), vec![0, 1]);
        q.append(9, (), 10, None);
        assert!(q.admit(8, 100, false).is_empty(), "80 running + 40 at the head is over 100; the head is not overtaken");
        q.leave(0);
        assert_eq!(ids(q.admit(8, 100, false)), vec![2, 9]);
    }

    #[test]
    fn a_job_over_the_budget_runs_alone() {
        let mut q = queue(&[500, 10]);
        assert_eq!(ids(q.admit(8, 100, false)), vec![0]);
        assert!(q.admit(8, 100, false).is_empty());
        q.leave(0);
        assert_eq!(ids(q.admit(8, 100, false)), vec![1]);
    }

    #[test]
    fn static_batches_run_to_completion_before_the_next_joins() {
        let mut q = queue(&[1, 1, 1]);
        assert_eq!(ids(q.admit(2, 0, true)), vec![0, 1]);
        q.leave(0);
        assert!(q.admit(2, 0, true).is_empty(), "row 1 still runs");
        q.leave(1);
        assert_eq!(ids(q.admit(2, 0, true)), vec![2]);
    }

    #[test]
    fn rows_out_of_memory_go_back_to_the_head_oldest_first() {
        let mut q = queue(&[10, 20, 30, 40]);
        assert_eq!(ids(q.admit(3, 0, false)), vec![0, 1, 2]);
        q.requeue(&[2, 0, 9]);
        assert_eq!(q.running_jobs().collect::<Vec<_>>(), vec![1], "a job not running is ignored");
        assert_eq!(q.waiting_jobs().collect::<Vec<_>>(), vec![0, 2, 3]);
        // Their token costs come back with them: 20 running + 10 + 30 fits 60, 40 more does not.
        assert_eq!(ids(q.admit(8, 60, false)), vec![0, 2]);
    }

    #[test]
    fn the_token_budget_divides_free_memory_less_the_margin_by_a_tokens_cost() {
        // Llama-3.2-1B in bf16: 16 layers x 8 KV heads x 64 dims x 2 (K, V) x 2 bytes = 32 KiB a
        // token; 60 GiB free, a 2048-token probe peaking at 1 GiB (0.5 MiB a token), 10 % margin:
        // 54 GiB / 544 KiB.
        let gib = 1u64 << 30;
        assert_eq!(token_budget(60 * gib, gib, 2048, 32 << 10, 0.1), (54 * gib / (544 << 10)) as usize);
        assert_eq!(token_budget(60 * gib, gib, 2048, 32 << 10, 0.1), 104_086);
        assert_eq!(token_budget(1000, 0, 10, 100, 0.0), 10, "no activations: KV alone");
        assert_eq!(token_budget(1000, 500, 10, 50, 0.5), 5, "half the memory, 100 bytes a token");
        assert_eq!(token_budget(10, 1 << 20, 1, 1 << 20, 0.1), 1, "nothing fits: one token, so a row still runs alone");
        assert_eq!(token_budget(10, 0, 0, 0, 0.1), 1);
    }

    #[test]
    fn a_dropped_batch_frees_every_row_and_waiting_jobs_can_be_failed() {
        let mut q = queue(&[1, 1, 1]);
        q.admit(2, 0, false);
        q.clear_running();
        assert_eq!(q.waiting_jobs().collect::<Vec<_>>(), vec![2]);
        assert_eq!(q.drain_waiting(), vec![2]);
        assert!(q.is_idle());
    }

    #[test]
    fn jobs_past_their_deadline_leave_waiting_unstarted_and_running_marked_once() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + std::time::Duration::from_millis(n);
        let mut q = GenQueue::default();
        q.append(0, (), 1, Some(ms(10)));
        q.append(1, (), 1, None);
        q.append(2, (), 1, Some(ms(30)));
        q.append(3, (), 1, Some(ms(5)));
        assert_eq!(ids(q.admit(2, 0, false)), vec![0, 1]);
        assert_eq!(q.expire(ms(4)), Expired::default(), "nothing due yet");
        assert_eq!(q.expire(ms(10)), Expired { waiting: vec![3], running: vec![0] }, "a deadline at the step's time is due");
        assert_eq!(q.waiting_jobs().collect::<Vec<_>>(), vec![2], "the unstarted job left the queue");
        assert_eq!(q.running(), 2, "the running row stays until its step reports it");
        assert_eq!(q.expire(ms(20)), Expired::default(), "each job is reported once");
        q.leave(0);
        assert_eq!(ids(q.admit(2, 0, false)), vec![2]);
        assert_eq!(q.expire(ms(30)), Expired { waiting: vec![], running: vec![2] });
        // A row out of memory waits to rejoin: past its deadline it leaves as a waiting job.
        q.append(4, (), 1, Some(ms(50)));
        q.requeue(&[1]);
        assert_eq!(q.expire(ms(60)), Expired { waiting: vec![4], running: vec![] });
        q.leave(2);
        assert_eq!(q.waiting_jobs().collect::<Vec<_>>(), vec![1]);
        assert!(q.deadlines.is_empty(), "nothing left to check");
    }
}
