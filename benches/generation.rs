//! Continuous vs static batching for `generate` on a mixed short/long workload, engine only (no
//! bus): tokens per second and job latency percentiles, both modes in the same run.
//!
//! `cargo bench --bench generation` (under `cargo test` it runs a few jobs as a smoke test).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jetbatch::engine::{EngineHandle, Event};
use jetbatch::job::{JobInput, JobKind, Output};
use jetbatch::kinds::{GenerateInput, Sampling};
use jetbatch::metrics::Metrics;
use jetbatch::repository::ModelSpec;

struct Report {
    tokens: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Sends `jobs` in waves of `wave` every `gap` (as batches reach the engine) and waits for all.
async fn run(engine: &EngineHandle, spec: Arc<ModelSpec>, jobs: &[usize], wave: usize, gap: Duration) -> Report {
    let start = Instant::now();
    let mut waiting = Vec::new();
    for (w, chunk) in jobs.chunks(wave).enumerate() {
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + gap * w as u32)).await;
        let inputs: Vec<JobInput> = chunk
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let prompt: Vec<u32> = (0..8).map(|t| 3 + ((w * 31 + i * 7 + t) % 250) as u32).collect();
                let sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None };
                JobInput::Generate(GenerateInput { prompt, max_new_tokens: n, sampling, stop: vec![], stop_token_ids: vec![], top_logprobs: 0 })
            })
            .collect();
        let sent = Instant::now();
        let mut events = engine.run(spec.clone(), JobKind::Generate, inputs, vec![false; chunk.len()]);
        let n = chunk.len();
        waiting.push(tokio::spawn(async move {
            let mut done = Vec::new();
            while done.len() < n {
                match events.recv().await {
                    Some(Event::Done { result: Ok(Output::Generate { tokens, .. }), .. }) => done.push((tokens.len(), sent.elapsed())),
                    Some(Event::Done { result, .. }) => panic!("generation failed: {result:?}"),
                    Some(Event::Chunk { .. }) => {}
                    None => panic!("engine stopped"),
                }
            }
            done
        }));
    }
    let mut report = Report { tokens: 0, wall: Duration::ZERO, latencies: Vec::new() };
    for w in waiting {
        for (tokens, latency) in w.await.expect("collector") {
            report.tokens += tokens;
            report.latencies.push(latency);
        }
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
        let model = dir.path().join(mode);
        jetbatch::demo::write_tiny_lm(&model, 7, hidden, layers).unwrap();
        let toml = format!("backend = \"hf\"\nmax_batch_size = 16\nmax_new_tokens_limit = 200\ngeneration = \"{mode}\"\n");
        std::fs::write(model.join("jetbatch.toml"), toml).unwrap();
        let spec = Arc::new(ModelSpec::load(&model).unwrap());
        let (engine, _thread) = EngineHandle::start(Arc::new(Metrics::new("bench")), 0);
        let lengths: Vec<usize> = (0..jobs).map(|i| if i % 4 == 3 { 128 } else { 8 }).collect();
        let r = runtime.block_on(async {
            engine.load(spec.clone()).await.unwrap();
            run(&engine, spec, &lengths, wave, Duration::from_millis(20)).await
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
