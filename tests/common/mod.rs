//! Test harness: a real nats-server per test (free loopback port, temp store), the demo models in
//! a temp repository, and `jetbatch serve` run as a child process like a real deployment.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};
use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt;
use jetbatch::config::Topology;
use jetbatch::demo::{write_demo_models, NatsServer};
use jetbatch::job::{Encoding, JobResult};
use jetbatch::tensor::TensorData;
use rmpv::Value;

pub struct Harness {
    pub server: Option<NatsServer>,
    pub dir: tempfile::TempDir,
    pub models: PathBuf,
    pub client: Client,
    pub js: Context,
    pub topology: Topology,
}

impl Harness {
    pub async fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = NatsServer::start(&NatsServer::find_binary(), &dir.path().join("nats")).expect("nats-server starts");
        let models = dir.path().join("models");
        write_demo_models(&models).expect("demo models");
        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = jetstream::new(client.clone());
        let topology = jetbatch::demo::local_serve_args(server.url(), PathBuf::new(), None).topology;
        jetbatch::bus::setup_streams(&js, &topology).await.expect("streams");
        Harness { server: Some(server), dir, models, client, js, topology }
    }

    pub fn url(&self) -> String {
        self.server.as_ref().expect("server running").url()
    }

    /// Starts a worker process with test-friendly defaults plus `extra` flags.
    pub fn worker(&self, name: &str, extra: &[&str]) -> Worker {
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = self.dir.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
            .arg("serve")
            .args(["--nats-url", &self.url(), "--worker-id", name])
            .arg("--models")
            .arg(&self.models)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}"), "--metrics-interval-secs", "1"])
            .args(extra)
            // Short redelivery for tests; an env default, so `extra` flags can override it.
            .env("JETBATCH_ACK_WAIT_SECS", "5")
            .env("JETBATCH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn jetbatch");
        Worker { child, name: name.to_string(), metrics_port, log }
    }

    pub async fn subscribe_results(&self) -> Subscriber {
        let sub = self.client.subscribe("jetbatch.results.>").await.expect("subscribe");
        self.client.flush().await.expect("flush");
        sub
    }

    /// Publishes a job value on its model's subject with `Nats-Msg-Id` = id.
    pub async fn publish(&self, job: &Value, encoding: Encoding) {
        let model = job_field(job, "model");
        let id = job_field(job, "id");
        let payload = match encoding {
            Encoding::MsgPack => rmp_serde::to_vec_named(job).unwrap(),
            Encoding::Json => serde_json::to_vec(job).unwrap(),
        };
        self.publish_raw(&model, Some(&id), payload, encoding == Encoding::Json).await;
    }

    pub async fn publish_raw(&self, model: &str, id: Option<&str>, payload: Vec<u8>, json: bool) {
        let mut headers = HeaderMap::new();
        if let Some(id) = id {
            headers.insert("Nats-Msg-Id", id);
        }
        if json {
            headers.insert("Content-Type", "application/json");
        }
        self.js
            .publish_with_headers(format!("jetbatch.jobs.{model}"), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    pub async fn consumer_info(&self) -> jetstream::consumer::Info {
        let stream = self.js.get_stream("JETBATCH_JOBS").await.expect("jobs stream");
        let mut c: jetstream::consumer::PullConsumer = stream.get_consumer("jetbatch-workers").await.expect("consumer");
        c.info().await.expect("info").clone()
    }

    pub async fn stream_messages(&self, stream: &str) -> u64 {
        let mut s = self.js.get_stream(stream).await.expect("stream");
        s.info().await.expect("info").state.messages
    }
}

fn job_field(job: &Value, key: &str) -> String {
    job.as_map()
        .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(key)))
        .and_then(|(_, v)| v.as_str())
        .unwrap_or_default()
        .to_string()
}

/// A `tensor` job as a wire value.
pub fn tensor_job(id: &str, model: &str, inputs: &[TensorData], encoding: Encoding) -> Value {
    Value::Map(vec![
        ("id".into(), id.into()),
        ("model".into(), model.into()),
        ("kind".into(), "tensor".into()),
        ("input".into(), Value::Map(vec![("inputs".into(), Value::Array(inputs.iter().map(|t| t.to_wire(encoding)).collect()))])),
    ])
}

pub fn f32_tensor(values: Vec<f32>, shape: Vec<i64>) -> TensorData {
    TensorData::from((values.as_slice(), shape))
}

/// Deterministic pseudo-random inputs.
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// The reference: the TorchScript model run directly with tch on one job (batch of one).
pub fn direct_forward(model_pt: &Path, inputs: &[TensorData]) -> Vec<Vec<f64>> {
    let _g = tch::no_grad_guard();
    let m = tch::CModule::load(model_pt).expect("load model");
    let args: Vec<tch::Tensor> = inputs
        .iter()
        .map(|t| {
            let values: Vec<f32> = t.to_f64_vec().into_iter().map(|v| v as f32).collect();
            let mut shape = vec![1];
            shape.extend_from_slice(&t.shape);
            tch::Tensor::from_slice(&values).reshape(&shape)
        })
        .collect();
    let out = m.forward_ts(&args).expect("forward");
    let flat = out.get(0).flatten(0, -1);
    vec![Vec::<f64>::try_from(flat.to_kind(tch::Kind::Double)).expect("to vec")]
}

pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

/// Results by id, until `ids` distinct jobs are answered, then a grace period to catch duplicates.
pub async fn collect(sub: &mut Subscriber, ids: usize, timeout: Duration) -> HashMap<String, Vec<JobResult>> {
    let mut by_id: HashMap<String, Vec<JobResult>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut grace: Option<tokio::time::Instant> = None;
    loop {
        let until = grace.unwrap_or(deadline);
        match tokio::time::timeout_at(until, sub.next()).await {
            Ok(Some(msg)) => {
                let r = JobResult::decode(&msg.payload).expect("result decodes");
                by_id.entry(r.id.clone()).or_default().push(r);
                if by_id.len() >= ids && grace.is_none() {
                    grace = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                }
            }
            _ => break,
        }
    }
    by_id
}

pub struct Worker {
    child: Child,
    pub name: String,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status().expect("kill").success();
        assert!(ok, "kill -{sig}");
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "worker {} did not exit; log:\n{}", self.name, self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path of the worker's HTTP endpoint, retrying until it answers.
    pub async fn http_get(&self, path: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) {
                write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
                let mut body = String::new();
                if s.read_to_string(&mut body).is_ok() && !body.is_empty() {
                    return body;
                }
            }
            assert!(Instant::now() < deadline, "no HTTP answer from {}; log:\n{}", self.name, self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the worker reports it is consuming.
    pub async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.http_get("/healthz").await.starts_with("HTTP/1.0 200") {
            assert!(Instant::now() < deadline, "worker {} not ready; log:\n{}", self.name, self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The value of one Prometheus series (exact name with labels), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.http_get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
