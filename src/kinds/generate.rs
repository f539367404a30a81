//! `generate`: text from a prompt, greedy or sampled, until `max_new_tokens`, a stop string or a
//! stop token. Output: `Generate` (`text`, `tokens`, `finish_reason`, `prompt_tokens`).

use rmpv::Value;
use serde::{Deserialize, Serialize};

use super::fields::{Input, Params};
use super::text;
use super::validation::{Count, ValidationError};
use super::{JobInput, Request};
use crate::lm::LmSpec;

pub const INPUT_KEYS: &[&str] = &["prompt", "prompt_tokens"];
pub const PARAM_KEYS: &[&str] = &["max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "stream", "truncate"];

/// `max_new_tokens` when a job does not say.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 64;

/// How `generate` picks each token. Temperature 0 is greedy; otherwise logits are divided by the
/// temperature, cut to the `top_k` most likely, then to the smallest set with `top_p` of the mass,
/// and one token is drawn with the job's own RNG (seeded by `seed`), so a job gives the same
/// tokens whatever shares its batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub seed: Option<u64>,
}

/// Everything that determines a `generate` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateInput {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation ends when the text contains one of these; it is cut from `text`.
    pub stop: Vec<String>,
    /// Generation ends on these tokens (default: the model's eos ids).
    pub stop_token_ids: Vec<u32>,
}

impl GenerateInput {
    /// Positions this job may hold in the KV cache: its prompt and every token it may generate.
    pub fn cost(&self) -> usize {
        self.prompt.len() + self.max_new_tokens
    }

    /// A sampled generation without a seed is not reproducible, so it is never cached.
    pub fn reproducible(&self) -> bool {
        self.sampling.temperature == 0.0 || self.sampling.seed.is_some()
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Length,
    Stop,
    Eos,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
        }
    }
}

/// What becomes of a prompt too long for the model (`params.truncate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Truncate {
    /// `"error"` (the default): a prompt that leaves no room to generate is a `bad_request`.
    #[default]
    Error,
    /// `"left"`: the prompt keeps its last `max_length - max_new_tokens` tokens, as
    /// lm-evaluation-harness's `generate_until` cuts its contexts (`context_enc[:, -max_ctx_len:]`).
    Left,
}

/// `params` of a `generate` job, parsed and range-checked (the vocabulary is checked in [`parse`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateParams {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub stream: bool,
    pub truncate: Truncate,
}

impl GenerateParams {
    pub fn read(params: &Params) -> Result<GenerateParams, ValidationError> {
        let bad = |name: &str, expected: &'static str| ValidationError::Expected { field: format!("params.{name}"), expected };
        let temperature = params.float("temperature")?;
        if temperature.is_some_and(|t| !(0.0..=100.0).contains(&t)) {
            return Err(bad("temperature", "a number in 0..=100"));
        }
        let top_p = params.float("top_p")?;
        if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(bad("top_p", "a number in (0, 1]"));
        }
        const STOP: &str = "up to 16 non-empty strings of at most 256 bytes";
        let stop = match params.get("stop") {
            None | Some(Value::Nil) => Vec::new(),
            Some(Value::Array(items)) if items.len() <= 16 => items
                .iter()
                .map(|s| s.as_str().filter(|s| !s.is_empty() && s.len() <= 256).map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("stop", STOP))?,
            Some(_) => return Err(bad("stop", STOP)),
        };
        let stop_token_ids = match params.get("stop_token_ids") {
            None | Some(Value::Nil) => None,
            // Ids past u32 are refused here (not wrapped); `parse` checks the vocabulary.
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("stop_token_ids", "a list of token ids (integers below the vocabulary size)"))?,
            ),
            Some(_) => return Err(bad("stop_token_ids", "a list of token ids")),
        };
        let truncate = match params.get("truncate") {
            None | Some(Value::Nil) => Truncate::Error,
            Some(v) => match v.as_str() {
                Some("error") => Truncate::Error,
                Some("left") => Truncate::Left,
                _ => return Err(bad("truncate", "\"error\" or \"left\"")),
            },
        };
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Ok(GenerateParams {
            max_new_tokens: params.uint("max_new_tokens")?.map(size),
            temperature,
            top_k: params.uint("top_k")?.map(size),
            top_p,
            seed: params.uint("seed")?,
            stop,
            stop_token_ids,
            stream: params.boolean("stream")?.unwrap_or(false),
            truncate,
        })
    }
}

pub fn parse(lm: &LmSpec, input: &Input, params: &Params) -> Result<Request, ValidationError> {
    let params = GenerateParams::read(params)?;
    let max_new = params.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
    if max_new == 0 || max_new > lm.max_new_tokens_limit {
        return Err(ValidationError::OutOfRange { field: "params.max_new_tokens".into(), range: format!("1..={}", lm.max_new_tokens_limit) });
    }
    // Tokens the prompt may keep: with `truncate: "left"`, what leaves room for every new token.
    let keep = match params.truncate {
        Truncate::Error => None,
        Truncate::Left => Some(lm.max_length.checked_sub(max_new).filter(|&k| k > 0).ok_or_else(|| ValidationError::OutOfRange {
            field: "params.max_new_tokens".into(),
            range: format!("1..{} with truncate \"left\" (room for the prompt within max_length)", lm.max_length),
        })?),
    };
    let prompt = match input.tokens("prompt_tokens", lm.config.vocab_size)? {
        Some(t) => t,
        None => {
            let prompt = input.text("prompt")?.ok_or(ValidationError::Missing { field: "input.prompt".into(), or: Some("prompt_tokens") })?;
            match keep {
                // Only the end of a long prompt is read: its last `keep` tokens are those of the whole.
                Some(keep) => text::encode_text(lm, text::bounded_tail(lm, prompt, keep)?)?,
                None => {
                    // A prompt must fit the model: a bounded start of it tells an over-long one.
                    if text::over(lm, prompt, lm.max_length)? {
                        return Err(ValidationError::NoRoomToGenerate { tokens: Count::MoreThan(lm.max_length), max: lm.max_length });
                    }
                    text::encode_text(lm, prompt)?
                }
            }
        }
    };
    if prompt.is_empty() {
        return Err(ValidationError::NoTokens { field: "input.prompt".into() });
    }
    let prompt = match keep {
        Some(keep) => prompt[prompt.len().saturating_sub(keep)..].to_vec(),
        None if prompt.len() >= lm.max_length => return Err(ValidationError::NoRoomToGenerate { tokens: Count::Exactly(prompt.len()), max: lm.max_length }),
        None => prompt,
    };
    let temperature = params.temperature.unwrap_or(0.0);
    let sampling = Sampling {
        temperature,
        // Greedy ignores the sampling knobs: normalised so they do not split the cache.
        top_k: if temperature > 0.0 { params.top_k.unwrap_or(0) } else { 0 },
        top_p: if temperature > 0.0 { params.top_p.unwrap_or(1.0) } else { 1.0 },
        seed: if temperature > 0.0 { params.seed } else { None },
    };
    let stop_token_ids = params.stop_token_ids.clone().unwrap_or_else(|| lm.config.eos_ids());
    if let Some(bad) = stop_token_ids.iter().find(|&&t| t as usize >= lm.config.vocab_size) {
        return Err(ValidationError::Invalid { field: "params.stop_token_ids".into(), detail: format!("{bad} is not below the vocabulary size") });
    }
    let input = GenerateInput { prompt, max_new_tokens: max_new, sampling, stop: params.stop, stop_token_ids };
    Ok(Request { cost: input.cost(), cacheable: input.reproducible(), stream: params.stream, input: JobInput::Generate(input) })
}

/// The `Generate` output on the wire.
pub fn to_wire(text: &str, tokens: &[u32], finish_reason: FinishReason, prompt_tokens: usize) -> Value {
    super::wire_map(vec![
        ("text", Value::from(text)),
        ("tokens", Value::Array(tokens.iter().map(|&t| Value::from(t)).collect())),
        ("finish_reason", Value::from(finish_reason.as_str())),
        ("prompt_tokens", Value::from(prompt_tokens as u64)),
    ])
}

