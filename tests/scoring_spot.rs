//! Spot check of LM scoring on a real-sized vocabulary, run on demand beside
//! `loadtest/spot/score_transformers.py` (which builds the model):
//!
//! ```sh
//! .venv/bin/python loadtest/spot/score_transformers.py /tmp/spot
//! JETBATCH_SPOT_MODELS=/tmp/spot cargo test --release --test scoring_spot -- --ignored --nocapture
//! ```
//! The same 64 loglikelihood windows, one engine batch at a time: jobs/s of the engine alone.

use std::sync::Arc;
use std::time::Instant;

use jetbatch::engine::{EngineHandle, Event};
use jetbatch::job::{JobInput, JobKind};
use jetbatch::kinds::Window;
use jetbatch::metrics::Metrics;
use jetbatch::plan::ModelPlan;

#[tokio::test]
#[ignore = "a timing spot check: needs JETBATCH_SPOT_MODELS (see the module doc)"]
async fn loglikelihood_batches_on_a_32k_vocabulary() {
    let dir = std::path::PathBuf::from(std::env::var("JETBATCH_SPOT_MODELS").expect("JETBATCH_SPOT_MODELS"));
    let model = dir.join("big-vocab");
    if !model.join("tokenizer.json").exists() {
        // Any byte-level tokenizer will do: the jobs are token ids.
        jetbatch_testkit::write_tiny_lm(&dir.join("tok"), 1, 32, 1).unwrap();
        std::fs::copy(dir.join("tok/tokenizer.json"), model.join("tokenizer.json")).unwrap();
    }
    let spec = Arc::new(ModelPlan::load(&model).unwrap());
    let (engine, _thread) = EngineHandle::start(Arc::new(Metrics::new("spot")), 0);
    engine.load(spec.clone()).await.unwrap();
    let inputs: Vec<JobInput> = (0..64u32)
        .map(|i| {
            let context: Vec<u32> = (0..20 + (i * 7) % 40).map(|t| 3 + (t * 13 + i) % 250).collect();
            let continuation: Vec<u32> = (0..1 + i % 8).map(|t| 3 + (t * 31 + i) % 250).collect();
            JobInput::Score(vec![Window { context, continuation, top_logprobs: 0 }])
        })
        .collect();
    for round in 0..3 {
        let (n, start) = (10, Instant::now());
        for _ in 0..n {
            let mut rx = engine.run(spec.clone(), JobKind::Loglikelihood, inputs.clone(), vec![false; 64], Vec::new());
            for _ in 0..64 {
                assert!(matches!(rx.recv().await, Some(Event::Done { result: Ok(_), .. })));
            }
        }
        let el = start.elapsed().as_secs_f64();
        eprintln!("{{\"round\": {round}, \"ms_per_batch\": {:.1}, \"jobs_per_s\": {:.0}}}", el * 1e3 / n as f64, 64.0 * n as f64 / el);
    }
}
