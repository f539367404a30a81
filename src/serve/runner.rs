//! The runner stage: hands batches to the engine and passes each job on, with its outcome, to the
//! results stage as soon as the engine reports it done.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tracing::{debug, debug_span, Instrument};

use super::flow::{ms, Finished, Header, Outcome, Pending};
use crate::batcher::Batch;
use crate::bus;
use crate::engine::{EngineError, EngineHandle};
use crate::job::{self, ErrorCode, JobError, JobKind, Timing};
use crate::metrics::Metrics;

/// Runs batches on the engine. Scoring batches are awaited here, so exactly one more waits in
/// the channel (prefetch); `generate` batches join the model's running generation and are
/// collected by their own task, so later jobs can join while earlier ones still generate.
/// Batches that arrive after shutdown was signalled were never started and are released.
pub(crate) async fn runner(
    mut batches: mpsc::Receiver<Batch<Pending>>,
    engine: EngineHandle,
    streamer: bus::Streamer,
    finished: mpsc::Sender<Finished>,
    metrics: Arc<Metrics>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let mut stopping = false;
    loop {
        let batch = tokio::select! {
            biased;
            _ = shutdown.recv(), if !stopping => {
                // Generate jobs waiting in the engine's scheduler were never started: hand them
                // back now rather than generate them all before exiting.
                stopping = true;
                engine.release_waiting();
                continue;
            }
            batch = batches.recv() => match batch {
                Some(batch) => batch,
                None => break,
            },
        };
        if stopping {
            for p in batch.items {
                let header = Header::of(&p);
                let _ = finished.send(Finished { delivery: p.delivery, header, outcome: Outcome::Release }).await;
            }
            continue;
        }
        let tokens: usize = batch.items.iter().map(|p| p.job.cost).sum();
        let span = debug_span!("batch", model = %batch.model.name, kind = batch.kind.as_str(), size = batch.items.len(), tokens);
        let generate = batch.kind == JobKind::Generate;
        let Some(run) = submit(batch, &engine, &finished, &metrics).await else { continue };
        let collect = collect(run, streamer.clone(), finished.clone(), metrics.clone()).instrument(span);
        if generate {
            tokio::spawn(collect);
        } else {
            collect.await;
        }
    }
}

/// A batch handed to the engine: its jobs (with their queue time) and the engine's events.
struct Submitted {
    model: Arc<str>,
    items: Vec<Option<(Pending, f64)>>,
    events: mpsc::UnboundedReceiver<crate::engine::Event>,
}

/// Answers jobs past their deadline, and submits the rest to the engine.
async fn submit(batch: Batch<Pending>, engine: &EngineHandle, finished: &mpsc::Sender<Finished>, metrics: &Metrics) -> Option<Submitted> {
    let Batch { model, kind, items } = batch;
    let (mut items, late): (Vec<Pending>, Vec<Pending>) =
        items.into_iter().partition(|p| p.job.timeout.is_none_or(|t| p.delivery.age() <= t));
    for p in late {
        let mut header = Header::of(&p);
        header.timing.queued_ms = ms(p.delivery.age());
        let err = JobError::new(ErrorCode::Timeout, format!("waited {:.0} ms, over the job's timeout_ms", header.timing.queued_ms));
        let _ = finished.send(Finished { delivery: p.delivery, header, outcome: Outcome::Answer(Err(err)) }).await;
    }
    if items.is_empty() {
        return None;
    }
    metrics.batch_size.with_label_values(&[&model.name]).observe(items.len() as f64);
    let inputs = items.iter_mut().map(|p| std::mem::replace(&mut p.job.input, job::JobInput::Tensor(Vec::new()))).collect();
    let streaming = items.iter().map(|p| p.job.stream).collect();
    let events = engine.run(model.clone(), kind, inputs, streaming);
    let items = items
        .into_iter()
        .map(|p| {
            let queued_ms = ms(p.delivery.age());
            Some((p, queued_ms))
        })
        .collect();
    Some(Submitted { model: model.name.clone(), items, events })
}

/// Publishes streamed chunks as they come and passes each job on as soon as it is done.
async fn collect(mut run: Submitted, streamer: bus::Streamer, finished: mpsc::Sender<Finished>, metrics: Arc<Metrics>) {
    let mut left = run.items.len();
    let mut slowest = Duration::ZERO;
    while left > 0 {
        match run.events.recv().await {
            Some(crate::engine::Event::Chunk { index, chunk }) => {
                if let Some((p, _)) = &run.items[index] {
                    streamer.publish(&p.job.id, p.job.encoding, &chunk).await;
                }
            }
            Some(crate::engine::Event::Done { index, result, compute, batch }) => {
                let Some((p, queued_ms)) = run.items[index].take() else { continue };
                left -= 1;
                slowest = slowest.max(compute);
                let mut header = Header::of(&p);
                header.timing = Timing { queued_ms, compute_ms: ms(compute), batch_size: batch };
                let outcome = match result {
                    Ok(output) => Outcome::Answer(Ok(output)),
                    Err(EngineError::Released) => Outcome::Release,
                    Err(e) => Outcome::Retry(e),
                };
                let _ = finished.send(Finished { delivery: p.delivery, header, outcome }).await;
            }
            None => break,
        }
    }
    // The engine went away before answering: retry elsewhere.
    for (p, _) in run.items.into_iter().flatten() {
        let header = Header::of(&p);
        let _ = finished.send(Finished { delivery: p.delivery, header, outcome: Outcome::Retry(EngineError::Stopped) }).await;
    }
    metrics.batch_compute_seconds.with_label_values(&[&run.model]).observe(slowest.as_secs_f64());
    debug!(compute_ms = ms(slowest), "batch done");
}

