//! `loglikelihood_rolling`: the log-probability of a whole text, scored in disjoint windows of the
//! model's length (lm-evaluation-harness `get_rolling_token_windows`). Output: `Score` without
//! `is_greedy`. The whole text is tokenised and scored, so its size is bounded by the model's
//! `max_input_bytes`.

use super::fields::Input;
use super::scoring::Window;
use super::text;
use super::validation::ValidationError;
use super::{JobInput, Request};
use crate::lm::LmSpec;

pub const INPUT_KEYS: &[&str] = &["text", "tokens"];
pub const PARAM_KEYS: &[&str] = &[];

pub fn parse(lm: &LmSpec, input: &Input) -> Result<Request, ValidationError> {
    let tokens = match input.tokens("tokens", lm.config.vocab_size)? {
        Some(t) => t,
        None => {
            let text = input.text("text")?.ok_or(ValidationError::Missing { field: "input.text".into(), or: None })?;
            if text.len() > lm.max_input_bytes {
                return Err(ValidationError::TooManyBytes { field: "input.text".into(), bytes: text.len(), max: lm.max_input_bytes });
            }
            text::encode_text(lm, text)?
        }
    };
    if tokens.is_empty() {
        return Err(ValidationError::NoTokens { field: "input.text".into() });
    }
    let windows = rolling_windows(&tokens, lm.prefix_token, lm.max_length);
    let cost = windows.iter().map(Window::cost).sum();
    Ok(Request::new(cost, JobInput::Score(windows)))
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
            Window { context: a[..keep].to_vec(), continuation: b, top_logprobs: 0 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_windows_follow_the_harness() {
        // 10 tokens, max length 4: [p,0,1,2]→[0,1,2,3]; then disjoint windows of 4 predicted tokens.
        let tokens: Vec<u32> = (0..10).collect();
        let w = rolling_windows(&tokens, 99, 4);
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = w.into_iter().map(|w| (w.context, w.continuation)).collect();
        assert_eq!(pairs, vec![(vec![99], vec![0, 1, 2, 3]), (vec![3], vec![4, 5, 6, 7]), (vec![5, 6, 7], vec![8, 9])]);
        // Every token is predicted exactly once.
        let short = rolling_windows(&[5, 6], 1, 4);
        assert_eq!(short, vec![Window { context: vec![1], continuation: vec![5, 6], top_logprobs: 0 }]);
    }
}
