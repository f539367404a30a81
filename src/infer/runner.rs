//! The runner: hands batches to the engine and passes each ticket back, with its output or
//! failure, as soon as the engine reports it done.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc};
use tracing::{debug, debug_span, Instrument};

use super::{ChunkSink, Done, Failure, Ticket};
use crate::batcher::Batch;
use crate::engine::{EngineHandle, Event};
use crate::deadline::Deadline;
use crate::job::{self, JobKind, Timing};
use crate::kinds::Batching;
use crate::metrics::Metrics;

/// Runs batches on the engine. Scoring batches are awaited here, so exactly one more waits in
/// the channel (prefetch); `generate` batches join the model's running generation and are
/// collected by their own task, so later jobs can join while earlier ones still generate.
/// Batches that arrive after shutdown was signalled were never started and are released.
pub(super) async fn runner<T: Ticket, O: From<Done<T>> + Send + 'static, S: ChunkSink>(
    mut batches: mpsc::Receiver<Batch<T>>,
    engine: EngineHandle,
    chunks: S,
    out: mpsc::Sender<O>,
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
            for ticket in batch.items {
                let _ = out.send(Done { ticket, timing: Timing::default(), result: Err(Failure::Released) }.into()).await;
            }
            continue;
        }
        let tokens: usize = batch.items.iter().map(|t| t.job().cost).sum();
        let span = debug_span!("batch", model = %batch.model.name, kind = batch.kind.as_str(), size = batch.items.len(), tokens);
        let generate = batch.kind == JobKind::Generate;
        let Some(run) = submit(batch, &engine, &out, &metrics).await else { continue };
        let collect = collect(run, chunks.clone(), out.clone(), metrics.clone()).instrument(span);
        if generate {
            tokio::spawn(collect);
        } else {
            collect.await;
        }
    }
}

/// A batch handed to the engine: its tickets (with their queue time) and the engine's events.
struct Submitted<T> {
    model: Arc<str>,
    items: Vec<Option<(T, f64)>>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Jobs that join a running generation: their batch is the rows they ran beside, known when done.
    continuous: bool,
}

/// Answers jobs past their deadline or `timeout_ms` (they waited in the batcher meanwhile), and
/// submits the rest to the engine.
async fn submit<T: Ticket, O: From<Done<T>>>(batch: Batch<T>, engine: &EngineHandle, out: &mpsc::Sender<O>, metrics: &Metrics) -> Option<Submitted<T>> {
    let Batch { model, kind, items: all } = batch;
    let batch_len = all.len();
    let now = SystemTime::now();
    let mut items = Vec::with_capacity(batch_len);
    for ticket in all {
        match super::admission::late(ticket.job(), ticket.age(), now) {
            None => items.push(ticket),
            Some(err) => {
                let timing = Timing { queued_ms: ms(ticket.age()), ..Timing::default() };
                let _ = out.send(Done { ticket, timing, result: Err(Failure::Late(err)) }.into()).await;
            }
        }
    }
    if items.is_empty() {
        return None;
    }
    // A generate job comes alone and joins the running batch: its size is counted when it is done.
    let continuous = kind.batching() == Batching::Continuous;
    if !continuous {
        metrics.batch_size.with_label_values(&[&model.name]).observe(items.len() as f64);
    }
    let inputs = items.iter_mut().map(|t| std::mem::replace(&mut t.job_mut().input, job::JobInput::Tensor(Vec::new()))).collect();
    let streaming = items.iter().map(|t| t.job().stream).collect();
    let deadlines = items.iter().map(|t| t.job().deadline.map(Deadline::instant)).collect();
    let events = engine.run(model.clone(), kind, inputs, streaming, deadlines);
    let items = items
        .into_iter()
        .map(|t| {
            let queued_ms = ms(t.age());
            Some((t, queued_ms))
        })
        .collect();
    Some(Submitted { model: model.name.clone(), items, events, continuous })
}

/// Publishes streamed chunks as they come and passes each ticket on as soon as it is done.
async fn collect<T: Ticket, O: From<Done<T>>, S: ChunkSink>(mut run: Submitted<T>, chunks: S, out: mpsc::Sender<O>, metrics: Arc<Metrics>) {
    let mut left = run.items.len();
    let mut slowest = Duration::ZERO;
    while left > 0 {
        match run.events.recv().await {
            Some(Event::Chunk { index, chunk }) => {
                if let Some((t, _)) = &run.items[index] {
                    chunks.publish(t.job(), &chunk).await;
                }
            }
            Some(Event::Done { index, result, compute, batch }) => {
                let Some((ticket, queued_ms)) = run.items[index].take() else { continue };
                left -= 1;
                slowest = slowest.max(compute);
                if run.continuous {
                    // The most rows the running generation held while this job was in it, as its result says.
                    metrics.batch_size.with_label_values(&[&run.model]).observe(batch as f64);
                }
                if let Ok(job::Output::Generate { tokens, .. }) = &result {
                    metrics.generated_tokens_total.with_label_values(&[&run.model]).inc_by(tokens.len() as u64);
                }
                let timing = Timing { queued_ms, compute_ms: ms(compute), batch_size: batch };
                let _ = out.send(Done { ticket, timing, result: result.map_err(Failure::from_engine) }.into()).await;
            }
            None => break,
        }
    }
    // The engine went away before answering: the adapter may retry elsewhere.
    for (ticket, queued_ms) in run.items.into_iter().flatten() {
        let timing = Timing { queued_ms, ..Timing::default() };
        let _ = out.send(Done { ticket, timing, result: Err(Failure::Engine(crate::engine::EngineError::Stopped)) }.into()).await;
    }
    metrics.batch_compute_seconds.with_label_values(&[&run.model]).observe(slowest.as_secs_f64());
    debug!(compute_ms = ms(slowest), "batch done");
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
