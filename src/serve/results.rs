//! The results stage: the only one that acks. A job is acked after its result is stored in the
//! cache and its publish is acknowledged by the results stream. [`decide`] is the policy — what
//! becomes of a finished job — as a plain function; [`settle`] carries it out on the bus.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::flow::{Ctx, Finished, Header, Outcome};
use crate::bus::{self, BusError, Delivery};
use crate::infer::admission;
use crate::job::{ErrorCode, JobError, JobResult, Output, Status};

/// Most result publishes awaiting their stream ack at once.
const MAX_PUBLISHING: usize = 4096;

/// What the results stage does with a finished job.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// Nak: redeliver after `delay` (none: at once); `reason` labels the metric.
    HandBack { delay: Option<Duration>, reason: &'static str },
    /// Ack without a second answer: the results stream has this job's answer.
    AckOnly,
    /// Publish the answer, then settle the message as `then` says.
    Answer { answer: Result<Output, JobError>, then: Then },
    /// No id to answer under: dead-letter the payload, then term.
    DeadLetter(JobError),
}

/// How a message is settled once its answer is stored.
#[derive(Debug, PartialEq)]
pub(crate) enum Then {
    Ack,
    /// An error answer is final: never redelivered.
    Term,
    /// Deliveries are used up: a dead letter too, then term.
    DeadLetter(JobError),
}

/// The ack policy. `delivered` counts this delivery; `max_deliver` ≤ 0 means unlimited.
pub(crate) fn decide(outcome: Outcome, has_id: bool, delivered: i64, max_deliver: i64) -> Decision {
    match outcome {
        Outcome::Release => Decision::HandBack { delay: None, reason: "shutdown" },
        Outcome::AlreadyAnswered => Decision::AckOnly,
        Outcome::Retry(e) if delivered < max_deliver || max_deliver <= 0 => {
            Decision::HandBack { delay: Some(backoff(delivered)), reason: e.error_type() }
        }
        Outcome::Retry(e) => {
            let err = e.to_job_error();
            Decision::Answer { answer: Err(err.clone()), then: Then::DeadLetter(err) }
        }
        Outcome::Elsewhere(_) if delivered < max_deliver || max_deliver <= 0 => {
            Decision::HandBack { delay: Some(super::peers::HANDOFF_DELAY), reason: ELSEWHERE }
        }
        Outcome::Elsewhere(last) => decide(Outcome::Answer(Err(last)), has_id, delivered, max_deliver),
        Outcome::Exhausted(err) if !has_id => Decision::DeadLetter(err),
        Outcome::Exhausted(err) => Decision::Answer { answer: Err(err.clone()), then: Then::DeadLetter(err) },
        Outcome::Answer(Ok(output)) => Decision::Answer { answer: Ok(output), then: Then::Ack },
        Outcome::Answer(Err(err)) if !has_id => Decision::DeadLetter(err),
        Outcome::Answer(Err(err)) => Decision::Answer { answer: Err(err), then: Then::Term },
    }
}

/// The hand-back reason of a job whose model other workers of the pool serve.
const ELSEWHERE: &str = "elsewhere";

/// When an answer's publish failed: a transient failure hands the job back (nothing is acked
/// without a stored result); one the server will never accept (say over its max payload) is
/// replaced by a short error answer, and the job goes to the dead letters.
pub(crate) fn after_failed_publish(e: &BusError) -> Result<JobError, Decision> {
    if e.is_permanent() {
        Ok(JobError::new(ErrorCode::ModelError, format!("the result could not be stored: {e}")))
    } else {
        Err(Decision::HandBack { delay: Some(Duration::from_secs(1)), reason: "publish" })
    }
}

/// Redelivery delay after the `delivered`-th failed attempt: 1 s doubling to at most 60 s.
fn backoff(delivered: i64) -> Duration {
    Duration::from_secs(1u64 << (delivered.clamp(1, 7) - 1)).min(Duration::from_secs(60))
}

/// Publishes results and acks jobs: store in cache → publish → await the stream's ack → ack job.
pub(crate) async fn results(mut finished: mpsc::Receiver<Finished>, mut released: mpsc::Receiver<Vec<Delivery>>, ctx: Arc<Ctx>) {
    let mut publishing = FuturesUnordered::new();
    let (mut finished_open, mut released_open) = (true, true);
    while finished_open || released_open || !publishing.is_empty() {
        let room = publishing.len() < MAX_PUBLISHING;
        tokio::select! {
            item = finished.recv(), if finished_open && room => match item {
                Some(f) => publishing.push(settle(f, ctx.clone())),
                None => finished_open = false,
            },
            item = released.recv(), if released_open => match item {
                Some(ds) => {
                    for d in ds {
                        hand_back(&d, None, "shutdown", &ctx).await;
                    }
                }
                None => released_open = false,
            },
            Some(()) = publishing.next(), if !publishing.is_empty() => {}
        }
    }
}

async fn hand_back(d: &Delivery, delay: Option<Duration>, reason: &str, ctx: &Ctx) {
    ctx.metrics.naks_total.with_label_values(&[reason]).inc();
    if let Err(e) = d.nak(delay).await {
        warn!(error = %e, "nak failed; the job is redelivered after ack_wait");
    }
}

/// Carries out [`decide`] for one job.
async fn settle(f: Finished, ctx: Arc<Ctx>) {
    let Finished { delivery, header, outcome } = f;
    let hash = bus::job_hash(&delivery.payload);
    // A redelivery, or a job held past ack_wait (say the process was paused): another worker may
    // have answered it meanwhile.
    let contested = delivery.delivered > 1 || delivery.received.elapsed() >= ctx.topology.ack_wait();
    let settling = matches!(outcome, Outcome::Answer(_) | Outcome::Retry(_) | Outcome::Elsewhere(_) | Outcome::Exhausted(_));
    let outcome = if contested && settling && ctx.already_answered(&header, &hash).await { Outcome::AlreadyAnswered } else { outcome };
    if let Outcome::Retry(e) = &outcome {
        warn!(id = ?header.id, error = %e, delivered = delivery.delivered, "job failed");
        ctx.metrics.errors_total.with_label_values(&["engine", e.error_type()]).inc();
    }
    let (answer, then) = match decide(outcome, header.id.is_some(), delivery.delivered, ctx.topology.max_deliver) {
        Decision::HandBack { delay, reason } => {
            if reason == ELSEWHERE {
                ctx.peers.handed_back();
            }
            return hand_back(&delivery, delay, reason, &ctx).await;
        }
        Decision::AckOnly => {
            debug!(id = ?header.id, "already answered by an earlier delivery; ack without a second answer");
            ctx.metrics.duplicates_suppressed_total.inc();
            if let Err(e) = delivery.ack().await {
                warn!(error = %e, "ack failed");
            }
            return;
        }
        Decision::DeadLetter(err) => {
            info!(subject = %delivery.subject, error = %err, "job without a readable id: dead-lettered");
            return dead_letter_then_term(&delivery, &header, &err, &ctx).await;
        }
        Decision::Answer { answer, then } => (answer, then),
    };
    if let Err(err) = &answer {
        info!(id = ?header.id, model = ctx.labels(&header)[0], error = %err, "job answered with an error");
    }
    if let (Ok(output), false) = (&answer, header.cached) {
        admission::store(ctx.cache.as_deref(), header.cache_key.as_ref(), output).await;
    }
    if let (true, true, Ok(Output::Generate { text, tokens, top, .. })) = (header.stream, header.cached, &answer) {
        // A cached generation streams as one chunk with the whole text, then done.
        let id = header.id.as_deref().expect("valid jobs have ids");
        let chunk = crate::stream::StreamChunk { job: 0, index: 0, text: text.clone(), tokens: tokens.clone(), top: top.clone(), done: false };
        ctx.streamer.publish(id, header.encoding, &chunk).await;
        ctx.streamer.publish(id, header.encoding, &crate::stream::StreamChunk { done: true, ..chunk }).await;
    }
    let mut code = answer.as_ref().err().map(|e| e.code);
    let mut then = then;
    if let Err(e) = publish_result(&ctx, &header, &hash, answer).await {
        ctx.metrics.errors_total.with_label_values(&["bus", e.error_type()]).inc();
        error!(id = ?header.id, error = %e, "result publish failed");
        let err = match after_failed_publish(&e) {
            Err(Decision::HandBack { delay, reason }) => return hand_back(&delivery, delay, reason, &ctx).await,
            Err(other) => unreachable!("after_failed_publish hands back: {other:?}"),
            Ok(err) => err,
        };
        match publish_result(&ctx, &header, &hash, Err(err.clone())).await {
            Err(e) => match after_failed_publish(&e) {
                Err(Decision::HandBack { delay, reason }) => return hand_back(&delivery, delay, reason, &ctx).await,
                _ => error!(id = ?header.id, error = %e, "error result refused as well; dead letter only"),
            },
            Ok(()) => {}
        }
        code = Some(err.code);
        then = Then::DeadLetter(err);
    }
    let level = delivery.subject_job(&ctx.topology.prefix).1;
    admission::count(&ctx.metrics, ctx.labels(&header), level, code, delivery.age());
    let done = match then {
        Then::DeadLetter(err) => return dead_letter_then_term(&delivery, &header, &err, &ctx).await,
        Then::Ack => delivery.ack().await,
        Then::Term => delivery.term().await,
    };
    if let Err(e) = done {
        warn!(id = ?header.id, error = %e, "ack failed; the job may be answered again (deduplicated by id)");
    }
}

async fn publish_result(ctx: &Ctx, h: &Header, hash: &str, answer: Result<Output, JobError>) -> Result<(), BusError> {
    let (status, output, error) = match answer {
        Ok(o) => (Status::Ok, Some(o.to_wire(h.encoding)), None),
        Err(e) => (Status::Error, None, Some(e)),
    };
    let result = JobResult {
        id: h.id.clone().expect("results are addressed by id"),
        model: h.model.clone(),
        kind: h.kind.clone(),
        status,
        output,
        error,
        cached: h.cached,
        worker: ctx.worker.clone(),
        timing: h.timing.clone(),
        provenance: h.provenance.clone(),
    };
    patiently(ctx, "result", |retry| ctx.publisher.result(&result, h.encoding, hash, h.reply_to.as_deref(), retry)).await
}

/// How long a publish that fails transiently is retried in place — the job held, its lease kept
/// by progress acks — before the job is handed back. Handing back at once would spend a delivery
/// per failed publish: through a cluster fail-over (seconds without a stream leader) a job could
/// use up `max_deliver`, after which the server never redelivers it. Retrying is safe: the
/// results stream drops a second copy by `Nats-Msg-Id` (its window is longer than this).
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);

/// The pause before retry `attempt` (1-based) of a publish that failed transiently, or `None`
/// once `elapsed` has used up [`PUBLISH_PATIENCE`]: 0.5 s doubling to at most 5 s.
pub(crate) fn publish_retry_pause(attempt: u32, elapsed: Duration) -> Option<Duration> {
    (elapsed < PUBLISH_PATIENCE).then(|| Duration::from_millis(250 << attempt.clamp(1, 5)).min(Duration::from_secs(5)))
}

/// Runs `publish` until it succeeds, fails permanently, or [`publish_retry_pause`] gives up;
/// `publish(true)` after a failed try.
async fn patiently<F, Fut>(ctx: &Ctx, what: &str, mut publish: F) -> Result<(), BusError>
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = Result<(), BusError>>,
{
    let started = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        match publish(attempt > 0).await {
            Err(e) if !e.is_permanent() => {
                attempt += 1;
                let Some(pause) = publish_retry_pause(attempt, started.elapsed()) else { return Err(e) };
                ctx.metrics.errors_total.with_label_values(&["bus", e.error_type()]).inc();
                warn!(what, error = %e, attempt, "publish failed; retrying");
                tokio::time::sleep(pause).await;
            }
            other => return other,
        }
    }
}

async fn dead_letter_then_term(d: &Delivery, h: &Header, err: &JobError, ctx: &Ctx) {
    match patiently(ctx, "dead letter", |_| ctx.publisher.dead_letter(d, &h.model, h.id.as_deref(), err)).await {
        Ok(()) => {
            ctx.metrics.dead_letters_total.inc();
            if let Err(e) = d.term().await {
                warn!(error = %e, "term failed");
            }
        }
        Err(e) => {
            error!(error = %e, "dead-letter publish failed; job will be redelivered");
            hand_back(d, Some(Duration::from_secs(1)), "publish", ctx).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;

    fn bad() -> JobError {
        JobError::bad_request("input: bad")
    }

    #[test]
    fn answers_are_acked_and_errors_termed() {
        let ok = Output::Score { logprob: -1.0, is_greedy: Some(true), tokens: 1, top: Vec::new() };
        assert_eq!(decide(Outcome::Answer(Ok(ok.clone())), true, 1, 5), Decision::Answer { answer: Ok(ok), then: Then::Ack });
        assert_eq!(decide(Outcome::Answer(Err(bad())), true, 1, 5), Decision::Answer { answer: Err(bad()), then: Then::Term });
    }

    #[test]
    fn without_an_id_the_payload_is_dead_lettered() {
        assert_eq!(decide(Outcome::Answer(Err(bad())), false, 1, 5), Decision::DeadLetter(bad()));
    }

    #[test]
    fn transient_failures_back_off_then_dead_letter_with_an_answer() {
        let retry = || Outcome::Retry(EngineError::Model("boom".into()));
        assert_eq!(decide(retry(), true, 1, 5), Decision::HandBack { delay: Some(Duration::from_secs(1)), reason: "model" });
        assert_eq!(decide(retry(), true, 4, 5), Decision::HandBack { delay: Some(Duration::from_secs(8)), reason: "model" });
        assert_eq!(decide(retry(), true, 30, 0), Decision::HandBack { delay: Some(Duration::from_secs(60)), reason: "model" }, "unlimited deliveries");
        let err = EngineError::Model("boom".into()).to_job_error();
        assert_eq!(decide(retry(), true, 5, 5), Decision::Answer { answer: Err(err.clone()), then: Then::DeadLetter(err) });
    }

    #[test]
    fn a_job_for_another_workers_model_goes_back_until_its_last_delivery_which_is_answered() {
        let last = JobError::new(ErrorCode::ModelError, "model: 'm' is served by other workers");
        let elsewhere = || Outcome::Elsewhere(last.clone());
        let back = Decision::HandBack { delay: Some(super::super::peers::HANDOFF_DELAY), reason: ELSEWHERE };
        assert_eq!(decide(elsewhere(), true, 1, 5), back);
        assert_eq!(decide(elsewhere(), true, 4, 5), back);
        assert_eq!(decide(elsewhere(), true, 9, 0), back, "unlimited deliveries");
        assert_eq!(decide(elsewhere(), true, 5, 5), Decision::Answer { answer: Err(last.clone()), then: Then::Term });
        assert_eq!(decide(elsewhere(), false, 5, 5), Decision::DeadLetter(last));
    }

    #[test]
    fn a_job_delivered_past_max_deliver_is_answered_and_dead_lettered_not_started() {
        use super::super::flow::deliveries_used_up;
        assert_eq!(deliveries_used_up(5, 5), None, "the last delivery is still worked on");
        assert_eq!(deliveries_used_up(50, 0), None, "unlimited");
        let err = deliveries_used_up(6, 5).expect("past the last delivery");
        assert!(err.message.starts_with("delivered 6 times without an answer (max_deliver 5)"), "{}", err.message);
        assert_eq!(decide(Outcome::Exhausted(err.clone()), true, 6, 5), Decision::Answer { answer: Err(err.clone()), then: Then::DeadLetter(err.clone()) });
        assert_eq!(decide(Outcome::Exhausted(err.clone()), false, 6, 5), Decision::DeadLetter(err));
    }

    #[test]
    fn releases_go_back_at_once_and_answered_jobs_are_only_acked() {
        assert_eq!(decide(Outcome::Release, true, 1, 5), Decision::HandBack { delay: None, reason: "shutdown" });
        assert_eq!(decide(Outcome::AlreadyAnswered, true, 2, 5), Decision::AckOnly);
    }

    #[test]
    fn a_refused_result_becomes_an_error_answer_and_a_transient_failure_a_retry() {
        let refused = BusError::Publish { message: "max payload".into(), permanent: true };
        let err = after_failed_publish(&refused).unwrap();
        assert_eq!(err.code, ErrorCode::ModelError);
        assert!(err.message.contains("could not be stored"));
        let transient = BusError::Publish { message: "timed out".into(), permanent: false };
        assert_eq!(after_failed_publish(&transient).unwrap_err(), Decision::HandBack { delay: Some(Duration::from_secs(1)), reason: "publish" });
    }

    #[test]
    fn a_transient_publish_failure_is_retried_in_place_for_a_minute() {
        let pauses: Vec<_> = (1..=7).map(|a| publish_retry_pause(a, Duration::from_secs(1)).unwrap().as_millis()).collect();
        assert_eq!(pauses, [500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(publish_retry_pause(3, PUBLISH_PATIENCE), None, "then the job is handed back");
    }
}
