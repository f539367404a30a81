//! What the two scoring kinds share (`loglikelihood`, `loglikelihood_rolling`): the scored
//! [`Window`], the harness's truncation, the outputs made of windows' scores, and their wire forms.

use rmpv::Value;
use serde::{Deserialize, Serialize};

use super::text;
use super::validation::ValidationError;
use super::{JobInput, Output, TopLogprobs};
use crate::encoding::Encoding;
use crate::lm::LmSpec;

/// One scored window: the log-probs of `continuation` given `context` (the model reads
/// `(context + continuation)[:-1]`, at most its max length).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
    /// `loglikelihood` with `top_logprobs`: how many of the most likely tokens to report at each
    /// continuation position (0: none; then not encoded, so cache keys stay as they were).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub top_logprobs: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Window {
    /// Positions the model reads for this window (its batch cost).
    pub fn cost(&self) -> usize {
        self.context.len() + self.continuation.len()
    }
}

/// The batch cost of a job's windows: each distinct context once (windows with equal context
/// tokens share one row in the engine) plus every continuation.
pub fn cost(windows: &[Window]) -> usize {
    let contexts: std::collections::HashSet<&[u32]> = windows.iter().map(|w| w.context.as_slice()).collect();
    contexts.iter().map(|c| c.len()).sum::<usize>() + windows.iter().map(|w| w.continuation.len()).sum::<usize>()
}

/// What the engine gives for one window: its log-prob, whether every token is the greedy one, and
/// the top log-probs at each continuation position (empty unless asked).
pub type WindowScore = (f64, bool, Vec<TopLogprobs>);

/// A scoring job's output from its windows' scores, in order: `Score` sums them (a rolling text's
/// windows; `is_greedy` only for `loglikelihood`), `Choices` keeps one per choice.
pub fn output(input: &JobInput, greedy: bool, scores: Vec<WindowScore>) -> Output {
    let tokens = input.windows().iter().map(|w| w.continuation.len());
    match input {
        JobInput::Choices(_) => {
            let asked = scores.iter().any(|s| !s.2.is_empty());
            Output::Choices {
                logprobs: scores.iter().map(|s| s.0).collect(),
                is_greedy: scores.iter().map(|s| s.1).collect(),
                tokens: tokens.collect(),
                top: if asked { scores.into_iter().map(|s| s.2).collect() } else { Vec::new() },
            }
        }
        _ => Output::Score {
            logprob: scores.iter().map(|s| s.0).sum(),
            is_greedy: greedy.then(|| scores.iter().all(|s| s.1)),
            tokens: tokens.sum(),
            top: scores.into_iter().flat_map(|s| s.2).collect(),
        },
    }
}

/// lm-evaluation-harness `_encode_pair`: trailing spaces of the context move to the front of the
/// continuation; the pair is encoded whole and the continuation is what follows the context's own
/// encoding. Texts are encoded as the harness encodes them ([`text::encode_text`]), so where the
/// tokenizer adds a BOS both encodings start with it. An empty context is conditioned on the
/// prefix token and its continuation encoded without special tokens; a continuation that starts
/// with the prefix token itself gives up that token as its context, as in the harness.
pub fn split_pair(lm: &LmSpec, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>), ValidationError> {
    if context.is_empty() {
        let mut continuation = text::encode(lm, continuation, false)?;
        if continuation.len() > 1 && continuation[0] == lm.prefix_token {
            let rest = continuation.split_off(1);
            return Ok((continuation, rest));
        }
        return Ok((vec![lm.prefix_token], continuation));
    }
    let trimmed = context.trim_end();
    let (context, continuation) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    let whole = text::encode_text(lm, &format!("{context}{continuation}"))?;
    let context_ids = text::encode_text(lm, context)?;
    let split = context_ids.len().min(whole.len());
    Ok((context_ids, whole[split..].to_vec()))
}

/// Left truncation to the model's length: the input is `(context + continuation)[-(max+1):][:-1]`.
/// Needs a non-empty context and at most `max_length` continuation tokens (checked by the
/// parser), and keeps the scoring invariant: a non-empty context, and context + continuation - 1
/// <= max_length.
pub fn truncate(max_length: usize, context: Vec<u32>, continuation: Vec<u32>) -> (Vec<u32>, Vec<u32>) {
    debug_assert!(!context.is_empty() && !continuation.is_empty() && continuation.len() <= max_length);
    let keep = max_length + 1;
    let total = context.len() + continuation.len();
    if total <= keep {
        return (context, continuation);
    }
    // continuation.len() <= max_length, so drop < context.len(): at least one context token stays.
    let drop = total - keep;
    (context[drop..].to_vec(), continuation)
}

/// The `Score` output on the wire: `logprob`, `tokens` and (for `loglikelihood`) `is_greedy`.
pub fn score_to_wire(logprob: f64, is_greedy: Option<bool>, tokens: usize, encoding: Encoding) -> Value {
    let mut pairs = vec![("logprob", super::wire_float(logprob, encoding)), ("tokens", Value::from(tokens as u64))];
    if let Some(g) = is_greedy {
        pairs.push(("is_greedy", Value::Boolean(g)));
    }
    super::wire_map(pairs)
}

/// The `Choices` output on the wire: `logprobs`, `tokens`, `is_greedy` (one per choice, in the
/// job's order) and, where asked, `top_logprobs` (per choice, one entry per continuation token).
pub fn choices_to_wire(logprobs: &[f64], is_greedy: &[bool], tokens: &[usize], top: &[Vec<TopLogprobs>], encoding: Encoding) -> Value {
    let mut pairs = vec![
        ("logprobs", Value::Array(logprobs.iter().map(|&l| super::wire_float(l, encoding)).collect())),
        ("tokens", Value::Array(tokens.iter().map(|&n| Value::from(n as u64)).collect())),
        ("is_greedy", Value::Array(is_greedy.iter().map(|&g| Value::Boolean(g)).collect())),
    ];
    if !top.is_empty() {
        pairs.push(("top_logprobs", Value::Array(top.iter().map(|t| super::top_to_wire(t, encoding)).collect())));
    }
    super::wire_map(pairs)
}
