//! A few seconds of the real tool against a real nats-server, so neither the load generator nor
//! the benchmarks rot: the reports must come out, with numbers that hang together.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn loadtest(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_jetbatch-loadtest")).args(args).env("RUST_BACKTRACE", "0").output().expect("run jetbatch-loadtest");
    assert!(out.status.success(), "jetbatch-loadtest {args:?} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn assert_plots(dir: &Path) {
    for plot in ["latency_cdf.svg", "throughput.svg", "batch_sizes.svg"] {
        let svg = std::fs::read_to_string(dir.join(plot)).unwrap_or_else(|e| panic!("{plot}: {e}"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{plot} is not a whole SVG document");
        assert!(svg.contains("<polyline") || svg.contains("<rect"), "{plot} draws nothing");
    }
}

#[test]
fn help_documents_every_option() {
    let run = String::from_utf8(loadtest(&["run", "--help"]).stdout).unwrap();
    for option in ["--workload", "--rate", "--concurrency", "--duration", "--jobs", "--warmup", "--drain-timeout", "--local", "--workers", "--no-cache", "--out", "--nats-url"] {
        assert!(run.contains(option), "run --help lacks {option}");
    }
    let bench = String::from_utf8(loadtest(&["bench", "--help"]).stdout).unwrap();
    for which in ["engine", "batching", "bus", "python", "generation", "scaling", "lm-score", "mc", "lm-generate", "lm-e2e", "all"] {
        assert!(bench.contains(which), "bench --help lacks {which}");
    }
    for option in ["--repeat", "--secs", "--engine-widths", "--concurrency", "--python", "--out", "--lm-jobs", "--mc-questions", "--gen-jobs", "--lm-tiny"] {
        assert!(bench.contains(option), "bench --help lacks {option}");
    }
}

#[test]
fn local_run_of_the_mixed_workload_reports_consistent_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let workload = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads/mixed.toml");
    let out = dir.path().join("report");
    let stdout = loadtest(&[
        "run", "--local", "--workload", workload.to_str().unwrap(), "--duration", "3", "--concurrency", "32", "--warmup", "20",
        "--out", out.to_str().unwrap(), "--quiet",
    ])
    .stdout;
    let r = &report(&out)["runs"][0];
    let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
    assert!(n("received") >= 50.0, "only {} results in 3 s", n("received"));
    assert_eq!(n("lost"), 0.0);
    assert_eq!(n("duplicates"), 0.0);
    assert_eq!(n("ok"), n("received"), "every mixed-workload job is valid: {}", r["errors"]);
    // A quarter of the jobs repeat earlier inputs and the local worker has a cache.
    assert!(n("cached_share") > 0.05 && n("cached_share") < 0.6, "cached share {}", n("cached_share"));
    assert!(n("tokens_per_s") > 0.0, "generate jobs report their tokens");
    let l = &r["latency_ms"];
    let (p50, p99, max) = (l["p50"].as_f64().unwrap(), l["p99"].as_f64().unwrap(), l["max"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "percentiles out of order: {l}");
    let batches = r["batch_sizes"].as_object().unwrap();
    let computed: f64 = batches.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((computed + n("cached_share") * n("received") - n("received")).abs() < 1.0, "computed + cached = received");
    let per_s: f64 = r["completed_per_s"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
    assert_eq!(per_s, n("received"), "the throughput series counts every result");
    assert_plots(&out);
    assert!(String::from_utf8_lossy(&stdout).contains("| run | closed ×32 |"), "markdown table printed");
}

#[test]
fn bus_and_python_benchmarks_produce_their_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    for which in ["bus", "python"] {
        loadtest(&["bench", which, "--secs", "1", "--concurrency", "64", "--out", out, "--quiet"]);
        let r = report(&dir.path().join(which));
        let ratio = r["ratios"][0]["value"].as_f64().unwrap();
        assert!(ratio.is_finite() && ratio > 0.0, "{which}: ratio {ratio}");
        for run in r["runs"].as_array().unwrap() {
            assert_eq!(run["lost"], 0, "{which}: {run}");
            assert!(run["received"].as_u64().unwrap() > 0, "{which}: {run}");
        }
        assert_plots(&dir.path().join(which));
    }
    // The raw worker and the Python baseline answer in jetbatch's result format.
    let bus = report(&dir.path().join("bus"));
    assert_eq!(bus["runs"][1]["cached_share"], 1.0, "after the fill, every job is a cache hit");
}

/// The LM benchmarks on the tiny model: `mc` drains through both workers and scores in process
/// with transformers (`lm-score` is the same drain without shared contexts), `lm-generate` runs
/// transformers' `generate` and compares greedy tokens, `lm-e2e` the engine alone.
#[test]
fn lm_benchmarks_run_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    for which in ["mc", "lm-generate", "lm-e2e"] {
        loadtest(&["bench", which, "--lm-tiny", "--mc-questions", "16", "--gen-jobs", "8", "--secs", "1", "--concurrency", "64", "--out", out, "--quiet"]);
        let r = report(&dir.path().join(which));
        for ratio in r["ratios"].as_array().unwrap() {
            let v = ratio["value"].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{which}: {ratio}");
        }
        for run in r["runs"].as_array().unwrap() {
            assert_eq!(run["lost"], 0, "{which}: {run}");
            assert_eq!(run["ok"], run["received"], "{which}: every job is valid: {run}");
        }
    }
    let mc = report(&dir.path().join("mc"));
    assert_eq!(mc["ratios"].as_array().unwrap().len(), 2, "vs the Python worker and vs transformers in process: {mc}");
    assert!(mc["runs"].as_array().unwrap().iter().all(|run| run["received"] == 64), "16 questions × 4 options: {mc}");
    // Batched continuous generation gives transformers' greedy tokens, job for job.
    let generate = report(&dir.path().join("lm-generate"));
    let notes = generate["notes"].to_string();
    assert!(notes.contains("greedy tokens: identical on all 8 sampled jobs"), "{notes}");
}
