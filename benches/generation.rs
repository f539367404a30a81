//! Continuous vs static batching for `generate` on a mixed short/long workload, through the core in
//! process (`jetbatch::infer::Infer`: batcher and engine, no bus): tokens per second and job
//! latency percentiles, both modes in the same run.
//!
//! `cargo bench --bench generation` (under `cargo test` it runs a few jobs as a smoke test).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use jetbatch::infer::Infer;
use jetbatch::job::Output;
use jetbatch::metrics::Metrics;

struct Report {
    tokens: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Sends `jobs` (their new-token counts) to the core in waves of `wave` every `gap` and waits for
/// all.
async fn run(infer: &Infer, model: &str, jobs: &[usize], wave: usize, gap: Duration) -> Report {
    let start = Instant::now();
    let each = jobs.iter().enumerate().map(|(i, &n)| async move {
        let (w, k) = (i / wave, i % wave);
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + gap * w as u32)).await;
        let prompt: Vec<u32> = (0..8).map(|t| 3 + ((w * 31 + k * 7 + t) % 250) as u32).collect();
        let job = serde_json::json!({"id": format!("g{i}"), "model": model, "kind": "generate", "input": {"prompt_tokens": prompt},
                                     "params": {"max_new_tokens": n, "stop_token_ids": []}, "cache": false});
        let sent = Instant::now();
        match infer.run(model, &serde_json::to_vec(&job).unwrap()).await {
            Ok(answer) => match answer.output {
                Output::Generate { tokens, .. } => (tokens.len(), sent.elapsed()),
                other => panic!("not a generation: {other:?}"),
            },
            Err(e) => panic!("generation failed: {e:?}"),
        }
    });
    let mut report = Report { tokens: 0, wall: Duration::ZERO, latencies: Vec::new() };
    for (tokens, latency) in join_all(each).await {
        report.tokens += tokens;
        report.latencies.push(latency);
    }
    report.wall = start.elapsed();
    report.latencies.sort();
    report
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().unwrap();
    // A decoder wide enough that steps cost compute: Llama architecture, hidden 512, 4 layers.
    let (hidden, layers, jobs, wave) = if bench { (512, 4, 96, 8) } else { (64, 1, 8, 4) };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!("mixed workload: {jobs} jobs, 3 short (8 new tokens) : 1 long (128), waves of {wave} every 20 ms");
    println!("| mode | tokens/s | p50 latency | p99 latency | wall |");
    println!("| --- | --- | --- | --- | --- |");
    let mut results = Vec::new();
    for mode in ["continuous", "static"] {
        let repository = dir.path().join(mode);
        let model = repository.join("lm");
        jetbatch_testkit::write_tiny_lm(&model, 7, hidden, layers).unwrap();
        let toml = format!("backend = \"hf\"\nmax_batch_size = 16\nmax_new_tokens_limit = 200\ngeneration = \"{mode}\"\n");
        std::fs::write(model.join("jetbatch.toml"), toml).unwrap();
        let lengths: Vec<usize> = (0..jobs).map(|i| if i % 4 == 3 { 128 } else { 8 }).collect();
        let r = runtime.block_on(async {
            let infer = Infer::start(&repository, 0, Arc::new(Metrics::new("bench"))).unwrap();
            infer.preload("lm").await.unwrap();
            let r = run(&infer, "lm", &lengths, wave, Duration::from_millis(20)).await;
            infer.shutdown().await;
            r
        });
        let tps = r.tokens as f64 / r.wall.as_secs_f64();
        println!(
            "| {mode} | {tps:.0} | {:.0} ms | {:.0} ms | {:.2} s |",
            percentile(&r.latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&r.latencies, 0.99).as_secs_f64() * 1e3,
            r.wall.as_secs_f64()
        );
        assert_eq!(r.tokens, lengths.iter().sum::<usize>(), "every job generated its tokens");
        results.push((tps, percentile(&r.latencies, 0.99)));
    }
    println!("continuous / static: throughput {:.2}x, p99 {:.2}x", results[0].0 / results[1].0, results[0].1.as_secs_f64() / results[1].1.as_secs_f64());
}
