//! `jetbatch submit`: publish jobs read as JSONL, wait for every result, write results as JSONL.
//!
//! Resumable: ids already in the output file are skipped, jobs are published with `Nats-Msg-Id`
//! (JetStream drops a re-published id inside the duplicate window), and results that reached the
//! results stream while this process was down are fetched from it by subject.

use std::collections::{HashMap, HashSet};
use std::future::IntoFuture;
use std::io::{BufRead, Write};
use std::time::Duration;

use async_nats::jetstream::{self, Context};
use async_nats::HeaderMap;
use futures::StreamExt;
use serde_json::Value;
use tracing::warn;

use crate::config::{SubmitArgs, Topology};
use crate::job::{valid_job_id, valid_model_name};

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error("nats: {0}")]
    Nats(String),
    #[error("no result for {missing} job(s) after waiting {secs} s without progress")]
    Incomplete { missing: usize, secs: u64 },
    #[error("{0}; pass --allow-errors to exit 0 anyway")]
    JobsFailed(String),
}

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

/// A line on what the workers' consumer says, for when results stop coming: are workers pulling,
/// how many jobs wait, how many are being worked on.
async fn consumer_status(js: &Context, t: &Topology) -> String {
    let info = async {
        let mut consumer: jetstream::consumer::PullConsumer = js.get_stream(&t.jobs_stream).await.ok()?.get_consumer(&t.consumer).await.ok()?;
        consumer.info().await.ok().cloned()
    };
    match info.await {
        Some(i) if i.num_waiting == 0 && i.num_ack_pending == 0 => format!(
            "consumer {}: no worker is pulling (0 pull requests waiting); {} job(s) pending",
            t.consumer, i.num_pending
        ),
        Some(i) => format!(
            "consumer {}: {} pull request(s) waiting, {} job(s) pending, {} being worked on",
            t.consumer, i.num_waiting, i.num_pending, i.num_ack_pending
        ),
        None => format!("consumer {} cannot be looked up (not created yet: no worker has started?)", t.consumer),
    }
}

/// A job line: its id and model (for the subject) and the JSON to publish.
pub struct JobLine {
    pub id: String,
    pub model: String,
    pub body: Vec<u8>,
}

/// Whether a result message answers the job whose payload hashes to `hash`: its body's id and its
/// [`crate::bus::JOB_HASH_HEADER`] must both match. A result that another producer's job with the
/// same id got (or anything else published on the subject) is not ours.
fn answers(id: &str, hash: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> bool {
    headers.and_then(|h| h.get(crate::bus::JOB_HASH_HEADER)).map(|v| v.as_str()) == Some(hash)
        && crate::job::JobResult::decode(payload).is_ok_and(|r| r.id == id)
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
        Ok(JobLine { id: id.to_string(), model: model.to_string(), body: line.as_bytes().to_vec() })
    }
}

/// Quiet time after which `run_jobs` reports the consumer's state.
const STALL_REPORT: Duration = Duration::from_secs(4);

/// Publishes `jobs` and calls `on_result` with each result's JSON as it arrives, until all are in;
/// `on_stall` hears what the consumer says when results stop coming.
pub async fn run_jobs(
    client: &async_nats::Client,
    topology: &Topology,
    jobs: Vec<JobLine>,
    look_up_stored: bool,
    idle_timeout: Duration,
    mut on_result: impl FnMut(&str, &[u8]) -> Result<(), SubmitError>,
    mut on_stall: impl FnMut(String),
) -> Result<(), SubmitError> {
    let js = jetstream::new(client.clone());
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
    // Publish with pipelined acks; the server's ack means the job is stored.
    let mut acks = futures::stream::FuturesUnordered::new();
    for job in jobs.into_iter().filter(|j| missing.contains(&j.id)) {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.id.as_str());
        headers.insert("Content-Type", "application/json");
        let ack = js.publish_with_headers(topology.jobs_subject(&job.model), headers, job.body.into()).await.map_err(|e| nats(&e))?;
        acks.push(ack.into_future());
        while acks.len() >= 1024 {
            acks.next().await.expect("non-empty").map_err(|e| nats(&e))?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack.map_err(|e| nats(&e))?;
    }
    let prefix_len = topology.prefix.len() + ".results.".len();
    let mut idle = Duration::ZERO;
    let poll = Duration::from_secs(2);
    while !missing.is_empty() {
        match tokio::time::timeout(poll, live.next()).await {
            Ok(Some(msg)) => {
                let id = msg.subject.get(prefix_len..).unwrap_or_default();
                let ours = hashes.get(id).is_some_and(|hash| answers(id, hash, msg.headers.as_ref(), &msg.payload));
                if missing.contains(id) && !ours {
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
                    on_stall(format!("no result for {} s: {}", idle.as_secs(), consumer_status(&js, topology).await));
                }
                if idle >= idle_timeout && !missing.is_empty() {
                    return Err(SubmitError::Incomplete { missing: missing.len(), secs: idle_timeout.as_secs() });
                }
            }
        }
    }
    Ok(())
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

/// Results already in the results stream that answer our jobs, by id (direct gets, 64 at a time).
async fn stored_results(js: &Context, t: &Topology, hashes: &HashMap<String, String>, ids: Vec<String>) -> Result<Vec<(String, Vec<u8>)>, SubmitError> {
    let stream = js.get_stream_no_info(&t.results_stream).await.map_err(|e| SubmitError::Nats(e.to_string()))?;
    let found = futures::stream::iter(ids)
        .map(|id| {
            let stream = &stream;
            async move {
                let hash = hashes.get(&id)?;
                let answer = crate::bus::stored_answer(stream, t.result_subject(&id), &id, hash).await.ok()??;
                Some((id, answer.to_vec()))
            }
        })
        .buffer_unordered(64)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    Ok(found)
}

/// The `submit` command.
pub async fn submit(args: SubmitArgs) -> Result<usize, SubmitError> {
    let done: HashSet<String> = match std::fs::File::open(&args.output) {
        Ok(f) => std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok()?.get("id")?.as_str().map(str::to_string))
            .collect(),
        Err(_) => HashSet::new(),
    };
    let reader: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(std::fs::File::open(&args.input)?))
    };
    let mut jobs = Vec::new();
    let mut seen = HashMap::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let job = JobLine::parse(&line, n + 1)?;
        if let Some(prev) = seen.insert(job.id.clone(), n + 1) {
            return Err(SubmitError::Input(format!("line {}: id '{}' repeats line {prev}", n + 1, job.id)));
        }
        if !done.contains(&job.id) {
            jobs.push(job);
        }
    }
    let todo = jobs.len();
    let bar = if args.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(todo as u64) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} results  {per_sec}  eta {eta}").expect("valid template"),
    );
    // Drawn at once (0/N) and kept alive while nothing arrives.
    bar.enable_steady_tick(Duration::from_millis(250));
    let mut summary = Summary::default();
    if !done.is_empty() {
        bar.println(format!("{} result(s) already in {}; submitting {todo}", done.len(), args.output.display()));
    }
    let client = crate::bus::connect(&args.nats, "jetbatch-submit").await?;
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&args.output)?;
    let resumed = !done.is_empty();
    run_jobs(&client, &args.topology, jobs, resumed, Duration::from_secs(args.idle_timeout_secs), |id, payload| {
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
        Ok(())
    }, |stall| if args.quiet { eprintln!("{stall}") } else { bar.println(stall) })
    .await?;
    out.flush()?;
    bar.finish_and_clear();
    eprintln!("{summary}");
    if summary.failed() > 0 && !args.allow_errors {
        return Err(SubmitError::JobsFailed(summary.to_string()));
    }
    Ok(todo)
}
