//! Metrics beside the pipeline: a Prometheus registry served on `/metrics`, and the same figures as
//! a JSON snapshot published on `<prefix>.metrics.<worker_id>` every few seconds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::proto::MetricType;
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::sync::broadcast;

pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    pub worker: String,
    pub jobs_total: IntCounterVec,
    pub job_latency_seconds: HistogramVec,
    pub batch_size: HistogramVec,
    pub batch_compute_seconds: HistogramVec,
    /// By `tier`: `local` (this worker's folder) or `shared` (the pool's bucket).
    pub cache_hits_total: IntCounterVec,
    /// Cacheable jobs found in no tier (one count a job, whatever the tiers).
    pub cache_misses_total: IntCounter,
    /// By `tier`: cached values refused as not the job's answer (see `cache::check`); each is a
    /// miss, recomputed and overwritten.
    pub cache_rejected_total: IntCounterVec,
    /// 1 while the shared cache tier answers, 0 while it is skipped after a failure (or absent).
    pub cache_shared_up: IntGauge,
    pub inflight_jobs: IntGauge,
    pub consumer_pending: IntGauge,
    pub consumer_ack_pending: IntGauge,
    pub redeliveries_total: IntCounter,
    pub naks_total: IntCounterVec,
    pub dead_letters_total: IntCounter,
    pub progress_acks_total: IntCounter,
    pub duplicates_suppressed_total: IntCounter,
    pub errors_total: IntCounterVec,
    /// Error results published, by their wire error code (`bad_request`, `timeout`, …).
    pub job_errors_total: IntCounterVec,
    pub model_forward_total: IntCounterVec,
    pub engine_jobs_total: IntCounterVec,
    /// Tokens `generate` jobs generated, by model (its rate is the pool's tokens/s).
    pub generated_tokens_total: IntCounterVec,
    /// A generate job's engine arrival to its first token chosen, by model.
    pub time_to_first_token_seconds: HistogramVec,
    pub models_loaded: IntGauge,
    /// The prefix cache, by model: tokens scored rows asked of it and got from it (not
    /// recomputed), tokens evicted, and bytes held.
    pub prefix_lookup_tokens_total: IntCounterVec,
    pub prefix_hit_tokens_total: IntCounterVec,
    pub prefix_evicted_tokens_total: IntCounterVec,
    pub prefix_cache_bytes: IntGaugeVec,
    /// Exact greedy speculation, by model: tokens drafted and verified, and those accepted (the
    /// model's own choice, emitted without a step of their own).
    pub speculated_tokens_total: IntCounterVec,
    pub speculated_accepted_tokens_total: IntCounterVec,
    /// Job latency (publish to result) by priority level.
    pub priority_latency_seconds: HistogramVec,
    /// Jobs waiting in the stream by priority level (the level's consumer's pending count).
    pub priority_pending: IntGaugeVec,
    /// Set while the worker is connected and consuming; `/healthz` reports it.
    pub ready: AtomicBool,
    /// True while the engine thread runs: set by `EngineHandle::start`, cleared when the thread
    /// exits (a drop guard, so a panic clears it too). `/healthz` answers 503 when it is false.
    pub engine_alive: AtomicBool,
    /// Stamped by the intake stage; `/healthz` answers 503 while it is stalled.
    pub intake: IntakeProgress,
}

/// How long intake may hold deliveries without finishing any before it counts as stalled. A parse
/// is bounded (a chat template by its fuel, about a second; tokenising a payload at the 8 MiB
/// limit, a few seconds), and so are the lookups that follow it.
pub const INTAKE_STALL: Duration = Duration::from_secs(30);

/// Whether the intake stage keeps up: it says when it takes a delivery and when it is done with
/// one; it is stalled while it holds deliveries and has finished none for [`INTAKE_STALL`] (a
/// worker whose intake hangs would otherwise report healthy while answering nothing).
#[derive(Debug, Default)]
pub struct IntakeProgress(Mutex<Progress>);

#[derive(Debug, Default)]
struct Progress {
    held: usize,
    /// Since when, while it holds any, it has finished none.
    since: Option<Instant>,
}

impl IntakeProgress {
    pub fn took(&self) {
        self.took_at(Instant::now());
    }

    pub fn done(&self) {
        self.done_at(Instant::now());
    }

    /// How long intake has held deliveries without progress, once that is over [`INTAKE_STALL`].
    pub fn stalled(&self) -> Option<Duration> {
        self.stalled_at(Instant::now())
    }

    fn took_at(&self, now: Instant) {
        let mut p = self.0.lock().expect("intake progress");
        if p.held == 0 {
            p.since = Some(now);
        }
        p.held += 1;
    }

    fn done_at(&self, now: Instant) {
        let mut p = self.0.lock().expect("intake progress");
        p.held = p.held.saturating_sub(1);
        p.since = (p.held > 0).then_some(now);
    }

    fn stalled_at(&self, now: Instant) -> Option<Duration> {
        let since = self.0.lock().expect("intake progress").since?;
        Some(now.saturating_duration_since(since)).filter(|d| *d > INTAKE_STALL)
    }
}

impl Metrics {
    pub fn new(worker: &str) -> Metrics {
        let b = Builder { registry: Registry::new(), names: std::cell::RefCell::new(Vec::new()) };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| b.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"));
        let counter = |name: &str, help: &str| b.add(IntCounter::new(name, help).expect("valid metric"));
        let gauge = |name: &str, help: &str| b.add(IntGauge::new(name, help).expect("valid metric"));
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            b.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["model"]).expect("valid metric"))
        };
        Metrics {
            worker: worker.to_string(),
            jobs_total: counter_vec("jetbatch_jobs_total", "Jobs answered, by model, kind and status.", &["model", "kind", "status"]),
            job_latency_seconds: histogram(
                "jetbatch_job_latency_seconds",
                "JetStream publish time of the job to its result published.",
                exponential_buckets(0.0005, 2.0, 18).expect("buckets"),
            ),
            batch_size: histogram(
                "jetbatch_batch_size",
                "Jobs per engine batch; for generate, per job, the most rows the running generation held beside it.",
                exponential_buckets(1.0, 2.0, 10).expect("buckets"),
            ),
            batch_compute_seconds: histogram(
                "jetbatch_batch_compute_seconds",
                "Engine time per batch.",
                exponential_buckets(0.0001, 2.0, 18).expect("buckets"),
            ),
            cache_hits_total: counter_vec("jetbatch_cache_hits_total", "Jobs answered from the result cache, by tier.", &["tier"]),
            cache_misses_total: counter("jetbatch_cache_misses_total", "Cacheable jobs in no cache tier."),
            cache_rejected_total: counter_vec(
                "jetbatch_cache_rejected_total",
                "Cached answers refused as not the job's (another kind or shape, not finite, stored under another key), by tier.",
                &["tier"],
            ),
            cache_shared_up: gauge("jetbatch_cache_shared_up", "1 while the shared cache bucket answers; 0 while skipped after a failure, or absent."),
            inflight_jobs: gauge("jetbatch_inflight_jobs", "Jobs pulled and not yet acked or nak'ed."),
            consumer_pending: gauge("jetbatch_consumer_pending", "Messages in the stream not yet delivered to the consumer."),
            consumer_ack_pending: gauge("jetbatch_consumer_ack_pending", "Messages delivered to the consumer and not yet acked."),
            redeliveries_total: counter("jetbatch_redeliveries_total", "Jobs received with a delivery count above one."),
            naks_total: counter_vec("jetbatch_naks_total", "Jobs handed back for redelivery, by reason.", &["reason"]),
            dead_letters_total: counter("jetbatch_dead_letters_total", "Jobs copied to the dead-letter stream."),
            duplicates_suppressed_total: counter(
                "jetbatch_duplicates_suppressed_total",
                "Redelivered or lapsed jobs acked without a second answer: the results stream had theirs.",
            ),
            progress_acks_total: counter("jetbatch_progress_acks_total", "In-progress acks sent for jobs held past a third of ack_wait."),
            errors_total: counter_vec("jetbatch_errors_total", "Internal errors by layer and type.", &["layer", "type"]),
            job_errors_total: counter_vec("jetbatch_job_errors_total", "Error results published, by wire error code.", &["code"]),
            model_forward_total: counter_vec("jetbatch_model_forward_total", "Forward passes run, by model.", &["model"]),
            engine_jobs_total: counter_vec("jetbatch_engine_jobs_total", "Jobs computed by a model, by model.", &["model"]),
            generated_tokens_total: counter_vec("jetbatch_generated_tokens_total", "Tokens generated by generate jobs, by model.", &["model"]),
            time_to_first_token_seconds: histogram(
                "jetbatch_time_to_first_token_seconds",
                "Generate jobs: the engine receiving the job to its first token chosen, by model.",
                exponential_buckets(0.005, 2.0, 14).expect("buckets"),
            ),
            models_loaded: gauge("jetbatch_models_loaded", "Models loaded on the engine."),
            prefix_lookup_tokens_total: counter_vec("jetbatch_prefix_lookup_tokens_total", "Prefix tokens looked up in the prefix cache, by model.", &["model"]),
            prefix_hit_tokens_total: counter_vec("jetbatch_prefix_hit_tokens_total", "Prefix tokens found in the prefix cache (not recomputed), by model.", &["model"]),
            prefix_evicted_tokens_total: counter_vec("jetbatch_prefix_evicted_tokens_total", "Tokens evicted from the prefix cache, by model.", &["model"]),
            prefix_cache_bytes: b.add(IntGaugeVec::new(Opts::new("jetbatch_prefix_cache_bytes", "Bytes held by the prefix cache, by model."), &["model"]).expect("valid metric")),
            speculated_tokens_total: counter_vec("jetbatch_speculated_tokens_total", "Tokens drafted for greedy generate rows and verified, by model.", &["model"]),
            speculated_accepted_tokens_total: counter_vec(
                "jetbatch_speculated_accepted_tokens_total",
                "Drafted tokens the model agreed with (emitted without a step of their own), by model.",
                &["model"],
            ),
            priority_latency_seconds: b.add(
                HistogramVec::new(
                    HistogramOpts::new("jetbatch_priority_latency_seconds", "JetStream publish time of the job to its result published, by priority level.")
                        .buckets(exponential_buckets(0.0005, 2.0, 18).expect("buckets")),
                    &["priority"],
                )
                .expect("valid metric"),
            ),
            priority_pending: b.add(
                IntGaugeVec::new(Opts::new("jetbatch_priority_pending", "Jobs in the stream not yet delivered, by priority level."), &["priority"])
                    .expect("valid metric"),
            ),
            ready: AtomicBool::new(false),
            engine_alive: AtomicBool::new(false),
            intake: IntakeProgress::default(),
            registry: b.registry.clone(),
            names: b.names.take(),
        }
    }

    /// Every metric family's name, observed yet or not (labelled families render nothing until then).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is utf-8")
    }

    /// Jobs answered so far: (ok, error), over every model and kind.
    pub fn jobs_answered(&self) -> (u64, u64) {
        use prometheus::core::Collector;
        let (mut ok, mut error) = (0, 0);
        for family in self.jobs_total.collect() {
            for m in family.get_metric() {
                let n = m.get_counter().get_value() as u64;
                match m.get_label().iter().find(|l| l.name() == "status").map(|l| l.value()) {
                    Some("ok") => ok += n,
                    _ => error += n,
                }
            }
        }
        (ok, error)
    }

    /// Every family by name (`schemas/metrics-snapshot.schema.json`): its type, help and series,
    /// each with its labels as an object; a counter or gauge has a `value`, a histogram its
    /// `count`, `sum` and cumulative `buckets` (`le` upper bounds; `count` is the `+Inf` bucket).
    /// Buckets rather than quantiles: buckets from several workers add up to the pool's, and the
    /// pool's quantiles come from those, where per-worker quantiles cannot be combined.
    pub fn snapshot(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let mut families = Map::new();
        for family in self.registry.gather() {
            let kind = match family.get_field_type() {
                MetricType::COUNTER => "counter",
                MetricType::GAUGE => "gauge",
                MetricType::HISTOGRAM => "histogram",
                _ => continue,
            };
            let series: Vec<Value> = family
                .get_metric()
                .iter()
                .map(|m| {
                    let labels: Map<String, Value> = m.get_label().iter().map(|l| (l.name().to_string(), Value::from(l.value()))).collect();
                    match family.get_field_type() {
                        MetricType::COUNTER => json!({"labels": labels, "value": m.get_counter().get_value()}),
                        MetricType::GAUGE => json!({"labels": labels, "value": m.get_gauge().get_value()}),
                        _ => {
                            let h = m.get_histogram();
                            let buckets: Vec<Value> = h
                                .get_bucket()
                                .iter()
                                .filter(|b| b.upper_bound().is_finite())
                                .map(|b| json!({"le": b.upper_bound(), "count": b.cumulative_count()}))
                                .collect();
                            json!({"labels": labels, "count": h.get_sample_count(), "sum": h.get_sample_sum(), "buckets": buckets})
                        }
                    }
                })
                .collect();
            families.insert(family.name().to_string(), json!({"type": kind, "help": family.help(), "series": series}));
        }
        json!({ "worker": self.worker, "time_ms": now_ms(), "metrics": families })
    }
}

pub fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// Registers collectors and remembers their names.
struct Builder {
    registry: Registry,
    names: std::cell::RefCell<Vec<String>>,
}

impl Builder {
    fn add<T: prometheus::core::Collector + Clone + 'static>(&self, c: T) -> T {
        self.names.borrow_mut().extend(c.desc().iter().map(|d| d.fq_name.clone()));
        self.registry.register(Box::new(c.clone())).expect("metric names are unique");
        c
    }
}

/// Serves `/metrics` (Prometheus text) and `/healthz` (200 when consuming with the engine thread
/// alive; 503 "engine stopped" once that thread has exited, "intake stalled" while intake is (see
/// [`IntakeProgress`]), "not consuming" otherwise).
pub async fn serve(metrics: Arc<Metrics>, addr: SocketAddr, mut shutdown: broadcast::Receiver<()>) -> std::io::Result<SocketAddr> {
    use axum::{http::StatusCode, routing::get, Router};
    let m = metrics.clone();
    let app = Router::new()
        .route("/metrics", get(move || async move { m.render() }))
        .route(
            "/healthz",
            get(move || async move {
                if !metrics.engine_alive.load(Ordering::SeqCst) {
                    (StatusCode::SERVICE_UNAVAILABLE, "engine stopped")
                } else if metrics.intake.stalled().is_some() {
                    (StatusCode::SERVICE_UNAVAILABLE, "intake stalled")
                } else if metrics.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not consuming")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { let _ = shutdown.recv().await; }).await;
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn healthz_is_ok_only_while_consuming_with_the_engine_alive() {
        let metrics = Arc::new(Metrics::new("w1"));
        let (_tx, rx) = broadcast::channel(1);
        let addr = serve(metrics.clone(), "127.0.0.1:0".parse().unwrap(), rx).await.unwrap();
        let get = || async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).await.unwrap();
            (body.split(' ').nth(1).unwrap().to_string(), body.rsplit("\r\n").next().unwrap().to_string())
        };
        let case = |ready: bool, alive: bool| {
            metrics.ready.store(ready, Ordering::SeqCst);
            metrics.engine_alive.store(alive, Ordering::SeqCst);
        };
        case(true, true);
        assert_eq!(get().await, ("200".into(), "ok".into()));
        case(true, false);
        assert_eq!(get().await, ("503".into(), "engine stopped".into()));
        case(false, true);
        assert_eq!(get().await, ("503".into(), "not consuming".into()));
        case(true, true);
        let long_ago = Instant::now() - INTAKE_STALL * 2;
        metrics.intake.took_at(long_ago);
        assert_eq!(get().await, ("503".into(), "intake stalled".into()));
        metrics.intake.done();
        assert_eq!(get().await, ("200".into(), "ok".into()));
    }

    #[test]
    fn intake_is_stalled_only_while_it_holds_deliveries_without_progress() {
        let p = IntakeProgress::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(p.stalled_at(at(1000)), None, "idle is not stalled");
        p.took_at(at(0));
        assert_eq!(p.stalled_at(at(30)), None);
        assert_eq!(p.stalled_at(at(31)), Some(Duration::from_secs(31)));
        // A second delivery taken is no progress on the first.
        p.took_at(at(10));
        assert_eq!(p.stalled_at(at(31)), Some(Duration::from_secs(31)));
        // One finished is: the clock restarts for the one still held.
        p.done_at(at(40));
        assert_eq!(p.stalled_at(at(70)), None);
        assert_eq!(p.stalled_at(at(71)), Some(Duration::from_secs(31)));
        p.done_at(at(80));
        assert_eq!(p.stalled_at(at(500)), None, "all finished");
        p.took_at(at(500));
        assert_eq!(p.stalled_at(at(520)), None, "the clock starts when it takes one after being idle");
    }

    #[test]
    fn render_and_snapshot_carry_the_same_series() {
        let m = Metrics::new("w1");
        m.jobs_total.with_label_values(&["demo", "tensor", "ok"]).inc_by(3);
        m.batch_size.with_label_values(&["demo"]).observe(4.0);
        let text = m.render();
        assert!(text.contains("jetbatch_jobs_total{kind=\"tensor\",model=\"demo\",status=\"ok\"} 3"), "{text}");
        m.batch_size.with_label_values(&["demo"]).observe(1.0);
        m.inflight_jobs.set(7);
        let snap = m.snapshot();
        assert_eq!(snap["worker"], "w1");
        let jobs = &snap["metrics"]["jetbatch_jobs_total"];
        assert_eq!(jobs["type"], "counter");
        assert_eq!(jobs["series"], serde_json::json!([{"labels": {"kind": "tensor", "model": "demo", "status": "ok"}, "value": 3.0}]));
        assert_eq!(snap["metrics"]["jetbatch_inflight_jobs"]["series"], serde_json::json!([{"labels": {}, "value": 7.0}]));
        let batches = &snap["metrics"]["jetbatch_batch_size"];
        assert_eq!(batches["type"], "histogram");
        let series = &batches["series"][0];
        assert_eq!((&series["labels"]["model"], &series["count"], &series["sum"]), (&"demo".into(), &2.into(), &5.0.into()));
        // Cumulative, Prometheus's buckets 1, 2, 4, … 512: one observation ≤ 1, both ≤ 4.
        let buckets: Vec<(f64, u64)> = series["buckets"].as_array().unwrap().iter().map(|b| (b["le"].as_f64().unwrap(), b["count"].as_u64().unwrap())).collect();
        assert_eq!(buckets.len(), 10);
        assert_eq!(&buckets[..4], &[(1.0, 1), (2.0, 1), (4.0, 2), (8.0, 2)]);
        m.jobs_total.with_label_values(&["demo", "tensor", "error"]).inc();
        assert_eq!(m.jobs_answered(), (3, 1));
    }
}
