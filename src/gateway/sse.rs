//! `stream: true`: a `generate` job's chunks (core NATS `<prefix>.stream.<id>`) as server-sent
//! events, in the route's chunk shape, then `data: [DONE]`.
//!
//! The response starts only once the job's first chunk or its result is in, so a job the worker
//! refuses is still an HTTP error with its status. From then on a failure is an error event
//! (`data: {"error": …}`) that ends the stream: the job's error result, its deadline, or no chunk
//! for `--stream-idle-secs` after the first (its worker died mid-stream; the job goes to another
//! worker on redelivery, but this response has told its client part of a text already). Chunks are
//! core NATS and may be lost: the result's text is the truth, and what the chunks did not carry
//! of it goes out in the last text event. A chunk whose index was sent already (a redelivered
//! job's generation starting over) is skipped.
//!
//! With log-probs asked for, each text event carries those of the tokens its chunk covers (the
//! chunk's `tokens` and `top_logprobs`, read as the whole answer reads the result's), and the last
//! text event those of the tokens no chunk covered (an end-of-sequence token adds no text), from
//! the result: the events' log-probs are the whole answer's.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Future, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::jobs::{Bus, JobSpec};
use super::openai::{self, TokenLogprob};

/// What the route renders into one event's `data`.
pub enum Piece<'a> {
    /// Text to add, `at` characters into the text sent so far, and its tokens' log-probs when
    /// they were asked for.
    Text { text: &'a str, at: usize, logprobs: Option<&'a [TokenLogprob]> },
    /// The end: the job's output (`finish_reason`, token counts).
    Finish(&'a Value),
}

/// The route's chunk shape.
pub type Render = Box<dyn Fn(Piece) -> Value + Send + Sync>;

enum Event {
    Chunk(Bytes),
    Result(Result<Value, ApiError>),
    Idle,
}

type Output = Pin<Box<dyn Future<Output = Result<Value, ApiError>> + Send>>;

/// Publishes `spec` (a `generate` job; `stream: true` is set here) and answers with its events;
/// with `logprobs: Some(k)` (the job asks for `top_logprobs`) they carry the tokens' log-probs and
/// their `k` most likely alternatives.
pub async fn respond(bus: &Arc<Bus>, mut spec: JobSpec<'_>, idle: Duration, logprobs: Option<usize>, render: Render) -> Result<Response, ApiError> {
    spec.params.insert("stream".into(), true.into());
    let id = bus.next_id();
    let mut chunks = bus.chunks(&id).await?;
    let mut result: Output = Box::pin(bus.publish(id, spec).await?.output());
    let first = tokio::select! {
        biased;
        chunk = chunks.next() => chunk.map_or(Event::Result(Err(ApiError::bus("the chunk subscription closed"))), |m| Event::Chunk(m.payload)),
        r = &mut result => match r {
            Err(e) => return Err(e),
            ok => Event::Result(ok),
        },
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let mut relay = Relay { tx, render, logprobs, sent: String::new(), sent_chars: 0, tokens_sent: 0, next: 0 };
        let mut event = Some(first);
        let mut started = false;
        loop {
            let e = match event.take() {
                Some(e) => e,
                None => {
                    // Before the first chunk the job's deadline bounds the wait (in `result`).
                    let quiet = if started { idle } else { Duration::MAX };
                    tokio::select! {
                        biased;
                        chunk = tokio::time::timeout(quiet, chunks.next()) => match chunk {
                            Ok(Some(m)) => Event::Chunk(m.payload),
                            Ok(None) => Event::Result(Err(ApiError::bus("the chunk subscription closed"))),
                            Err(_) => Event::Idle,
                        },
                        r = &mut result => Event::Result(r),
                    }
                }
            };
            let go_on = match e {
                Event::Chunk(payload) => {
                    started = true;
                    relay.chunk(&payload).await
                }
                Event::Result(Ok(output)) => {
                    relay.finish(&output).await;
                    false
                }
                Event::Result(Err(e)) => {
                    relay.error(&e).await;
                    false
                }
                Event::Idle => {
                    let e = ApiError::deadline(format!("the stream stopped: no chunk for {} s (its worker stopped?); the job is retried by another worker but this stream ends", idle.as_secs()));
                    relay.error(&e).await;
                    false
                }
            };
            if !go_on {
                break;
            }
        }
    });
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|b| b.map(Ok::<_, Infallible>))));
    Ok(([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response())
}

/// Sends the events of one stream; every send reports whether the client is still there.
struct Relay {
    tx: mpsc::Sender<Bytes>,
    render: Render,
    /// With log-probs: how many alternatives each token lists.
    logprobs: Option<usize>,
    /// The text sent so far, and its length in characters.
    sent: String,
    sent_chars: usize,
    /// How many generated tokens the events sent so far cover.
    tokens_sent: usize,
    /// The index of the next chunk to send.
    next: usize,
}

impl Relay {
    async fn send(&self, data: &Value) -> bool {
        self.tx.send(Bytes::from(format!("data: {data}\n\n"))).await.is_ok()
    }

    /// Sends `text` (covering `tokens` more generated tokens, with their log-probs).
    async fn text(&mut self, text: &str, tokens: usize, logprobs: Option<&[TokenLogprob]>) -> bool {
        let piece = Piece::Text { text, at: self.sent_chars, logprobs };
        self.sent.push_str(text);
        self.sent_chars += text.chars().count();
        self.tokens_sent += tokens;
        self.send(&(self.render)(piece)).await
    }

    async fn chunk(&mut self, payload: &[u8]) -> bool {
        let Ok(chunk) = serde_json::from_slice::<Value>(payload) else { return true };
        let (Some(index), Some(text)) = (chunk["index"].as_u64(), chunk["text"].as_str()) else { return true };
        if (index as usize) < self.next || text.is_empty() {
            self.next = self.next.max(index as usize + 1);
            return true;
        }
        self.next = index as usize + 1;
        let tokens = chunk["tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
        let top = chunk["top_logprobs"].as_array().map(Vec::as_slice).unwrap_or_default();
        let logprobs = self.logprobs.map(|k| tokens.iter().zip(top).map(|(t, at)| openai::token_logprob(t.as_u64().unwrap_or(u64::MAX), at, k)).collect::<Vec<_>>());
        self.text(text, tokens.len(), logprobs.as_deref()).await
    }

    async fn finish(&mut self, output: &Value) {
        let text = output["text"].as_str().unwrap_or_default();
        let rest = text.strip_prefix(self.sent.as_str()).unwrap_or_default();
        let logprobs = self.logprobs.map(|k| {
            let mut all = openai::generated_logprobs(output, k);
            all.split_off(self.tokens_sent.min(all.len()))
        });
        let tokens_left = logprobs.as_ref().is_some_and(|l| !l.is_empty());
        if (!rest.is_empty() || tokens_left) && !self.text(rest, 0, logprobs.as_deref()).await {
            return;
        }
        if self.send(&(self.render)(Piece::Finish(output))).await {
            let _ = self.tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        }
    }

    async fn error(&self, e: &ApiError) {
        let _ = self.send(&e.body()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn top(id: u64, text: &str, logprob: f64) -> Value {
        json!({"ids": [id, 9], "tokens": [text, "x"], "logprobs": [logprob, -5.0]})
    }

    /// Chunks (one lost to a redelivery's repeat), then the result with an end-of-sequence token
    /// no chunk covered: the events' text and log-probs are the result's.
    #[tokio::test]
    async fn events_carry_the_chunks_log_probs_and_the_rest_from_the_result() {
        let (tx, mut rx) = mpsc::channel(16);
        let render: Render = Box::new(|piece| match piece {
            Piece::Text { text, at, logprobs } => json!({"text": text, "at": at, "tokens": logprobs.unwrap().iter().map(|t| (t.text.clone(), t.logprob)).collect::<Vec<_>>()}),
            Piece::Finish(_) => json!("finish"),
        });
        let mut relay = Relay { tx, render, logprobs: Some(1), sent: String::new(), sent_chars: 0, tokens_sent: 0, next: 0 };
        let chunk = |index: u64, text: &str, tokens: &[(u64, &str, f64)]| {
            let ids: Vec<u64> = tokens.iter().map(|t| t.0).collect();
            let tops: Vec<Value> = tokens.iter().map(|&(id, text, lp)| top(id, text, lp)).collect();
            serde_json::to_vec(&json!({"id": "j", "index": index, "text": text, "token": ids.last(), "tokens": ids, "top_logprobs": tops})).unwrap()
        };
        assert!(relay.chunk(&chunk(0, "hé", &[(1, "h", -0.5), (2, "é", -1.0)])).await);
        assert!(relay.chunk(&chunk(0, "hé", &[(1, "h", -0.5), (2, "é", -1.0)])).await, "a repeat is skipped");
        assert!(relay.chunk(&chunk(1, "y", &[(3, "y", -0.25)])).await);
        let output = json!({"text": "héy", "tokens": [1, 2, 3, 0], "finish_reason": "eos",
                            "top_logprobs": [top(1, "h", -0.5), top(2, "é", -1.0), top(3, "y", -0.25), top(0, "", -0.125)]});
        relay.finish(&output).await;
        drop(relay);
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(String::from_utf8(e.to_vec()).unwrap());
        }
        let data: Vec<Value> = events.iter().map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap().trim()).unwrap_or(json!(e))).collect();
        assert_eq!(
            data[..4],
            [
                json!({"text": "hé", "at": 0, "tokens": [["h", -0.5], ["é", -1.0]]}),
                json!({"text": "y", "at": 2, "tokens": [["y", -0.25]]}),
                json!({"text": "", "at": 3, "tokens": [["", -0.125]]}),
                json!("finish"),
            ]
        );
        assert_eq!(events[4], "data: [DONE]\n\n");
    }
}
