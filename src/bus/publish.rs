//! Publishing: results (stored on the job's own subject, with the job's hash), dead letters,
//! streamed chunks and metric snapshots, and the lookup of a job's stored answer.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream, Context};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use tokio::sync::broadcast;
use tracing::warn;

use super::{BusError, Delivery};
use crate::config::Topology;
use crate::job::{Encoding, JobError, JobResult};
use crate::metrics::Metrics;
use crate::stream::StreamChunk;

/// Header of every result: [`job_hash`] of the job it answers. A result is trusted as a job's
/// answer only when its body's id and this header both match the job (see [`stored_answer`]).
pub const JOB_HASH_HEADER: &str = "Jetbatch-Job-Hash";

/// A job's fingerprint on the wire: the hash of its payload as published. Two jobs that share an
/// id but not their input (a careless or hostile producer) never take each other's answer.
pub fn job_hash(payload: &[u8]) -> String {
    blake3::hash(payload).to_hex()[..32].to_string()
}

/// The `Nats-Msg-Id` of a job's result: the results stream keeps one answer per (id, job) within
/// its duplicate window, so a redelivered job is not answered twice, and a second job reusing an
/// id cannot have its answer dropped as a duplicate of the first one's.
pub fn result_msg_id(id: &str, hash: &str) -> String {
    format!("{id}:{hash}")
}

/// Publishes into a stream and awaits the stream's ack.
pub async fn publish_stored(js: &Context, subject: String, headers: HeaderMap, payload: Bytes) -> Result<jetstream::publish::PublishAck, BusError> {
    js.publish_with_headers(subject, headers, payload).await.map_err(publish_error)?.await.map_err(publish_error)
}

/// JetStream API errors that a message causes by itself, so that sending it again cannot succeed:
/// over the stream's maximum message size, an expected stream / last id / last sequence that does
/// not hold, a per-message TTL the stream refuses. Everything else (leader elections, timeouts,
/// a stream that is briefly missing) may pass on a later try: naming the permanent ones instead of
/// taking every 4xx keeps a cluster failover from turning good results into dead letters.
const PERMANENT_API_ERRORS: [u64; 6] = [10054, 10060, 10070, 10071, 10164, 10165];

/// Sorts a publish failure into transient (retry later) and permanent: a message over the
/// server's max payload or one of [`PERMANENT_API_ERRORS`].
fn publish_error(e: jetstream::context::PublishError) -> BusError {
    use jetstream::context::PublishErrorKind as Kind;
    let permanent = match e.kind() {
        Kind::MaxPayloadExceeded | Kind::WrongLastMessageId | Kind::WrongLastSequence => true,
        Kind::Other => std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|api| PERMANENT_API_ERRORS.contains(&api.error_code().0)),
        _ => false,
    };
    BusError::Publish { message: e.to_string(), permanent }
}

/// What the results stream holds under a job's own subject, if it is that job's answer: the
/// body's id and the [`JOB_HASH_HEADER`] must both match. Anything else stored there (a result of
/// another job that reused the id) is not an answer, and the job is computed.
pub async fn stored_answer<I>(results: &stream::Stream<I>, subject: String, id: &str, hash: &str) -> Result<Option<Bytes>, BusError> {
    match results.direct_get_last_for_subject(subject).await {
        Ok(m) => {
            let same_job = m.headers.get(JOB_HASH_HEADER).map(|v| v.as_str()) == Some(hash);
            let same_id = crate::job::JobResult::decode(&m.payload).is_ok_and(|r| r.id == id);
            Ok((same_job && same_id).then_some(m.payload))
        }
        Err(e) if matches!(e.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => Ok(None),
        Err(e) => Err(BusError::Pull(format!("results lookup: {e}"))),
    }
}

/// Publishes what the results stage decided, into the streams of one topology.
#[derive(Clone)]
pub struct Publisher {
    js: Context,
    topology: Topology,
    /// The results stream, for [`Publisher::answered`].
    results: stream::Stream<()>,
}

impl Publisher {
    pub async fn new(js: Context, topology: Topology) -> Result<Publisher, BusError> {
        let results = js.get_stream_no_info(&topology.results_stream).await.map_err(|e| BusError::Setup(e.to_string()))?;
        Ok(Publisher { js, topology, results })
    }

    /// Stores `result` on the job's own subject `<prefix>.results.<id>` — whatever the job asked —
    /// and then, if the job named a `reply_to` (which the decoder allowed: only under the
    /// configured reply prefixes, never a system subject or one of ours), sends a copy there.
    ///
    /// `retry`: an earlier try failed. Its message may have reached live subscribers anyway (the
    /// subject's core message goes out whether or not the stream stores it) or been stored with
    /// its ack lost, so the result is sent again only once the stream answers a lookup and does
    /// not hold it: an outage then costs subscribers one extra copy, not one per try.
    pub async fn result(&self, result: &JobResult, encoding: Encoding, hash: &str, reply_to: Option<&str>, retry: bool) -> Result<(), BusError> {
        let payload = Bytes::from(encoding.encode(result));
        let mut headers = content_type(encoding);
        headers.insert("Nats-Msg-Id", result_msg_id(&result.id, hash).as_str());
        headers.insert(JOB_HASH_HEADER, hash);
        let stored = retry
            && self.answered(&result.id, hash).await.map_err(|e| BusError::Publish { message: format!("results stream not answering: {e}"), permanent: false })?;
        if !stored {
            let ack = publish_stored(&self.js, self.topology.result_subject(&result.id), headers.clone(), payload.clone()).await?;
            if ack.duplicate {
                tracing::debug!(id = %result.id, "result already published (duplicate delivery)");
            }
        }
        if let Some(reply_to) = reply_to {
            // A copy for the producer's inbox; the stored result is the answer, so a failure here
            // (the inbox is gone, the copy too large) only loses the copy.
            if let Err(e) = self.js.client().publish_with_headers(reply_to.to_string(), headers, payload).await {
                warn!(id = %result.id, error = %e, "reply_to copy not sent");
            }
        }
        Ok(())
    }

    /// Copies the job's payload to `<prefix>.dead.<model|invalid>` with the error in headers.
    /// Only our own headers go with it: the producer's (say `Nats-Expected-Stream`) would be read
    /// by the dead-letter stream as instructions. A payload the server refuses there for good is
    /// dropped, and the dead letter says so. `model` names the subject token only when the job
    /// had an id and a valid model name.
    pub async fn dead_letter(&self, d: &Delivery, model: &str, id: Option<&str>, err: &JobError) -> Result<(), BusError> {
        let token = if crate::job::valid_model_name(model) && id.is_some() { crate::job::model_token(model) } else { "invalid".into() };
        let mut headers = HeaderMap::new();
        headers.insert("Jetbatch-Error-Code", err.code.as_str());
        headers.insert("Jetbatch-Error", header_text(&err.message, 512).as_str());
        headers.insert("Jetbatch-Subject", d.subject.as_str());
        headers.insert("Jetbatch-Stream-Seq", d.stream_seq.to_string().as_str());
        headers.insert("Jetbatch-Deliveries", d.delivered.to_string().as_str());
        headers.insert("Nats-Msg-Id", format!("dead-{}", d.stream_seq).as_str());
        if let Some(ct) = d.header("Content-Type") {
            headers.insert("Jetbatch-Content-Type", header_text(ct, 128).as_str());
        }
        if let Some(id) = id {
            headers.insert("Jetbatch-Job-Id", id);
        }
        let subject = format!("{}.dead.{token}", self.topology.prefix);
        match publish_stored(&self.js, subject.clone(), headers.clone(), d.payload.clone()).await {
            Err(e) if e.is_permanent() => {
                headers.insert("Jetbatch-Payload-Dropped", d.payload.len().to_string().as_str());
                publish_stored(&self.js, subject, headers, Bytes::new()).await.map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }

    /// Whether the results stream holds this very job's answer (see [`stored_answer`]).
    pub async fn answered(&self, id: &str, hash: &str) -> Result<bool, BusError> {
        Ok(stored_answer(&self.results, self.topology.result_subject(id), id, hash).await?.is_some())
    }
}

fn content_type(e: Encoding) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Content-Type", e.content_type());
    h
}

/// Header-safe text: printable characters only, at most `max` of them.
fn header_text(s: &str, max: usize) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(max).collect()
}

/// Publishes the metrics snapshot (JSON) on `subject` every `interval_secs` (0: never).
pub async fn snapshots(client: Client, subject: String, metrics: Arc<Metrics>, interval_secs: u64, mut shutdown: broadcast::Receiver<()>) {
    if interval_secs == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(interval_secs));
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tick.tick() => {}
        }
        let body = serde_json::to_vec(&metrics.snapshot()).expect("json");
        if let Err(e) = client.publish(subject.clone(), body.into()).await {
            warn!(error = %e, "metrics snapshot publish");
        }
    }
}

/// Publishes streamed `generate` chunks on core NATS `<prefix>.stream.<id>`. Core publishes on the
/// worker's one connection keep their order, and the runner publishes a job's chunks before its
/// result goes to the results stage, so subscribers see every chunk before the result.
#[derive(Clone)]
pub struct Streamer {
    pub client: Client,
    pub prefix: String,
}

impl Streamer {
    pub async fn publish(&self, id: &str, encoding: crate::job::Encoding, c: &StreamChunk) {
        let payload = Bytes::from(encoding.encode(&c.wire(id, encoding)));
        if let Err(e) = self.client.publish(format!("{}.stream.{id}", self.prefix), payload).await {
            warn!(%id, error = %e, "stream chunk publish");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetstream::context::{PublishError, PublishErrorKind};

    #[test]
    fn publish_failures_that_cannot_succeed_later_are_permanent() {
        let api = |code: u16, err_code: u64| -> jetstream::Error {
            serde_json::from_value(serde_json::json!({"code": code, "err_code": err_code, "description": "refused"})).unwrap()
        };
        let permanent = |e: PublishError| publish_error(e).is_permanent();
        assert!(permanent(PublishError::new(PublishErrorKind::MaxPayloadExceeded)));
        assert!(permanent(PublishError::new(PublishErrorKind::WrongLastSequence)));
        assert!(permanent(PublishError::with_source(PublishErrorKind::Other, api(400, 10054))), "message over the stream's max size");
        assert!(permanent(PublishError::with_source(PublishErrorKind::Other, api(400, 10060))), "expected stream mismatch");
        assert!(!permanent(PublishError::with_source(PublishErrorKind::Other, api(503, 10008))), "JetStream temporarily unavailable");
        assert!(!permanent(PublishError::with_source(PublishErrorKind::Other, api(404, 10059))), "stream not found during a failover");
        assert!(!permanent(PublishError::new(PublishErrorKind::TimedOut)));
        assert!(!permanent(PublishError::new(PublishErrorKind::BrokenPipe)));
        assert!(!permanent(PublishError::new(PublishErrorKind::StreamNotFound)));
    }

    #[test]
    fn results_are_keyed_by_id_and_job() {
        let (a, b) = (job_hash(b"{\"id\":\"x\",\"n\":1}"), job_hash(b"{\"id\":\"x\",\"n\":2}"));
        assert_ne!(result_msg_id("x", &a), result_msg_id("x", &b), "two jobs that share an id keep two answers");
        assert_eq!(result_msg_id("x", &a), result_msg_id("x", &job_hash(b"{\"id\":\"x\",\"n\":1}")), "a redelivery is deduplicated");
    }
}
