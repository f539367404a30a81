//! Test harness: a real nats-server per test (free loopback port, temp store), the demo models in
//! a temp repository, and `jetbatch serve` run as a child process like a real deployment.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::IntoFuture;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};
use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt;
use jetbatch::config::Topology;
use jetbatch_testkit::{write_fixture_models, NatsServer};
use jetbatch::job::{Encoding, JobResult};
use jetbatch::tensor::TensorData;
use rmpv::Value;

/// One nats-server process of a test, killable and restartable with the same store.
pub struct Node {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where the server's own log goes (appended across restarts), when it has one.
    log: Option<PathBuf>,
}

impl Node {
    /// A server from a config file that listens on `port`.
    /// Its log goes beside the config (`n0.conf` → `n0.log`) so a failing test can show it.
    pub fn spawn_conf(conf: &Path, port: u16) -> Node {
        let mut node = Node { child: None, port, args: vec!["-c".into(), conf.to_string_lossy().to_string()], env: vec![], log: Some(conf.with_extension("log")) };
        node.start();
        node
    }

    pub fn spawn(args: Vec<String>, port: u16) -> Node {
        Node::spawn_env(args, port, vec![])
    }

    pub fn spawn_env(args: Vec<String>, port: u16, env: Vec<(String, String)>) -> Node {
        let mut node = Node { child: None, port, args, env, log: None };
        node.start();
        node
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(NatsServer::find_binary())
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(match &self.log {
                Some(path) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path).expect("server log")),
                None => Stdio::null(),
            })
            .spawn()
            .expect("nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server on {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The last lines of the server's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A nats-server run from the shipped `deploy/nats` files (accounts, permissions) with its store
/// in `dir`; users `producer` / `prod-pw` and `worker` / `work-pw`.
pub fn shipped_accounts_server(dir: &Path) -> Node {
    let (port, monitor) = (free_port(), free_port());
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/nats");
    let conf = dir.join("nats-server.conf");
    let text = std::fs::read_to_string(shipped.join("nats-server.conf")).unwrap();
    std::fs::write(&conf, text.replace("/data/jetstream", dir.join("store").to_str().unwrap())).unwrap();
    std::fs::copy(shipped.join("accounts.conf"), dir.join("accounts.conf")).unwrap();
    let args = ["-c", conf.to_str().unwrap(), "-p", &port.to_string(), "-m", &monitor.to_string()];
    let env = vec![("PRODUCER_PASSWORD".to_string(), "prod-pw".to_string()), ("WORKER_PASSWORD".to_string(), "work-pw".to_string())];
    Node::spawn_env(args.map(String::from).to_vec(), port, env)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Harness {
    pub nodes: Vec<Node>,
    pub dir: tempfile::TempDir,
    pub models: PathBuf,
    pub client: Client,
    pub js: Context,
    pub topology: Topology,
}

impl Harness {
    /// One nats-server with JetStream on file storage.
    pub async fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let store = dir.path().join("nats").to_string_lossy().to_string();
        let args = ["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd", &store].map(String::from).to_vec();
        Harness::with_nodes(dir, vec![Node::spawn(args, port)], 1).await
    }

    /// One nats-server with JetStream and `conf` added to its configuration (say `max_payload: 24576`).
    pub async fn with_conf(conf: &str) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let path = dir.path().join("server.conf");
        let store = dir.path().join("nats");
        std::fs::write(&path, format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n{conf}\n", store.display())).unwrap();
        Harness::with_nodes(dir, vec![Node::spawn_conf(&path, port)], 1).await
    }

    /// A 3-node JetStream cluster on loopback (routes between all, a store each), streams at R3.
    pub async fn cluster() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports.iter().map(|(_, r)| format!("\"nats-route://127.0.0.1:{r}\"")).collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (port, route))| {
                let conf = dir.path().join(format!("n{i}.conf"));
                let store = dir.path().join(format!("n{i}"));
                std::fs::write(
                    &conf,
                    format!(
                        "server_name: n{i}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n\
                         cluster {{ name: jetbatch-test, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                        store.display(),
                        routes.join(", ")
                    ),
                )
                .unwrap();
                Node::spawn_conf(&conf, *port)
            })
            .collect();
        Harness::with_nodes(dir, nodes, 3).await
    }

    async fn with_nodes(mut dir: tempfile::TempDir, nodes: Vec<Node>, replicas: usize) -> Harness {
        // JETBATCH_KEEP_TEST_DIR=1 keeps servers' and workers' logs and stores for a post-mortem.
        if std::env::var_os("JETBATCH_KEEP_TEST_DIR").is_some() {
            dir.disable_cleanup(true);
            eprintln!("test dir kept: {}", dir.path().display());
        }
        let models = dir.path().join("models");
        write_fixture_models(&models).expect("fixture models");
        let urls: Vec<String> = nodes.iter().map(Node::url).collect();
        let client = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .retry_on_initial_connect()
            .connect(urls.as_slice())
            .await
            .expect("connect");
        let js = jetstream::new(client.clone());
        let mut topology = jetbatch::config::ServeArgs::local(urls.join(","), PathBuf::new(), None).topology;
        topology.replicas = replicas;
        // A cluster needs a meta leader before streams can be made; on 2 busy cores (CI runs the
        // fault tests side by side) its election has taken over 30 s, so wait long and show the
        // servers' logs if it never comes.
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Err(e) = jetbatch::bus::setup_streams(&js, &topology).await {
            if Instant::now() > deadline {
                let logs: Vec<String> = nodes.iter().map(|n| format!("--- :{}\n{}", n.port, n.log_tail())).collect();
                panic!("streams: {e}\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Harness { nodes, dir, models, client, js, topology }
    }

    /// The server URLs, comma-separated.
    pub fn url(&self) -> String {
        self.nodes.iter().map(Node::url).collect::<Vec<_>>().join(",")
    }

    /// Starts a worker process with test-friendly defaults plus `extra` flags.
    pub fn worker(&self, name: &str, extra: &[&str]) -> Worker {
        self.worker_on(name, &self.models, extra)
    }

    /// A worker on its own model repository.
    pub fn worker_on(&self, name: &str, models: &Path, extra: &[&str]) -> Worker {
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = self.dir.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
            .arg("serve")
            .args(["--nats-url", &self.url(), "--worker-id", name])
            .arg("--models")
            .arg(models)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}"), "--metrics-interval-secs", "1"])
            .args(["--replicas", &self.topology.replicas.to_string()])
            .args(extra)
            // Short redelivery for tests; an env default, so `extra` flags can override it.
            .env("JETBATCH_ACK_WAIT_SECS", "5")
            // No shared cache tier unless a test asks for one (`--shared-cache-bucket`): tests
            // repeat inputs under new ids and expect them computed.
            .env("JETBATCH_SHARED_CACHE_BUCKET", "")
            // TEST_WORKER_LOG=jetbatch=debug to see batch spans in a failing test's worker log.
            .env("JETBATCH_LOG", std::env::var("TEST_WORKER_LOG").unwrap_or("info".into()))
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

    /// Messages in a stream (a work queue's count drops as jobs are acked: see
    /// [`Harness::stream_state`]'s `last_sequence` for what was ever published).
    pub async fn stream_messages(&self, stream: &str) -> u64 {
        self.stream_state(stream).await.messages
    }

    /// A stream's state; retried while a cluster fails over (requests time out meanwhile).
    pub async fn stream_state(&self, stream: &str) -> jetstream::stream::State {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = async { self.js.get_stream(stream).await?.info().await.map(|i| i.state.clone()).map_err(Into::into) };
            match info.await {
                Ok(state) => return state,
                Err::<_, Box<dyn std::error::Error + Send + Sync>>(e) => {
                    assert!(Instant::now() < deadline, "stream {stream}: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Every result stored in the results stream, counted by job id.
    pub async fn stored_results(&self) -> HashMap<String, usize> {
        let stream = self.js.get_stream("JETBATCH_RESULTS").await.expect("results stream");
        let total = self.stream_messages("JETBATCH_RESULTS").await as usize;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig { ..Default::default() })
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("messages");
        let mut counts = HashMap::new();
        for _ in 0..total {
            let msg = tokio::time::timeout(Duration::from_secs(10), messages.next()).await.expect("stored result").unwrap().unwrap();
            let id = msg.subject.trim_start_matches("jetbatch.results.").to_string();
            *counts.entry(id).or_default() += 1;
        }
        counts
    }

    /// Waits until the results stream holds `n` results.
    pub async fn wait_for_stored(&self, n: u64, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let stored = self.stream_messages("JETBATCH_RESULTS").await;
            if stored >= n {
                return start.elapsed();
            }
            assert!(start.elapsed() < timeout, "{stored} of {n} results after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

pub fn mlp_input(seed: u64) -> TensorData {
    f32_tensor(values(seed, 16), vec![16])
}

pub fn seq_input(seed: u64, len: i64) -> TensorData {
    f32_tensor(values(seed, len as usize * 8), vec![len, 8])
}

/// Publishes many jobs with pipelined acks, so they arrive as a burst.
pub async fn burst(h: &Harness, jobs: &[rmpv::Value]) {
    burst_at(h, jobs, "").await
}

/// [`burst`] on the subjects of a priority level: `suffix` is `.high`, `.low` or empty (normal).
pub async fn burst_at(h: &Harness, jobs: &[rmpv::Value], suffix: &str) {
    let mut acks = futures::stream::FuturesUnordered::new();
    for job in jobs {
        let map = job.as_map().unwrap();
        let field = |k: &str| map.iter().find(|(key, _)| key.as_str() == Some(k)).unwrap().1.as_str().unwrap().to_string();
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", field("id").as_str());
        let payload = rmp_serde::to_vec_named(job).unwrap();
        let ack = h.js.publish_with_headers(format!("jetbatch.jobs.{}{suffix}", field("model")), headers, payload.into()).await.unwrap();
        acks.push(ack.into_future());
    }
    while let Some(ack) = acks.next().await {
        ack.expect("job stored");
    }
}

/// A model slow enough (a chain of `depth` width×width matmuls) that a worker is mid-work when signalled.
pub fn write_heavy_model(h: &Harness, depth: usize, width: i64, max_batch_size: usize) {
    let _g = tch::no_grad_guard();
    tch::manual_seed(5);
    let opts = (tch::Kind::Float, tch::Device::Cpu);
    let w0 = tch::Tensor::randn([width, 16], opts) * 0.1;
    let w = tch::Tensor::randn([width, width], opts) * (1.0 / (width as f64).sqrt());
    let module = tch::CModule::create_by_tracing("Heavy", "forward", &[tch::Tensor::zeros([2, 16], opts)], &mut |x| {
        let mut y = x[0].linear(&w0, None::<&tch::Tensor>);
        for _ in 0..depth {
            y = y.linear(&w, None::<&tch::Tensor>).tanh();
        }
        vec![y.narrow(1, 0, 4)]
    })
    .unwrap();
    let toml = jetbatch_testkit::MLP_TOML.replace("max_batch_size = 64", &format!("max_batch_size = {max_batch_size}"));
    jetbatch_testkit::write_model(&h.models.join("heavy"), &module, &toml).unwrap();
}


/// `n` jobs for the heavy model, ids `<prefix>-<i>`.
pub fn heavy_jobs(prefix: &str, n: u64) -> Vec<Value> {
    (0..n).map(|i| tensor_job(&format!("{prefix}-{i}"), "heavy", &[mlp_input(i)], Encoding::MsgPack)).collect()
}
