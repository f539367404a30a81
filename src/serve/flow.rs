//! The types that flow between the serve stages: a valid job on its way to the engine
//! ([`Pending`]), what became of a job ([`Outcome`], with the [`Header`] of its result and its
//! [`Delivery`]) on its way to the results stage, and the read-only [`Ctx`] they share. A
//! [`Pending`] is the JetStream adapter's ticket through the core (`crate::infer`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use crate::bus::{self, Delivery};
use crate::cache::Cache;
use crate::config::Topology;
use crate::engine::EngineError;
use crate::infer::{ChunkSink, Done, Failure, Ticket};
use crate::job::{Encoding, ErrorCode, JobError, Output, Provenance, Timing, ValidJob};
use crate::metrics::Metrics;
use crate::plan::ModelPlan;
use crate::repository::LiveRepository;
use crate::stream::StreamChunk;

/// A valid job on its way to the engine.
pub struct Pending {
    pub job: ValidJob,
    pub spec: Arc<ModelPlan>,
    pub cache_key: Option<[u8; 32]>,
    pub delivery: Delivery,
    /// Counts the job in its model's queue until it leaves the core.
    pub _queued: Queued,
}

/// Valid jobs per model waiting for or in the engine (the `stats` endpoint's queue).
#[derive(Default)]
pub(crate) struct Queues(Mutex<BTreeMap<Arc<str>, u64>>);

impl Queues {
    pub fn enter(self: &Arc<Self>, model: Arc<str>) -> Queued {
        *self.0.lock().expect("queues lock").entry(model.clone()).or_default() += 1;
        Queued { queues: self.clone(), model }
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().expect("queues lock").iter().map(|(m, n)| (m.to_string(), *n)).collect()
    }
}

/// One job in [`Queues`]; leaves when dropped.
pub(crate) struct Queued {
    queues: Arc<Queues>,
    model: Arc<str>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let mut queues = self.queues.0.lock().expect("queues lock");
        if let Some(n) = queues.get_mut(&self.model) {
            *n -= 1;
            if *n == 0 {
                queues.remove(&self.model);
            }
        }
    }
}

impl Ticket for Pending {
    fn spec(&self) -> &Arc<ModelPlan> {
        &self.spec
    }
    fn job(&self) -> &ValidJob {
        &self.job
    }
    fn job_mut(&mut self) -> &mut ValidJob {
        &mut self.job
    }
    fn age(&self) -> Duration {
        self.delivery.age()
    }
}

/// What became of a job; the results stage turns it into a publish and an ack.
pub enum Outcome {
    /// Answer and ack (an error result here is final: the message is termed).
    Answer(Result<Output, JobError>),
    /// A transient failure: nak with backoff, or dead-letter when deliveries are used up.
    Retry(EngineError),
    /// Never started (shutdown): hand back at once.
    Release,
    /// Its result is already in the results stream (an earlier delivery was answered): ack only.
    AlreadyAnswered,
    /// Its model is served by other workers of the pool, not this one: hand it back for them;
    /// on its last delivery, answer this error instead.
    Elsewhere(JobError),
    /// Delivered more often than `max_deliver` allows, never answered ([`deliveries_used_up`]):
    /// answer this error and dead-letter it.
    Exhausted(JobError),
}

/// The error of a job on a delivery past `max_deliver` (≤ 0: unlimited). The consumer redelivers
/// without limit, so that no job is stranded unanswered; a job that comes back this often was
/// taken by workers that died on it (or handed it back) every time, and is not started again.
pub(crate) fn deliveries_used_up(delivered: i64, max_deliver: i64) -> Option<JobError> {
    (max_deliver > 0 && delivered > max_deliver).then(|| {
        let why = "the workers that took it stopped (killed, out of memory, shut down) before answering it each time";
        JobError::new(ErrorCode::ModelError, format!("delivered {delivered} times without an answer (max_deliver {max_deliver}): {why}; not started again"))
    })
}

/// A job back from the core: failures that are answers (its deadline passed) are answered, the
/// engine's failures retried, jobs never started handed back.
impl From<Done<Pending>> for Finished {
    fn from(Done { ticket, timing, result }: Done<Pending>) -> Finished {
        let mut header = Header::of(&ticket);
        header.timing = timing;
        let outcome = match result {
            Ok(output) => Outcome::Answer(Ok(output)),
            Err(Failure::Late(e)) => Outcome::Answer(Err(e)),
            Err(Failure::Released) => Outcome::Release,
            Err(Failure::Engine(e)) => Outcome::Retry(e),
        };
        Finished { delivery: ticket.delivery, header, outcome }
    }
}

/// Streamed chunks go on `<prefix>.stream.<id>`.
impl ChunkSink for bus::Streamer {
    async fn publish(&self, job: &ValidJob, chunk: &StreamChunk) {
        bus::Streamer::publish(self, &job.id, job.encoding, chunk).await
    }
}

/// Everything the results stage needs of a job, with the outcome.
pub struct Finished {
    pub delivery: Delivery,
    pub header: Header,
    pub outcome: Outcome,
}

/// The parts of a job that go into its result.
pub struct Header {
    pub id: Option<String>,
    pub model: String,
    pub kind: String,
    pub encoding: Encoding,
    pub reply_to: Option<String>,
    pub cache_key: Option<[u8; 32]>,
    pub cached: bool,
    pub stream: bool,
    pub timing: Timing,
    /// What produced the answer; for valid jobs only (the model is known).
    pub provenance: Option<Provenance>,
}

impl Header {
    pub(crate) fn of(p: &Pending) -> Header {
        Header::of_job(&p.job, &p.spec, p.cache_key)
    }

    pub(crate) fn of_job(job: &ValidJob, spec: &ModelPlan, cache_key: Option<[u8; 32]>) -> Header {
        // Asked of libtorch once: the count does not change while the worker runs.
        static CUDA_DEVICES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cuda_devices = *CUDA_DEVICES.get_or_init(|| tch::Cuda::device_count().max(0) as usize);
        let provenance = Provenance {
            model_fingerprint: job.fingerprint.to_string(),
            dtype: spec.config.dtype.map_or("f32", |d| d.name()).to_string(),
            device: spec.config.device.resolved(cuda_devices),
            jetbatch: env!("CARGO_PKG_VERSION").to_string(),
            chat_template: job.chat.clone(),
        };
        Header {
            provenance: Some(provenance),
            id: Some(job.id.clone()),
            model: job.model.to_string(),
            kind: job.kind.as_str().to_string(),
            encoding: job.encoding,
            reply_to: job.reply_to.clone(),
            cache_key,
            cached: false,
            stream: job.stream,
            timing: Timing::default(),
        }
    }

    /// A job that did not get as far as a [`ValidJob`]: what of it could be read.
    pub(crate) fn of_parts(id: Option<String>, model: String, kind: String, encoding: Encoding, reply_to: Option<String>) -> Header {
        Header { id, model, kind, encoding, reply_to, cache_key: None, cached: false, stream: false, timing: Timing::default(), provenance: None }
    }
}

/// Shared, read-only context of the stages.
pub(crate) struct Ctx {
    pub topology: Topology,
    pub worker: String,
    pub metrics: Arc<Metrics>,
    pub cache: Option<Arc<Cache>>,
    /// The models served, so metric labels name only these (a producer's made-up model names and
    /// kinds would otherwise each become a new series); swapped by the `load`/`unload` endpoints.
    pub repository: Arc<LiveRepository>,
    /// What the other workers of the pool serve.
    pub peers: Arc<super::peers::Peers>,
    pub queues: Arc<Queues>,
    pub publisher: bus::Publisher,
    pub streamer: bus::Streamer,
}

impl Ctx {
    /// Whether the results stream already holds this job's answer. Asked only for redeliveries
    /// and for jobs held past `ack_wait` — the cases where another worker may have answered — so
    /// the common path pays nothing. Only an answer to this very job counts (see
    /// [`bus::Publisher::answered`]): a result stored by another job with the same id does not.
    pub async fn already_answered(&self, h: &Header, hash: &str) -> bool {
        let Some(id) = h.id.as_deref() else { return false };
        match self.publisher.answered(id, hash).await {
            Ok(found) => found,
            Err(e) => {
                warn!(id, error = %e, "results lookup failed; answering anyway (deduplicated by id)");
                false
            }
        }
    }

    /// `model` and `kind` labels: a served model and a known kind, else `unknown` / `invalid`.
    pub fn labels<'a>(&self, h: &'a Header) -> [&'a str; 2] {
        crate::infer::admission::labels(&self.repository.current(), &h.model, &h.kind)
    }
}

