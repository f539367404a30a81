//! What the two streams hold under a job's id, for `submit` and `cancel`: the answer stored in the
//! results stream (ours only if its job hash is our job's), the jobs queued in the jobs stream,
//! and from both what a job that the jobs stream dropped as a duplicate comes to.

use std::collections::{HashMap, HashSet};

use async_nats::jetstream::{self, Context};
use async_nats::HeaderMap;
use futures::{StreamExt, TryStreamExt};

use super::error::SubmitError;
use crate::config::Topology;

/// Whether a result message answers the job whose payload hashes to `hash`: its body's id and its
/// [`crate::bus::JOB_HASH_HEADER`] must both match. A result that another producer's job with the
/// same id got (or anything else published on the subject) is not ours.
pub(super) fn answers(id: &str, hash: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> bool {
    headers.and_then(|h| h.get(crate::bus::JOB_HASH_HEADER)).map(|v| v.as_str()) == Some(hash)
        && crate::job::JobResult::decode(payload).is_ok_and(|r| r.id == id)
}

/// Results already in the results stream that answer our jobs, by id (direct gets, 64 at a time).
pub(super) async fn stored_results(js: &Context, t: &Topology, hashes: &HashMap<String, String>, ids: Vec<String>) -> Result<Vec<(String, Vec<u8>)>, SubmitError> {
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

/// What a job that the jobs stream dropped as a duplicate (`PubAck.duplicate`: a job under its
/// id was published within the stream's duplicate window) comes to.
pub(super) enum Duplicate {
    /// The results stream holds this very job's answer: it is collected.
    Answered(Vec<u8>),
    /// This very job is queued (an earlier run published it): its answer is waited for.
    Queued,
    /// The queue cannot be read with this account (why) and nothing is stored under the id yet.
    Unverified(String),
    /// It will never be answered (why, and what to do).
    Dropped(String),
}

/// What the results stream holds under `id`: this job's answer, another job's, or nothing.
async fn stored_under<I>(results: &jetstream::stream::Stream<I>, t: &Topology, id: &str, hash: &str) -> Result<Option<Duplicate>, SubmitError> {
    match results.direct_get_last_for_subject(t.result_subject(id)).await {
        Ok(m) if answers(id, hash, Some(&m.headers), &m.payload) => Ok(Some(Duplicate::Answered(m.payload.to_vec()))),
        Ok(_) => Ok(Some(Duplicate::Dropped("a different job under this id is answered already; give this job a new id".into()))),
        Err(e) if matches!(e.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => Ok(None),
        Err(e) => Err(SubmitError::Nats(format!("results lookup: {e}"))),
    }
}

/// Sorts out the jobs dropped as duplicates (`ids`, with their hashes in `hashes`): answered,
/// queued, or never to be answered. The queue is read before the results are looked up again: a
/// job that leaves the queue was answered first, so none is missed between the two.
pub(super) async fn resolve_duplicates(js: &Context, t: &Topology, hashes: &HashMap<String, String>, ids: Vec<String>) -> Result<Vec<(String, Duplicate)>, SubmitError> {
    let results = js.get_stream_no_info(&t.results_stream).await.map_err(|e| SubmitError::Nats(e.to_string()))?;
    let mut resolved = Vec::new();
    let mut unanswered = Vec::new();
    for id in ids {
        match stored_under(&results, t, &id, &hashes[&id]).await? {
            Some(d) => resolved.push((id, d)),
            None => unanswered.push(id),
        }
    }
    if unanswered.is_empty() {
        return Ok(resolved);
    }
    let wanted: HashSet<&str> = unanswered.iter().map(String::as_str).collect();
    let queued = match queued_jobs(js, t, |id| wanted.contains(id)).await {
        Ok(queued) => queued.into_iter().map(|q| (q.id, crate::bus::job_hash(&q.payload))).collect::<HashMap<_, _>>(),
        Err(e) => {
            let why = format!("this account cannot look into the jobs queue ({e}) to tell whether it is this very job; waiting for it — a result for a different job under this id ends the wait");
            resolved.extend(unanswered.into_iter().map(|id| (id, Duplicate::Unverified(why.clone()))));
            return Ok(resolved);
        }
    };
    for id in unanswered {
        let d = match queued.get(&id) {
            Some(h) if *h == hashes[&id] => Duplicate::Queued,
            Some(_) => Duplicate::Dropped("a different job under this id is queued; give this job a new id".into()),
            None => stored_under(&results, t, &id, &hashes[&id]).await?.unwrap_or_else(|| {
                Duplicate::Dropped("the earlier job under this id is neither queued nor answered (cancelled?); give this job a new id, or submit it again once the duplicate window has passed".into())
            }),
        };
        resolved.push((id, d));
    }
    Ok(resolved)
}

/// A job in the jobs stream: its sequence, `Nats-Msg-Id` and payload.
pub(super) struct QueuedJob {
    pub(super) seq: u64,
    pub(super) id: String,
    pub(super) payload: bytes::Bytes,
}

/// The jobs in the jobs stream (queued or being worked on) whose `Nats-Msg-Id` `wanted` picks,
/// read one by one: the stream's subjects name models, not ids. Needs
/// `$JS.API.STREAM.MSG.GET` on the jobs stream, which shows every producer's jobs.
pub(super) async fn queued_jobs(js: &Context, t: &Topology, wanted: impl Fn(&str) -> bool) -> Result<Vec<QueuedJob>, SubmitError> {
    let nats = |e: &dyn std::fmt::Display| SubmitError::Nats(e.to_string());
    let stream = js.get_stream(&t.jobs_stream).await.map_err(|e| nats(&e))?;
    let state = &stream.cached_info().state;
    futures::stream::iter(state.first_sequence..=state.last_sequence)
        .map(|seq| {
            let (stream, wanted) = (&stream, &wanted);
            async move {
                match stream.get_raw_message(seq).await {
                    // Gaps are jobs already acked (a work queue removes them) or cancelled.
                    Err(e) if matches!(e.kind(), jetstream::stream::RawMessageErrorKind::NoMessageFound) => Ok(None),
                    Err(e) => Err(nats(&e)),
                    Ok(m) => {
                        let id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string()).filter(|id| wanted(id));
                        Ok(id.map(|id| QueuedJob { seq, id, payload: m.payload }))
                    }
                }
            }
        })
        .buffer_unordered(64)
        .try_filter_map(|x| async move { Ok(x) })
        .try_collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Encoding, JobResult, Status, Timing};

    #[test]
    fn a_result_answers_our_job_only_under_its_id_and_its_job_hash() {
        let result = |id: &str| {
            let r = JobResult { id: id.into(), model: "m".into(), kind: "tensor".into(), status: Status::Ok, output: None, error: None, cached: false, worker: "w".into(), timing: Timing::default(), provenance: None };
            Encoding::Json.encode(&r)
        };
        let mut headers = HeaderMap::new();
        headers.insert(crate::bus::JOB_HASH_HEADER, "h1");
        assert!(answers("a", "h1", Some(&headers), &result("a")));
        assert!(!answers("a", "h2", Some(&headers), &result("a")), "another job under the same id");
        assert!(!answers("b", "h1", Some(&headers), &result("a")), "another id");
        assert!(!answers("a", "h1", None, &result("a")), "no job hash");
        assert!(!answers("a", "h1", Some(&headers), b"not a result"));
    }
}
