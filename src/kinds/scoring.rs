//! What the two scoring kinds share (`loglikelihood`, `loglikelihood_rolling`): the scored
//! [`Window`], the harness's truncation, and the `Score` output's wire form.

use rmpv::Value;
use serde::{Deserialize, Serialize};

use super::text;
use super::validation::ValidationError;
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
