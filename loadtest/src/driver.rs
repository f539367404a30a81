//! The load generator: publishes jobs open-loop (Poisson arrivals at a target rate) or
//! closed-loop (a fixed number outstanding), and records each job's latency from the moment it
//! was due to the moment its result arrived.
//!
//! Open-loop latency starts at the job's scheduled time, not when it was actually published, so a
//! generator that falls behind shows up as latency instead of hiding it (no coordinated omission).

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use jetbatch::config::Topology;
use jetbatch::job::Encoding;
use serde::{Deserialize, Serialize};

use crate::workload::{Generator, Rng};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum Mode {
    /// Poisson arrivals at `rate` jobs/s, whatever the worker does.
    Open { rate: f64 },
    /// `concurrency` jobs outstanding: a new one as each result arrives.
    Closed { concurrency: usize },
    /// `jobs` published before any worker started, then drained ([`publish_backlog`]).
    Backlog { jobs: u64 },
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    /// Stop sending after this long…
    pub duration: Option<Duration>,
    /// …or after this many jobs, whichever comes first.
    pub jobs: Option<u64>,
    /// After the last job is sent, how long to wait for missing results before counting them lost.
    pub drain_timeout: Duration,
    /// Id prefix; ids must be new to the stream's duplicate window, so each run has its own.
    pub run_id: String,
    pub progress: bool,
}

/// Everything measured in one run.
pub struct Recording {
    pub latency_us: Histogram<u64>,
    pub sent: u64,
    pub received: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub cached: u64,
    /// Computed (not cached) results by the batch they ran in.
    pub batch_sizes: BTreeMap<usize, u64>,
    /// Generated tokens (`generate` results).
    pub tokens: u64,
    /// Summed `timing.queued_ms` and `timing.compute_ms` of computed results: where a job's time
    /// inside the worker went.
    pub queued_ms: f64,
    pub compute_ms: f64,
    pub duplicates: u64,
    /// Results per worker name.
    pub workers: BTreeMap<String, u64>,
    /// Share of the machine's CPU by group during the run (see `cpu`); empty where not taken.
    pub cpu: BTreeMap<String, f64>,
    /// Results per second since the first job was sent.
    pub completed_per_s: Vec<u64>,
    pub sent_per_s: Vec<u64>,
    /// First job sent to last result received.
    pub wall: Duration,
    /// First job sent to last job sent.
    pub send_wall: Duration,
}

impl Recording {
    fn new() -> Recording {
        Recording {
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            sent: 0,
            received: 0,
            ok: 0,
            errors: BTreeMap::new(),
            cached: 0,
            batch_sizes: BTreeMap::new(),
            tokens: 0,
            queued_ms: 0.0,
            compute_ms: 0.0,
            duplicates: 0,
            workers: BTreeMap::new(),
            cpu: BTreeMap::new(),
            completed_per_s: Vec::new(),
            sent_per_s: Vec::new(),
            wall: Duration::ZERO,
            send_wall: Duration::ZERO,
        }
    }

    pub fn lost(&self) -> u64 {
        self.sent - self.received
    }

    /// CPU time the `groups` of `cpu` spent per result, in µs.
    pub fn cpu_us_per_job(&self, groups: &[&str]) -> f64 {
        let share: f64 = groups.iter().filter_map(|g| self.cpu.get(*g)).sum();
        share * crate::cpu::cores() as f64 * self.wall.as_secs_f64() * 1e6 / self.received.max(1) as f64
    }

    /// Results per second over the whole run.
    pub fn throughput(&self) -> f64 {
        self.received as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn bump(series: &mut Vec<u64>, second: usize) {
        if series.len() <= second {
            series.resize(second + 1, 0);
        }
        series[second] += 1;
    }
}

/// The fields of a result the loadtest reads; everything else is skipped unparsed.
#[derive(Deserialize)]
struct ResultView {
    id: String,
    status: String,
    #[serde(default)]
    cached: bool,
    #[serde(default)]
    worker: String,
    #[serde(default)]
    timing: TimingView,
    #[serde(default)]
    error: Option<ErrorView>,
    #[serde(default)]
    output: Option<OutputView>,
}

#[derive(Deserialize, Default)]
struct TimingView {
    #[serde(default)]
    batch_size: usize,
    #[serde(default)]
    queued_ms: f64,
    #[serde(default)]
    compute_ms: f64,
}

#[derive(Deserialize)]
struct ErrorView {
    code: String,
}

#[derive(Deserialize)]
struct OutputView {
    #[serde(default)]
    tokens: Option<TokensView>,
}

/// `generate` answers with the generated token ids; the scoring kinds with a token count.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokensView {
    Generated(Vec<serde::de::IgnoredAny>),
    Counted(#[allow(dead_code)] serde::de::IgnoredAny),
}

/// Runs `plan` against the workers behind `topology`'s streams and returns what it measured.
pub async fn drive(client: &async_nats::Client, topology: &Topology, generator: &mut Generator, plan: &Plan) -> anyhow::Result<Recording> {
    if let Mode::Backlog { .. } = plan.mode {
        anyhow::bail!("a backlog is published with `publish_backlog` and drained, not driven");
    }
    let js = jetstream::new(client.clone());
    let mut results = client.subscribe(format!("{}.results.{}.>", topology.prefix, plan.run_id)).await?;
    // Make sure the subscription is registered before the first job can be answered.
    client.flush().await?;
    let mut rec = Recording::new();
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut acks = FuturesUnordered::new();
    let mut rng = Rng::new(0x5eed ^ plan.run_id.len() as u64);
    let bar = progress_bar(plan);
    let start = Instant::now();
    let mut next_due = start;
    let mut last_result = start;
    let mut sending = true;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let content_type = match generator.encoding() {
        Encoding::MsgPack => "application/msgpack",
        Encoding::Json => "application/json",
    };
    loop {
        if sending {
            let over = plan.duration.is_some_and(|d| start.elapsed() >= d) || plan.jobs.is_some_and(|n| rec.sent >= n);
            if over {
                sending = false;
                rec.send_wall = start.elapsed();
            }
        }
        if !sending && due.is_empty() {
            break;
        }
        // Jobs to publish now, each with the time it was due: the due arrivals (open) or enough to
        // refill the window (closed).
        let mut to_send: Vec<Instant> = Vec::new();
        if sending {
            let left = plan.jobs.map_or(u64::MAX, |n| n - rec.sent) as usize;
            match plan.mode {
                Mode::Open { rate } => {
                    let now = Instant::now();
                    while next_due <= now && acks.len() + to_send.len() < MAX_UNACKED && to_send.len() < left {
                        to_send.push(next_due);
                        next_due += Duration::from_secs_f64(rng.exponential(1.0 / rate));
                    }
                }
                Mode::Closed { concurrency } => {
                    let room = concurrency.saturating_sub(due.len()).min(left);
                    to_send.resize(room, Instant::now());
                }
                Mode::Backlog { .. } => unreachable!("refused above"),
            }
        }
        for due_at in to_send {
            let id = format!("{}.{}", plan.run_id, rec.sent);
            let job = generator.next(id.clone());
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            headers.insert("Content-Type", content_type);
            let ack = js.publish_with_headers(topology.jobs_subject(&job.model), headers, job.body).await?;
            acks.push(ack.into_future());
            due.insert(id, due_at);
            Recording::bump(&mut rec.sent_per_s, start.elapsed().as_secs() as usize);
            rec.sent += 1;
        }
        let wait_until = match plan.mode {
            Mode::Open { .. } if sending => tokio::time::Instant::from_std(next_due),
            _ => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            biased;
            msg = results.next() => {
                let msg = msg.ok_or_else(|| anyhow::anyhow!("results subscription closed"))?;
                let now = Instant::now();
                record(&mut rec, &mut due, &msg.payload, now, start);
                // Take whatever else is already here before going back to sending.
                while let Some(Some(msg)) = futures::FutureExt::now_or_never(results.next()) {
                    record(&mut rec, &mut due, &msg.payload, now, start);
                }
                last_result = now;
                bar.set_position(rec.received);
            }
            Some(ack) = acks.next(), if !acks.is_empty() => {
                ack.map_err(|e| anyhow::anyhow!("publishing a job: {e}"))?;
            }
            _ = tokio::time::sleep_until(wait_until), if sending => {}
            _ = tick.tick() => {
                bar.set_message(format!("sent {} · {} outstanding · {:.0} results/s", rec.sent, due.len(), rec.received as f64 / start.elapsed().as_secs_f64()));
                if !sending && last_result.max(start + rec.send_wall).elapsed() > plan.drain_timeout {
                    break;
                }
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack.map_err(|e| anyhow::anyhow!("publishing a job: {e}"))?;
    }
    rec.wall = last_result.duration_since(start);
    if rec.send_wall.is_zero() {
        rec.send_wall = rec.wall;
    }
    bar.finish_and_clear();
    Ok(rec)
}

/// A backlog of jobs published with nobody consuming them yet (see [`publish_backlog`]).
pub struct Backlog {
    results: async_nats::Subscriber,
    due: HashMap<String, Instant>,
    rec: Recording,
}

/// Publishes `jobs` jobs from `generator` under `run_id` and waits until the server has stored
/// them all: a queue for workers started afterwards to drain ([`Backlog::drain`]).
pub async fn publish_backlog(client: &async_nats::Client, topology: &Topology, generator: &mut Generator, jobs: u64, run_id: &str) -> anyhow::Result<Backlog> {
    let js = jetstream::new(client.clone());
    let results = client.subscribe(format!("{}.results.{run_id}.>", topology.prefix)).await?;
    client.flush().await?;
    let mut rec = Recording::new();
    let mut due = HashMap::new();
    let mut acks = FuturesUnordered::new();
    let content_type = match generator.encoding() {
        Encoding::MsgPack => "application/msgpack",
        Encoding::Json => "application/json",
    };
    let now = Instant::now();
    for n in 0..jobs {
        let id = format!("{run_id}.{n}");
        let job = generator.next(id.clone());
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert("Content-Type", content_type);
        acks.push(js.publish_with_headers(topology.jobs_subject(&job.model), headers, job.body).await?.into_future());
        if acks.len() >= MAX_UNACKED {
            acks.next().await.expect("not empty").map_err(|e| anyhow::anyhow!("publishing a job: {e}"))?;
        }
        due.insert(id, now);
        rec.sent += 1;
    }
    while let Some(ack) = acks.next().await {
        ack.map_err(|e| anyhow::anyhow!("publishing a job: {e}"))?;
    }
    Ok(Backlog { results, due, rec })
}

impl Backlog {
    /// Records the results as workers (started since the backlog was published) drain it, until
    /// every job is answered or none was for `drain_timeout` (the wait for the first result is
    /// `start_timeout`: a worker's start-up). Latency counts from this call; `wall` runs from
    /// the first result to the last, so the workers' start-up (model loading, a Python
    /// interpreter's imports) is not counted: throughput is the rate of the drain itself, and the
    /// CPU shares (this process's threads and `others`) are taken over the same span.
    pub async fn drain(mut self, start_timeout: Duration, drain_timeout: Duration, others: &[(&str, u32)]) -> anyhow::Result<Recording> {
        let start = Instant::now();
        for due in self.due.values_mut() {
            *due = start;
        }
        let (mut first, mut last, mut cpu) = (None, start, None);
        while !self.due.is_empty() {
            let wait = if first.is_some() { drain_timeout } else { start_timeout };
            let Ok(msg) = tokio::time::timeout(wait, self.results.next()).await else { break };
            let msg = msg.ok_or_else(|| anyhow::anyhow!("results subscription closed"))?;
            last = Instant::now();
            if first.is_none() {
                (first, cpu) = (Some(last), Some(crate::cpu::Snapshot::take(others)));
            }
            record(&mut self.rec, &mut self.due, &msg.payload, last, start);
        }
        if let Some(cpu) = cpu {
            self.rec.cpu = crate::cpu::Snapshot::take(others).shares_since(&cpu);
        }
        self.rec.wall = last.duration_since(first.unwrap_or(start));
        self.rec.send_wall = self.rec.wall;
        Ok(self.rec)
    }
}

/// Publishes not yet acknowledged by the server before the generator waits for acks.
const MAX_UNACKED: usize = 8192;

fn record(rec: &mut Recording, due: &mut HashMap<String, Instant>, payload: &[u8], now: Instant, start: Instant) {
    let view: ResultView = match Encoding::detect(None, payload).decode(payload) {
        Ok(v) => v,
        Err(e) => {
            *rec.errors.entry(format!("undecodable result: {e}")).or_default() += 1;
            return;
        }
    };
    let Some(due_at) = due.remove(&view.id) else {
        // Answered twice (or not ours): the second answer is a duplicate.
        rec.duplicates += 1;
        return;
    };
    rec.received += 1;
    let us = now.duration_since(due_at).as_micros().max(1) as u64;
    rec.latency_us.saturating_record(us);
    Recording::bump(&mut rec.completed_per_s, now.duration_since(start).as_secs() as usize);
    *rec.workers.entry(view.worker).or_default() += 1;
    if view.status == "ok" {
        rec.ok += 1;
    } else {
        *rec.errors.entry(view.error.map_or_else(|| "error".to_string(), |e| e.code)).or_default() += 1;
    }
    if view.cached {
        rec.cached += 1;
    } else if view.timing.batch_size > 0 {
        *rec.batch_sizes.entry(view.timing.batch_size).or_default() += 1;
        rec.queued_ms += view.timing.queued_ms;
        rec.compute_ms += view.timing.compute_ms;
    }
    if let Some(TokensView::Generated(tokens)) = view.output.and_then(|o| o.tokens) {
        rec.tokens += tokens.len() as u64;
    }
}

fn progress_bar(plan: &Plan) -> indicatif::ProgressBar {
    if !plan.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match plan.jobs {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = if plan.jobs.is_some() {
        "{elapsed_precise} {bar:30} {pos}/{len} results  {msg}"
    } else {
        "{elapsed_precise} {spinner} {pos} results  {msg}"
    };
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
