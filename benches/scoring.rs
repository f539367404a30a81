//! Scoring on the engine alone (no bus): how close a scoring forward comes to the host's measured
//! GEMM peak (the roofline), and what the prefix cache saves on few-shot-shaped work, what it
//! costs work that shares nothing, and an idle single job's latency — cache on against off, in
//! the same run.
//!
//! `cargo bench --bench scoring` (under `cargo test` it runs tiny shapes as a smoke test). The
//! model is a random Llama (testkit `write_lm`): vocabulary 32,000, hidden 512, 8 layers, GQA.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jetbatch::engine::{EngineHandle, Event};
use jetbatch::job::{JobInput, JobKind, Output};
use jetbatch::kinds::Window;
use jetbatch::metrics::Metrics;
use jetbatch::plan::ModelPlan;
use tch::{Kind, Tensor};

struct Shape {
    vocab: i64,
    hidden: i64,
    layers: i64,
    /// Few-shot work: batches of `questions` rows over one shared prefix of `shared` tokens, each
    /// with `own` tokens of its own and a 1-token continuation.
    shared: usize,
    own: usize,
    questions: usize,
    batches: usize,
}

/// Best GFLOP/s of an `n`×`n` f32 matmul, on libtorch's default threads (as the engine's), through
/// MKL and through oneDNN with the weight packed once (the engine's CPU projections): the better of
/// the two is the host's peak.
fn gemm_peak(n: i64) -> f64 {
    let _no_grad = tch::no_grad_guard();
    let (a, b) = (Tensor::randn([n, n], (Kind::Float, tch::Device::Cpu)), Tensor::randn([n, n], (Kind::Float, tch::Device::Cpu)));
    let packed = b.to_mkldnn();
    let best = |f: &dyn Fn() -> Tensor| {
        let _ = f();
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let _ = f();
                2.0 * (n * n * n) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    let mkl = best(&|| a.mm(&b));
    let onednn = best(&|| a.to_mkldnn().mkldnn_linear(&packed, None::<Tensor>).to_dense(None, false));
    println!("f32 {n}x{n} GEMM: MKL {mkl:.1} GFLOP/s, oneDNN {onednn:.1} GFLOP/s");
    mkl.max(onednn)
}

/// Runs `inputs` as one engine call; the wall time.
fn run(engine: &EngineHandle, spec: &Arc<ModelPlan>, inputs: Vec<JobInput>) -> (Duration, Vec<Output>) {
    let n = inputs.len();
    let t = Instant::now();
    let mut events = engine.run(spec.clone(), JobKind::Loglikelihood, inputs, vec![false; n], Vec::new());
    let mut out: Vec<Option<Output>> = (0..n).map(|_| None).collect();
    while out.iter().any(Option::is_none) {
        match events.blocking_recv() {
            Some(Event::Done { index, result, .. }) => out[index] = Some(result.expect("scored")),
            Some(_) => {}
            None => panic!("engine stopped"),
        }
    }
    (t.elapsed(), out.into_iter().map(Option::unwrap).collect())
}

fn tokens(seed: &mut u64, n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            3 + ((*seed >> 33) % 250) as u32
        })
        .collect()
}

fn window(context: Vec<u32>, seed: &mut u64) -> JobInput {
    JobInput::Score(vec![Window { context, continuation: tokens(seed, 1), top_logprobs: 0 }])
}

fn logprobs(out: &[Output]) -> Vec<f64> {
    out.iter().map(|o| if let Output::Score { logprob, .. } = o { *logprob } else { panic!("{o:?}") }).collect()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let s = match bench {
        true => Shape { vocab: 32000, hidden: 512, layers: 8, shared: 600, own: 100, questions: 16, batches: 6 },
        false => Shape { vocab: 300, hidden: 64, layers: 1, shared: 40, own: 8, questions: 4, batches: 2 },
    };
    let dir = tempfile::tempdir().unwrap();
    let model = |name: &str, prefix_mb: u64| {
        let path = dir.path().join(name);
        jetbatch_testkit::write_lm(&path, 3, s.hidden, s.layers, s.vocab, 1024).unwrap();
        let toml = std::fs::read_to_string(path.join("jetbatch.toml")).unwrap();
        std::fs::write(path.join("jetbatch.toml"), format!("{}prefix_cache_mb = {prefix_mb}\n", toml.replace("max_batch_size = 16", "max_batch_size = 256"))).unwrap();
        Arc::new(ModelPlan::load(&path).unwrap())
    };
    let (on, off) = (model("on", 1024), model("off", 0));
    let engine = EngineHandle::start(Arc::new(Metrics::new("bench")), 0).0;
    let n = if bench { 2048 } else { 256 };
    let peak = gemm_peak(n);
    println!("model: Llama, vocabulary {}, hidden {}, {} layers; GEMM peak {peak:.1} GFLOP/s (f32 {n}x{n} matmul, best of 5)", s.vocab, s.hidden, s.layers);

    // The roofline: one scoring forward of 16 rows of 256 tokens with the cache off.
    let mut seed = 1u64;
    let (rows, len) = (16usize, 256usize.min(s.shared));
    let batch: Vec<JobInput> = (0..rows).map(|_| window(tokens(&mut seed, len), &mut seed)).collect();
    let _ = run(&engine, &off, batch.clone());
    let took = (0..3).map(|_| run(&engine, &off, batch.clone()).0).min().unwrap();
    let (h, inter) = (s.hidden as f64, 2.0 * s.hidden as f64);
    // Per token and layer: q, o (h×h), k, v (h×h/2), gate, up, down (h×2h): 2 FLOPs a weight.
    let per_token = 2.0 * s.layers as f64 * (2.0 * h * h + h * h + 3.0 * h * inter);
    let attention = 2.0 * s.layers as f64 * (len * len) as f64 * h * rows as f64;
    let flops = per_token * (rows * len) as f64 + attention + 2.0 * (s.vocab as f64) * h * rows as f64;
    let achieved = flops / took.as_secs_f64() / 1e9;
    println!("scoring forward, {rows} rows x {len} tokens: {:.1} ms, {achieved:.1} GFLOP/s = {:.0} % of the GEMM peak", took.as_secs_f64() * 1e3, 100.0 * achieved / peak);

    // Few-shot work: the same jobs with the cache on and off, batch by batch.
    let prefix = tokens(&mut seed, s.shared);
    let batches: Vec<Vec<JobInput>> = (0..s.batches)
        .map(|_| (0..s.questions).map(|_| window(prefix.iter().copied().chain(tokens(&mut seed, s.own)).collect(), &mut seed)).collect())
        .collect();
    let (mut t_on, mut t_off, mut worst) = (Duration::ZERO, Duration::ZERO, 0.0f64);
    for b in &batches {
        let (a, x) = run(&engine, &on, b.clone());
        let (c, y) = run(&engine, &off, b.clone());
        (t_on, t_off) = (t_on + a, t_off + c);
        worst = logprobs(&x).iter().zip(logprobs(&y)).map(|(p, q)| (p - q).abs() / q.abs().max(1.0)).fold(worst, f64::max);
    }
    let n = s.batches * s.questions;
    println!(
        "few-shot ({n} rows: {} shared + {} own tokens, {} a batch): cache on {:.1} rows/s, off {:.1} rows/s: {:.2}x; largest relative difference {worst:.1e}",
        s.shared,
        s.own,
        s.questions,
        n as f64 / t_on.as_secs_f64(),
        n as f64 / t_off.as_secs_f64(),
        t_off.as_secs_f64() / t_on.as_secs_f64()
    );
    assert!(worst <= 1e-4, "the cache changed a score by {worst}");

    // Work that shares nothing, and one job alone on an idle engine: on against off.
    let (mut t_on, mut t_off) = (Duration::ZERO, Duration::ZERO);
    let (mut single_on, mut single_off) = (Vec::new(), Vec::new());
    for _ in 0..s.batches {
        let b: Vec<JobInput> = (0..s.questions).map(|_| window(tokens(&mut seed, s.shared / 4 + s.own), &mut seed)).collect();
        t_on += run(&engine, &on, b.clone()).0;
        t_off += run(&engine, &off, b).0;
        let one = vec![window(tokens(&mut seed, s.own), &mut seed)];
        single_on.push(run(&engine, &on, one.clone()).0);
        single_off.push(run(&engine, &off, one).0);
    }
    single_on.sort();
    single_off.sort();
    println!(
        "sharing nothing: cache on / off time {:.3}; a single job of {} tokens alone: median {:.2} ms on, {:.2} ms off",
        t_on.as_secs_f64() / t_off.as_secs_f64(),
        s.own,
        single_on[single_on.len() / 2].as_secs_f64() * 1e3,
        single_off[single_off.len() / 2].as_secs_f64() * 1e3
    );
}
