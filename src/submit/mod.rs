//! `jetbatch submit`: publish jobs read as JSONL, wait for every result, write results as JSONL.
//!
//! Resumable: ids already in the output file are skipped, jobs are published with `Nats-Msg-Id`
//! (JetStream drops a re-published id inside the duplicate window), and results that reached the
//! results stream while this process was down are fetched from it by subject. `jetbatch cancel`
//! drops the queued jobs of an input file, or of a run id (`<run id>.…`, as the Python client and
//! the lm-eval backend name their jobs).
//!
//! Here: the two commands, reading the input and the output file, and `run_jobs` (publish, then
//! collect). Beside it: `lookup` (what the streams hold under a job's id: stored answers, queued
//! jobs, duplicates sorted out), `progress` (plain progress lines off a terminal) and `error`.

mod error;
mod lookup;
mod progress;

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::io::{BufRead, Write};
use std::time::Duration;

use async_nats::jetstream::{self, Context};
use async_nats::HeaderMap;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use tracing::warn;

use crate::config::{CancelArgs, SubmitArgs, Topology};
use crate::job::{valid_job_id, valid_model_name};
use crate::priority::Priority;
pub use error::SubmitError;
use lookup::{answers, queued_jobs, resolve_duplicates, stored_results, Duplicate};

/// What the answered jobs came to: ok (of which cached) and errors by code.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    pub ok: usize,
    pub cached: usize,
    pub errors: std::collections::BTreeMap<String, usize>,
}

impl Summary {
    /// Counts one result (a JSON result as `submit` writes it).
    pub fn count(&mut self, result: &Value) {
        if result["status"] == "ok" {
            self.ok += 1;
            self.cached += usize::from(result["cached"] == true);
        } else {
            let code = result["error"]["code"].as_str().unwrap_or("unknown").to_string();
            *self.errors.entry(code).or_default() += 1;
        }
    }

    pub fn failed(&self) -> usize {
        self.errors.values().sum()
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} answered: {} ok ({} cached), {} error(s)", self.ok + self.failed(), self.ok, self.cached, self.failed())?;
        if !self.errors.is_empty() {
            let by_code: Vec<String> = self.errors.iter().map(|(code, n)| format!("{code} {n}")).collect();
            write!(f, " ({})", by_code.join(", "))?;
        }
        Ok(())
    }
}

/// A line on what the workers' consumers (one per priority level) say, for when results stop
/// coming: are workers pulling, how many jobs wait, how many are being worked on.
async fn consumer_status(js: &Context, t: &Topology) -> String {
    let info = |name: String| async move {
        let mut consumer: jetstream::consumer::PullConsumer = js.get_stream(&t.jobs_stream).await.ok()?.get_consumer(&name).await.ok()?;
        consumer.info().await.ok().cloned()
    };
    let mut infos = Vec::new();
    for level in Priority::ALL {
        let name = level.consumer(&t.consumer);
        match info(name.clone()).await {
            Some(i) => infos.push((name, i)),
            None => return format!("consumer {name} cannot be looked up (not created yet: no worker has started?)"),
        }
    }
    // An idle worker keeps a pull request open on every level; a busy one holds jobs of some.
    if infos.iter().all(|(_, i)| i.num_waiting == 0 && i.num_ack_pending == 0) {
        let pending: u64 = infos.iter().map(|(_, i)| i.num_pending).sum();
        return format!("consumers {}: no worker is pulling (0 pull requests waiting); {pending} job(s) pending", t.consumer);
    }
    let levels: Vec<String> = infos
        .iter()
        .map(|(name, i)| format!("{name}: {} pull request(s) waiting, {} job(s) pending, {} being worked on", i.num_waiting, i.num_pending, i.num_ack_pending))
        .collect();
    format!("consumers {}", levels.join("; "))
}

/// A job line: its id and model (for the subject) and the JSON to publish.
pub struct JobLine {
    pub id: String,
    pub model: String,
    pub body: Vec<u8>,
    /// The line's `priority`, if it has one; it is published on that level's subject.
    pub priority: Option<Priority>,
}

impl JobLine {
    pub fn parse(line: &str, n: usize) -> Result<JobLine, SubmitError> {
        let bad = |m: &str| SubmitError::Input(format!("line {n}: {m}"));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let id = v.get("id").and_then(Value::as_str).filter(|id| valid_job_id(id)).ok_or_else(|| bad("id: missing or invalid"))?;
        let model = v.get("model").and_then(Value::as_str).filter(|m| valid_model_name(m)).ok_or_else(|| bad("model: missing or invalid"))?;
        if v.get("reply_to").is_some() {
            return Err(bad("reply_to: submit collects results from the results stream; remove reply_to"));
        }
        let priority = match v.get("priority") {
            None => None,
            Some(p) => Some(p.as_str().and_then(Priority::parse).ok_or_else(|| bad("priority: expected one of high, normal, low"))?),
        };
        Ok(JobLine { id: id.to_string(), model: model.to_string(), body: line.as_bytes().to_vec(), priority })
    }
}

/// Quiet time after which `run_jobs` reports the consumer's state.
const STALL_REPORT: Duration = Duration::from_secs(4);

/// What `run_jobs` has to say while it runs (each is one line for the producer).
pub enum Notice {
    /// Results stopped coming: what the consumers say.
    Stall(String),
    /// The jobs stream dropped a job as a duplicate of an earlier job under its id, and that
    /// earlier job is not this one (or is gone): it is not queued and will never be answered.
    Dropped { id: String, why: String },
    /// The jobs stream dropped a job as a duplicate and this account cannot look into the queue
    /// to tell whether the earlier job is this very one: it is waited for, and a result for a
    /// different job under its id ends the wait (as [`Notice::Dropped`]).
    Unverified { id: String, why: String },
    /// A duplicate that is this very job, published earlier: collected or waited for.
    Duplicate(String),
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Stall(line) | Notice::Duplicate(line) => f.write_str(line),
            Notice::Dropped { id, why } => write!(f, "id '{id}': not queued, dropped as a duplicate: {why}"),
            Notice::Unverified { id, why } => write!(f, "id '{id}': dropped as a duplicate of a job published earlier under this id; {why}"),
        }
    }
}

/// Publishes `jobs` and calls `on_result` with each result's JSON as it arrives, until all are in;
/// `on_notice` hears what the consumer says when results stop coming, and at once of jobs dropped
/// as duplicates of another job under their id. Those are returned: they will never be answered.
pub async fn run_jobs(
    js: &Context,
    topology: &Topology,
    jobs: Vec<JobLine>,
    look_up_stored: bool,
    idle_timeout: Duration,
    mut on_result: impl FnMut(&str, &[u8]) -> Result<(), SubmitError>,
    mut on_notice: impl FnMut(Notice),
) -> Result<Vec<String>, SubmitError> {
    let (js, client) = (js.clone(), js.client());
    ensure_streams(&js, topology).await?;
    // Each job's fingerprint, to tell its result from anything else published under its id.
    let hashes: HashMap<String, String> = jobs.iter().map(|j| (j.id.clone(), crate::bus::job_hash(&j.body))).collect();
    let mut missing: HashSet<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let mut live = client
        .subscribe(format!("{}.results.>", topology.prefix))
        .await
        .map_err(|e| SubmitError::Nats(e.to_string()))?;
    let nats = |e: &dyn std::fmt::Display| SubmitError::Nats(e.to_string());
    if look_up_stored {
        for (id, payload) in stored_results(&js, topology, &hashes, missing.iter().cloned().collect()).await? {
            if missing.remove(&id) {
                on_result(&id, &payload)?;
            }
        }
    }
    // Publish with pipelined acks; the server's ack means the job is stored. An ack that says
    // duplicate means the stream dropped it: it already held a job under this id (inside its
    // duplicate window), which may or may not be this one.
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut duplicates = Vec::new();
    let mut note = |(id, ack): (String, Result<jetstream::publish::PublishAck, _>)| -> Result<(), SubmitError> {
        if ack.map_err(|e: jetstream::context::PublishError| nats(&e))?.duplicate {
            duplicates.push(id);
        }
        Ok(())
    };
    for job in jobs.into_iter().filter(|j| missing.contains(&j.id)) {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.id.as_str());
        headers.insert("Content-Type", "application/json");
        let subject = topology.priority_subject(&job.model, job.priority.unwrap_or_default());
        let ack = js.publish_with_headers(subject, headers, job.body.into()).await.map_err(|e| nats(&e))?;
        acks.push(async move { (job.id, ack.into_future().await) });
        while acks.len() >= 1024 {
            note(acks.next().await.expect("non-empty"))?;
        }
    }
    while let Some(ack) = acks.next().await {
        note(ack)?;
    }
    // Said before any waiting: a dropped job is never waited for.
    let mut dropped = Vec::new();
    let mut unverified = HashSet::new();
    for (id, d) in resolve_duplicates(&js, topology, &hashes, duplicates).await? {
        match d {
            Duplicate::Answered(payload) => {
                on_notice(Notice::Duplicate(format!("id '{id}': published before and answered; its stored answer is collected")));
                missing.remove(&id);
                on_result(&id, &payload)?;
            }
            Duplicate::Queued => on_notice(Notice::Duplicate(format!("id '{id}': this very job is queued already (published before); waiting for its answer"))),
            Duplicate::Unverified(why) => {
                on_notice(Notice::Unverified { id: id.clone(), why });
                unverified.insert(id);
            }
            Duplicate::Dropped(why) => {
                missing.remove(&id);
                on_notice(Notice::Dropped { id: id.clone(), why });
                dropped.push(id);
            }
        }
    }
    let prefix_len = topology.prefix.len() + ".results.".len();
    let mut idle = Duration::ZERO;
    let poll = Duration::from_secs(2);
    while !missing.is_empty() {
        match tokio::time::timeout(poll, live.next()).await {
            Ok(Some(msg)) => {
                let id = msg.subject.get(prefix_len..).unwrap_or_default();
                let ours = hashes.get(id).is_some_and(|hash| answers(id, hash, msg.headers.as_ref(), &msg.payload));
                if missing.contains(id) && !ours && unverified.contains(id) {
                    // The job the unverified duplicate stood behind was another one.
                    on_notice(Notice::Dropped { id: id.to_string(), why: "the job queued under this id was a different one (it is answered now); give this job a new id".into() });
                    missing.remove(id);
                    dropped.push(id.to_string());
                } else if missing.contains(id) && !ours {
                    warn!(%id, "a result under this id answers another job; still waiting for ours");
                } else if missing.remove(id) {
                    on_result(id, &msg.payload)?;
                    idle = Duration::ZERO;
                }
            }
            Ok(None) => return Err(SubmitError::Nats("subscription closed".into())),
            Err(_) => {
                // Quiet for a while: results may have been missed by the live feed (slow consumer).
                idle += poll;
                for (id, payload) in stored_results(&js, topology, &hashes, missing.iter().cloned().collect()).await? {
                    if missing.remove(&id) {
                        on_result(&id, &payload)?;
                        idle = Duration::ZERO;
                    }
                }
                // After a few quiet seconds, and every ten after that, say what the consumer says.
                if !missing.is_empty() && idle >= STALL_REPORT && (idle - STALL_REPORT).as_secs() % 10 < poll.as_secs() {
                    on_notice(Notice::Stall(format!("no result for {} s: {}", idle.as_secs(), consumer_status(&js, topology).await)));
                }
                if idle >= idle_timeout && !missing.is_empty() {
                    return Err(SubmitError::Incomplete { missing: missing.len(), secs: idle_timeout.as_secs() });
                }
            }
        }
    }
    Ok(dropped)
}

/// Makes sure the jobs and results streams exist. A producer's account may lack the rights to
/// create or update streams (the shipped accounts only let it look them up): only when they are
/// missing does this try to create them, and says what to run if that is refused.
async fn ensure_streams(js: &Context, t: &Topology) -> Result<(), SubmitError> {
    let exist = js.get_stream(&t.jobs_stream).await.is_ok() && js.get_stream(&t.results_stream).await.is_ok();
    if !exist {
        crate::bus::setup_streams(js, t)
            .await
            .map_err(|e| SubmitError::Nats(format!("streams missing and cannot be created ({e}); run `jetbatch setup` with a worker's credentials")))?;
    }
    Ok(())
}

/// What the output file already holds: per job (by the id of its input line), its last result's
/// status and how many times it was retried.
#[derive(Default)]
struct Previous {
    last_ok: HashMap<String, bool>,
    retries: HashMap<String, usize>,
}

/// The id of an input line that a result's id answers: `<id>:retry-<n>` answers `<id>`.
fn original_id(id: &str) -> (&str, usize) {
    match id.rsplit_once(":retry-") {
        Some((orig, n)) if !orig.is_empty() => n.parse().map_or((id, 0), |n| (orig, n)),
        _ => (id, 0),
    }
}

impl Previous {
    fn read(path: &std::path::Path) -> Previous {
        let mut p = Previous::default();
        let Ok(f) = std::fs::File::open(path) else { return p };
        for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            let Some(id) = v.get("id").and_then(Value::as_str) else { continue };
            let (orig, n) = original_id(id);
            p.last_ok.insert(orig.to_string(), v["status"] == "ok");
            let r = p.retries.entry(orig.to_string()).or_default();
            *r = (*r).max(n);
        }
        p
    }
}

/// Reads the input: the jobs to publish, and every bad line (each named; the run publishes
/// nothing while there is one).
fn read_jobs(reader: Box<dyn BufRead>, max_payload: usize, previous: &Previous, retry_errors: bool) -> Result<(Vec<JobLine>, Vec<String>, Vec<(usize, JobLine)>), SubmitError> {
    let (mut jobs, mut bad, mut done) = (Vec::new(), Vec::new(), Vec::new());
    let mut seen = HashMap::new();
    for (n, line) in reader.lines().enumerate() {
        let (n, line) = (n + 1, line?);
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > max_payload {
            bad.push(format!("line {n}: {} bytes, over the server's max_payload of {max_payload} bytes", line.len()));
            continue;
        }
        let job = match JobLine::parse(&line, n) {
            Ok(job) => job,
            Err(e) => {
                bad.push(e.to_string());
                continue;
            }
        };
        if let Some(prev) = seen.insert(job.id.clone(), n) {
            bad.push(format!("line {n}: id '{}' repeats line {prev}", job.id));
            continue;
        }
        match previous.last_ok.get(&job.id) {
            None => jobs.push(job),
            Some(false) if retry_errors => {
                let retry = format!("{}:retry-{}", job.id, previous.retries.get(&job.id).copied().unwrap_or(0) + 1);
                let mut v: Value = serde_json::from_str(&line).map_err(|e| SubmitError::Input(e.to_string()))?;
                v["id"] = retry.clone().into();
                jobs.push(JobLine { id: retry, model: job.model, body: v.to_string().into_bytes(), priority: job.priority });
            }
            Some(_) => done.push((n, job)),
        }
    }
    Ok((jobs, bad, done))
}

/// Warns about resumed jobs whose input line changed since they were answered: the stored result
/// answers the job as it was (its job hash differs), and re-running keeps that answer.
async fn warn_changed(js: &Context, t: &Topology, done: &[(usize, JobLine)], say: &dyn Fn(String)) {
    let Ok(stream) = js.get_stream_no_info(&t.results_stream).await else { return };
    let changed: Vec<String> = futures::stream::iter(done)
        .map(|(n, job)| {
            let stream = &stream;
            async move {
                // A direct get names the subject, so an account may be allowed it for its own ids only.
                let stored = stream.direct_get_last_for_subject(t.result_subject(&job.id)).await.ok()?;
                let hash = stored.headers.get(crate::bus::JOB_HASH_HEADER)?.as_str().to_string();
                (hash != crate::bus::job_hash(&job.body)).then(|| format!("line {n}: id '{}' was answered for a different job than this line (the output holds that answer); give the changed job a new id", job.id))
            }
        })
        .buffer_unordered(64)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    for c in changed {
        say(c);
    }
}

/// Most bad lines printed one by one (the rest are counted).
const BAD_LINES_SHOWN: usize = 50;

/// The `submit` command.
pub async fn submit(args: SubmitArgs) -> Result<usize, SubmitError> {
    let topology = args.subjects.topology();
    let to_stdout = args.output.as_os_str() == "-";
    let previous = if to_stdout { Previous::default() } else { Previous::read(&args.output) };
    let client = crate::bus::connect(&args.nats, "jetbatch-submit").await?;
    let js = args.subjects.jetstream(&client);
    let max_payload = client.server_info().max_payload;
    let reader: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(&args.input)?))
    };
    let (mut jobs, bad, done) = read_jobs(reader, max_payload, &previous, args.retry_errors)?;
    for job in &mut jobs {
        job.priority.get_or_insert(args.priority);
    }
    if !bad.is_empty() {
        for line in bad.iter().take(BAD_LINES_SHOWN) {
            eprintln!("{line}");
        }
        if bad.len() > BAD_LINES_SHOWN {
            eprintln!("… and {} more", bad.len() - BAD_LINES_SHOWN);
        }
        // Said where it matters (a line over it), not on every run.
        if max_payload < crate::config::DEFAULT_MAX_PAYLOAD_BYTES && bad.iter().any(|b| b.contains("max_payload")) {
            eprintln!(
                "note: the server's max_payload is {max_payload} bytes, below the {} bytes a worker accepts by default (nats-server's max_payload setting)",
                crate::config::DEFAULT_MAX_PAYLOAD_BYTES
            );
        }
        return Err(SubmitError::Input(format!("{} bad line(s) in {}; nothing was submitted", bad.len(), args.input.display())));
    }
    let todo = jobs.len();
    // Not a terminal (CI, a log): plain lines instead of the bar, which would draw nothing there.
    let plain = (!args.quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        eprintln!("submitting {todo} job(s) from {}", args.input.display());
        std::cell::RefCell::new(progress::PlainProgress::new(todo, std::time::Instant::now()))
    });
    let bar = if args.quiet || plain.is_some() { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(todo as u64) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} results  {per_sec}  eta {eta}").expect("valid template"),
    );
    // Drawn at once (0/N) and kept alive while nothing arrives.
    bar.enable_steady_tick(Duration::from_millis(250));
    let say = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
    if !previous.last_ok.is_empty() {
        let retried = if args.retry_errors { format!(" ({} errored, submitted again)", jobs.iter().filter(|j| j.id.contains(":retry-")).count()) } else { String::new() };
        say(format!("{} job(s) already answered in {}{retried}; submitting {todo}", previous.last_ok.len(), args.output.display()));
        warn_changed(&js, &topology, &done, &say).await;
    }
    let mut out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::OpenOptions::new().create(true).append(true).open(&args.output)?)
    };
    let mut summary = Summary::default();
    let resumed = !previous.last_ok.is_empty();
    // What the Ctrl-C message must not count as queued: jobs dropped as duplicates, and those
    // that may be (unverified) until their answer comes.
    let not_queued = std::cell::Cell::new(0);
    let unverified = std::cell::RefCell::new(HashSet::new());
    let run = run_jobs(&js, &topology, jobs, resumed, Duration::from_secs(args.idle_timeout_secs), |id, payload| {
        unverified.borrow_mut().remove(id);
        // Jobs go out as JSON, so their results come back as JSON: one line each.
        match serde_json::from_slice::<Value>(payload) {
            Ok(v) if !payload.contains(&b'\n') => {
                summary.count(&v);
                out.write_all(payload)?;
            }
            _ => {
                warn!(%id, "result is not single-line JSON; re-encoding");
                let r = crate::job::JobResult::decode(payload).map_err(SubmitError::Input)?;
                let v = serde_json::to_value(&r).map_err(|e| SubmitError::Input(e.to_string()))?;
                summary.count(&v);
                serde_json::to_writer(&mut out, &v).map_err(|e| SubmitError::Input(e.to_string()))?;
            }
        }
        out.write_all(b"\n")?;
        bar.inc(1);
        if let Some(line) = plain.as_ref().and_then(|p| p.borrow_mut().on_result(bar.position() as usize, std::time::Instant::now())) {
            eprintln!("{line}");
        }
        Ok(())
    }, |notice| {
        match &notice {
            Notice::Dropped { id, .. } => {
                not_queued.set(not_queued.get() + 1);
                unverified.borrow_mut().remove(id);
            }
            Notice::Unverified { id, .. } => {
                unverified.borrow_mut().insert(id.clone());
            }
            Notice::Stall(_) | Notice::Duplicate(_) => {}
        }
        say(notice.to_string())
    });
    let outcome = tokio::select! {
        r = run => r,
        _ = tokio::signal::ctrl_c() => {
            let (written, unsure) = (bar.position() as usize, unverified.borrow().len());
            Err(SubmitError::Interrupted { written, queued: todo - written - not_queued.get() - unsure, unsure })
        }
    };
    out.flush()?;
    bar.finish_and_clear();
    eprintln!("{summary}");
    let dropped = outcome?;
    if !dropped.is_empty() {
        // Each was named as it was found; the last line only recalls the first few.
        let mut ids = dropped.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        if dropped.len() > 10 {
            ids.push_str(", …");
        }
        return Err(SubmitError::Duplicates { ids, n: dropped.len() });
    }
    if summary.failed() > 0 && !args.allow_errors {
        // The summary line above says which.
        return Err(SubmitError::JobsFailed(summary.failed()));
    }
    Ok(todo)
}

/// The `cancel` command: deletes the queued jobs of the input file (or, with `--run-id`, those
/// whose id is under `<run id>.`) from the jobs stream. Jobs a worker has taken finish and are
/// answered. Needs the right to read and delete messages of the jobs stream
/// (`$JS.API.STREAM.MSG.GET`/`DELETE`).
pub async fn cancel(args: CancelArgs) -> Result<usize, SubmitError> {
    let topology = args.subjects.topology();
    let (ids, what) = match (&args.input, &args.run_id) {
        (Some(input), None) => {
            let reader: Box<dyn BufRead> = if input.as_os_str() == "-" {
                Box::new(std::io::BufReader::new(std::io::stdin()))
            } else {
                Box::new(std::io::BufReader::new(std::fs::File::open(input)?))
            };
            let (jobs, bad, _) = read_jobs(reader, usize::MAX, &Previous::default(), false)?;
            if let Some(first) = bad.first() {
                return Err(SubmitError::Input(format!("{first} ({} bad line(s))", bad.len())));
            }
            let ids: HashSet<String> = jobs.into_iter().map(|j| j.id).collect();
            let what = format!("of {} in {}", ids.len(), input.display());
            (Some(ids), what)
        }
        (None, Some(run_id)) if valid_job_id(run_id) => (None, format!("of run {run_id}")),
        (None, Some(run_id)) => return Err(SubmitError::Input(format!("--run-id: '{}' is not a job id prefix", crate::error::excerpt(run_id)))),
        _ => return Err(SubmitError::Input("give --input or --run-id".into())),
    };
    let under = args.run_id.as_ref().map(|r| format!("{r}."));
    // Retries of a job (`<id>:retry-<n>`) are its own too.
    let ours = |id: &str| match (&ids, &under) {
        (Some(ids), _) => ids.contains(id) || ids.contains(original_id(id).0),
        (None, Some(under)) => id.starts_with(under.as_str()),
        (None, None) => false,
    };
    let client = crate::bus::connect(&args.nats, "jetbatch-cancel").await?;
    let js = args.subjects.jetstream(&client);
    let queued = queued_jobs(&js, &topology, ours).await?;
    let stream = js.get_stream_no_info(&topology.jobs_stream).await.map_err(|e| SubmitError::Nats(e.to_string()))?;
    let deleted: Vec<bool> = futures::stream::iter(queued)
        .map(|q| stream.delete_message(q.seq))
        .buffer_unordered(64)
        .try_collect()
        .await
        .map_err(|e| SubmitError::Nats(e.to_string()))?;
    let n = deleted.into_iter().filter(|d| *d).count();
    eprintln!("cancelled {n} queued job(s) {what}");
    Ok(n)
}
