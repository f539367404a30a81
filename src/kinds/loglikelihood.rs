//! `loglikelihood`: the log-probability of a continuation given a context, and whether it is the
//! greedy one — lm-evaluation-harness semantics (see [`super::scoring::split_pair`]). Output:
//! `Score` with `is_greedy` (and, with `top_logprobs: k`, the k most likely tokens at each
//! continuation position).

use super::fields::{Input, Params};
use super::scoring::{self, Window};
use super::text;
use super::validation::{Count, ValidationError};
use super::{JobInput, Request};
use crate::lm::LmSpec;

pub const INPUT_KEYS: &[&str] = &["context", "continuation", "context_tokens", "continuation_tokens"];
pub const PARAM_KEYS: &[&str] = &["top_logprobs"];

pub fn parse(lm: &LmSpec, input: &Input, params: &Params) -> Result<Request, ValidationError> {
    let top_logprobs = super::read_top_logprobs(params)?.unwrap_or(0);
    let vocab = lm.config.vocab_size;
    let (context, continuation, field) = match (input.tokens("context_tokens", vocab)?, input.tokens("continuation_tokens", vocab)?) {
        (Some(c), Some(k)) => (c, k, "input.continuation_tokens"),
        (None, None) => {
            let context = input.text("context")?.ok_or(ValidationError::Missing { field: "input.context".into(), or: Some("context_tokens") })?;
            let continuation =
                input.text("continuation")?.ok_or(ValidationError::Missing { field: "input.continuation".into(), or: Some("continuation_tokens") })?;
            // Bounded before tokenising: a continuation past the model's length is refused, and
            // the context is cut from the left anyway.
            if text::over(lm, continuation, lm.max_length)? {
                return Err(too_long(lm, "input.continuation", Count::MoreThan(lm.max_length)));
            }
            let context = text::bounded_tail(lm, context, lm.max_length)?;
            let (c, k) = scoring::split_pair(lm, context, continuation)?;
            (c, k, "input.continuation")
        }
        _ => return Err(ValidationError::Invalid { field: "input".into(), detail: "give context_tokens and continuation_tokens together".into() }),
    };
    if continuation.is_empty() {
        return Err(ValidationError::NoTokens { field: field.into() });
    }
    // lm-evaluation-harness's HF backend fails on these too: the model cannot score the
    // continuation whole (it would be conditioned on nothing, or on padding).
    if continuation.len() > lm.max_length {
        return Err(too_long(lm, field, Count::Exactly(continuation.len())));
    }
    // An empty context is conditioned on the prefix token, given as text or as tokens.
    let context = if context.is_empty() { vec![lm.prefix_token] } else { context };
    let (context, continuation) = scoring::truncate(lm.max_length, context, continuation);
    let window = Window { context, continuation, top_logprobs };
    Ok(Request::new(window.cost(), JobInput::Score(vec![window])))
}

fn too_long(lm: &LmSpec, field: &str, tokens: Count) -> ValidationError {
    ValidationError::ContinuationTooLong { field: field.into(), tokens, max: lm.max_length }
}

