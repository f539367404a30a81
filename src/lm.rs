//! Language-model requests at the edge: the Hugging Face model folder's `config.json` and
//! `tokenizer.json`, and the parsing of `loglikelihood`, `loglikelihood_rolling`, `generate`,
//! `embed` and `classify` inputs into token ids — with lm-evaluation-harness semantics — so the
//! engine receives only validated token sequences and the cache key covers exactly what is run.

use std::path::Path;

use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::job::{JobError, JobInput, JobKind};

/// `config.json` and the architecture table live with the engine's model code; the edge reads
/// limits, special tokens and kinds from them.
pub use crate::engine::hf::config::{Arch, HfConfig};

/// What the edge knows of an `hf` model: its config and tokenizer, and the request limits.
pub struct LmSpec {
    pub config: HfConfig,
    pub arch: Arch,
    pub tokenizer: tokenizers::Tokenizer,
    /// Longest sequence the model reads.
    pub max_length: usize,
    /// The token an empty context (and the first rolling window) is conditioned on: BOS, else EOS.
    pub prefix_token: u32,
    pub max_new_tokens_limit: usize,
    /// Largest `loglikelihood_rolling` text, in bytes: that kind tokenises and scores the whole
    /// text, so this bounds its cost (`max_input_bytes` in jetbatch.toml; see
    /// [`DEFAULT_MAX_INPUT_BYTES`]). Other kinds read a bounded window of their texts whatever
    /// their size (see [`LmSpec::parse`]).
    pub max_input_bytes: usize,
}

/// Default `max_input_bytes`: 4 MiB, half the worker's default payload limit (8 MiB). A rolling
/// text that size is ~1M tokens to score, so tokenising it (~5 s) is a small part of its cost.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 4 << 20;

/// Bounded tokenisation: a text is first tokenised from a window of `WINDOW_BYTES_PER_TOKEN`
/// bytes per token needed (a token is rarely more than a few bytes), and the window doubles until it
/// yields `TOKEN_MARGIN` tokens more than needed, or holds the whole text. Tokenisers are local
/// (the tokens far from a cut do not depend on what lies past it), and windows are cut at
/// whitespace where they can be, so the kept tokens equal those of tokenising the whole text; the
/// margin absorbs the tokens next to the cut, which may differ.
const WINDOW_BYTES_PER_TOKEN: usize = 16;
const TOKEN_MARGIN: usize = 8;

/// The start of `text`, at most `max` bytes: ending just before a whitespace in the window's
/// second half if there is one, else at a char boundary.
fn cut_head(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let window = &text[..end];
    match window.rfind(char::is_whitespace) {
        Some(i) if i > 0 && i >= end / 2 => &text[..i],
        _ => window,
    }
}

/// The end of `text`, at most `max` bytes: starting at a whitespace in the window's first half if
/// there is one (it stays, as the words after it begin with it), else at a char boundary.
fn cut_tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let window = &text[start..];
    match window.find(char::is_whitespace) {
        Some(i) if i <= window.len() / 2 => &window[i..],
        _ => window,
    }
}

impl std::fmt::Debug for LmSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmSpec").field("arch", &self.arch).field("max_length", &self.max_length).finish()
    }
}

impl LmSpec {
    pub fn load(dir: &Path, max_length: Option<usize>, max_new_tokens_limit: usize) -> Result<LmSpec, String> {
        let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| format!("config.json: {e}"))?;
        let config: HfConfig = serde_json::from_str(&text).map_err(|e| format!("config.json: {e}"))?;
        let arch = config.arch()?;
        if arch.is_decoder() {
            config.rope()?;
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| format!("tokenizer.json: {e}"))?;
        // Batching pads and truncation follows the kind's rules; a tokenizer.json's own settings
        // (sentence-transformers ship fixed padding) would put pad tokens into the inputs.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| format!("tokenizer.json: {e}"))?;
        let prefix_token = match config.bos_token_id.or_else(|| config.eos_ids().first().copied()) {
            Some(t) => t,
            None if arch.is_decoder() => return Err("config.json: neither bos_token_id nor eos_token_id is set (needed as the prefix token)".into()),
            // Encoders score nothing: no prefix token.
            None => 0,
        };
        // sentence-transformers folders carry the length their embeddings were made with.
        let st_length = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map(|n| n as usize);
        let max_length = max_length.or(st_length).unwrap_or(config.max_positions()).min(config.max_positions());
        if max_length == 0 {
            return Err("max_length: must be at least 1 (and the model's max_position_embeddings too)".into());
        }
        if arch.is_decoder() && (prefix_token as usize) >= config.vocab_size {
            return Err(format!("config.json: the prefix token {prefix_token} is not below vocab_size {}", config.vocab_size));
        }
        Ok(LmSpec { config, arch, tokenizer, max_length, prefix_token, max_new_tokens_limit, max_input_bytes: DEFAULT_MAX_INPUT_BYTES })
    }

    /// The shortest start of `text` (see [`cut_head`]) whose tokens (without special tokens)
    /// number at least `need` + margin, or the whole text: its first `need` tokens are those of
    /// the whole text.
    fn bounded_head<'a>(&self, text: &'a str, need: usize) -> Result<&'a str, JobError> {
        self.bounded(text, need, cut_head)
    }

    /// The shortest end of `text` (see [`cut_tail`]) whose tokens number at least `need` +
    /// margin, or the whole text: its last `need` tokens are those of the whole text.
    fn bounded_tail<'a>(&self, text: &'a str, need: usize) -> Result<&'a str, JobError> {
        self.bounded(text, need, cut_tail)
    }

    /// The shortest `cut` of `text` holding `need` + margin tokens, the window doubling from
    /// [`WINDOW_BYTES_PER_TOKEN`] bytes a token until it does (or is the whole text).
    fn bounded<'a>(&self, text: &'a str, need: usize, cut: fn(&str, usize) -> &str) -> Result<&'a str, JobError> {
        let mut window = need.max(1).saturating_mul(WINDOW_BYTES_PER_TOKEN);
        loop {
            if text.len() <= window {
                return Ok(text);
            }
            let part = cut(text, window);
            if self.count(part)? >= need + TOKEN_MARGIN {
                return Ok(part);
            }
            window = window.saturating_mul(2);
        }
    }

    /// Whether `text` certainly has more than `limit` tokens, found from a bounded start of it
    /// (the whole text is tokenised only when it is short enough to be within reach of `limit`).
    fn over(&self, text: &str, limit: usize) -> Result<bool, JobError> {
        let head = self.bounded_head(text, limit)?;
        Ok(head.len() < text.len())
    }

    fn count(&self, text: &str) -> Result<usize, JobError> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.len())
            .map_err(|e| JobError::bad_request(format!("input: cannot tokenize: {e}")))
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, JobError> {
        self.tokenizer
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| JobError::bad_request(format!("input: cannot tokenize: {e}")))
    }

    /// Parses the kind-specific input into token ids; returns the input and its batch cost.
    pub fn parse(&self, kind: JobKind, input: &Value, params: &Params) -> Result<(JobInput, usize), JobError> {
        let field = |name: &str| input.as_map().and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some(name))).map(|(_, v)| v);
        let text = |name: &str| -> Result<Option<String>, JobError> {
            match field(name) {
                None | Some(Value::Nil) => Ok(None),
                Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| JobError::bad_request(format!("input.{name}: expected a string"))),
            }
        };
        let tokens = |name: &str| -> Result<Option<Vec<u32>>, JobError> {
            match field(name) {
                None | Some(Value::Nil) => Ok(None),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).filter(|&t| (t as usize) < self.config.vocab_size))
                    .collect::<Option<Vec<u32>>>()
                    .map(Some)
                    .ok_or_else(|| JobError::bad_request(format!("input.{name}: token ids must be integers below the vocabulary size {}", self.config.vocab_size))),
                Some(_) => Err(JobError::bad_request(format!("input.{name}: expected a list of token ids"))),
            }
        };
        match kind {
            JobKind::Loglikelihood => {
                let (context, continuation, field) = match (tokens("context_tokens")?, tokens("continuation_tokens")?) {
                    (Some(c), Some(k)) => (c, k, "continuation_tokens"),
                    (None, None) => {
                        let context = text("context")?.ok_or_else(|| JobError::bad_request("input.context: missing (or context_tokens)"))?;
                        let continuation =
                            text("continuation")?.ok_or_else(|| JobError::bad_request("input.continuation: missing (or continuation_tokens)"))?;
                        // Bounded before tokenising: a continuation past the model's length is
                        // refused, and the context is cut from the left anyway.
                        if self.over(&continuation, self.max_length)? {
                            return Err(self.continuation_too_long("continuation", None));
                        }
                        let context = self.bounded_tail(&context, self.max_length)?;
                        let (c, k) = self.split_pair(context, &continuation)?;
                        (c, k, "continuation")
                    }
                    _ => return Err(JobError::bad_request("input: give context_tokens and continuation_tokens together")),
                };
                if continuation.is_empty() {
                    return Err(JobError::bad_request(format!("input.{field}: encodes to no tokens")));
                }
                // lm-evaluation-harness's HF backend fails on these too: the model cannot score the
                // continuation whole (it would be conditioned on nothing, or on padding).
                if continuation.len() > self.max_length {
                    return Err(self.continuation_too_long(field, Some(continuation.len())));
                }
                // An empty context is conditioned on the prefix token, given as text or as tokens.
                let context = if context.is_empty() { vec![self.prefix_token] } else { context };
                let (context, continuation) = self.truncate(context, continuation);
                let cost = context.len() + continuation.len();
                Ok((JobInput::Score(vec![Window { context, continuation }]), cost))
            }
            JobKind::LoglikelihoodRolling => {
                let tokens = match tokens("tokens")? {
                    Some(t) => t,
                    None => {
                        let text = text("text")?.ok_or_else(|| JobError::bad_request("input.text: missing"))?;
                        if text.len() > self.max_input_bytes {
                            return Err(JobError::bad_request(format!(
                                "input.text: {} bytes, over this model's max_input_bytes ({}) for loglikelihood_rolling",
                                text.len(),
                                self.max_input_bytes
                            )));
                        }
                        self.encode(&text, false)?
                    }
                };
                if tokens.is_empty() {
                    return Err(JobError::bad_request("input.text: encodes to no tokens"));
                }
                let windows = rolling_windows(&tokens, self.prefix_token, self.max_length);
                let cost = windows.iter().map(|w| w.context.len() + w.continuation.len()).sum();
                Ok((JobInput::Score(windows), cost))
            }
            JobKind::Generate => {
                let prompt = match tokens("prompt_tokens")? {
                    Some(t) => t,
                    None => {
                        let prompt = text("prompt")?.ok_or_else(|| JobError::bad_request("input.prompt: missing (or prompt_tokens)"))?;
                        // A prompt must fit the model: a bounded start of it tells an over-long one.
                        if self.over(&prompt, self.max_length)? {
                            return Err(JobError::bad_request(format!(
                                "input.prompt: more than {} tokens leave no room to generate within the model's {} positions",
                                self.max_length, self.max_length
                            )));
                        }
                        self.encode(&prompt, true)?
                    }
                };
                if prompt.is_empty() {
                    return Err(JobError::bad_request("input.prompt: encodes to no tokens"));
                }
                let max_new = params.max_new_tokens.unwrap_or(64);
                if max_new == 0 || max_new > self.max_new_tokens_limit {
                    return Err(JobError::bad_request(format!("params.max_new_tokens: must be 1..={}", self.max_new_tokens_limit)));
                }
                if prompt.len() >= self.max_length {
                    return Err(JobError::bad_request(format!(
                        "input.prompt: {} tokens leave no room to generate within the model's {} positions",
                        prompt.len(),
                        self.max_length
                    )));
                }
                let cost = prompt.len() + max_new;
                let temperature = params.temperature.unwrap_or(0.0);
                let sampling = Sampling {
                    temperature,
                    // Greedy ignores the sampling knobs: normalised so they do not split the cache.
                    top_k: if temperature > 0.0 { params.top_k.unwrap_or(0) } else { 0 },
                    top_p: if temperature > 0.0 { params.top_p.unwrap_or(1.0) } else { 1.0 },
                    seed: if temperature > 0.0 { params.seed } else { None },
                };
                let stop_token_ids = params.stop_token_ids.clone().unwrap_or_else(|| self.config.eos_ids());
                if let Some(bad) = stop_token_ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
                    return Err(JobError::bad_request(format!("params.stop_token_ids: {bad} is not below the vocabulary size")));
                }
                let input = GenerateInput { prompt, max_new_tokens: max_new, sampling, stop: params.stop.clone(), stop_token_ids };
                Ok((JobInput::Generate(input), cost))
            }
            JobKind::Embed | JobKind::Classify => {
                let text_a = text("text")?.ok_or_else(|| JobError::bad_request("input.text: missing"))?;
                let pair = if kind == JobKind::Classify { text("text_pair")? } else { None };
                // Truncation keeps the first max_length - 1 tokens, which a bounded start of each
                // text has, and the last token, which a bounded end of the last text has.
                let a = self.bounded_head(&text_a, self.max_length)?;
                let b = pair.as_deref().map(|b| self.bounded_head(b, self.max_length)).transpose()?;
                let tokenize = |a: &str, b: Option<&str>| {
                    match b {
                        Some(b) => self.tokenizer.encode((a, b), true),
                        None => self.tokenizer.encode(a, true),
                    }
                    .map_err(|e| JobError::bad_request(format!("input.text: cannot tokenize: {e}")))
                };
                let enc = tokenize(a, b)?;
                let mut ids = enc.get_ids().to_vec();
                let mut type_ids = enc.get_type_ids().to_vec();
                if ids.is_empty() {
                    return Err(JobError::bad_request("input.text: encodes to no tokens"));
                }
                // Encoders truncate from the right, keeping the final separator.
                if ids.len() > self.max_length {
                    let last_cut = match (&pair, b) {
                        (Some(whole), Some(b)) => b.len() < whole.len(),
                        _ => a.len() < text_a.len(),
                    };
                    let last = if last_cut {
                        let end = match (&pair, b) {
                            (Some(whole), Some(_)) => tokenize(a, Some(self.bounded_tail(whole, 1)?))?,
                            _ => tokenize(self.bounded_tail(&text_a, 1)?, None)?,
                        };
                        (*end.get_ids().last().expect("non-empty"), *end.get_type_ids().last().expect("non-empty"))
                    } else {
                        (*ids.last().expect("non-empty"), *type_ids.last().expect("non-empty"))
                    };
                    ids.truncate(self.max_length - 1);
                    type_ids.truncate(self.max_length - 1);
                    ids.push(last.0);
                    type_ids.push(last.1);
                }
                let cost = ids.len();
                Ok((JobInput::Encode { ids, type_ids, normalize: params.normalize.unwrap_or(true) }, cost))
            }
            JobKind::Tensor => unreachable!("tensor jobs are not LM jobs"),
        }
    }

    /// lm-evaluation-harness `_encode_pair`: trailing spaces of the context move to the front of the
    /// continuation; the pair is encoded whole and the continuation is what follows the context's
    /// own encoding. An empty context is conditioned on the prefix token.
    fn continuation_too_long(&self, field: &str, tokens: Option<usize>) -> JobError {
        let n = match tokens {
            Some(n) => n.to_string(),
            None => format!("more than {}", self.max_length),
        };
        JobError::bad_request(format!(
            "input.{field}: {n} tokens; the model scores at most {} continuation tokens (its max_length)",
            self.max_length
        ))
    }

    fn split_pair(&self, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>), JobError> {
        if context.is_empty() {
            return Ok((vec![self.prefix_token], self.encode(continuation, false)?));
        }
        let trimmed = context.trim_end();
        let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
        let whole = self.encode(&format!("{context}{continuation}"), false)?;
        let context_ids = self.encode(context, false)?;
        let split = context_ids.len().min(whole.len());
        Ok((context_ids, whole[split..].to_vec()))
    }

    /// Left truncation to the model's length: the input is `(context + continuation)[-(max+1):][:-1]`.
    /// Needs a non-empty context and at most `max_length` continuation tokens (checked by `parse`),
    /// and keeps the scoring invariant: a non-empty context, and context + continuation - 1 <=
    /// max_length.
    fn truncate(&self, context: Vec<u32>, continuation: Vec<u32>) -> (Vec<u32>, Vec<u32>) {
        debug_assert!(!context.is_empty() && !continuation.is_empty() && continuation.len() <= self.max_length);
        let keep = self.max_length + 1;
        let total = context.len() + continuation.len();
        if total <= keep {
            return (context, continuation);
        }
        // continuation.len() <= max_length, so drop < context.len(): at least one context token stays.
        let drop = total - keep;
        (context[drop..].to_vec(), continuation)
    }
}

/// One scored window: the log-probs of `continuation` given `context` (the model reads
/// `(context + continuation)[:-1]`, at most its max length).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// lm-evaluation-harness `get_rolling_token_windows` with context length 1, each made disjoint.
/// Every window has a non-empty context and context + continuation - 1 <= `max_len`. Needs a
/// non-empty `tokens` and `max_len` >= 1.
pub fn rolling_windows(tokens: &[u32], prefix: u32, max_len: usize) -> Vec<Window> {
    if tokens.is_empty() || max_len == 0 {
        return Vec::new();
    }
    let mut windows = Vec::new();
    let first = max_len.min(tokens.len());
    let mut context = vec![prefix];
    context.extend_from_slice(&tokens[..first - 1]);
    windows.push((context, tokens[..first].to_vec()));
    let mut predicted = first;
    while predicted < tokens.len() {
        let n = (tokens.len() - predicted).min(max_len);
        let end = predicted + n;
        windows.push((tokens[(end.saturating_sub(max_len + 1))..end - 1].to_vec(), tokens[end - n..end].to_vec()));
        predicted += n;
    }
    windows
        .into_iter()
        .map(|(a, b)| {
            // make_disjoint_window: the context keeps only what precedes the continuation.
            let keep = a.len() + 1 - b.len();
            Window { context: a[..keep].to_vec(), continuation: b }
        })
        .collect()
}

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

/// Parameters of LM kinds, parsed and checked; those that change results end up in the typed input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    pub max_new_tokens: Option<usize>,
    pub normalize: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub stream: bool,
}

impl Params {
    pub fn parse(params: &std::collections::BTreeMap<String, Value>) -> Result<Params, JobError> {
        let bad = |name: &str, what: &str| JobError::bad_request(format!("params.{name}: expected {what}"));
        let uint = |name: &str| -> Result<Option<u64>, JobError> {
            params.get(name).map(|v| v.as_u64().ok_or_else(|| bad(name, "a non-negative integer"))).transpose()
        };
        let float = |name: &str| -> Result<Option<f64>, JobError> {
            params.get(name).map(|v| v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)).ok_or_else(|| bad(name, "a number"))).transpose()
        };
        let boolean = |name: &str| -> Result<Option<bool>, JobError> {
            params.get(name).map(|v| v.as_bool().ok_or_else(|| bad(name, "true or false"))).transpose()
        };
        let temperature = float("temperature")?;
        if temperature.is_some_and(|t| !(0.0..=100.0).contains(&t)) {
            return Err(bad("temperature", "a number in 0..=100"));
        }
        let top_p = float("top_p")?;
        if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return Err(bad("top_p", "a number in (0, 1]"));
        }
        let stop = match params.get("stop") {
            None | Some(Value::Nil) => Vec::new(),
            Some(Value::Array(items)) if items.len() <= 16 => items
                .iter()
                .map(|s| s.as_str().filter(|s| !s.is_empty() && s.len() <= 256).map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("stop", "up to 16 non-empty strings of at most 256 bytes"))?,
            Some(_) => return Err(bad("stop", "up to 16 non-empty strings of at most 256 bytes")),
        };
        let stop_token_ids = match params.get("stop_token_ids") {
            None | Some(Value::Nil) => None,
            // Ids past u32 are refused here (not wrapped); LmSpec::parse checks the vocabulary.
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("stop_token_ids", "a list of token ids (integers below the vocabulary size)"))?,
            ),
            Some(_) => return Err(bad("stop_token_ids", "a list of token ids")),
        };
        Ok(Params {
            max_new_tokens: uint("max_new_tokens")?.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            normalize: boolean("normalize")?,
            temperature,
            top_k: uint("top_k")?.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            top_p,
            seed: uint("seed")?,
            stop,
            stop_token_ids,
            stream: boolean("stream")?.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The demo decoder's spec (byte-level tokenizer: one token per byte), at `max_length`.
    fn tiny(max_length: usize) -> (tempfile::TempDir, LmSpec) {
        let dir = tempfile::tempdir().unwrap();
        crate::demo::write_tiny_lm(dir.path(), 1, 8, 1).unwrap();
        let spec = LmSpec::load(dir.path(), Some(max_length), 64).unwrap();
        (dir, spec)
    }

    fn parse(spec: &LmSpec, kind: JobKind, input: serde_json::Value, params: serde_json::Value) -> Result<JobInput, JobError> {
        let params: std::collections::BTreeMap<String, Value> = rmpv::ext::to_value(params)
            .unwrap()
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
            .collect();
        spec.parse(kind, &rmpv::ext::to_value(input).unwrap(), &Params::parse(&params)?).map(|(i, _)| i)
    }

    fn windows(input: JobInput) -> Vec<Window> {
        match input {
            JobInput::Score(w) => w,
            other => panic!("{other:?}"),
        }
    }

    fn assert_invariant(w: &Window, max_length: usize) {
        assert!(!w.context.is_empty() && !w.continuation.is_empty(), "{w:?}");
        assert!(w.context.len() + w.continuation.len() - 1 <= max_length, "{w:?} over {max_length}");
    }

    #[test]
    fn continuations_the_model_cannot_score_whole_are_refused_and_empty_contexts_use_the_prefix() {
        let (_d, spec) = tiny(48);
        let ll = JobKind::Loglikelihood;
        // Text: 49 continuation tokens is one too many; 48 is scored whole, with one context token.
        let err = parse(&spec, ll, json!({"context": "Hi", "continuation": "x".repeat(49)}), json!({})).unwrap_err();
        assert_eq!(err.code, crate::job::ErrorCode::BadRequest);
        assert!(err.message.starts_with("input.continuation: 49 tokens") && err.message.contains("at most 48 continuation tokens"), "{}", err.message);
        let err = parse(&spec, ll, json!({"context": "Hi", "continuation": " the quick brown fox".repeat(100)}), json!({})).unwrap_err();
        assert!(err.message.starts_with("input.continuation: more than 48 tokens"), "{}", err.message);
        let w = windows(parse(&spec, ll, json!({"context": "Hi", "continuation": "x".repeat(48)}), json!({})).unwrap());
        assert_eq!((w[0].context.len(), w[0].continuation.len()), (1, 48));
        // Tokens alike.
        let err = parse(&spec, ll, json!({"context_tokens": [5], "continuation_tokens": vec![6; 49]}), json!({})).unwrap_err();
        assert!(err.message.starts_with("input.continuation_tokens: 49 tokens") && err.message.contains("at most 48"), "{}", err.message);
        let err = parse(&spec, ll, json!({"context_tokens": [5], "continuation_tokens": []}), json!({})).unwrap_err();
        assert!(err.message.starts_with("input.continuation_tokens"), "{}", err.message);
        // An empty context is the prefix token, as text or as tokens.
        let text = windows(parse(&spec, ll, json!({"context": "", "continuation": "ab"}), json!({})).unwrap());
        assert_eq!(text[0].context, vec![spec.prefix_token]);
        let tokens = windows(parse(&spec, ll, json!({"context_tokens": [], "continuation_tokens": text[0].continuation}), json!({})).unwrap());
        assert_eq!(tokens, text);
    }

    #[test]
    fn every_scored_window_keeps_the_invariant() {
        for max_length in [1, 2, 3, 7, 48] {
            let (_d, spec) = tiny(max_length);
            for c in 0..60 {
                for n in 1..=max_length {
                    let input = json!({"context_tokens": vec![7; c], "continuation_tokens": vec![8; n]});
                    let w = windows(parse(&spec, JobKind::Loglikelihood, input, json!({})).unwrap());
                    assert_invariant(&w[0], max_length);
                    assert_eq!(w[0].continuation.len(), n, "the continuation is scored whole");
                    assert_eq!(w[0].context.len(), c.clamp(1, max_length + 1 - n), "the context is cut from the left only");
                }
            }
            for len in 1..40 {
                let tokens: Vec<u32> = (0..len).collect();
                let ws = rolling_windows(&tokens, 99, max_length);
                ws.iter().for_each(|w| assert_invariant(w, max_length));
                let predicted: Vec<u32> = ws.iter().flat_map(|w| w.continuation.clone()).collect();
                assert_eq!(predicted, tokens, "every token is predicted once, in order");
            }
        }
    }

    #[test]
    fn stop_token_ids_past_u32_are_refused_not_wrapped() {
        let (_d, spec) = tiny(48);
        for bad in [json!([1u64 << 32]), json!([(1u64 << 32) + 5]), json!([u64::MAX]), json!([259]), json!([-1])] {
            let err = parse(&spec, JobKind::Generate, json!({"prompt": "hi"}), json!({"stop_token_ids": bad})).unwrap_err();
            assert!(err.message.starts_with("params.stop_token_ids"), "{bad}: {}", err.message);
        }
        let JobInput::Generate(g) = parse(&spec, JobKind::Generate, json!({"prompt": "hi"}), json!({"stop_token_ids": [258]})).unwrap() else {
            panic!()
        };
        assert_eq!(g.stop_token_ids, vec![258]);
        let err = parse(&spec, JobKind::Loglikelihood, json!({"context_tokens": [1u64 << 32], "continuation_tokens": [5]}), json!({})).unwrap_err();
        assert!(err.message.starts_with("input.context_tokens"), "{}", err.message);
    }

    #[test]
    fn long_texts_are_bounded_before_tokenising_with_the_whole_text_result() {
        let (_d, spec) = tiny(48);
        let words = "the quick brown fox jumps over the lazy dog, Ünïcödé 東京 ";
        // (b) A 1,000,000-character prompt is refused without tokenising it whole.
        let prompt = words.chars().cycle().take(1_000_000).collect::<String>();
        let start = std::time::Instant::now();
        let err = parse(&spec, JobKind::Generate, json!({"prompt": prompt}), json!({})).unwrap_err();
        let refused = start.elapsed();
        assert!(err.message.starts_with("input.prompt: more than 48 tokens"), "{}", err.message);
        // A long context is cut from the left; the window equals that of a context cut by hand.
        let context = words.repeat(4 << 20 >> 6);
        let start = std::time::Instant::now();
        let big = windows(parse(&spec, JobKind::Loglikelihood, json!({"context": context, "continuation": " end"}), json!({})).unwrap());
        let scored = start.elapsed();
        let tail = &context[context.len() - 200..];
        let small = windows(parse(&spec, JobKind::Loglikelihood, json!({"context": tail, "continuation": " end"}), json!({})).unwrap());
        assert_eq!(big, small);
        assert_invariant(&big[0], 48);
        // Texts crossing the window (16 bytes a token): bounded results equal whole-text ones.
        for len in [700, 767, 768, 769, 800, 1600, 5000] {
            let text: String = words.chars().cycle().take(len).collect();
            let whole = spec.encode(&text, true).unwrap();
            match parse(&spec, JobKind::Generate, json!({"prompt": text}), json!({"max_new_tokens": 1})) {
                Ok(JobInput::Generate(g)) => assert_eq!(g.prompt, whole),
                Ok(other) => panic!("{other:?}"),
                Err(e) => assert!(whole.len() >= 48, "{len}: refused {} tokens: {}", whole.len(), e.message),
            }
            let (c, k) = spec.split_pair(&text, " !").unwrap();
            let (c, k) = spec.truncate(c, k);
            let w = windows(parse(&spec, JobKind::Loglikelihood, json!({"context": text, "continuation": " !"}), json!({})).unwrap());
            assert_eq!(w[0], Window { context: c, continuation: k }, "{len}");
            let JobInput::Encode { ids: got, .. } = parse(&spec, JobKind::Embed, json!({"text": text}), json!({})).unwrap() else { panic!() };
            // Encoders keep the first max_length - 1 tokens and the last (their final separator).
            let want: Vec<u32> = if whole.len() > 48 { whole[..47].iter().chain(whole.last()).copied().collect() } else { whole.clone() };
            assert_eq!(got, want, "{len}");
        }
        eprintln!("FIGURES 1M-char prompt refused in {refused:?}; 4 MiB context scored window in {scored:?}");
        assert!(refused < std::time::Duration::from_secs(1) && scored < std::time::Duration::from_secs(1), "{refused:?} {scored:?}");
    }

    #[test]
    fn windows_are_cut_on_char_boundaries_preferably_at_whitespace() {
        assert_eq!(cut_head("ab cd ef", 7), "ab cd");
        assert_eq!(cut_head("abcdefgh", 5), "abcde");
        assert_eq!(cut_head("é€😀", 5), "é€");
        assert_eq!(cut_tail("ab cd ef", 7), " cd ef");
        assert_eq!(cut_tail("abcdefgh", 5), "defgh");
        assert_eq!(cut_tail("é€😀", 5), "😀");
        assert_eq!(cut_head("short", 100), "short");
    }

    #[test]
    fn rolling_texts_over_max_input_bytes_are_refused() {
        let (_d, mut spec) = tiny(48);
        spec.max_input_bytes = 1000;
        let err = parse(&spec, JobKind::LoglikelihoodRolling, json!({"text": "x".repeat(1001)}), json!({})).unwrap_err();
        assert!(err.message.starts_with("input.text: 1001 bytes, over this model's max_input_bytes (1000)"), "{}", err.message);
        assert!(parse(&spec, JobKind::LoglikelihoodRolling, json!({"text": "x".repeat(1000)}), json!({})).is_ok());
    }

    #[test]
    fn rolling_windows_follow_the_harness() {
        // 10 tokens, max length 4: [p,0,1,2]→[0,1,2,3]; then disjoint windows of 4 predicted tokens.
        let tokens: Vec<u32> = (0..10).collect();
        let w = rolling_windows(&tokens, 99, 4);
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = w.into_iter().map(|w| (w.context, w.continuation)).collect();
        assert_eq!(
            pairs,
            vec![
                (vec![99], vec![0, 1, 2, 3]),
                (vec![3], vec![4, 5, 6, 7]),
                (vec![5, 6, 7], vec![8, 9]),
            ]
        );
        // Every token is predicted exactly once.
        let short = rolling_windows(&[5, 6], 1, 4);
        assert_eq!(short, vec![Window { context: vec![1], continuation: vec![5, 6] }]);
    }
}
