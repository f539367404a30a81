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
pub const DEFAULT_SPECULATE_TOKENS: usize = 8;

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

/// `k` tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (of
/// [`MAX_NGRAM`] tokens down to one) found before, continued periodically past the end of
/// `tokens`; empty when none is found.
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
            // What followed it, up to the end of the sequence and on as the sequence repeated
            // itself (the suffix recurs `period` tokens on): a loop drafts whole turns.
            let from = start + n;
            let period = len - from;
            return (0..k).map(|i| tokens[from + i % period]).collect();
        }
    }
    Vec::new()
}

/// Steps at most a row waits before drafting again after its drafts were all rejected.
const MAX_WAIT: usize = 16;

/// A row's drafting budget, adapted to what the model accepted (as transformers' assisted
/// generation adapts its draft length): all accepted, one more token next time; some, as many as
/// were accepted; none, no drafts for a while (1, 2, 4, … steps), then one token. A row whose
/// text does not repeat itself stops paying for verifying guesses that fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    len: usize,
    wait: usize,
    backoff: usize,
}

impl Budget {
    /// Drafts of `len` tokens to start with.
    pub fn new(len: usize) -> Budget {
        Budget { len, wait: 0, backoff: 1 }
    }

    /// Tokens to draft this step, at most `max` (0 while waiting).
    pub fn next(&mut self, max: usize) -> usize {
        match self.wait {
            0 => self.len.min(max),
            _ => {
                self.wait -= 1;
                0
            }
        }
    }

    /// The model accepted `accepted` of `drafted` tokens; the next drafts are at most `max`.
    pub fn update(&mut self, drafted: usize, accepted: usize, max: usize) {
        match (drafted, accepted) {
            (0, _) => {}
            (d, a) if a == d => {
                self.len = (a + 1).min(max);
                self.backoff = 1;
            }
            (_, 0) => {
                self.len = 1;
                self.wait = self.backoff;
                self.backoff = (2 * self.backoff).min(MAX_WAIT);
            }
            (_, a) => {
                self.len = a;
                self.backoff = 1;
            }
        }
    }
}

/// How many drafted tokens per row a batch verifies, given each row's drafts: the most `w` whose
/// drafts (each row's cut to `w`) fill at least half of the `rows × w` positions they add to the
/// step's forward — the rest is padding, computed for nothing; 0 when no `w` does (the batch's
/// drafts wait: a lone guess does not widen the forward of many rows).
pub fn verified(drafts: &[usize]) -> usize {
    let rows = drafts.len();
    let most = drafts.iter().copied().max().unwrap_or(0);
    (1..=most).rev().find(|&w| 2 * drafts.iter().map(|&d| d.min(w)).sum::<usize>() >= rows * w).unwrap_or(0)
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
        assert_eq!(draft(&t, 9), vec![8, 9, 1, 7, 2, 5, 6, 7, 8]);
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
    fn a_batch_verifies_drafts_that_fill_half_the_positions_they_add() {
        // Alone: all of it.
        assert_eq!(verified(&[4]), 4);
        assert_eq!(verified(&[0]), 0);
        assert_eq!(verified(&[]), 0);
        // Two rows, one drafting 4: 4 of 8 added positions are drafts.
        assert_eq!(verified(&[4, 0]), 4);
        // Four rows, one drafting: never half; two drafting 4 and 1: 2 + 1 of 4 × 2 is short,
        // 1 + 1 of 4 × 1 is half.
        assert_eq!(verified(&[4, 0, 0, 0]), 0);
        assert_eq!(verified(&[4, 1, 0, 0]), 1);
        // Several rows drafting: the widest that half of them fill.
        assert_eq!(verified(&[4, 4, 2, 1]), 4);
        assert_eq!(verified(&[4, 1, 1, 0]), 2);
        assert_eq!(verified(&[3, 3, 3, 3]), 3);
    }

    #[test]
    fn the_budget_follows_what_the_model_accepts() {
        let mut b = Budget::new(4);
        assert_eq!(b.next(8), 4);
        assert_eq!(b.next(2), 2, "never above the step's maximum");
        // Some accepted: as many next time; all accepted: one more, up to the maximum.
        b.update(4, 2, 4);
        assert_eq!(b.next(8), 2);
        b.update(2, 2, 4);
        assert_eq!(b.next(8), 3);
        b.update(3, 3, 4);
        b.update(4, 4, 4);
        assert_eq!(b.next(8), 4);
        // Nothing drafted (no earlier occurrence): nothing learnt.
        b.update(0, 0, 4);
        assert_eq!(b.next(8), 4);
        // All rejected: waits 1 step, then 2, then 4, … (up to MAX_WAIT), trying one token between.
        let mut waits = Vec::new();
        for _ in 0..6 {
            b.update(1, 0, 4);
            let mut w = 0;
            while b.next(8) == 0 {
                w += 1;
            }
            waits.push(w);
        }
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 16]);
        // One accepted again: the wait starts over.
        b.update(1, 1, 4);
        assert_eq!(b.next(8), 2);
        b.update(2, 0, 4);
        assert_eq!((b.next(8), b.next(8)), (0, 1));
    }

    #[test]
    fn a_draft_past_the_end_of_the_sequence_repeats_it() {
        // A repeating token: the occurrence just before the suffix, followed by the token again.
        assert_eq!(draft(&[3, 3, 3], 5), vec![3; 5]);
        // A cycle drafts whole turns of itself.
        assert_eq!(draft(&[1, 2, 1, 2, 1, 2], 5), vec![1, 2, 1, 2, 1]);
        // "7 8" seen five tokens back: the five tokens after it, then again.
        assert_eq!(draft(&[5, 7, 8, 9, 4, 6, 7, 8], 6), vec![9, 4, 6, 7, 8, 9]);
    }
}
