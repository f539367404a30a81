//! jetbatch: a NATS JetStream job worker that batches ML jobs onto libtorch.
//!
//! Producers publish jobs on `jetbatch.jobs.<model>`; stateless workers share a durable pull
//! consumer, batch jobs per (model, kind), run them on a dedicated engine thread, cache
//! deterministic results in sled, publish results on `jetbatch.results.<id>` and ack a job only
//! after its result's publish was acknowledged by the results stream. The wire contract is in
//! `schemas/`.
//!
//! # Layout
//! Data flows one way through bounded channels; cache and metrics sit beside the stages.
//! - [`bus`]: everything JetStream — connection and setup, the pull loop and [`bus::Delivery`]
//!   (ack/nak/term/progress) in `bus/pull.rs` (one consumer per priority level, highest first),
//!   the pause a worker puts on its pulls after handing a job back for another (`bus/gate.rs`),
//!   publishing results, dead letters, chunks and snapshots and the stored-answer lookup in
//!   `bus/publish.rs`.
//! - [`job`]: the wire contract — decoding jobs into envelopes, results (`job/mod.rs`); the subject
//!   grammar of names and `reply_to` (`job/subject.rs`); the lenient id scanner of refused payloads
//!   (`job/scan.rs`). [`encoding`] and [`error`] (the wire [`error::JobError`] and its codes) sit below it.
//! - [`kinds`]: one module per job kind — its typed input and params, cost, batching and output
//!   wire form; typed [`kinds::ValidationError`]s; unknown keys refused.
//! - [`plan`]: one model as the repository resolved it ([`plan::ModelPlan`]: what to load, where,
//!   dtype, device, budgets, its kinds), which the engine and every stage read; it reads no file
//!   and no CLI option. [`repository`]: model folders (`jetbatch.toml`), fingerprints, building
//!   plans, and the model-specific validation into [`job::ValidJob`].
//! - [`hf_config`]: a Hugging Face model's `config.json` and its RoPE settings, below both readers
//!   (the edge's [`lm`] and the engine's `engine/hf/`).
//! - [`lm`]: what the edge knows of an HF model — config, tokenizer, request limits; [`chat`]: its
//!   chat template, rendered as transformers renders it, within bounds (fuel, output, recursion).
//! - [`batcher`]: per-(model, kind) [`batcher::State`] and the task that closes batches.
//! - [`engine`]: the OS thread that owns every tensor, one file per concern (its `# Layout`: the
//!   handle, errors, model slots, batch splitting, generation, device memory); backends behind
//!   [`engine::LoadedModel`]: TorchScript, and `engine/hf/` — shared layers (`layers.rs`), one file per architecture family
//!   and one table from `config.json`'s `architectures` (`archs.rs`), scoring heads, generation;
//!   the generation scheduler (`scheduler.rs`) as a plain state machine.
//! - [`infer`]: the transport-neutral core — the batcher and the runner (`infer/runner.rs`) in
//!   front of the engine, for any adapter's tickets ([`infer::spawn`]); what every adapter does
//!   around it (`infer/admission.rs`: validation, the deadline at intake, the cache before and
//!   after, the job metrics); and [`infer::Infer`], the in-process adapter the benchmarks,
//!   loadtest and tests use.
//! - [`serve`]: `jetbatch serve`, the JetStream adapter on the core — the wiring and shutdown
//!   (`serve/mod.rs`), the types that flow between its stages (`flow.rs`), `intake.rs` and
//!   `results.rs` with only what is JetStream's (deliveries, acks, redeliveries, dead letters;
//!   the ack policy as a plain function, `decide`).
//! - [`cache`] (a worker's sled folder, `cache/local.rs`, and the pool's key-value bucket,
//!   `cache/shared.rs`, behind one two-tier facade), [`metrics`]: beside the pipeline.
//! - [`deadline`]: a job's `deadline` and `timeout_ms`, and the `timeout` answer of a job past them.
//! - [`priority`]: job levels, their subjects and consumers, the aging rule the pull loop and the
//!   batcher follow.
//! - [`config`]: the clap CLI; [`submit`] and [`demo`]: client-side commands (`submit/mod.rs`:
//!   `submit`, `cancel` and `run_jobs`; `submit/lookup.rs`: what the streams hold under a job's id).
//! - [`pool`]: the workers' NATS service endpoints as a client sees them (`jetbatch pool`);
//!   `serve/service.rs` answers them and `serve/peers.rs` learns from them which models the
//!   other workers of the pool serve.
//! - [`gateway`]: `jetbatch gateway`, the OpenAI-compatible HTTP producer (its `# Layout`: the
//!   door every request passes, one file per route, jobs on the bus, errors in OpenAI's shape).
//! - [`stream`]: a streamed `generate` result's chunks and their wire form.
//! - [`tensor`]: plain tensors (dtype, shape, bytes) as they cross the wire and the engine boundary.

pub(crate) mod batcher;
pub mod bus;
pub mod cache;
pub mod chat;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod encoding;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod hf_config;
pub mod infer;
pub mod job;
pub mod kinds;
pub mod lm;
pub mod metrics;
pub mod plan;
pub mod pool;
pub mod priority;
pub mod repository;
pub mod serve;
pub mod stream;
pub mod submit;
pub mod tensor;
