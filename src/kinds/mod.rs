//! The job kinds: one module each. A kind module parses its `input` and `params` into its typed
//! request (its [`JobInput`] variant) and its batch cost, says which keys it takes (others are
//! refused, naming the key), and writes its [`Output`]'s wire form. [`JobKind`] is the table and
//! dispatches to the modules, as mini-redis's `Command::from_frame` does.
//!
//! # Layout
//! - [`tensor`], [`generate`], [`loglikelihood`], [`loglikelihood_rolling`], [`embed`],
//!   [`classify`]: one per kind.
//! - [`scoring`]: what the two scoring kinds share (the [`scoring::Window`], truncation, the
//!   `Score` and `Choices` outputs).
//! - [`encoder`]: what `embed` and `classify` share (the truncated encoder input).
//! - [`messages`]: `input.messages`, rendered with the model's chat template (`generate`'s
//!   prompt, `loglikelihood`'s context).
//! - [`text`]: bounded tokenisation of producer text; [`fields`]: strict reading of the job's
//!   maps and the hints for unknown keys; [`validation`]: the typed [`ValidationError`].
//!
//! Adding a kind: a module here, a row in [`JobKind`] (`ALL`, `as_str`, `keys`, `validate`, and
//! its batching), its [`JobInput`]/[`Output`] variants if new, the schema, and tests.

use std::collections::BTreeMap;

use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::encoding::Encoding;
use crate::lm::LmSpec;
use crate::tensor::TensorData;

pub mod classify;
pub mod embed;
pub mod encoder;
pub mod fields;
pub mod generate;
pub mod kind;
pub mod loglikelihood;
pub mod loglikelihood_rolling;
pub mod messages;
pub mod scoring;
pub mod tensor;
pub mod text;
pub mod validation;

pub use fields::Place;
pub use generate::{FinishReason, GenerateInput, Sampling};
pub use scoring::Window;
pub use validation::ValidationError;

pub use kind::JobKind;

/// How the batcher groups a kind's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// In arrival order.
    Arrival,
    /// Jobs of similar cost together (less padding); for the scoring and encoder kinds.
    ByLength,
    /// Straight through, no waiting: `generate` jobs wait in the engine's generation scheduler,
    /// which admits them into the running batch under the model's one token budget.
    Continuous,
}

impl JobKind {
    pub const ALL: [JobKind; 6] = [
        JobKind::Tensor,
        JobKind::Generate,
        JobKind::Loglikelihood,
        JobKind::LoglikelihoodRolling,
        JobKind::Embed,
        JobKind::Classify,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Tensor => "tensor",
            JobKind::Generate => "generate",
            JobKind::Loglikelihood => "loglikelihood",
            JobKind::LoglikelihoodRolling => "loglikelihood_rolling",
            JobKind::Embed => "embed",
            JobKind::Classify => "classify",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The keys this kind's `input` (or `params`) may have; [`Place::Top`]: the job's own.
    pub fn keys(self, place: Place) -> &'static [&'static str] {
        let (input, params) = match self {
            JobKind::Tensor => (tensor::INPUT_KEYS, tensor::PARAM_KEYS),
            JobKind::Generate => (generate::INPUT_KEYS, generate::PARAM_KEYS),
            JobKind::Loglikelihood => (loglikelihood::INPUT_KEYS, loglikelihood::PARAM_KEYS),
            JobKind::LoglikelihoodRolling => (loglikelihood_rolling::INPUT_KEYS, loglikelihood_rolling::PARAM_KEYS),
            JobKind::Embed => (embed::INPUT_KEYS, embed::PARAM_KEYS),
            JobKind::Classify => (classify::INPUT_KEYS, classify::PARAM_KEYS),
        };
        match place {
            Place::Top => fields::TOP_LEVEL,
            Place::Input => input,
            Place::Params => params,
        }
    }

    /// How the batcher groups this kind's jobs.
    pub fn batching(self) -> Batching {
        match self {
            JobKind::Tensor => Batching::Arrival,
            JobKind::Generate => Batching::Continuous,
            JobKind::Loglikelihood | JobKind::LoglikelihoodRolling | JobKind::Embed | JobKind::Classify => Batching::ByLength,
        }
    }

    /// Parses a job's `input` and `params` for `model`: its typed request. Unknown keys are refused.
    pub fn validate(self, model: &Model, input: &Value, params: &BTreeMap<String, Value>) -> Result<Request, ValidationError> {
        let input = fields::Input::read(input, self.keys(Place::Input), self)?;
        let params = fields::Params::read(params, self.keys(Place::Params), self)?;
        let unsupported = |name: &str| ValidationError::UnsupportedKind { model: name.to_string(), kind: self };
        match (self, model) {
            (JobKind::Tensor, Model::Tensor { name, slots, max_elements }) => tensor::parse(name, slots, *max_elements, &input),
            (JobKind::Generate, Model::Lm { lm, .. }) => generate::parse(lm, &input, &params),
            (JobKind::Loglikelihood, Model::Lm { lm, .. }) => loglikelihood::parse(lm, &input, &params),
            (JobKind::LoglikelihoodRolling, Model::Lm { lm, .. }) => loglikelihood_rolling::parse(lm, &input),
            (JobKind::Embed, Model::Lm { lm, .. }) => embed::parse(lm, &input, &params),
            (JobKind::Classify, Model::Lm { lm, .. }) => classify::parse(lm, &input),
            (_, Model::Tensor { name, .. } | Model::Lm { name, .. }) => Err(unsupported(name)),
        }
    }
}

/// What a kind's parser needs of the model a job is for.
#[derive(Debug)]
pub enum Model<'a> {
    /// A TorchScript model: its inputs, and the largest tensor accepted.
    Tensor { name: &'a str, slots: Vec<tensor::Slot<'a>>, max_elements: usize },
    /// A Hugging Face model: its config, tokenizer and request limits.
    Lm { name: &'a str, lm: &'a LmSpec },
}

/// A kind's typed request: what the cache, the batcher and the engine need of a valid job.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub input: JobInput,
    /// Budget units the job uses in a batch.
    pub cost: usize,
    /// Whether the result may be cached (it is reproducible).
    pub cacheable: bool,
    /// `generate` with `stream: true`.
    pub stream: bool,
    /// The prompt the model's chat template made of the job's `messages`, if it sent them.
    pub chat: Option<ChatPrompt>,
}

impl Request {
    /// A cacheable, non-streaming request.
    pub fn new(cost: usize, input: JobInput) -> Request {
        Request { input, cost, cacheable: true, stream: false, chat: None }
    }
}

/// A job's `messages` as the model's chat template rendered them: the template's hash and the
/// text it wrote (results carry it, so that what was scored can be read back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatPrompt {
    pub template_hash: String,
    pub prompt: String,
}

/// Kind-specific, validated input: everything that determines the result (it is the cache key,
/// in its MessagePack form: variants, field names and their order must not change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobInput {
    Tensor(Vec<TensorData>),
    /// `loglikelihood` (one window) and `loglikelihood_rolling` (disjoint windows), in token ids.
    Score(Vec<Window>),
    Generate(GenerateInput),
    /// `embed` and `classify`: the encoder's input with its special tokens.
    Encode { ids: Vec<u32>, type_ids: Vec<u32>, normalize: bool },
    /// `loglikelihood` with `continuations`: one window per choice, in the job's order.
    Choices(Vec<Window>),
}

impl JobInput {
    /// The windows a scoring job scores (none for the other kinds).
    pub fn windows(&self) -> &[Window] {
        match self {
            JobInput::Score(w) | JobInput::Choices(w) => w,
            _ => &[],
        }
    }
}

/// What a model produces for one job; stored as-is in the cache (its MessagePack form must not
/// change: the cache lives on disk across upgrades).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Output {
    Tensor(Vec<TensorData>),
    /// `loglikelihood` (with `is_greedy`) and `loglikelihood_rolling` (without); `top`: per
    /// continuation token with `top_logprobs`, else empty.
    Score {
        logprob: f64,
        is_greedy: Option<bool>,
        tokens: usize,
        #[serde(default)]
        top: Vec<TopLogprobs>,
    },
    /// `top`: per generated token with `top_logprobs`, else empty.
    Generate {
        text: String,
        tokens: Vec<u32>,
        finish_reason: FinishReason,
        prompt_tokens: usize,
        #[serde(default)]
        top: Vec<TopLogprobs>,
    },
    /// `embed`: `tokens` is how many tokens the model read (the text's, special tokens included,
    /// as truncated to the model's length).
    Embedding { embedding: Vec<f32>, tokens: usize },
    Classification { logits: Vec<f32>, probs: Vec<f32>, label: String, label_id: usize },
    /// `loglikelihood` with `continuations`: per choice, in the job's order; `top`: per choice
    /// (per continuation token) with `top_logprobs`, else empty.
    Choices { logprobs: Vec<f64>, is_greedy: Vec<bool>, tokens: Vec<usize>, top: Vec<Vec<TopLogprobs>> },
}

impl Output {
    /// The result's `output` field, written by the kind's module.
    pub fn to_wire(&self, encoding: Encoding) -> Value {
        match self {
            Output::Tensor(ts) => tensor::to_wire(ts, encoding),
            Output::Score { logprob, is_greedy, tokens, top } => with_top(scoring::score_to_wire(*logprob, *is_greedy, *tokens, encoding), top, encoding),
            Output::Generate { text, tokens, finish_reason, prompt_tokens, top } => with_top(generate::to_wire(text, tokens, *finish_reason, *prompt_tokens), top, encoding),
            Output::Embedding { embedding, tokens } => embed::to_wire(embedding, *tokens, encoding),
            Output::Classification { logits, probs, label, label_id } => classify::to_wire(logits, probs, label, *label_id, encoding),
            Output::Choices { logprobs, is_greedy, tokens, top } => scoring::choices_to_wire(logprobs, is_greedy, tokens, top, encoding),
        }
    }

    /// Whether this is the job's whole result (what the cache may keep): a generation its
    /// deadline cut short is not.
    pub fn complete(&self) -> bool {
        !matches!(self, Output::Generate { finish_reason: FinishReason::Deadline, .. })
    }
}

/// The most likely tokens at one position (`top_logprobs`): ids, their text, their log-probs
/// (of the model's distribution, before any temperature), most likely first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprobs {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
    pub logprobs: Vec<f32>,
}

/// `top_logprobs` (params of `generate` and `loglikelihood`): how many, 1..=20; `None` if absent.
pub fn read_top_logprobs(params: &fields::Params) -> Result<Option<usize>, ValidationError> {
    match params.uint("top_logprobs")? {
        None => Ok(None),
        Some(k @ 1..=20) => Ok(Some(k as usize)),
        Some(_) => Err(ValidationError::OutOfRange { field: "params.top_logprobs".into(), range: "1..=20".into() }),
    }
}

/// A kind's output map with `top_logprobs` (one entry per scored or generated token) where asked.
fn with_top(output: Value, top: &[TopLogprobs], encoding: Encoding) -> Value {
    let Value::Map(mut pairs) = output else { return output };
    if !top.is_empty() {
        pairs.push((Value::from("top_logprobs"), top_to_wire(top, encoding)));
    }
    Value::Map(pairs)
}

/// `top_logprobs` entries, one per token (also a streamed chunk's).
pub(crate) fn top_to_wire(top: &[TopLogprobs], encoding: Encoding) -> Value {
    Value::Array(
        top.iter()
            .map(|t| {
                wire_map(vec![
                    ("ids", Value::Array(t.ids.iter().map(|&i| Value::from(i)).collect())),
                    ("tokens", Value::Array(t.tokens.iter().map(|s| Value::from(s.as_str())).collect())),
                    ("logprobs", wire_floats(&t.logprobs, encoding)),
                ])
            })
            .collect(),
    )
}

fn wire_map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

/// JSON has no NaN or infinities: there they are the strings "NaN", "Infinity", "-Infinity".
fn wire_float(x: f64, encoding: Encoding) -> Value {
    match encoding {
        Encoding::Json => crate::tensor::json_float(Value::from(x)),
        Encoding::MsgPack => Value::from(x),
    }
}

fn wire_floats(xs: &[f32], encoding: Encoding) -> Value {
    Value::Array(
        xs.iter()
            .map(|&x| match encoding {
                Encoding::Json => crate::tensor::json_float(Value::from(x)),
                Encoding::MsgPack => Value::from(x),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests;
