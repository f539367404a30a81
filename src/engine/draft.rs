//! Prompt-lookup drafting for exact greedy speculation: a greedy row's next tokens guessed from its
//! own sequence (prompt and generated tokens), as prompt-lookup decoding does. The last `n` tokens
//! (the longest `n` up to [`MAX_NGRAM`] that occurred before) are found earlier in the sequence
//! and the tokens that followed that occurrence are the draft. The model verifies a draft in one
//! forward and keeps only the tokens it would have chosen itself, so a draft changes speed, never
//! tokens. Plain Rust, tested without torch.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The longest suffix looked up; shorter ones are tried down to one token.
pub const MAX_NGRAM: usize = 3;

/// `--speculate-tokens`'s default (see the README's generation settings for the measurement).
pub const DEFAULT_SPECULATE_TOKENS: usize = 4;

/// Drafts per step a batch may verify in all: rows × (1 + drafts) query positions above this run
/// without drafts (on a compute-bound device, a big batch has no spare FLOPs for rejected guesses).
pub const MAX_VERIFIED_POSITIONS: usize = 64;

/// The drafts of a model whose configuration sets none (from the CLI).
static DEFAULT_TOKENS: AtomicUsize = AtomicUsize::new(DEFAULT_SPECULATE_TOKENS);

/// Sets how many tokens a greedy row drafts per step when its model's configuration sets none.
pub fn configure_speculation(tokens: usize) {
    DEFAULT_TOKENS.store(tokens, Ordering::Relaxed);
}

pub(crate) fn default_tokens() -> usize {
    DEFAULT_TOKENS.load(Ordering::Relaxed)
}

/// Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
/// (of [`MAX_NGRAM`] tokens down to one) found before; empty when none is found.
pub fn draft(tokens: &[u32], k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (1..=MAX_NGRAM.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Latest start first: recent text predicts the next tokens best. The suffix itself
        // (start len - n) is not an earlier occurrence.
        if let Some(start) = (0..len - n).rev().find(|&s| &tokens[s..s + n] == suffix) {
            let from = start + n;
            return tokens[from..(from + k).min(len)].to_vec();
        }
    }
    Vec::new()
}

/// What drafting did, for metrics: tokens drafted and verified, and those the model agreed with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpeculationStats {
    pub drafted: u64,
    pub accepted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_suffix_seen_before_drafts_what_followed_it() {
        // "5 6 7" occurred before, followed by 8 9 1: the 3-gram wins over the later 1-gram "7".
        let t = [5, 6, 7, 8, 9, 1, 7, 2, 5, 6, 7];
        assert_eq!(draft(&t, 3), vec![8, 9, 1]);
        assert_eq!(draft(&t, 2), vec![8, 9]);
        assert_eq!(draft(&t, 0), Vec::<u32>::new());
    }

    #[test]
    fn the_latest_occurrence_wins_and_shorter_suffixes_are_tried() {
        // "4" alone: its latest earlier occurrence (index 4) is followed by 9.
        assert_eq!(draft(&[4, 1, 2, 3, 4, 9, 8, 4], 2), vec![9, 8]);
        // Nothing seen before: no draft; a one-token sequence has no earlier occurrence.
        assert_eq!(draft(&[1, 2, 3], 4), Vec::<u32>::new());
        assert_eq!(draft(&[1], 4), Vec::<u32>::new());
        assert_eq!(draft(&[], 4), Vec::<u32>::new());
    }

    #[test]
    fn a_draft_stops_at_the_end_of_the_sequence() {
        // A repeating token: the occurrence just before the suffix is followed by one token.
        assert_eq!(draft(&[3, 3, 3], 5), vec![3]);
        // A cycle drafts its continuation, overlapping the suffix itself.
        assert_eq!(draft(&[1, 2, 1, 2, 1, 2], 8), vec![1, 2]);
    }
}
