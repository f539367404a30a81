//! Reports: `report.json` (for machines), `report.md` (for people) and SVG plots — latency
//! percentiles, throughput over time and the batch-size distribution, one series per run.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::driver::{Mode, Recording};

/// One run's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub label: String,
    #[serde(flatten)]
    pub mode: Mode,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub cached_share: f64,
    pub throughput_jobs_per_s: f64,
    pub tokens_per_s: f64,
    pub latency_ms: Latency,
    /// Computed jobs by the size of the batch they ran in.
    pub batch_sizes: BTreeMap<usize, u64>,
    pub mean_batch_size: f64,
    /// Mean over computed jobs of the worker's own timing: waiting in the worker (pulled, not yet
    /// running) and the batch's compute time.
    pub mean_queued_ms: f64,
    pub mean_compute_ms: f64,
    /// Share of the wall time the model was computing (batches/s × compute per batch), summed
    /// over workers: near 1 when the device is the bound. None for generation, where a job's
    /// compute time is its stay in a running batch that others join and leave, so the sum over
    /// jobs does not add up to the device's time.
    pub compute_busy: Option<f64>,
    pub workers: BTreeMap<String, u64>,
    /// Share of the machine's CPU (all cores) by group over the run, with the idle rest.
    pub cpu_share: BTreeMap<String, f64>,
    pub wall_s: f64,
    pub completed_per_s: Vec<u64>,
    pub sent_per_s: Vec<u64>,
    /// Percentile curve for the CDF plot: (quantile, latency ms).
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

impl RunReport {
    pub fn new(label: &str, mode: Mode, r: &Recording) -> RunReport {
        let h = &r.latency_us;
        let ms = |us: u64| us as f64 / 1e3;
        let q = |q: f64| if h.is_empty() { 0.0 } else { ms(h.value_at_quantile(q)) };
        let computed: u64 = r.batch_sizes.values().sum();
        let mean_batch = if computed == 0 {
            0.0
        } else {
            r.batch_sizes.iter().map(|(&b, &n)| b as f64 * n as f64).sum::<f64>() / computed as f64
        };
        RunReport {
            label: label.to_string(),
            mode,
            sent: r.sent,
            received: r.received,
            lost: r.lost(),
            duplicates: r.duplicates,
            ok: r.ok,
            errors: r.errors.clone(),
            cached_share: r.cached as f64 / r.received.max(1) as f64,
            throughput_jobs_per_s: r.throughput(),
            tokens_per_s: r.tokens as f64 / r.wall.as_secs_f64().max(1e-9),
            latency_ms: Latency { p50: q(0.5), p90: q(0.9), p99: q(0.99), p99_9: q(0.999), max: ms(h.max()), mean: h.mean() / 1e3 },
            batch_sizes: r.batch_sizes.clone(),
            mean_batch_size: mean_batch,
            mean_queued_ms: r.queued_ms / computed.max(1) as f64,
            mean_compute_ms: r.compute_ms / computed.max(1) as f64,
            // Each job of a batch reports the batch's compute time: divide by the batch size.
            compute_busy: (r.tokens == 0).then(|| r.compute_ms / mean_batch.max(1.0) / 1e3 / r.wall.as_secs_f64().max(1e-9)),
            workers: r.workers.clone(),
            cpu_share: r.cpu.clone(),
            wall_s: r.wall.as_secs_f64(),
            completed_per_s: r.completed_per_s.clone(),
            sent_per_s: r.sent_per_s.clone(),
            curve: if h.is_empty() { vec![] } else { h.iter_quantiles(4).map(|v| (v.quantile_iterated_to(), ms(v.value_iterated_to()))).collect() },
        }
    }
}

/// A measured ratio with its target (`None`: recorded, no target).
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub name: String,
    /// The median of `rounds` (the one value, for a single round).
    pub value: f64,
    pub target: Option<f64>,
    /// Whether the median meets the target.
    pub met: Option<bool>,
    /// Every round's value, in the order measured.
    pub rounds: Vec<f64>,
}

impl Ratio {
    pub fn new(name: &str, value: f64, target: Option<f64>) -> Ratio {
        Ratio::of_rounds(name, vec![value], target)
    }

    fn of_rounds(name: &str, rounds: Vec<f64>, target: Option<f64>) -> Ratio {
        let mut sorted = rounds.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let value = if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 };
        Ratio { name: name.into(), value, target, met: target.map(|t| value >= t), rounds }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    pub date: String,
    pub commit: String,
    pub machine: String,
    pub cores: usize,
    pub command: String,
    pub runs: Vec<RunReport>,
    pub ratios: Vec<Ratio>,
    /// Extra tables (e.g. engine-only throughput by batch size) as Markdown.
    pub tables: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(title: &str) -> Report {
        Report {
            title: title.into(),
            date: today(),
            commit: commit(),
            machine: cpu_model(),
            cores: crate::cpu::cores(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            runs: vec![],
            ratios: vec![],
            tables: vec![],
            notes: vec![],
        }
    }

    /// One report from several rounds of the same benchmark: each ratio is the median of its
    /// rounds (matched by name); runs, tables and notes are the last round's.
    pub fn median_of(mut rounds: Vec<Report>) -> Report {
        let mut last = rounds.pop().expect("at least one round");
        if rounds.is_empty() {
            return last;
        }
        for ratio in &mut last.ratios {
            let mut values: Vec<f64> = rounds.iter().filter_map(|r| r.ratios.iter().find(|x| x.name == ratio.name)).map(|x| x.value).collect();
            values.push(ratio.value);
            *ratio = Ratio::of_rounds(&ratio.name, values, ratio.target);
        }
        last.notes.push(format!("ratios: median of {} rounds (every round in parentheses); runs, tables and plots: the last round", rounds.len() + 1));
        last
    }

    /// Writes `report.json`, `report.md` and the plots into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        let runs: Vec<&RunReport> = self.runs.iter().filter(|r| r.received > 0).collect();
        if !runs.is_empty() {
            plot_latency(&dir.join("latency_cdf.svg"), &runs)?;
            plot_throughput(&dir.join("throughput.svg"), &runs)?;
            plot_batches(&dir.join("batch_sizes.svg"), &runs)?;
        }
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# {}\n\n{} · commit `{}` · {} ({} cores)\n\n`{}`\n\n",
            self.title, self.date, self.commit, self.machine, self.cores, self.command
        );
        if !self.ratios.is_empty() {
            md += "| ratio | measured | target | |\n| --- | --- | --- | --- |\n";
            for r in &self.ratios {
                let target = r.target.map_or("—".to_string(), |t| format!("≥ {t}"));
                let met = match r.met {
                    Some(true) => "met",
                    Some(false) => "**missed**",
                    None => "",
                };
                let measured = if r.rounds.len() > 1 {
                    let each: Vec<String> = r.rounds.iter().map(|v| format!("{v:.2}")).collect();
                    format!("{:.2} ({})", r.value, each.join(", "))
                } else {
                    format!("{:.2}", r.value)
                };
                md += &format!("| {} | {measured} | {target} | {met} |\n", r.name);
            }
            md += "\n";
        }
        for t in &self.tables {
            md += t;
            md += "\n";
        }
        if !self.runs.is_empty() {
            md += "| run | load | jobs | jobs/s | tokens/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | mean batch | compute ms | busy | cached | lost | dup | errors |\n";
            md += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
            for r in &self.runs {
                let load = match r.mode {
                    Mode::Open { rate } => format!("open {rate:.0}/s"),
                    Mode::Closed { concurrency } => format!("closed ×{concurrency}"),
                    Mode::Backlog { jobs } => format!("backlog of {jobs}"),
                };
                let l = &r.latency_ms;
                let errors: u64 = r.errors.values().sum();
                let busy = r.compute_busy.map_or("—".to_string(), |b| format!("{:.0}%", b * 100.0));
                md += &format!(
                    "| {} | {load} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {busy} | {:.0}% | {} | {} | {errors} |\n",
                    r.label, r.received, r.throughput_jobs_per_s, r.tokens_per_s, l.p50, l.p90, l.p99, l.p99_9, l.max,
                    r.mean_batch_size, r.mean_compute_ms, r.cached_share * 100.0, r.lost, r.duplicates
                );
            }
            md += "\n";
            for r in self.runs.iter().filter(|r| !r.cpu_share.is_empty()) {
                md += &format!("CPU ({} cores), {}: {}\n\n", self.cores, r.label, crate::cpu::describe(&r.cpu_share));
            }
            for r in self.runs.iter().filter(|r| r.workers.len() > 1) {
                let spread: Vec<String> = r.workers.iter().map(|(w, n)| format!("{w}: {n}")).collect();
                md += &format!("Jobs per worker, {}: {}\n\n", r.label, spread.join(", "));
            }
            md += "![latency](latency_cdf.svg) ![throughput](throughput.svg) ![batch sizes](batch_sizes.svg)\n\n";
        }
        for n in &self.notes {
            md += &format!("- {n}\n");
        }
        md
    }
}

const COLORS: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn plot_err(e: Box<dyn std::error::Error>) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// Latency by percentile, HdrHistogram style: x is 1/(1-q) on a log axis, so the tail is visible.
fn plot_latency(path: &Path, runs: &[&RunReport]) -> anyhow::Result<()> {
    let draw = || -> PlotResult {
        let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let x_of = |q: f64| 1.0 / (1.0 - q.min(0.99999));
        let max_ms = runs.iter().flat_map(|r| r.curve.iter().map(|p| p.1)).fold(0.001f64, f64::max);
        let min_ms = runs.iter().flat_map(|r| r.curve.iter().map(|p| p.1)).fold(max_ms, f64::min).max(0.001);
        let mut chart = ChartBuilder::on(&root)
            .caption("Latency by percentile (publish → result)", ("sans-serif", 22))
            .margin(12)
            .margin_right(40)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1.0..1e5).log_scale(), (min_ms * 0.8..max_ms * 1.25).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x: &f64| {
                let q = 100.0 * (1.0 - 1.0 / x);
                if q < 1.0 { "0%".into() } else { format!("{}%", (q * 1000.0).round() / 1000.0) }
            })
            .draw()?;
        for (i, r) in runs.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(r.curve.iter().map(|&(q, ms)| (x_of(q), ms)), color.stroke_width(2)))?
                .label(r.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(plot_err)
}

/// Results per second over the run, one line per run.
fn plot_throughput(path: &Path, runs: &[&RunReport]) -> anyhow::Result<()> {
    let draw = || -> PlotResult {
        let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let secs = runs.iter().map(|r| r.completed_per_s.len()).max().unwrap_or(1).max(2) as f64;
        let top = runs.iter().flat_map(|r| r.completed_per_s.iter().chain(&r.sent_per_s)).copied().max().unwrap_or(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption("Throughput over time", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..secs, 0.0..top * 1.1)?;
        // Whole seconds only: at most one label a second, so no two labels read the same.
        chart
            .configure_mesh()
            .x_desc("seconds since the first job")
            .x_labels((secs as usize + 1).min(13))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("per second")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (i, r) in runs.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            // The last second is partial: left out rather than drawn as a drop.
            let points = |s: &[u64]| s.iter().enumerate().take(s.len().saturating_sub(1).max(1)).map(|(t, &n)| (t as f64 + 0.5, n as f64)).collect::<Vec<_>>();
            chart
                .draw_series(LineSeries::new(points(&r.completed_per_s), color.stroke_width(2)))?
                .label(format!("{} results/s", r.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart
                .draw_series(LineSeries::new(points(&r.sent_per_s), color.mix(0.45).stroke_width(1)))?
                .label(format!("{} sent/s", r.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.45).stroke_width(1)));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(plot_err)
}

/// Share of computed jobs by batch size; runs side by side within each size.
fn plot_batches(path: &Path, runs: &[&RunReport]) -> anyhow::Result<()> {
    let draw = || -> PlotResult {
        let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_b = runs.iter().flat_map(|r| r.batch_sizes.keys()).copied().max().unwrap_or(1).max(1) as f64;
        let share = |r: &RunReport, n: u64| n as f64 / r.batch_sizes.values().sum::<u64>().max(1) as f64;
        let top = runs.iter().flat_map(|r| r.batch_sizes.values().map(|&n| share(r, n))).fold(0.01f64, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption("Batch sizes of computed jobs (cache hits excluded)", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max_b + 1.0, 0.0..(top * 1.15).min(1.0))?;
        chart
            .configure_mesh()
            .x_desc("batch size")
            .x_labels((max_b as usize + 2).min(17))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("share of computed jobs")
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .draw()?;
        let width = 0.8 / runs.len() as f64;
        for (i, r) in runs.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let bars = r.batch_sizes.iter().map(|(&b, &n)| {
                let x0 = b as f64 - 0.4 + i as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, share(r, n))], color.filled())
            });
            chart
                .draw_series(bars)?
                .label(format!("{} (mean {:.1})", r.label, r.mean_batch_size))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(plot_err)
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Today's UTC date (civil-from-days), without a date crate.
fn today() -> String {
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_are_summed_up_by_their_median() {
        let round = |v: f64| {
            let mut r = Report::new("t");
            r.ratios.push(Ratio::new("a ÷ b", v, Some(3.0)));
            r
        };
        let one = Report::median_of(vec![round(2.5)]);
        assert_eq!((one.ratios[0].value, one.ratios[0].met), (2.5, Some(false)));
        assert!(one.markdown().contains("| a ÷ b | 2.50 | ≥ 3 | **missed** |"), "{}", one.markdown());
        let three = Report::median_of(vec![round(3.6), round(2.7), round(3.1)]);
        let r = &three.ratios[0];
        assert_eq!((r.value, r.met, r.rounds.clone()), (3.1, Some(true), vec![3.6, 2.7, 3.1]));
        assert!(three.markdown().contains("| a ÷ b | 3.10 (3.60, 2.70, 3.10) | ≥ 3 | met |"), "{}", three.markdown());
        let two = Report::median_of(vec![round(2.0), round(4.0)]);
        assert_eq!(two.ratios[0].value, 3.0);
    }
}
