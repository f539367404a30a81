//! How much load a run puts on the workers: the command line's [`LoadOpts`], turned into the
//! driver's [`Plan`]s under a fresh [`run_id`], and [`warm_then_drive`], a warm-up then the
//! measured run. Shared by `run` and the benchmarks.

use std::time::Duration;

use clap::Args;
use jetbatch::config::Topology;

use crate::cpu;
use crate::driver::{self, Mode, Plan};
use crate::workload::Generator;

/// How much load, for how long.
#[derive(Debug, Clone, Args)]
pub struct LoadOpts {
    /// Open loop: Poisson arrivals at this many jobs/s, whatever the workers manage (latency then
    /// shows queueing). Without it the run is closed-loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Closed loop: jobs outstanding at once; a new job goes out as each result arrives.
    #[arg(long, default_value_t = 256, conflicts_with = "rate")]
    pub concurrency: usize,
    /// Stop sending after this many seconds…
    #[arg(long)]
    pub duration: Option<f64>,
    /// …or after this many jobs, whichever comes first (one of the two is needed).
    #[arg(long)]
    pub jobs: Option<u64>,
    /// Jobs sent and awaited before measuring (loads models, fills caches and connections).
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// Seconds to wait for the last results before counting the missing ones as lost.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
}

impl LoadOpts {
    pub fn plan(&self, run_id: String, progress: bool) -> anyhow::Result<Plan> {
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
