//! A self-contained target: a nats-server on a free loopback port, a model repository written from
//! fixed seeds, and jetbatch workers run in this process, each on its own thread and runtime (as
//! separate worker processes would be, without having to find a `jetbatch` binary).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use jetbatch::config::Topology;
use jetbatch_testkit::NatsServer;
use tch::{CModule, Kind, Tensor};

/// The compute-bound benchmark model: f32[256] in, `depth` tanh layers of `width × width`, f32[256]
/// out — small messages, and enough arithmetic per job that the forward pass, not the bus, bounds
/// throughput.
pub struct WideModel {
    pub width: i64,
    pub depth: i64,
}

/// Size of the built-in compute-bound model `wide` (and `wide-b1`).
#[derive(Debug, Clone, Args)]
pub struct WideOpts {
    /// Width of `wide`'s hidden layers (jobs are f32[256] in and out).
    #[arg(long, default_value_t = 2048)]
    pub wide_width: i64,
    /// Number of `wide`'s hidden layers.
    #[arg(long, default_value_t = 8)]
    pub wide_depth: i64,
}

/// Elements per job in and out of `wide`.
pub const WIDE_IO: i64 = 256;

/// Generation benchmark decoder: Llama architecture, hidden 512, 4 layers (as `cargo bench`).
const GEN_HIDDEN: i64 = 512;
const GEN_LAYERS: i64 = 4;

pub struct Local {
    pub server: NatsServer,
    pub models: PathBuf,
    dir: tempfile::TempDir,
    workers: Vec<Worker>,
}

struct Worker {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Local {
    /// Starts a nats-server and writes the repository: the demo models (`mlp`, `seqproj`,
    /// `tiny-lm`), `wide` (dynamic batching up to 64) and `wide-b1` (the same weights, batch 1),
    /// and `gen-continuous` / `gen-static` (the same decoder, both generation modes). Or uses
    /// `models` as the repository instead.
    pub fn start(nats_server: Option<PathBuf>, models: Option<PathBuf>, wide: &WideModel) -> anyhow::Result<Local> {
        let dir = tempfile::Builder::new().prefix("jetbatch-loadtest-").tempdir()?;
        let bin = nats_server.unwrap_or_else(NatsServer::find_binary);
        let server = NatsServer::start(&bin, &dir.path().join("nats"))?;
        let models = match models {
            Some(m) => m,
            None => {
                let m = dir.path().join("models");
                write_models(&m, wide).map_err(anyhow::Error::msg)?;
                m
            }
        };
        Ok(Local { server, models, dir, workers: vec![] })
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The server as a process whose CPU time a run accounts (see `cpu`).
    pub fn server_process(&self) -> (&'static str, u32) {
        ("nats-server", self.server.pid())
    }

    /// The default topology (what a worker with no flags uses).
    pub fn topology(&self) -> Topology {
        jetbatch::config::ServeArgs::local(self.url(), PathBuf::new(), None).topology
    }

    /// Starts a worker named `name`; `cache`: with a result cache of its own.
    pub fn start_worker(&mut self, name: &str, cache: bool) -> anyhow::Result<()> {
        let cache_dir = cache.then(|| self.dir.path().join(format!("cache-{name}")));
        let mut args = jetbatch::config::ServeArgs::local(self.url(), self.models.clone(), cache_dir);
        args.worker_id = Some(name.to_string());
        args.metrics_interval_secs = 0;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread_name = format!("jb-{name}");
        let thread = std::thread::Builder::new().name(thread_name.clone()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name(thread_name).build()?;
            runtime.block_on(jetbatch::serve::run(args, async move {
                let _ = stopped.await;
            }))?;
            Ok(())
        })?;
        self.workers.push(Worker { stop, thread });
        Ok(())
    }

    /// Stops every worker and waits for them (in-flight jobs are finished or handed back).
    pub async fn stop_workers(&mut self) -> anyhow::Result<()> {
        for w in self.workers.drain(..) {
            let _ = w.stop.send(());
            tokio::task::spawn_blocking(move || w.thread.join()).await?.map_err(|_| anyhow::anyhow!("worker thread panicked"))??;
        }
        // Let the consumer see the workers' pull requests go before the next run starts new ones.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

fn write_models(dir: &Path, wide: &WideModel) -> Result<(), String> {
    jetbatch_testkit::write_fixture_models(dir)?;
    let module = wide_module(wide.width, wide.depth, jetbatch_testkit::SEED)?;
    for (name, batch) in [("wide", 64), ("wide-b1", 1)] {
        let toml = format!(
            "# Benchmark: f32[{WIDE_IO}] -> {depth} tanh layers of {w}x{w} -> f32[{WIDE_IO}].\nbackend = \"torchscript\"\nmax_batch_size = {batch}\nmax_wait_ms = 2\npreload = true\n\n[[inputs]]\nname = \"x\"\ndtype = \"f32\"\nshape = [{WIDE_IO}]\n",
            depth = wide.depth,
            w = wide.width
        );
        jetbatch_testkit::write_model(&dir.join(name), &module, &toml)?;
    }
    for mode in ["continuous", "static"] {
        let model = dir.join(format!("gen-{mode}"));
        jetbatch_testkit::write_tiny_lm(&model, 7, GEN_HIDDEN, GEN_LAYERS)?;
        let toml = format!("backend = \"hf\"\nmax_batch_size = 16\nmax_wait_ms = 5\nmax_new_tokens_limit = 200\ngeneration = \"{mode}\"\npreload = true\n");
        std::fs::write(model.join("jetbatch.toml"), toml).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn wide_module(width: i64, depth: i64, seed: i64) -> Result<CModule, String> {
    let _no_grad = tch::no_grad_guard();
    tch::manual_seed(seed + 3);
    let opts = (Kind::Float, tch::Device::Cpu);
    let layer = |out: i64, inp: i64| (Tensor::randn([out, inp], opts) / (inp as f64).sqrt(), Tensor::randn([out], opts) * 0.1);
    let first = layer(width, WIDE_IO);
    let hidden: Vec<(Tensor, Tensor)> = (1..depth).map(|_| layer(width, width)).collect();
    let last = layer(WIDE_IO, width);
    CModule::create_by_tracing("WideMlp", "forward", &[Tensor::zeros([2, WIDE_IO], opts)], &mut |x| {
        let h = x[0].linear(&first.0, Some(&first.1)).tanh();
        let h = hidden.iter().fold(h, |h, (w, b)| h.linear(w, Some(b)).tanh());
        vec![h.linear(&last.0, Some(&last.1))]
    })
    .map_err(|e| e.to_string())
}
