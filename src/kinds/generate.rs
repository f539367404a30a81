//! `generate`: text from a prompt (text, token ids, or `messages` rendered with the model's chat
//! template), greedy or sampled, until `max_new_tokens`, a stop string or a
//! stop token. Output: `Generate` (`text`, `tokens`, `finish_reason`, `prompt_tokens`).

use rmpv::Value;
use serde::{Deserialize, Serialize};

use super::fields::{Input, Params};
use super::text;
use super::validation::{Count, ValidationError};
use super::{JobInput, Request};
use crate::chat::Message;
use crate::lm::LmSpec;

pub const INPUT_KEYS: &[&str] = &["prompt", "prompt_tokens", "messages"];
pub const PARAM_KEYS: &[&str] = &["max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "stream", "truncate", "add_generation_prompt", "top_logprobs"];

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
    /// How many of the most likely tokens to report at each generated position (0: none; then
    /// not encoded, so cache keys stay as they were).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub top_logprobs: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
    pub add_generation_prompt: Option<bool>,
    pub top_logprobs: Option<usize>,
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
            add_generation_prompt: params.boolean("add_generation_prompt")?,
            top_logprobs: super::read_top_logprobs(params)?,
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
    let given: Vec<&str> = INPUT_KEYS.iter().copied().filter(|k| input.get(k).is_some()).collect();
    let (field, prompt) = match given.as_slice() {
        ["prompt_tokens"] => ("input.prompt_tokens", input.tokens("prompt_tokens", lm.config.vocab_size)?.unwrap_or_default()),
        ["prompt"] => {
            // As the harness's generate_until encodes its contexts (`tok_batch_encode`).
            let prompt = input.text("prompt")?.unwrap_or_default();
            let special = text::special_tokens(lm, prompt, lm.bos_text.as_deref().unwrap_or(""));
            ("input.prompt", encode_prompt(lm, prompt, special, keep, "input.prompt")?)
        }
        ["messages"] => {
            let messages = read_messages(input)?;
            let chat = lm.chat.as_ref().map_err(|why| ValidationError::Invalid { field: "input.messages".into(), detail: why.clone() })?;
            let text = chat
                .render(&messages, params.add_generation_prompt.unwrap_or(true))
                .map_err(|e| ValidationError::Invalid { field: "input.messages".into(), detail: e.to_string() })?;
            // As apply_chat_template(tokenize=True) encodes it: the template writes its own
            // special tokens (a BOS where the model wants one).
            ("input.messages", encode_prompt(lm, &text, false, keep, "input.messages")?)
        }
        [] => return Err(ValidationError::Missing { field: "input.prompt".into(), or: Some("prompt_tokens or messages") }),
        _ => {
            let detail = format!("give one of prompt, prompt_tokens and messages, not {}", given.join(" and "));
            return Err(ValidationError::Invalid { field: "input".into(), detail });
        }
    };
    if params.add_generation_prompt.is_some() && field != "input.messages" {
        return Err(ValidationError::Invalid { field: "params.add_generation_prompt".into(), detail: "only with input.messages".into() });
    }
    if prompt.is_empty() {
        return Err(ValidationError::NoTokens { field: field.into() });
    }
    let prompt = match keep {
        Some(keep) => prompt[prompt.len().saturating_sub(keep)..].to_vec(),
        None if prompt.len() >= lm.max_length => {
            return Err(ValidationError::NoRoomToGenerate { field: field.into(), tokens: Count::Exactly(prompt.len()), max: lm.max_length })
        }
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
    let top_logprobs = params.top_logprobs.unwrap_or(0);
    let input = GenerateInput { prompt, max_new_tokens: max_new, sampling, stop: params.stop, stop_token_ids, top_logprobs };
    Ok(Request { cost: input.cost(), cacheable: input.reproducible(), stream: params.stream, input: JobInput::Generate(input) })
}

/// The token ids of a prompt's text (with the tokenizer's special tokens when `special`), bounded
/// before tokenising: with `keep` (truncate left) only its end is read, else a bounded start of it
/// tells an over-long one.
fn encode_prompt(lm: &LmSpec, prompt: &str, special: bool, keep: Option<usize>, field: &str) -> Result<Vec<u32>, ValidationError> {
    match keep {
        // Its last `keep` tokens are those of the whole text.
        Some(keep) => text::encode(lm, text::bounded_tail(lm, prompt, keep)?, special),
        None if text::over(lm, prompt, lm.max_length)? => {
            Err(ValidationError::NoRoomToGenerate { field: field.into(), tokens: Count::MoreThan(lm.max_length), max: lm.max_length })
        }
        None => text::encode(lm, prompt, special),
    }
}

/// `input.messages`: a list of `{role, content}` maps, strings both.
fn read_messages(input: &Input) -> Result<Vec<Message>, ValidationError> {
    const EXPECTED: &str = "a non-empty list of {role, content} maps with string values";
    let expected = |field: String| ValidationError::Expected { field, expected: EXPECTED };
    let items = match input.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => return Err(expected("input.messages".into())),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |key: &str| format!("input.messages[{i}].{key}");
            let pairs = m.as_map().ok_or_else(|| expected(format!("input.messages[{i}]")))?;
            let (mut role, mut content) = (None, None);
            for (k, v) in pairs {
                let slot = match k.as_str() {
                    Some("role") => &mut role,
                    Some("content") => &mut content,
                    Some(other) => return Err(ValidationError::UnknownKey { field: at(other), hint: "a message has role and content".into() }),
                    None => return Err(ValidationError::KeyNotString { field: format!("input.messages[{i}]") }),
                };
                *slot = Some(v.as_str().map(String::from).ok_or_else(|| ValidationError::Expected { field: at(k.as_str().unwrap_or_default()), expected: "a string" })?);
            }
            Ok(Message {
                role: role.ok_or_else(|| ValidationError::Missing { field: at("role"), or: None })?,
                content: content.ok_or_else(|| ValidationError::Missing { field: at("content"), or: None })?,
            })
        })
        .collect()
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

