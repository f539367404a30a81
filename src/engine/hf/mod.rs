//! The `hf` backend: Hugging Face model folders run natively with tch (no Python at run time).
//!
//! Decoders batch with left padding: an additive attention mask hides padding and the future,
//! and position ids count each row's own tokens, so a row's result does not depend on the rows
//! beside it. Generation keeps a KV cache. Encoders batch with right padding and a key mask.
//!
//! # Layout
//! - `config.json` is read into [`crate::hf_config::HfConfig`], below the engine: the request edge
//!   reads it too.
//! - [`archs`]: the architecture table ([`archs::ARCHS`]), the only place an architecture is
//!   named; the request edge reads it too.
//! - `weights`: safetensors loading and scoped look-up.
//! - `layers`: linear, norms, MLPs, rotary embeddings (with their scaling types), attention,
//!   masks and the KV cache.
//! - One file per architecture family: `llama` (Llama, Mistral, Qwen2), `qwen3`, `gemma` (2 and 3),
//!   `phi3`, `gpt2`, `bert`, `xlm_roberta`.
//! - `heads`: scoring windows, pooling and classifying; `generate`: the generation batch.
//! - `prefix`: forwards over the prefix cache (keys and values of prefixes already computed).

pub mod archs;
mod bert;
mod gemma;
mod generate;
mod gpt2;
mod heads;
mod layers;
mod llama;
mod phi3;
mod prefix;
mod qwen3;
mod weights;
mod xlm_roberta;

use tch::{Device, Kind, Tensor};

use super::{EngineError, LoadedModel, Sink};
use crate::job::{JobInput, JobKind, Output};
use crate::kinds::{scoring, Window};
use crate::plan::ModelPlan;
use generate::{GenBatch, Row};
use layers::{KvCache, Layout, Outputs};

fn load_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(e.to_string())
}

fn tch_err(e: tch::TchError) -> EngineError {
    EngineError::from_tch(e)
}

/// A causal LM, as scoring and generation use it.
pub(crate) trait CausalLm {
    fn vocab(&self) -> i64;
    fn num_layers(&self) -> usize;
    /// Final hidden states `[B, T, H]` of `ids [B, T]`, attending as `layout` says (S = cached +
    /// T keys); with a cache, keys and values are appended to it.
    fn forward(&self, ids: &Tensor, layout: &Layout, cache: Option<&mut KvCache>) -> Tensor {
        self.forward_to(ids, layout, cache, None)
    }
    /// [`CausalLm::forward`], with only the final hidden states of `out`'s columns computed and
    /// returned (`[B, T', H]`) where given.
    fn forward_to(&self, ids: &Tensor, layout: &Layout, cache: Option<&mut KvCache>, out: Option<&Outputs>) -> Tensor;
    /// f32 logits of hidden states.
    fn logits(&self, hidden: &Tensor) -> Tensor;
    /// Whether one row may pack a shared context and several continuations (positions
    /// restarting after the context): not under LongRoPE, whose factors follow each row's
    /// largest position.
    fn packs(&self) -> bool;
}

/// What an architecture's constructor returns.
pub(crate) enum Net {
    Decoder(Box<dyn CausalLm>),
    Encoder(bert::Bert),
}

/// `rows` left-padded with zeros: `[B, L]`.
fn pad_left(rows: &[Vec<i64>], device: Device) -> Tensor {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(rows.len() * len);
    for r in rows {
        flat.extend(std::iter::repeat_n(0, len - r.len()).chain(r.iter().copied()));
    }
    Tensor::from_slice(&flat).view([rows.len() as i64, len as i64]).to_device(device)
}

/// Left-padded rows: ids `[B, L]`, keep mask `[B, L]`, and their layout (positions counting
/// real tokens).
fn left_pad(rows: &[Vec<i64>], device: Device) -> (Tensor, Tensor, Layout) {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let ids = pad_left(rows, device);
    let keep = pad_left(&rows.iter().map(|r| vec![1; r.len()]).collect::<Vec<_>>(), device);
    let pos = (keep.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let dense = rows.iter().all(|r| r.len() == len);
    let layout = Layout::new(pos, &keep, dense);
    (ids, keep, layout)
}

#[derive(Clone, Copy)]
enum Pooling {
    Mean,
    Cls,
}

pub struct Hf {
    net: Net,
    /// The running generation (continuous batching).
    gen: GenBatch,
    device: Device,
    tokenizer: tokenizers::Tokenizer,
    eos: Vec<u32>,
    max_length: usize,
    labels: Vec<String>,
    pooling: Pooling,
    /// KV cache bytes of one token in every layer, in the weights' dtype.
    kv_token_bytes: u64,
    /// Keys and values of prefixes already scored (a `RefCell`: scoring borrows the network too;
    /// only the engine thread touches it).
    prefix: std::cell::RefCell<prefix::KvTree>,
    /// Tokens a greedy generation row drafts per step (see [`crate::engine::draft`]).
    speculate: usize,
}

impl Hf {
    pub fn load(spec: &ModelPlan, device: Device) -> Result<Hf, EngineError> {
        let lm = spec.lm.as_ref().ok_or_else(|| load_err("an hf model without its LM spec"))?;
        let kind = match spec.config.dtype {
            Some(crate::tensor::DType::F16) => Kind::Half,
            Some(crate::tensor::DType::Bf16) => Kind::BFloat16,
            _ => Kind::Float,
        };
        let c = &lm.config;
        let entry = lm.arch.0;
        let weights = weights::Weights { map: weights::load_weights(&spec.dir, device, kind)?, prefixes: entry.prefixes, device };
        let net = (entry.load)(c, &weights.root())?;
        let labels = c.labels();
        // sentence-transformers folders say how to pool in 1_Pooling/config.json.
        let pooling = std::fs::read_to_string(spec.dir.join("1_Pooling/config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| if v["pooling_mode_cls_token"].as_bool() == Some(true) { Pooling::Cls } else { Pooling::Mean })
            .unwrap_or(Pooling::Mean);
        let kv_token_bytes = (2 * c.num_hidden_layers * c.kv_heads() * c.head_dim() * kind.elt_size_in_bytes()) as u64;
        let prefix_budget = spec.config.prefix_cache_mb.map_or_else(crate::engine::prefix::default_budget, |mb| mb << 20);
        let prefix = std::cell::RefCell::new(prefix::KvTree::new(prefix_budget, kv_token_bytes));
        Ok(Hf { net, gen: GenBatch::default(), device, tokenizer: lm.tokenizer.clone(), eos: c.eos_ids(), max_length: lm.max_length, labels, pooling, kv_token_bytes, prefix, speculate: spec.config.speculate_tokens.unwrap_or_else(crate::engine::draft::default_tokens) })
    }
}

impl LoadedModel for Hf {
    fn run(&mut self, kind: JobKind, inputs: &[&JobInput]) -> Result<Vec<Output>, EngineError> {
        match (&self.net, kind) {
            (Net::Decoder(d), JobKind::Loglikelihood | JobKind::LoglikelihoodRolling) => {
                // Every window of every job is a row (a rolling text's windows, a job's choices).
                let windows: Vec<&Window> = inputs.iter().flat_map(|i| i.windows()).collect();
                let mut scores = self.score(d.as_ref(), &windows)?.into_iter();
                let greedy = kind == JobKind::Loglikelihood;
                Ok(inputs.iter().map(|i| scoring::output(i, greedy, scores.by_ref().take(i.windows().len()).collect())).collect())
            }
            (Net::Encoder(b), JobKind::Embed | JobKind::Classify) => {
                let jobs: Vec<(&Vec<u32>, &Vec<u32>, bool)> = inputs
                    .iter()
                    .map(|i| match i {
                        JobInput::Encode { ids, type_ids, normalize } => (ids, type_ids, *normalize),
                        _ => unreachable!("validated kind"),
                    })
                    .collect();
                self.encode(b, kind, &jobs)
            }
            (_, kind) => Err(EngineError::Model(format!("kind {} is not served by this model", kind.as_str()))),
        }
    }

    fn join(&mut self, jobs: Vec<(u64, JobInput, bool)>) -> Result<(), EngineError> {
        let Net::Decoder(d) = &self.net else { return Err(EngineError::Model("an encoder does not generate".into())) };
        let vocab = d.vocab();
        let rows = jobs
            .into_iter()
            .map(|(job, input, stream)| match input {
                // `LmSpec::parse` admits only these; checked again as the cache and positions rely on it.
                JobInput::Generate(g) if g.prompt.is_empty() || g.prompt.len() >= self.max_length => Err(EngineError::Model(format!(
                    "a prompt of {} tokens does not fit 1..{} positions",
                    g.prompt.len(),
                    self.max_length
                ))),
                JobInput::Generate(g) if g.prompt.iter().any(|&t| i64::from(t) >= vocab) => {
                    Err(EngineError::Model(format!("a prompt token is not below the vocabulary size {vocab}")))
                }
                JobInput::Generate(g) => Ok(self.gen.resume(job as usize).unwrap_or_else(|| Row::new(job as usize, g, stream))),
                other => Err(EngineError::Model(format!("not a generate job: {other:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prefix = self.prefix_on(d.as_ref()).then_some(&self.prefix);
        if prefix.is_some() {
            // Prompts joining together that share a prefix (a generate_until task's shots) have
            // it computed once; their prefills below then find it cached.
            let tokens: Vec<Vec<u32>> = rows.iter().map(Row::tokens).collect();
            self.prefill_shared(d.as_ref(), &tokens.iter().map(|t| &t[..t.len() - 1]).collect::<Vec<_>>())?;
        }
        self.gen.admit(d.as_ref(), self.device, rows, prefix)
    }

    fn step(&mut self, sink: &mut dyn Sink) -> Vec<(u64, Result<Output, EngineError>)> {
        let Net::Decoder(d) = &self.net else { return Vec::new() };
        if self.gen.rows.is_empty() {
            return Vec::new();
        }
        let mut gen = std::mem::take(&mut self.gen);
        // Positions restart per forward under LongRoPE (its factors follow the forward's largest
        // position): verifying drafts would change the tokens, so such models draft none.
        let speculate = if d.packs() { self.speculate } else { 0 };
        let result = gen.step(d.as_ref(), self, speculate, sink);
        match result {
            Ok(done) => {
                self.gen = gen;
                done.into_iter().map(|(job, out)| (job as u64, out)).collect()
            }
            // A failed step fails every row; the batch starts afresh.
            Err(e) => {
                self.gen.stats = gen.stats;
                gen.rows.iter().map(|r| (r.job as u64, Err(e.clone()))).collect()
            }
        }
    }

    fn generating(&self) -> usize {
        self.gen.rows.len()
    }

    fn forget(&mut self, job: u64) {
        self.gen.forget(job as usize);
    }

    fn stop(&mut self, jobs: &[u64]) {
        self.gen.stop(&jobs.iter().map(|&j| j as usize).collect::<Vec<_>>());
    }

    fn prefix_stats(&self) -> Option<crate::engine::prefix::PrefixStats> {
        match self.net {
            Net::Decoder(_) => Some(self.prefix.borrow().stats()),
            Net::Encoder(_) => None,
        }
    }

    fn speculation_stats(&self) -> Option<crate::engine::draft::SpeculationStats> {
        match self.net {
            Net::Decoder(_) => Some(self.gen.stats),
            Net::Encoder(_) => None,
        }
    }

    fn kv_bytes_per_token(&self) -> u64 {
        match self.net {
            Net::Decoder(_) => self.kv_token_bytes,
            Net::Encoder(_) => 0,
        }
    }

    /// Scoring rows of `max_length` (distinct, so none share a row) holding `tokens` in all.
    fn probe(&mut self, tokens: usize) -> Result<(), EngineError> {
        let Net::Decoder(d) = &self.net else { return Ok(()) };
        let len = self.max_length.min(tokens).max(2);
        let windows: Vec<Window> = (0..tokens.div_ceil(len) as u32).map(|r| Window { context: vec![r % 2; len - 1].into_iter().chain([r]).collect(), continuation: vec![0], top_logprobs: 0 }).collect();
        self.score(d.as_ref(), &windows.iter().collect::<Vec<_>>()).map(|_| ())
    }

    fn warmup(&mut self) -> Result<(), EngineError> {
        match &self.net {
            Net::Decoder(d) => self.score(d.as_ref(), &[&Window { context: vec![0], continuation: vec![0], top_logprobs: 0 }]).map(|_| ()),
            Net::Encoder(b) => self.encode(b, JobKind::Embed, &[(&vec![0, 0], &vec![0, 0], true)]).map(|_| ()),
        }
    }
}

