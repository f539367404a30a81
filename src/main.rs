use anyhow::Context;
use clap::Parser;
use jetbatch::config::{CacheAction, Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// An error ends the command with one line on stderr (its causes joined with `: `) and exit
/// status 1: never a backtrace, which `main` returning the error would print under RUST_BACKTRACE.
fn main() -> std::process::ExitCode {
    match try_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // 130 for Ctrl-C, as shells report it.
            std::process::ExitCode::from(e.downcast_ref::<jetbatch::submit::SubmitError>().map_or(1, |e| e.exit_code()))
        }
    }
}

fn try_main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    jetbatch::config::apply_config_file(&args).map_err(anyhow::Error::msg)?;
    let cli = Cli::parse();
    // The worker logs what it does; a command run by hand says only what went wrong (no lines on
    // its connection).
    let default_level = if matches!(cli.command, Command::Serve(_) | Command::Demo(_)) { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("JETBATCH_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init(),
    }
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    let result = runtime.block_on(run(cli.command));
    // A shutdown that ran out of time may leave blocking work behind (a model load, the engine
    // thread's join): the process exits without waiting for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => jetbatch::serve::run(args, shutdown_signal()).await?,
        Command::Setup(args) => {
            let client = jetbatch::bus::connect(&args.nats, "jetbatch-setup").await?;
            let js = async_nats::jetstream::new(client);
            jetbatch::bus::setup(&js, &args.topology).await?;
            let t = &args.topology;
            let consumers: Vec<String> = jetbatch::priority::Priority::ALL.iter().map(|p| p.consumer(&t.consumer)).collect();
            println!("streams {}, {}, {} and consumers {} are ready", t.jobs_stream, t.results_stream, t.dead_stream, consumers.join(", "));
            if let Some(bucket) = jetbatch::bus::CacheBucket::of(&args.cache, args.topology.replicas) {
                jetbatch::bus::setup_cache_bucket(&js, &bucket).await?;
                println!("shared cache bucket {} is ready", bucket.name);
            }
        }
        Command::Models(args) => models(args).await?,
        Command::Cache(args) => {
            let cache = match jetbatch::cache::Cache::for_command(&args.cache, &args.nats).await {
                // sled locks the folder while a worker runs: that worker answers for its cache.
                Err(jetbatch::cache::CacheError::Locked(dir)) => return cache_via_worker(&args, &dir).await,
                other => other?,
            };
            // Clears what it can, shows what is left, then reports what it could not clear.
            let cleared = match args.action {
                CacheAction::Clear => cache.clear().await,
                CacheAction::Stats => Ok(()),
            };
            println!("{}", serde_json::to_string(&cache.stats().await?)?);
            cleared?;
        }
        Command::Submit(args) => {
            // It prints its own summary (answered, ok, cached, errors by code).
            jetbatch::submit::submit(args).await?;
        }
        Command::Cancel(args) => {
            jetbatch::submit::cancel(args).await?;
        }
        Command::DemoModels { dir } => {
            jetbatch::demo::write_demo_models(&dir).map_err(anyhow::Error::msg)?;
            println!("demo models written to {}", dir.display());
        }
        Command::Demo(args) => jetbatch::demo::run(args).await?,
        Command::Pool(args) => jetbatch::pool::run(args).await.map_err(anyhow::Error::from_boxed)?,
        Command::Gateway(args) => jetbatch::gateway::run(args, shutdown_signal()).await?,
    }
    Ok(())
}

/// `jetbatch cache` on a folder a running worker holds: through that worker's cache endpoint.
async fn cache_via_worker(args: &jetbatch::config::CacheArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let client = jetbatch::bus::connect(&args.nats, "jetbatch-cache").await?;
    let clear = matches!(args.action, CacheAction::Clear);
    let answer = jetbatch::pool::cache_via_worker(&client, &args.prefix, dir, clear).await.map_err(anyhow::Error::from)?;
    let answer = answer.with_context(|| {
        format!("{} is locked by a process, and no worker of this host on that NATS (prefix {}) says it holds it", dir.display(), args.prefix)
    })?;
    println!("{}", serde_json::to_string(&answer)?);
    Ok(())
}

async fn models(args: jetbatch::config::ModelsArgs) -> anyhow::Result<()> {
    let repo = jetbatch::repository::Repository::scan(&args.models)?;
    let metrics = std::sync::Arc::new(jetbatch::metrics::Metrics::new("models"));
    let (engine, _thread) = jetbatch::engine::EngineHandle::start(metrics, 0);
    for (name, spec) in &repo.models {
        let kinds: Vec<&str> = spec.kinds().iter().map(|k| k.as_str()).collect();
        let loaded = if args.load {
            match engine.load(spec.clone()).await {
                Ok(()) => " loaded+warm".to_string(),
                Err(e) => format!(" LOAD FAILED: {e}"),
            }
        } else {
            String::new()
        };
        println!("ok      {name}  kinds={} fingerprint={} size={}B{loaded}", kinds.join(","), spec.fingerprint, spec.size_bytes);
        for warning in spec.lm.iter().flat_map(|lm| lm.warnings()) {
            println!("warning {name}  {warning}");
        }
    }
    for (name, e) in &repo.invalid {
        println!("invalid {name}  {e}");
    }
    for (name, why) in &repo.skipped {
        println!("skipped {name}  {why}");
    }
    anyhow::ensure!(repo.invalid.is_empty(), "{} invalid model(s)", repo.invalid.len());
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
