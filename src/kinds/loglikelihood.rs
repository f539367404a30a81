//! `loglikelihood`: the log-probability of a continuation given a context, and whether it is the
//! greedy one — lm-evaluation-harness semantics (see [`super::scoring::split_pair`]). Output:
//! `Score` with `is_greedy` (and, with `top_logprobs: k`, the k most likely tokens at each
//! continuation position).
//!
//! The choices form: `continuations` (texts, with `context`) or `continuations_tokens` (token
//! lists, with `context_tokens`) in place of the one continuation — a multiple-choice question in
//! one job. Each choice is the window a job with that one continuation would score (split and
//! truncated on its own), and the job answers `Choices`: one log-prob and greedy flag per choice.
//! Choices whose context tokens come out equal share one row in the engine (the context is run
//! once), and the job's cost counts each distinct context once.
//!
//! The context may be `messages` instead: rendered with the model's chat template and the
//! assistant's turn opened (as lm-eval's `--apply_chat_template` renders it), then scored as that
//! text would be.

use rmpv::Value;

use super::fields::{self, Input, Params};
use super::messages;
use super::scoring::{self, Window};
use super::text;
use super::validation::{Count, ValidationError};
use super::{JobInput, Request};
use crate::lm::LmSpec;

pub const INPUT_KEYS: &[&str] = &["context", "messages", "continuation", "continuations", "context_tokens", "continuation_tokens", "continuations_tokens"];
pub const PARAM_KEYS: &[&str] = &["top_logprobs"];

/// The most choices one job may have: more than any multiple-choice task asks, few enough that a
/// job stays one batch's worth of rows.
pub const MAX_CHOICES: usize = 64;

pub fn parse(lm: &LmSpec, input: &Input, params: &Params) -> Result<Request, ValidationError> {
    let top_logprobs = super::read_top_logprobs(params)?.unwrap_or(0);
    let vocab = lm.config.vocab_size;
    let given = |key| input.get(key).is_some();
    let choices = given("continuations") || given("continuations_tokens");
    if choices && (given("continuation") || given("continuation_tokens")) {
        return Err(ValidationError::Invalid { field: "input".into(), detail: "give continuation (one) or continuations (choices), not both".into() });
    }
    let mut chat = None;
    let together = || ValidationError::Invalid { field: "input".into(), detail: "give context_tokens and continuation_tokens (or continuations_tokens) together".into() };
    // Each continuation with the field it came from and its context's tokens.
    let pairs: Vec<(String, Vec<u32>, Vec<u32>)> = match input.tokens("context_tokens", vocab)? {
        Some(context) => {
            let continuations = match (input.tokens("continuation_tokens", vocab)?, input.list("continuations_tokens", MAX_CHOICES, "choices")?) {
                (Some(k), None) => vec![("input.continuation_tokens".to_string(), k)],
                (None, Some(items)) => each(items, "continuations_tokens", |v, field| fields::token_ids(v, field.into(), vocab))?,
                _ => return Err(together()),
            };
            continuations.into_iter().map(|(field, k)| (field, context.clone(), k)).collect()
        }
        None if given("continuation_tokens") || given("continuations_tokens") => return Err(together()),
        None => {
            let context = match (input.text("context")?, input.get("messages").is_some()) {
                (Some(_), true) => return Err(ValidationError::Invalid { field: "input".into(), detail: "give context or messages, not both".into() }),
                (Some(context), false) => context,
                // As lm-eval's apply_chat_template makes the context: with the assistant's turn opened.
                (None, true) => &chat.insert(messages::render(lm, input, true)?).prompt,
                (None, false) => return Err(ValidationError::Missing { field: "input.context".into(), or: Some("context_tokens or messages") }),
            };
            let continuations: Vec<(String, &str)> = match (input.text("continuation")?, input.list("continuations", MAX_CHOICES, "choices")?) {
                (Some(k), None) => vec![("input.continuation".to_string(), k)],
                (None, Some(items)) => each(items, "continuations", |v, field| v.as_str().ok_or(ValidationError::Expected { field: field.into(), expected: "a string" }))?,
                _ => return Err(ValidationError::Missing { field: "input.continuation".into(), or: Some("continuation_tokens") }),
            };
            // The context is cut from the left anyway: tokenised only as far as a window reaches.
            let context = text::bounded_tail(lm, context, lm.max_length)?;
            continuations
                .into_iter()
                .map(|(field, k)| {
                    // Bounded before tokenising: a continuation past the model's length is refused.
                    if text::over(lm, k, lm.max_length)? {
                        return Err(too_long(lm, &field, Count::MoreThan(lm.max_length)));
                    }
                    let (c, k) = scoring::split_pair(lm, context, k)?;
                    Ok((field, c, k))
                })
                .collect::<Result<_, _>>()?
        }
    };
    let windows = pairs.into_iter().map(|(field, c, k)| window(lm, &field, c, k, top_logprobs)).collect::<Result<Vec<_>, _>>()?;
    let cost = scoring::cost(&windows);
    Ok(Request { chat, ..Request::new(cost, if choices { JobInput::Choices(windows) } else { JobInput::Score(windows) }) })
}

/// Each choice of the list `input.{name}` read by `read` (given its field's path), with that path.
fn each<'a, T>(items: &'a [Value], name: &str, read: impl Fn(&'a Value, &str) -> Result<T, ValidationError>) -> Result<Vec<(String, T)>, ValidationError> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let field = format!("input.{name}[{i}]");
            read(v, &field).map(|k| (field, k))
        })
        .collect()
}

/// The scored window of one continuation (`field`) and its context, truncated as the harness does.
fn window(lm: &LmSpec, field: &str, context: Vec<u32>, continuation: Vec<u32>, top_logprobs: usize) -> Result<Window, ValidationError> {
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
    Ok(Window { context, continuation, top_logprobs })
}

fn too_long(lm: &LmSpec, field: &str, tokens: Count) -> ValidationError {
    ValidationError::ContinuationTooLong { field: field.into(), tokens, max: lm.max_length }
}
