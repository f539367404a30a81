//! `jetbatch-loadtest`: drives jetbatch workers with jobs and reports latency percentiles,
//! throughput, batch sizes and cache hits; and reproduces the benchmarks of `loadtest/README.md`.
//!
//! # Layout
//! - `workload`: workload files (mix of models and kinds, length distributions, duplicates).
//! - `driver`: the open-/closed-loop generator and what it records (HDR histogram, series).
//! - `load`: how much load a run puts on the workers (`LoadOpts`), run ids, warm-up then measured run.
//! - `report`: JSON, Markdown and SVG plots.
//! - `local`: a nats-server, a model repository and in-process workers for self-contained runs.
//! - `rawbus`: the bus-only worker that bounds the cache-hit path.
//! - `cpu`: where the machine's CPU time went during a run (engine, worker I/O, generator, server).
//! - `bench`: the benchmarks, each a side-by-side run reported as ratios.

mod bench;
mod cpu;
mod driver;
mod load;
mod local;
mod rawbus;
mod report;
mod workload;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use jetbatch::config::{NatsOpts, Topology};

use crate::load::{warm_then_drive, LoadOpts};
use crate::local::WideOpts;
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
    Bench(bench::BenchArgs),
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
