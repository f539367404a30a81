//! `jetbatch gateway`: an OpenAI-compatible HTTP endpoint in front of the pool. It is a producer
//! and holds no state: each request becomes jobs on the bus (`<prefix>.jobs.<model>[.<level>]`)
//! and their results become the response, so any number of gateways can run beside any number
//! of workers. It does not validate jobs: the worker does, and its `bad_request` becomes a 400
//! naming the request's field.
//!
//! Every request passes the same door ([`App::serve`]): the API key (`Authorization: Bearer`,
//! when `--api-keys` is set), a bound on requests in flight (429 past it), a bounded body (413),
//! a JSON object, its level/deadline/cache (extra fields or `X-Jetbatch-*` headers), then the
//! route; the metrics count it by route and status. HTTPS with `--tls-cert`/`--tls-key`
//! (`tls.rs`), else plain HTTP.
//!
//! A client that disconnects drops its wait, never a job it was promised: every job carries a
//! deadline (the request's, else now + `--timeout-secs`), which takes it — a worker answers it
//! `timeout` unstarted past it and stops a generation at it ([`jobs`]).
//!
//! # Layout
//! - `mod.rs`: the router, the door every request passes, `run`.
//! - [`jobs`]: publishing a request's jobs and waiting for their results (one reply
//!   subscription per gateway, the results stream as fallback).
//! - `openai.rs`: request fields the gateway reads itself, generation parameters, log-probs out
//!   of `top_logprobs`, `usage`; `error.rs`: errors in OpenAI's shape, the worker's mapped.
//! - One file per route: `completions.rs` (with echo + logprobs as per-token `loglikelihood`
//!   jobs), `chat.rs`, `embeddings.rs`, `models.rs` (service discovery, also the 404/503 check);
//!   `sse.rs`: `stream: true` from the bus's chunks.
//! - `metrics.rs`: requests, latency, in flight by route and status.
//! - `tls.rs`: the HTTPS listener (handshakes off the accept loop, bounded in time).

mod chat;
mod completions;
mod embeddings;
pub mod error;
pub mod jobs;
mod metrics;
mod models;
mod openai;
mod sse;
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use crate::config::GatewayArgs;
use error::ApiError;
use jobs::{Bus, JobOptions};
use metrics::GatewayMetrics;
use models::Models;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error("{0}")]
    Start(String),
    #[error("listen on {addr}: {e}")]
    Listen { addr: std::net::SocketAddr, e: std::io::Error },
}

/// What every request shares.
pub struct App {
    pub bus: Arc<Bus>,
    models: Arc<Models>,
    metrics: GatewayMetrics,
    api_keys: Vec<String>,
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    max_body: usize,
    timeout: Duration,
    stream_idle: Duration,
}

impl App {
    /// The door: key, permit, body, options, then `route`, counted by route and status.
    async fn serve<F, Fut>(self: Arc<Self>, route: &'static str, headers: HeaderMap, body: Body, handle: F) -> Response
    where
        F: FnOnce(Arc<App>, Map<String, Value>, JobOptions) -> Fut,
        Fut: Future<Output = Result<Response, ApiError>>,
    {
        let metrics = self.metrics.start(route);
        let response = match self.clone().admit(&headers, body).await {
            Ok((body, options, permit)) => hold_while_streaming(handle(self.clone(), body, options).await.unwrap_or_else(IntoResponse::into_response), permit),
            Err(e) => e.into_response(),
        };
        metrics.done(response.status().as_u16());
        response
    }

    async fn admit(self: Arc<Self>, headers: &HeaderMap, body: Body) -> Result<(Map<String, Value>, JobOptions, tokio::sync::OwnedSemaphorePermit), ApiError> {
        self.authorize(headers)?;
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| ApiError::busy(self.max_concurrent))?;
        let bytes = axum::body::to_bytes(body, self.max_body).await.map_err(|_| ApiError::too_large(self.max_body))?;
        let mut body = match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(ApiError::bad("body", "expected a JSON object")),
            Err(e) => return Err(ApiError::bad("body", format!("not JSON: {e}"))),
        };
        let options = openai::job_options(&mut body, headers, self.timeout)?;
        Ok((body, options, permit))
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.api_keys.is_empty() {
            return Ok(());
        }
        let key = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match key {
            Some(k) if self.api_keys.iter().any(|known| known == k) => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }
}

/// A streamed response keeps its request's permit until its last event: streams count against
/// `--max-concurrent` for as long as they run.
fn hold_while_streaming(response: Response, permit: tokio::sync::OwnedSemaphorePermit) -> Response {
    use futures::StreamExt;
    let streaming = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        return response;
    }
    let (parts, body) = response.into_parts();
    let events = body.into_data_stream().map(move |event| {
        let _held = &permit;
        event
    });
    Response::from_parts(parts, Body::from_stream(events))
}

/// Every event of a stream is a small write of its own: with Nagle's algorithm on, one waits for
/// the client to acknowledge the one before (a delayed ACK: up to 40 ms on Linux).
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY");
    }
}

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
        app.serve("completions", headers, body, completions::handle).await
    }
    async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
        app.serve("chat", headers, body, chat::handle).await
    }
    async fn embeddings(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
        app.serve("embeddings", headers, body, embeddings::handle).await
    }
    async fn list_models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
        let metrics = app.metrics.start("models");
        let response = match app.authorize(&headers) {
            Ok(()) => app.models.list().await.unwrap_or_else(IntoResponse::into_response),
            Err(e) => e.into_response(),
        };
        metrics.done(response.status().as_u16());
        response
    }
    async fn other(State(app): State<Arc<App>>, uri: Uri) -> Response {
        let metrics = app.metrics.start("other");
        let response = ApiError::not_found(uri.path()).into_response();
        metrics.done(response.status().as_u16());
        response
    }
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(list_models))
        .route("/metrics", get(|State(app): State<Arc<App>>| async move { app.metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(other)
        .with_state(app)
}

/// Runs the gateway until `shutdown` completes; in-flight requests are finished first.
pub async fn run(args: GatewayArgs, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), GatewayError> {
    // A bad certificate or key stops the gateway before it touches the bus.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key).map_err(GatewayError::Start)?),
        _ => None,
    };
    let client = crate::bus::connect(&args.nats, "jetbatch-gateway").await?;
    let js = args.subjects.jetstream(&client);
    let topology = args.subjects.topology();
    // Not fatal: a gateway may start before the pool; until the streams exist its jobs are 503s.
    if !jobs::streams_exist(&js, &topology).await {
        tracing::warn!(stream = %topology.jobs_stream, "the jobs stream is not there (yet): requests are answered 503 until a worker or `jetbatch setup` makes it");
    }
    let bus = Bus::start(client.clone(), js, topology.clone()).await.map_err(|e| GatewayError::Start(e.message))?;
    let app = Arc::new(App {
        bus,
        models: Models::new(client, topology.prefix.clone(), Duration::from_secs(args.models_ttl_secs)),
        metrics: GatewayMetrics::default(),
        api_keys: args.api_keys.into_iter().filter(|k| !k.is_empty()).collect(),
        permits: Arc::new(Semaphore::new(args.max_concurrent)),
        max_concurrent: args.max_concurrent,
        max_body: args.max_body_bytes,
        timeout: Duration::from_secs(args.timeout_secs),
        stream_idle: Duration::from_secs(args.stream_idle_secs),
    });
    let listener = tokio::net::TcpListener::bind(args.addr).await.map_err(|e| GatewayError::Listen { addr: args.addr, e })?;
    let bound = listener.local_addr().map_err(|e| GatewayError::Listen { addr: args.addr, e })?;
    tracing::info!(addr = %bound, prefix = %topology.prefix, keys = app.api_keys.len(), tls = tls.is_some(), "gateway listening");
    let served = match tls {
        Some(acceptor) => axum::serve(tls::Listener::start(listener, acceptor), router(app)).with_graceful_shutdown(shutdown).await,
        None => {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(no_delay);
            axum::serve(listener, router(app)).with_graceful_shutdown(shutdown).await
        }
    };
    served.map_err(|e| GatewayError::Listen { addr: bound, e })
}
