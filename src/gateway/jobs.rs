//! The gateway as a producer: publishing a request's jobs and waiting for their results.
//!
//! Every job carries `reply_to: <inbox>.<id>`, so its result comes straight back to this gateway
//! (one wildcard subscription, demultiplexed by id) without every gateway reading every result;
//! the copy in the results stream is looked up directly when nothing came for a while (a core
//! NATS copy can be lost across a reconnect), checked like `jetbatch submit` checks it. Jobs are
//! JSON (so are their results and chunks), published with `Nats-Msg-Id` and a `deadline`: the
//! request's own or now + `--timeout-secs`. A client that goes away drops its wait, not its job:
//! the job's deadline takes it (a worker answers it `timeout` unstarted past it, and stops a
//! generation at it), so nothing runs on for long for nobody.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, Context};
use async_nats::{Client, HeaderMap, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use super::error::ApiError;
use crate::config::Topology;
use crate::priority::Priority;

/// What a request says of its jobs besides their content: level, deadline, cache.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub priority: Priority,
    /// Milliseconds since the Unix epoch.
    pub deadline_ms: u64,
    pub cache: Option<bool>,
}

impl JobOptions {
    /// How long is left until the deadline.
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        Duration::from_millis(self.deadline_ms.saturating_sub(now))
    }
}

/// One job to publish.
pub struct JobSpec<'a> {
    pub model: &'a str,
    pub kind: &'static str,
    pub input: Value,
    pub params: Map<String, Value>,
    pub options: &'a JobOptions,
}

/// How often a wait with nothing heard looks the result up in the results stream.
const LOOKUP_EVERY: Duration = Duration::from_secs(2);

/// This gateway's link to the pool.
pub struct Bus {
    pub client: Client,
    js: Context,
    pub topology: Topology,
    /// `_INBOX.<unique>`: results come back on `<inbox>.<id>`.
    inbox: String,
    /// This gateway's part of its job ids (unique per process).
    tag: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<String, oneshot::Sender<Bytes>>>,
}

impl Bus {
    /// Subscribes to this gateway's results and starts handing them out.
    pub async fn start(client: Client, js: Context, topology: Topology) -> Result<Arc<Bus>, ApiError> {
        let inbox = client.new_inbox();
        let tag = inbox.rsplit('.').next().unwrap_or("gw").to_string();
        let mut replies = client.subscribe(format!("{inbox}.*")).await.map_err(ApiError::bus)?;
        let bus = Arc::new(Bus { client, js, topology, inbox, tag, next: AtomicU64::new(0), waiting: Mutex::new(HashMap::new()) });
        let weak = Arc::downgrade(&bus);
        tokio::spawn(async move {
            while let Some(msg) = replies.next().await {
                let Some(bus) = weak.upgrade() else { break };
                let id = msg.subject.rsplit('.').next().unwrap_or_default();
                let waiter = bus.waiting.lock().expect("waiting").remove(id);
                if let Some(tx) = waiter {
                    let _ = tx.send(msg.payload);
                }
            }
        });
        Ok(bus)
    }

    /// A fresh job id: `gw-<gateway>-<n>`.
    pub fn next_id(&self) -> String {
        format!("gw-{}-{}", self.tag, self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// The subject a streamed job's chunks come on.
    pub fn stream_subject(&self, id: &str) -> String {
        format!("{}.stream.{id}", self.topology.prefix)
    }

    /// Subscribes to a job's chunks; subscribe before publishing so none is missed.
    pub async fn chunks(&self, id: &str) -> Result<Subscriber, ApiError> {
        let sub = self.client.subscribe(self.stream_subject(id)).await.map_err(ApiError::bus)?;
        self.client.flush().await.map_err(ApiError::bus)?;
        Ok(sub)
    }

    /// Publishes `spec` under `id` and returns the wait for its result; the job is stored (its
    /// publish acknowledged) when this returns.
    pub async fn publish(self: &Arc<Self>, id: String, spec: JobSpec<'_>) -> Result<Pending, ApiError> {
        let mut job = json!({"id": id, "model": spec.model, "kind": spec.kind, "input": spec.input, "reply_to": format!("{}.{id}", self.inbox), "deadline": spec.options.deadline_ms});
        if !spec.params.is_empty() {
            job["params"] = Value::Object(spec.params);
        }
        if let Some(cache) = spec.options.cache {
            job["cache"] = cache.into();
        }
        let body = serde_json::to_vec(&job).expect("json");
        let hash = crate::bus::job_hash(&body);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("waiting").insert(id.clone(), tx);
        let pending = Pending { bus: self.clone(), id, hash, model: spec.model.to_string(), rx, options: spec.options.clone() };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", pending.id.as_str());
        headers.insert("Content-Type", "application/json");
        let subject = self.topology.priority_subject(spec.model, spec.options.priority);
        let ack = self.js.publish_with_headers(subject, headers, body.into()).await.map_err(ApiError::bus)?;
        ack.into_future().await.map_err(ApiError::bus)?;
        Ok(pending)
    }

    /// Publishes `spec` and waits for its output.
    pub async fn run(self: &Arc<Self>, spec: JobSpec<'_>) -> Result<Value, ApiError> {
        let id = self.next_id();
        self.publish(id, spec).await?.output().await
    }

    /// The stored answer to job `id` (hash `hash`) in the results stream, if there is one.
    async fn stored(&self, id: &str, hash: &str) -> Option<Bytes> {
        let stream = self.js.get_stream_no_info(&self.topology.results_stream).await.ok()?;
        crate::bus::stored_answer(&stream, self.topology.result_subject(id), id, hash).await.ok().flatten()
    }
}

/// A published job's result, not yet in. Dropping it forgets the job (its deadline takes it).
pub struct Pending {
    bus: Arc<Bus>,
    pub id: String,
    hash: String,
    model: String,
    rx: oneshot::Receiver<Bytes>,
    options: JobOptions,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.bus.waiting.lock().expect("waiting").remove(&self.id);
    }
}

impl Pending {
    /// The job's output (its result's `output`), or its error as the client should see it.
    pub async fn output(mut self) -> Result<Value, ApiError> {
        let until = Instant::now() + self.options.remaining();
        let payload = loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::deadline(format!("no result for job {} by the request's deadline (the pool is busy, or no worker serves model '{}' now)", self.id, self.model)));
            }
            match tokio::time::timeout(left.min(LOOKUP_EVERY), &mut self.rx).await {
                Ok(Ok(payload)) => break payload,
                Ok(Err(_)) => return Err(ApiError::bus("the result subscription closed")),
                Err(_) => {
                    if let Some(payload) = self.bus.stored(&self.id, &self.hash).await {
                        break payload;
                    }
                }
            }
        };
        let mut result: Value = serde_json::from_slice(&payload).map_err(|e| ApiError::bus(format!("unreadable result of job {}: {e}", self.id)))?;
        if result["status"] == "ok" {
            return Ok(result["output"].take());
        }
        let error = &result["error"];
        Err(ApiError::from_job(&self.model, error["code"].as_str().unwrap_or("model_error"), error["message"].as_str().unwrap_or("")))
    }
}

/// A JSON float of a result: a number, or `"NaN"`/`"Infinity"`/`"-Infinity"` (JSON has none).
pub fn float(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        v => v.as_f64(),
    }
}

/// Whether the jobs stream exists (the pool is set up) — said at start.
pub async fn streams_exist(js: &Context, t: &Topology) -> bool {
    let stream: Result<jetstream::stream::Stream, _> = js.get_stream(&t.jobs_stream).await;
    stream.is_ok()
}
