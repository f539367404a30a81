//! The intake stage: parses each delivery into a job; answers invalid jobs, jobs past their
//! deadline, cache hits and jobs already answered straight away, and passes the rest on to the
//! batcher. Validation, the deadline and the cache are the core's (`crate::infer::admission`);
//! what is here is JetStream's: deliveries, `Nats-Msg-Id` against the id, the level of the
//! subject, redeliveries already answered and deliveries used up.

use std::sync::Arc;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::error;

use super::flow::{Ctx, Finished, Header, Outcome, Pending};
use crate::infer::admission::{self, Admitted};
use crate::infer::ms;
use crate::bus::{self, Delivery};
use crate::error::excerpt;
use crate::job::{self, JobError, Limits};
use crate::error::ErrorCode;
use crate::repository::{LiveRepository, Repository};

/// Payloads at least this large are parsed on the blocking pool: decoding and tokenising them
/// takes long enough to hold up the jobs behind them on the intake loop.
const HEAVY_PAYLOAD: usize = 16 << 10;
/// Most heavy payloads parsed at once (each may hold a few times its size in memory meanwhile).
const HEAVY_PARSERS: usize = 4;

/// Parses each delivery into a job; answers invalid jobs and cache hits straight away. Small
/// payloads are parsed in line; large ones, and those that may run a chat template, on the
/// blocking pool, so one huge or slow job cannot stall the jobs behind it. Each delivery taken and
/// done is stamped on `Metrics::intake`, which `health` reads.
pub(crate) async fn intake(
    mut deliveries: mpsc::Receiver<Delivery>,
    pending: mpsc::Sender<Pending>,
    finished: mpsc::Sender<Finished>,
    repository: Arc<LiveRepository>,
    limits: Limits,
    ctx: Arc<Ctx>,
) {
    let limits = Arc::new(limits);
    let mut heavy = FuturesUnordered::new();
    let mut open = true;
    while open || !heavy.is_empty() {
        let (delivery, parsed) = tokio::select! {
            d = deliveries.recv(), if open && heavy.len() < HEAVY_PARSERS => match d {
                None => { open = false; continue }
                Some(d) => {
                    ctx.metrics.intake.took();
                    let (repository, prefix) = (repository.current(), ctx.topology.prefix.clone());
                    if is_heavy(&d, &repository, &prefix) {
                        let limits = limits.clone();
                        heavy.push(tokio::task::spawn_blocking(move || {
                            let parsed = parse(&d, &repository, &limits, &prefix);
                            (d, parsed)
                        }));
                        continue;
                    }
                    let parsed = parse(&d, &repository, &limits, &prefix);
                    (d, parsed)
                }
            },
            Some(done) = heavy.next(), if !heavy.is_empty() => match done {
                Ok(pair) => pair,
                // The parse panicked: the job is dropped with its permit and redelivered after
                // ack_wait; the decoder's fuzz tests exist so that this does not happen.
                Err(e) => { error!(error = %e, "job parsing failed"); ctx.metrics.intake.done(); continue }
            },
        };
        let sent = match admit(delivery, parsed, &pending, &ctx).await {
            Some(item) => finished.send(item).await.is_ok(),
            None => true,
        };
        ctx.metrics.intake.done();
        if !sent {
            return;
        }
    }
}

/// Whether a delivery is parsed on the blocking pool: a large payload, or one that may render the
/// chat template of its subject's model (up to its bounds, about a second). The key `messages`
/// is in the bytes of any job that sends it, unless a JSON key spells it with `\u` escapes, which
/// count too.
fn is_heavy(d: &Delivery, repository: &Repository, prefix: &str) -> bool {
    let renders = || repository.get(&d.subject_job(prefix).0).and_then(|spec| spec.lm.as_ref()).is_some_and(|lm| lm.chat.is_ok());
    d.payload.len() >= HEAVY_PAYLOAD || (may_send_messages(&d.payload) && renders())
}

fn may_send_messages(payload: &[u8]) -> bool {
    let has = |needle: &[u8]| payload.windows(needle.len()).any(|w| w == needle);
    has(b"messages") || has(b"\\u")
}

/// Routes a parsed delivery: an error answer, an answer from the cache, an ack of a job already
/// answered, or on to the batcher (`None`).
async fn admit(delivery: Delivery, parsed: Result<Admitted, (Header, JobError)>, pending: &mpsc::Sender<Pending>, ctx: &Ctx) -> Option<Finished> {
    let Admitted { job, spec, cache_key } = match parsed {
        Err((header, error)) => {
            let outcome = match elsewhere(&header, &error, ctx).await {
                Some(last) => Outcome::Elsewhere(last),
                None => Outcome::Answer(Err(error)),
            };
            return Some(Finished { delivery, header, outcome });
        }
        Ok(parsed) => parsed,
    };
    let header = Header::of_job(&job, &spec, cache_key);
    // Past its deadline (say after hours in the stream): answered now, never batched.
    if let Some(err) = admission::late(&job, delivery.age(), std::time::SystemTime::now()) {
        let mut header = header;
        header.timing.queued_ms = ms(delivery.age());
        return Some(Finished { delivery, header, outcome: Outcome::Answer(Err(err)) });
    }
    if delivery.delivered > 1 && ctx.already_answered(&header, &bus::job_hash(&delivery.payload)).await {
        return Some(Finished { delivery, header, outcome: Outcome::AlreadyAnswered });
    }
    if let Some(output) = admission::lookup(ctx.cache.as_deref(), &job, &spec, cache_key.as_ref()).await {
        let mut header = header;
        header.cached = true;
        header.timing.queued_ms = ms(delivery.age());
        return Some(Finished { delivery, header, outcome: Outcome::Answer(Ok(output)) });
    }
    if let Some(err) = super::flow::deliveries_used_up(delivery.delivered, ctx.topology.max_deliver) {
        return Some(Finished { delivery, header, outcome: Outcome::Exhausted(err) });
    }
    let queued = ctx.queues.enter(spec.name.clone());
    match pending.send(Pending { job, spec, cache_key, delivery, _queued: queued }).await {
        Ok(()) => None,
        // The batcher has stopped: this job was never started.
        Err(mpsc::error::SendError(p)) => Some(Finished { header: Header::of(&p), delivery: p.delivery, outcome: Outcome::Release }),
    }
}

/// For a job refused because this worker lacks its model (absent or unservable here) while other
/// workers of the pool serve it: the answer for its last delivery (it is handed back before).
async fn elsewhere(header: &Header, error: &JobError, ctx: &Ctx) -> Option<JobError> {
    let lacking = matches!(error.code, ErrorCode::UnknownModel | ErrorCode::ModelError)
        && !header.model.is_empty()
        && ctx.repository.current().get(&header.model).is_none();
    if !lacking {
        return None;
    }
    let serving = ctx.peers.serving(&header.model).await;
    (!serving.is_empty()).then(|| super::peers::elsewhere_error(&header.model, &serving, ctx.topology.max_deliver))
}

/// Decodes and validates a delivery; on failure, the header of the error result.
fn parse(d: &Delivery, repository: &Repository, limits: &Limits, prefix: &str) -> Result<Admitted, (Header, JobError)> {
    let (model, level) = d.subject_job(prefix);
    let mut env = job::decode(&d.payload, d.header("Content-Type"), &model, limits).map_err(|r| {
        let header = Header::of_parts(r.id, r.model.unwrap_or_default(), r.kind.unwrap_or_default(), r.encoding, None);
        (header, r.error)
    })?;
    let header = |env: &job::Envelope| Header::of_parts(Some(env.id.clone()), env.model.clone(), env.kind.as_str().to_string(), env.encoding, env.reply_to.clone());
    // The stream deduplicates jobs by Nats-Msg-Id; an id in the body that differs would let one
    // job pass the stream's dedup under one name and be answered under another's.
    if let Some(msg_id) = d.header("Nats-Msg-Id").filter(|m| *m != env.id) {
        let msg = format!("id: '{}' differs from the Nats-Msg-Id header '{}'", env.id, msg_id.chars().take(64).collect::<String>());
        return Err((header(&env), JobError::bad_request(msg)));
    }
    // The subject decides the level (the consumer that delivered it); a body that says otherwise
    // was published on the wrong subject.
    match env.priority {
        Some(p) if p != level => {
            let msg = format!("priority: '{p}' differs from the level of the subject it was published on ('{level}', {})", excerpt(&d.subject));
            return Err((header(&env), JobError::bad_request(msg)));
        }
        _ => env.priority = Some(level),
    }
    let h = header(&env);
    admission::admit(repository, env, limits).map_err(|e| (h, e))
}

#[cfg(test)]
mod tests {
    use super::may_send_messages;

    #[test]
    fn jobs_that_may_send_messages_are_told_by_their_bytes() {
        let msgpack = rmp_serde::to_vec_named(&serde_json::json!({"input": {"messages": []}})).unwrap();
        assert!(may_send_messages(&msgpack));
        assert!(may_send_messages(br#"{"input": {"messages": []}}"#));
        // serde_json reads this key as `messages`.
        assert!(may_send_messages(br#"{"input": {"\u006dessages": []}}"#));
        assert!(!may_send_messages(br#"{"input": {"context": "a", "continuation": "b"}}"#));
    }
}
