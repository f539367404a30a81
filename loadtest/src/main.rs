//! `jetbatch-loadtest`: drives jetbatch workers with jobs and reports latency percentiles,
//! throughput, batch sizes and cache hits; and reproduces the benchmarks of `loadtest/README.md`.
//!
//! # Layout
//! - `workload`: workload files (mix of models and kinds, length distributions, duplicates).
//! - `driver`: the open-/closed-loop generator and what it records (HDR histogram, series).
//! - `report`: JSON, Markdown and SVG plots.
//! - `local`: a nats-server, a model repository and in-process workers for self-contained runs.
//! - `rawbus`: the bus-only worker that bounds the cache-hit path.
//! - `cpu`: where the machine's CPU time went during a run (engine, worker I/O, generator, server).
//! - `bench`: the benchmarks, each a side-by-side run reported as ratios.

mod bench;
mod cpu;
mod driver;
mod local;
mod rawbus;
mod report;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use jetbatch::config::{NatsOpts, Topology};

use crate::driver::{Mode, Plan};
use crate::report::{Report, RunReport};
use crate::workload::{Generator, Workload};

#[derive(Debug, Parser)]
#[command(name = "jetbatch-loadtest", version, about = "Load generator and benchmarks for jetbatch workers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a workload to workers (yours, or `--local` ones) and report what came back.
    Run(RunArgs),
    /// Reproduce one of the benchmarks of loadtest/README.md (all of them self-contained: a local
    /// nats-server, models written from fixed seeds, in-process workers).
    Bench(BenchArgs),
}

/// How much load, for how long.
#[derive(Debug, Clone, Args)]
pub struct LoadOpts {
    /// Open loop: Poisson arrivals at this many jobs/s, whatever the workers manage (latency then
    /// shows queueing). Without it the run is closed-loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop: jobs outstanding at once; a new job goes out as each result arrives.
    #[arg(long, default_value_t = 256, conflicts_with = "rate")]
    concurrency: usize,
    /// Stop sending after this many seconds…
    #[arg(long)]
    duration: Option<f64>,
    /// …or after this many jobs, whichever comes first (one of the two is needed).
    #[arg(long)]
    jobs: Option<u64>,
    /// Jobs sent and awaited before measuring (loads models, fills caches and connections).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Seconds to wait for the last results before counting the missing ones as lost.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Workload file (TOML, or JSON by extension); see loadtest/workloads/ and loadtest/README.md.
    #[arg(long)]
    workload: PathBuf,
    #[command(flatten)]
    load: LoadOpts,
    /// Start a local nats-server and in-process workers instead of using `--nats-url`.
    #[arg(long)]
    local: bool,
    /// `--local`: number of workers on the shared consumer.
    #[arg(long, default_value_t = 1, requires = "local")]
    workers: usize,
    /// `--local`: workers without a result cache (every job is computed).
    #[arg(long, requires = "local")]
    no_cache: bool,
    /// `--local`: serve this model repository instead of the built-in one (demo models, `wide`,
    /// `wide-b1`, `gen-continuous`, `gen-static`).
    #[arg(long, requires = "local")]
    models: Option<PathBuf>,
    #[command(flatten)]
    wide: WideOpts,
    /// `--local`: the nats-server binary (default: the project venv's, then PATH).
    #[arg(long, requires = "local")]
    nats_server: Option<PathBuf>,
    /// Name of the run in the report.
    #[arg(long, default_value = "run")]
    label: String,
    /// Folder for report.json, report.md and the plots.
    #[arg(long, default_value = "loadtest-report")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    nats: NatsOpts,
    #[command(flatten)]
    topology: Topology,
}

/// Size of the built-in compute-bound model `wide` (and `wide-b1`).
#[derive(Debug, Clone, Args)]
pub struct WideOpts {
    /// Width of `wide`'s hidden layers (jobs are f32[256] in and out).
    #[arg(long, default_value_t = 2048)]
    wide_width: i64,
    /// Number of `wide`'s hidden layers.
    #[arg(long, default_value_t = 8)]
    wide_depth: i64,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[arg(value_enum)]
    which: bench::Which,
    /// Folder for the reports (one sub-folder per benchmark, plus summary.md).
    #[arg(long, default_value = "loadtest-report")]
    out: PathBuf,
    /// Seconds each measured run lasts (saturation runs; the generation benchmark is a job count).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Run each benchmark this many times and report each ratio as the median of the rounds, with
    /// every round's value beside it (runs on 2 shared cores vary by 5–20 %; 3 is a good choice
    /// before trusting a ratio near its target). Runs, tables and plots are the last round's.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Closed-loop concurrency of the saturation runs.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    #[command(flatten)]
    wide: WideOpts,
    /// `engine`: the widths of `wide` to compare at (comma-separated). Compute per job grows with
    /// the square of the width while the bus's cost per job stays the same, so the sweep shows
    /// from what model size on the bus stops mattering.
    #[arg(long, value_delimiter = ',', default_values_t = [1024i64, 2048, 4096])]
    engine_widths: Vec<i64>,
    /// `lm-score`: `loglikelihood` jobs in the backlog each side drains.
    #[arg(long, default_value_t = 5000)]
    lm_jobs: u64,
    /// `mc`: multiple-choice questions (4 jobs each) in the backlog each side drains.
    #[arg(long, default_value_t = 1250)]
    mc_questions: u64,
    /// `lm-generate`: `generate` jobs, all published at once.
    #[arg(long, default_value_t = 384)]
    gen_jobs: u64,
    /// The LM benchmarks on a tiny model (vocabulary 259, hidden 64, 1 layer) instead of the
    /// 32k-vocabulary one: seconds instead of minutes, for checking that they run, not for ratios.
    #[arg(long)]
    lm_tiny: bool,
    /// The nats-server binary (default: the project venv's, then PATH).
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// Python for the baseline worker and the LM benchmarks' transformers side (default: the project venv's).
    #[arg(long)]
    python: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The in-process workers log through this (RUST_LOG=jetbatch=info for more).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run(args)),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
    }
}

impl LoadOpts {
    fn plan(&self, run_id: String, progress: bool) -> anyhow::Result<Plan> {
        if self.duration.is_none() && self.jobs.is_none() {
            anyhow::bail!("give --duration or --jobs (or both): runs are bounded");
        }
        let mode = match self.rate {
            Some(rate) if rate > 0.0 && rate.is_finite() => Mode::Open { rate },
            Some(rate) => anyhow::bail!("--rate {rate}: must be > 0"),
            None => Mode::Closed { concurrency: self.concurrency.max(1) },
        };
        Ok(Plan {
            mode,
            duration: self.duration.map(Duration::from_secs_f64),
            jobs: self.jobs,
            drain_timeout: Duration::from_secs_f64(self.drain_timeout),
            run_id,
            progress,
        })
    }
}

/// A run id that is new to the streams' duplicate window: label and start time.
pub fn run_id(label: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let label: String = label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("{label}-{nanos:x}")
}

/// Warms up with `load.warmup` jobs, then runs the measured plan; both from `generator`. The
/// CPU time of this process's threads and of `others` (label, pid) is accounted over the measured
/// part.
pub async fn warm_then_drive(client: &async_nats::Client, topology: &Topology, generator: &mut Generator, load: &LoadOpts, label: &str, progress: bool, others: &[(&str, u32)]) -> anyhow::Result<driver::Recording> {
    if load.warmup > 0 {
        let warm = Plan {
            mode: Mode::Closed { concurrency: load.concurrency.clamp(1, 256) },
            duration: None,
            jobs: Some(load.warmup),
            drain_timeout: Duration::from_secs(120),
            run_id: run_id(&format!("{label}-warmup")),
            progress: false,
        };
        let r = driver::drive(client, topology, generator, &warm).await?;
        if r.lost() > 0 {
            anyhow::bail!("warm-up: {} of {} jobs got no result in 120 s — are workers running?", r.lost(), r.sent);
        }
    }
    let before = cpu::Snapshot::take(others);
    let mut recording = driver::drive(client, topology, generator, &load.plan(run_id(label), progress)?).await?;
    recording.cpu = cpu::Snapshot::take(others).shares_since(&before);
    Ok(recording)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let workload = Workload::load(&args.workload).map_err(anyhow::Error::msg)?;
    let mut local = None;
    let (nats, topology) = if args.local {
        let wide = local::WideModel { width: args.wide.wide_width, depth: args.wide.wide_depth };
        let mut l = local::Local::start(args.nats_server.clone(), args.models.clone(), &wide)?;
        for i in 0..args.workers {
            l.start_worker(&format!("worker-{i}"), !args.no_cache)?;
        }
        let nats = NatsOpts { urls: vec![l.url()], ..args.nats.clone() };
        let topology = l.topology();
        local = Some(l);
        (nats, topology)
    } else {
        (args.nats.clone(), args.topology.clone())
    };
    let client = jetbatch::bus::connect(&nats, "jetbatch-loadtest").await?;
    jetbatch::bus::setup_streams(&async_nats::jetstream::new(client.clone()), &topology).await?;
    let mut generator = Generator::new(workload);
    let plan = args.load.plan(String::new(), !args.quiet)?;
    let others: Vec<_> = local.iter().map(local::Local::server_process).collect();
    let recording = warm_then_drive(&client, &topology, &mut generator, &args.load, &args.label, !args.quiet, &others).await?;
    let mut report = Report::new(&format!("jetbatch-loadtest run: {}", args.workload.display()));
    report.runs.push(RunReport::new(&args.label, plan.mode, &recording));
    report.write(&args.out)?;
    print!("{}", report.markdown());
    println!("report: {}", args.out.join("report.md").display());
    if let Some(mut l) = local {
        l.stop_workers().await?;
    }
    if recording.lost() > 0 {
        anyhow::bail!("{} job(s) got no result within the drain timeout", recording.lost());
    }
    Ok(())
}
