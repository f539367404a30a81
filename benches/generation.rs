//! Continuous vs static batching for `generate` on a mixed short/long workload, through the core in
//! process (`jetbatch::infer::Infer`: batcher and engine, no bus): tokens per second and job
//! latency percentiles, both modes in the same run. Then exact greedy speculation on and off: one
//! job's latency and a batch's tokens/s, with the share of drafted tokens the model accepted.
//!
//! `cargo bench --bench generation` (under `cargo test` it runs a few jobs as a smoke test);
//! `cargo bench --bench generation -- speculation` runs the speculation part alone.

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

/// The tokens of one uncached greedy `generate` job of model `lm` (no stop tokens).
async fn greedy(infer: &Infer, id: String, prompt: Vec<u32>, max_new_tokens: usize) -> Vec<u32> {
    let job = serde_json::json!({"id": id, "model": "lm", "kind": "generate", "input": {"prompt_tokens": prompt},
                                 "params": {"max_new_tokens": max_new_tokens, "stop_token_ids": []}, "cache": false});
    match infer.run("lm", &serde_json::to_vec(&job).unwrap()).await.unwrap().output {
        Output::Generate { tokens, .. } => tokens,
        other => panic!("not a generation: {other:?}"),
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().unwrap();
    // A decoder wide enough that steps cost compute: Llama architecture, hidden 512, 4 layers.
    let (hidden, layers, jobs, wave) = if bench { (512, 4, 96, 8) } else { (64, 1, 8, 4) };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if std::env::args().any(|a| a == "speculation") {
        return speculation(&runtime, dir.path(), bench);
    }
    if std::env::args().any(|a| a == "fewshot") {
        return fewshot(&runtime, dir.path(), bench);
    }
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
    speculation(&runtime, dir.path(), bench);
    fewshot(&runtime, dir.path(), bench);
}

/// A 3-shot `generate_until`-shaped backlog: greedy prompts of three shared solved examples and
/// an own question, all sent at once, with the prefix cache off (`prefix_cache_mb = 0`) and on:
/// tokens/s, and the same tokens either way.
fn fewshot(runtime: &tokio::runtime::Runtime, dir: &std::path::Path, bench: bool) {
    let (hidden, layers, vocab, shot, own, new_tokens, jobs) = if bench { (512, 8, 32000usize, 128, 24, 32, 64) } else { (64, 1, 259, 16, 4, 4, 4) };
    println!("\n3-shot generation: {jobs} greedy jobs, prompts of 3 shared shots of {shot} tokens and {own} own, {new_tokens} new tokens, sent at once");
    println!("| prefix cache | tokens/s | wall | prompt tokens from the cache |");
    println!("| --- | --- | --- | --- |");
    let prompt = |j: usize| -> Vec<u32> {
        let shots = (0..3 * shot).map(|t| 3 + ((t * 7919) % (vocab - 3)) as u32);
        shots.chain((0..own).map(|t| 3 + ((j * 104_729 + t * 31) % (vocab - 3)) as u32)).collect()
    };
    let mut runs: Vec<(f64, Vec<Vec<u32>>)> = Vec::new();
    for mb in [0, 512] {
        let repository = dir.join(format!("fewshot-{mb}"));
        let model = repository.join("lm");
        jetbatch_testkit::write_lm(&model, 7, hidden, layers, vocab as i64, 1024).unwrap();
        std::fs::write(model.join("jetbatch.toml"), format!("backend = \"hf\"\nmax_batch_size = 64\nprefix_cache_mb = {mb}\n")).unwrap();
        let metrics = Arc::new(Metrics::new("bench"));
        let _in_runtime = runtime.enter();
        let infer = Infer::start(&repository, 0, metrics.clone()).unwrap();
        runtime.block_on(infer.preload("lm")).unwrap();
        let hits = || metrics.prefix_hit_tokens_total.with_label_values(&["lm"]).get();
        let before = hits();
        let start = Instant::now();
        let tokens = runtime.block_on(join_all((0..jobs).map(|j| greedy(&infer, format!("f{mb}-{j}"), prompt(j), new_tokens))));
        let wall = start.elapsed();
        runtime.block_on(infer.shutdown());
        let n: usize = tokens.iter().map(Vec::len).sum();
        let tps = n as f64 / wall.as_secs_f64();
        println!("| {} | {tps:.0} | {:.0} ms | {} of {} |", if mb == 0 { "off" } else { "on" }, wall.as_secs_f64() * 1e3, hits() - before, jobs * (3 * shot + own));
        runs.push((tps, tokens));
    }
    assert_eq!(runs[0].1, runs[1].1, "the same tokens with the prefix cache on and off");
    println!("prefix cache on / off: {:.2}x tokens/s, tokens equal", runs[1].0 / runs[0].0);
}

/// Greedy jobs whose prompts repeat a phrase, alone and in batches, with `speculate_tokens` 0
/// (off) and on: wall time, tokens/s and drafts accepted. A random model's generations rarely
/// repeat (drafts rejected: the cost of having speculation on); an echoing one (see
/// [`jetbatch_testkit::make_echo`]) repeats its last token (drafts accepted: the gain).
fn speculation(runtime: &tokio::runtime::Runtime, dir: &std::path::Path, bench: bool) {
    // Shaped like a small real model where it counts: a 32k vocabulary, hidden 512, 8 layers.
    let (hidden, layers, vocab, new_tokens, batches) = if bench { (512, 8, 32000, 96, vec![1, 2, 4, 8, 16]) } else { (64, 1, 259, 8, vec![1, 2]) };
    println!("\nspeculation: greedy, prompts repeating a 7-token phrase, {new_tokens} new tokens, jobs sent at once");
    println!("| model | speculate_tokens | jobs | tokens/s | wall | drafted | accepted |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    // A 259-token vocabulary: random generations soon meet tokens seen before (drafts are found,
    // and rejected: speculation's worst case).
    for (name, vocab, echo) in [("random", vocab, false), ("random, 259 tokens", 259, false), ("echo", vocab, true)] {
        let mut want: Option<Vec<Vec<u32>>> = None;
        for k in [0, 4, 8] {
            let repository = dir.join(format!("spec-{vocab}-{echo}-{k}"));
            let model = repository.join("lm");
            jetbatch_testkit::write_lm(&model, 7, hidden, layers, vocab, 512).unwrap();
            if echo {
                jetbatch_testkit::make_echo(&model).unwrap();
            }
            std::fs::write(model.join("jetbatch.toml"), format!("backend = \"hf\"\nmax_batch_size = 32\nspeculate_tokens = {k}\n")).unwrap();
            let metrics = Arc::new(Metrics::new("bench"));
            let _in_runtime = runtime.enter();
            let infer = Infer::start(&repository, 0, metrics.clone()).unwrap();
            runtime.block_on(infer.preload("lm")).unwrap();
            // Warm: libtorch prepares each shape of forward on first use.
            for &jobs in &batches {
                runtime.block_on(run(&infer, "lm", &vec![new_tokens / 4; jobs], jobs, Duration::ZERO));
            }
            let mut got = Vec::new();
            for &jobs in &batches {
                let counters = || (metrics.speculated_tokens_total.with_label_values(&["lm"]).get(), metrics.speculated_accepted_tokens_total.with_label_values(&["lm"]).get());
                let before = counters();
                let start = Instant::now();
                let tokens = runtime.block_on(join_all((0..jobs).map(|j| {
                    let prompt: Vec<u32> = (0..48).map(|t| 3 + ((j * 37 + (t % 7) * 13) % 250) as u32).collect();
                    greedy(&infer, format!("s{k}-{jobs}-{j}"), prompt, new_tokens)
                })));
                let wall = start.elapsed();
                let (drafted, accepted) = (counters().0 - before.0, counters().1 - before.1);
                let n: usize = tokens.iter().map(Vec::len).sum();
                println!(
                    "| {name} | {k} | {jobs} | {:.0} | {:.0} ms | {drafted} | {accepted} ({:.0} % of tokens) |",
                    n as f64 / wall.as_secs_f64(),
                    wall.as_secs_f64() * 1e3,
                    100.0 * accepted as f64 / n as f64
                );
                got.extend(tokens);
            }
            runtime.block_on(infer.shutdown());
            // The same tokens whatever the drafts.
            match &want {
                None => want = Some(got),
                Some(w) => assert_eq!(&got, w, "speculate_tokens = {k}: tokens as without drafts"),
            }
        }
    }
}
