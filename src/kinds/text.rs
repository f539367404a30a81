//! Bounded tokenisation of producer text: the LM kinds read a bounded window of a text whatever
//! its size, with the tokens of the whole text.
//!
//! A text is first tokenised from a window of [`WINDOW_BYTES_PER_TOKEN`] bytes per token needed
//! (a token is rarely more than a few bytes), and the window doubles until it yields
//! [`TOKEN_MARGIN`] tokens more than needed, or holds the whole text. Tokenisers are local (the
//! tokens far from a cut do not depend on what lies past it), and windows are cut at whitespace
//! where they can be, so the kept tokens equal those of tokenising the whole text; the margin
//! absorbs the tokens next to the cut, which may differ.

use super::validation::ValidationError;
use crate::lm::LmSpec;

const WINDOW_BYTES_PER_TOKEN: usize = 16;
const TOKEN_MARGIN: usize = 8;

/// The start of `text`, at most `max` bytes: ending just before a whitespace in the window's
/// second half if there is one, else at a char boundary.
pub(crate) fn cut_head(text: &str, max: usize) -> &str {
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
pub(crate) fn cut_tail(text: &str, max: usize) -> &str {
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

/// The shortest start of `text` (see [`cut_head`]) whose tokens (without special tokens) number
/// at least `need` + margin, or the whole text: its first `need` tokens are those of the whole text.
pub(crate) fn bounded_head<'a>(lm: &LmSpec, text: &'a str, need: usize) -> Result<&'a str, ValidationError> {
    bounded(lm, text, need, cut_head)
}

/// The shortest end of `text` (see [`cut_tail`]) whose tokens number at least `need` + margin, or
/// the whole text: its last `need` tokens are those of the whole text.
pub(crate) fn bounded_tail<'a>(lm: &LmSpec, text: &'a str, need: usize) -> Result<&'a str, ValidationError> {
    bounded(lm, text, need, cut_tail)
}

/// The shortest `cut` of `text` holding `need` + margin tokens, the window doubling from
/// [`WINDOW_BYTES_PER_TOKEN`] bytes a token until it does (or is the whole text).
fn bounded<'a>(lm: &LmSpec, text: &'a str, need: usize, cut: fn(&str, usize) -> &str) -> Result<&'a str, ValidationError> {
    let mut window = need.max(1).saturating_mul(WINDOW_BYTES_PER_TOKEN);
    loop {
        if text.len() <= window {
            return Ok(text);
        }
        let part = cut(text, window);
        if count(lm, part)? >= need + TOKEN_MARGIN {
            return Ok(part);
        }
        window = window.saturating_mul(2);
    }
}

/// Whether `text` certainly has more than `limit` tokens, found from a bounded start of it (the
/// whole text is tokenised only when it is short enough to be within reach of `limit`).
pub(crate) fn over(lm: &LmSpec, text: &str, limit: usize) -> Result<bool, ValidationError> {
    let head = bounded_head(lm, text, limit)?;
    Ok(head.len() < text.len())
}

fn tokenize_error(e: impl std::fmt::Display) -> ValidationError {
    ValidationError::Tokenize { field: "input".into(), reason: e.to_string() }
}

pub(crate) fn count(lm: &LmSpec, text: &str) -> Result<usize, ValidationError> {
    lm.tokenizer.encode_fast(text, false).map(|e| e.len()).map_err(tokenize_error)
}

/// The token ids of producer text as lm-evaluation-harness (0.4.13) `tok_encode`s contexts,
/// continuations and rolling texts: with the tokenizer's own special tokens (a BOS where its
/// post-processor adds one; [`LmSpec::add_bos`] overrides), but none when the text already starts
/// with the prefix token's text.
pub fn encode_text(lm: &LmSpec, text: &str) -> Result<Vec<u32>, ValidationError> {
    encode(lm, text, special_tokens(lm, text, &lm.prefix_text))
}

/// Whether text that may start with `marker` (written by the producer) gets special tokens.
pub(crate) fn special_tokens(lm: &LmSpec, text: &str, marker: &str) -> bool {
    let marked = !marker.is_empty() && text.starts_with(marker);
    !marked && lm.add_bos.unwrap_or(true)
}

/// The token ids of `text`, with the tokenizer's special tokens when `special`.
pub fn encode(lm: &LmSpec, text: &str, special: bool) -> Result<Vec<u32>, ValidationError> {
    lm.tokenizer.encode(text, special).map(|e| e.get_ids().to_vec()).map_err(tokenize_error)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
