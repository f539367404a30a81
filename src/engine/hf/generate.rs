//! The generation batch (continuous batching): rows join at step boundaries with their prompt
//! prefilled into free slots of the batch's preallocated KV cache, and leave when finished;
//! sampling draws from each job's own seeded stream so a row's tokens do not depend on its
//! neighbours. Out of device memory, rows are paused (their tokens, text and random stream kept,
//! their cache dropped) and resume when they join again, prefilling prompt and generated tokens.
//! Greedy rows speculate exactly: a step feeds each row's new token with the tokens it drafted
//! from its own sequence ([`crate::engine::draft`]), and the next step keeps the drafts the model's
//! own choices confirm, each through the stop conditions, and drops the others' keys.

use tch::{Device, Kind, Tensor};

use std::cell::RefCell;

use super::layers::{KvCache, Layout, Outputs, Write};
use super::prefix::{gather, store_slot, KvTree};
use super::{tch_err, CausalLm, EngineError, Hf};
use crate::engine::draft::{draft, verified, Budget, SpeculationStats, MAX_VERIFIED_POSITIONS};
use crate::engine::{catch_oom, Sink};
use crate::job::{FinishReason, Output};
use crate::kinds::{GenerateInput, Sampling, TopLogprobs};
use crate::stream::StreamChunk;

/// One generation in a [`GenBatch`].
pub(super) struct Row {
    pub job: usize,
    input: GenerateInput,
    generated: Vec<u32>,
    rng: Rng,
    /// Text is tracked (decoded each step) only when stop strings or streaming need it.
    track_text: bool,
    stream: bool,
    text: String,
    /// Incremental detokenization (as TGI): `text` holds the text of `generated[..read]`;
    /// `generated[prefix..read]` is decoded again as the context of the newer tokens.
    prefix: usize,
    read: usize,
    emitted: usize,
    chunks: usize,
    /// The generated tokens the chunks sent so far cover.
    covered: usize,
    finish: Option<FinishReason>,
    /// Its deadline passed: it ends at the next step (after the token already computed).
    out_of_time: bool,
    /// With `top_logprobs`: the most likely tokens at each generated position.
    top: Vec<TopLogprobs>,
    /// Tokens drafted after its last one (see [`crate::engine::draft`]), fed with it to the
    /// forward whose logits are pending: logits position j verifies `drafts[j]`.
    drafts: Vec<u32>,
    /// How many tokens it drafts next, following how many it had accepted.
    budget: Budget,
}

impl Row {
    pub fn new(job: usize, input: GenerateInput, stream: bool) -> Row {
        // An unseeded sampled job draws from fresh entropy (such jobs are never cached).
        let seed = input.sampling.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ (job as u64).rotate_left(32)
        });
        let track_text = stream || !input.stop.is_empty();
        Row { job, rng: Rng(seed), generated: Vec::new(), track_text, stream, text: String::new(), prefix: 0, read: 0, emitted: 0, chunks: 0, covered: 0, finish: None, out_of_time: false, top: Vec::new(), drafts: Vec::new(), budget: Budget::new(usize::MAX), input }
    }

    /// The tokens its cache holds once prefilled: the prompt, then what it generated (a resumed
    /// row feeds its last token again, so its next logits are those a decode step gives).
    pub fn tokens(&self) -> Vec<u32> {
        self.input.prompt.iter().chain(&self.generated).copied().collect()
    }

    /// Text that may be streamed now: not what could still become a stop string, nor an
    /// incomplete UTF-8 sequence (decoded as U+FFFD).
    fn safe_end(&self) -> usize {
        let hold = self.input.stop.iter().map(|s| s.chars().count()).max().unwrap_or(1) - 1;
        let mut end = self.text.len();
        for _ in 0..hold {
            end = self.text[..end].char_indices().next_back().map(|(i, _)| i).unwrap_or(0);
        }
        while self.text[..end].ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        end.max(self.emitted)
    }

    /// Appends the text of the newest tokens: the tail from `prefix` decoded, less the text of
    /// `prefix..read` (so the tokenizer's leading-space and byte rules see the same neighbours
    /// as in a whole decode), held back while it ends in an incomplete UTF-8 sequence unless
    /// `last`. Two decodes of a few tokens a step instead of one of the whole generation.
    fn detokenize(&mut self, tokenizer: &tokenizers::Tokenizer, last: bool) -> Result<(), EngineError> {
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| EngineError::Model(format!("decode: {e}")));
        let before = decode(&self.generated[self.prefix..self.read])?;
        let now = decode(&self.generated[self.prefix..])?;
        if now.len() > before.len() && (last || !now.ends_with('\u{FFFD}')) {
            match now.strip_prefix(before.as_str()) {
                Some(new) => self.text.push_str(new),
                // The context decodes differently once followed: fall back to a whole decode.
                None => self.text = decode(&self.generated)?,
            }
            (self.prefix, self.read) = (self.read, self.generated.len());
        }
        Ok(())
    }

    /// Appends a chosen token and finishes the row if it ends here: a stop string (its text cut
    /// there), a stop token, `max_new_tokens` or the model's length, its deadline; emits the text
    /// that may be streamed.
    fn take(&mut self, tok: u32, hf: &Hf, sink: &mut dyn Sink) -> Result<(), EngineError> {
        self.generated.push(tok);
        if self.track_text {
            self.detokenize(&hf.tokenizer, false)?;
            let stop_at = self.input.stop.iter().filter_map(|s| self.text.find(s.as_str())).min();
            if let Some(at) = stop_at {
                self.text.truncate(at);
                self.finish = Some(FinishReason::Stop);
            }
        }
        let cut_at_stop_string = self.finish.is_some();
        if self.finish.is_none() && self.input.stop_token_ids.contains(&tok) {
            self.finish = Some(if hf.eos.contains(&tok) { FinishReason::Eos } else { FinishReason::Stop });
        } else if self.finish.is_none() && self.left(hf.max_length) == 0 {
            self.finish = Some(FinishReason::Length);
        } else if self.finish.is_none() && self.out_of_time {
            self.finish = Some(FinishReason::Deadline);
        }
        // A row finished by a token: its text is the whole decode's, an incomplete tail too.
        if self.track_text && self.finish.is_some() && !cut_at_stop_string {
            self.detokenize(&hf.tokenizer, true)?;
        }
        let end = if self.finish.is_some() { self.text.len() } else { self.safe_end() };
        self.emit(end, sink);
        Ok(())
    }

    /// Tokens it may still generate: within `max_new_tokens` and the model's `max_length`.
    fn left(&self, max_length: usize) -> usize {
        self.input.max_new_tokens.saturating_sub(self.generated.len()).min(max_length.saturating_sub(self.input.prompt.len() + self.generated.len()))
    }

    /// Drafts for its next step (at most `k`, within its [`Budget`]): a greedy row without
    /// `top_logprobs` or a passed deadline guesses from its own tokens, no further than the tokens
    /// it may still generate after the one just chosen (so no draft sits past `max_length`).
    fn draft(&mut self, k: usize, max_length: usize) -> Vec<u32> {
        if self.input.sampling.temperature > 0.0 || self.input.top_logprobs > 0 || self.out_of_time {
            return Vec::new();
        }
        match self.budget.next(k).min(self.left(max_length).saturating_sub(1)) {
            0 => Vec::new(),
            k => draft(&self.tokens(), k),
        }
    }

    fn emit(&mut self, end: usize, sink: &mut dyn Sink) {
        if self.stream && end > self.emitted {
            let tokens = self.generated[self.covered..].to_vec();
            let top = self.top.get(self.covered..).unwrap_or_default().to_vec();
            sink.emit(StreamChunk { job: self.job, index: self.chunks, text: self.text[self.emitted..end].to_string(), tokens, top, done: false });
            self.chunks += 1;
            self.covered = self.generated.len();
        }
        self.emitted = self.emitted.max(end);
    }
}

/// SplitMix64: a job's own random stream, so its samples do not depend on its batch.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Draws a token: temperature, then top-k, then top-p (nucleus), then one draw from `rng`.
fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / s.temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut kept = weights.len();
    if s.top_p < 1.0 {
        let mut mass = 0.0;
        for (n, w) in weights.iter().enumerate() {
            mass += w / total;
            if mass >= s.top_p {
                kept = n + 1;
                break;
            }
        }
    }
    let kept_total: f64 = weights[..kept].iter().sum();
    let mut u = rng.next_f64() * kept_total;
    for (n, w) in weights[..kept].iter().enumerate() {
        u -= w;
        if u < 0.0 {
            return order[n] as u32;
        }
    }
    order[kept - 1] as u32
}

/// A row that left a step: its job, and its output or why it has none.
pub(super) type Finished = (usize, Result<Output, EngineError>);

/// Rows generating together: their KV cache (row r in slot r), the tokens each has in it, and
/// the logits the next tokens are chosen from. Rows join (`admit`) and leave (finished rows
/// are dropped in `step`) at step boundaries.
#[derive(Default)]
pub(super) struct GenBatch {
    pub rows: Vec<Row>,
    state: Option<GenState>,
    /// Rows paused out of memory, by job, until they join again (or are forgotten).
    paused: std::collections::HashMap<usize, Row>,
    /// Tokens drafted and accepted since the model was loaded.
    pub stats: SpeculationStats,
}

struct GenState {
    cache: KvCache,
    /// Tokens in each row's cache (also the position of its next token).
    lens: Vec<i64>,
    /// The last hidden states of the forwards since the last step, in row order, each `[n, W, H]`:
    /// at position 0 what the next token of each of its rows is chosen from, at position j what
    /// follows its j-th draft (see [`Row::drafts`]). The step runs the LM head over them all in
    /// one GEMM: a row joining alone would read the whole head (32k × hidden) for one row, and
    /// joining logits to the running rows' would copy theirs (8 MB at 64 rows × 32k).
    pending: Vec<Tensor>,
}

/// The logits of a step: `[R, V]` for the pending positions of every row, and each row's first
/// position and count of them.
struct Choices {
    logits: Tensor,
    spans: Vec<(usize, usize)>,
}

impl GenState {
    fn choices(&self, d: &dyn CausalLm) -> Result<Choices, EngineError> {
        let mut spans = Vec::new();
        for p in &self.pending {
            let (n, w) = (p.size()[0] as usize, p.size()[1] as usize);
            let at = spans.last().map_or(0, |&(o, w)| o + w);
            spans.extend((0..n).map(|r| (at + r * w, w)));
        }
        let flat: Vec<Tensor> = self.pending.iter().map(|p| p.flatten(0, 1)).collect();
        let logits = catch_oom(|| Tensor::f_cat(&flat, 0).map(|h| d.logits(&h)).map_err(tch_err)).and_then(|r| r)?;
        Ok(Choices { logits, spans })
    }
}

impl Choices {
    /// Every row's greedy choices at each of its pending positions.
    fn greedy(&self) -> Result<Vec<Vec<i64>>, EngineError> {
        let ids = Vec::<i64>::try_from(self.logits.argmax(-1, false).to_device(Device::Cpu)).map_err(tch_err)?;
        Ok(self.spans.iter().map(|&(o, w)| ids[o..o + w].to_vec()).collect())
    }

    /// Every row's next-token logits `[B, V]` (its position 0).
    fn next(&self) -> Tensor {
        let first: Vec<i64> = self.spans.iter().map(|&(o, _)| o as i64).collect();
        self.logits.index_select(0, &Tensor::from_slice(&first).to_device(self.logits.device()))
    }
}

/// Right-padded prompts: ids `[B, T]` and their layout (a padding query repeats its row's last
/// position, so it never looks like a longer row), the cache's left-aligned slot layout.
fn right_pad(rows: &[Vec<i64>], device: Device) -> (Tensor, Layout) {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut keep, mut pos) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        ids.extend(r.iter().copied().chain(std::iter::repeat_n(0, len - r.len())));
        keep.extend((0..len).map(|j| (j < r.len()) as i64));
        pos.extend((0..len).map(|j| j.min(r.len() - 1) as i64));
    }
    let shape = [rows.len() as i64, len as i64];
    let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    let dense = rows.iter().all(|r| r.len() == len);
    (tensor(&ids), Layout::new(tensor(&pos), &tensor(&keep), dense))
}

/// Prepares a prefill over cached prefixes: each row's hit copied into its slot (`first + r`),
/// then its new tokens written after it (see [`write_after`]).
fn over_prefixes(cache: &mut KvCache, first: i64, hits: &[Vec<(Tensor, Tensor)>], skip: &[usize], new: &[Vec<i64>], device: Device) -> Layout {
    let layout = write_after(cache, first, skip, new, device);
    for (r, hit) in hits.iter().enumerate().filter(|&(r, _)| skip[r] > 0) {
        cache.copy_in(first + r as i64, hit);
    }
    layout
}

/// Prepares a forward of right-padded `new` tokens whose slots (`first + r`) hold `skip[r]`
/// tokens already: new token j of row r written at column `skip[r] + j` (the padding past its
/// length, masked, is overwritten by later steps); returns their layout over their slots.
fn write_after(cache: &mut KvCache, first: i64, skip: &[usize], new: &[Vec<i64>], device: Device) -> Layout {
    let n = new.len() as i64;
    let t = new.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let len = skip.iter().max().copied().unwrap_or(0) as i64 + t;
    cache.reserve(first + n, len);
    let grid = |width: i64, f: &dyn Fn(i64, i64) -> i64| -> Tensor {
        let v: Vec<i64> = (0..n).flat_map(|r| (0..width).map(move |j| (r, j))).map(|(r, j)| f(r, j)).collect();
        Tensor::from_slice(&v).view([n, width]).to_device(device)
    };
    let (s, l) = (|r: i64| skip[r as usize] as i64, |r: i64| new[r as usize].len() as i64);
    // A padding query repeats its row's last position, as in `right_pad`.
    let pos = grid(t, &|r, j| s(r) + j.min(l(r) - 1));
    cache.write = Write::PrefillOver { first, cols: grid(t, &|r, j| s(r) + j), len };
    Layout::general(pos, grid(len, &|r, c| if c < s(r) + l(r) { c } else { -1 }), None, &grid(t, &|r, j| (j < l(r)) as i64))
}

impl GenBatch {
    /// The paused row of `job`, if it was paused (see [`GenBatch::admit`]).
    pub fn resume(&mut self, job: usize) -> Option<Row> {
        self.paused.remove(&job)
    }

    /// Pauses every running row and drops the cache; returns their jobs.
    fn pause_all(&mut self) -> Vec<usize> {
        self.state = None;
        let rows = std::mem::take(&mut self.rows);
        let jobs = rows.iter().map(|r| r.job).collect();
        self.paused.extend(rows.into_iter().map(|r| (r.job, r)));
        jobs
    }

    /// Drops a paused row that will not join again.
    pub fn forget(&mut self, job: usize) {
        self.paused.remove(&job);
    }

    /// The running rows of `jobs` end at the next step (their deadline passed).
    pub fn stop(&mut self, jobs: &[usize]) {
        for row in self.rows.iter_mut().filter(|r| jobs.contains(&r.job)) {
            row.out_of_time = true;
        }
    }

    /// Prefills `rows` into the next free slots of the cache. Out of memory, they are paused and
    /// the running rows go on untouched (the slots and columns written beyond them are unused).
    /// With `prefix`, each row's longest cached prefix is copied into its slot and only the rest
    /// is prefilled; the prompts are cached afterwards.
    pub fn admit(&mut self, d: &dyn CausalLm, device: Device, mut rows: Vec<Row>, prefix: Option<&RefCell<KvTree>>) -> Result<(), EngineError> {
        if rows.is_empty() {
            return Ok(());
        }
        // A resumed row's drafts were not verified: its prefill gives the logits of its last token.
        for row in &mut rows {
            row.drafts.clear();
        }
        let prompts: Vec<Vec<u32>> = rows.iter().map(Row::tokens).collect();
        let mut tree = prefix.map(RefCell::borrow_mut);
        let hits: Vec<Vec<(Tensor, Tensor)>> = match tree.as_deref_mut() {
            Some(tree) => prompts.iter().map(|p| gather(&tree.lookup(&p[..p.len() - 1]), d.num_layers())).collect(),
            None => Vec::new(),
        };
        let skip: Vec<usize> = prompts.iter().enumerate().map(|(r, _)| hits.get(r).and_then(|h| h.first()).map_or(0, |(k, _)| k.size()[1] as usize)).collect();
        let new: Vec<Vec<i64>> = prompts.iter().zip(&skip).map(|(p, &s)| p[s..].iter().map(|&t| i64::from(t)).collect()).collect();
        let state = self.state.get_or_insert_with(|| GenState { cache: KvCache::new(d.num_layers()), lens: Vec::new(), pending: Vec::new() });
        let first = self.rows.len() as i64;
        let prefilled = catch_oom(|| {
            let (ids, layout) = right_pad(&new, device);
            let layout = match tree.is_some() {
                true => over_prefixes(&mut state.cache, first, &hits, &skip, &new, device),
                false => {
                    state.cache.reserve(first + rows.len() as i64, ids.size()[1]);
                    state.cache.write = Write::Prefill { first };
                    layout
                }
            };
            // Only each row's last token's hidden state is used: the last layer runs it alone.
            let last: Vec<Vec<i64>> = new.iter().map(|p| vec![p.len() as i64 - 1]).collect();
            d.forward_to(&ids, &layout, Some(&mut state.cache), Some(&Outputs::new(&last, &layout)))
        });
        let hidden = match prefilled {
            Ok(hidden) => hidden,
            Err(e) => {
                if let EngineError::OutOfMemory(_) = e {
                    self.paused.extend(rows.into_iter().map(|r| (r.job, r)));
                }
                if self.rows.is_empty() {
                    self.state = None;
                }
                return Err(e);
            }
        };
        let state = self.state.as_mut().expect("kept");
        state.pending.push(hidden);
        state.lens.extend(prompts.iter().map(|p| p.len() as i64));
        if let Some(tree) = tree.as_deref_mut() {
            for (r, row) in rows.iter().enumerate() {
                store_slot(tree, &row.input.prompt, &state.cache, first + r as i64);
            }
        }
        tracing::debug!(rows = first + rows.len() as i64, kv_cache_bytes = state.cache.bytes(), "generation batch");
        self.rows.extend(rows);
        Ok(())
    }

    /// Chooses every row's next token, finishes rows, and runs one decode step for the rest.
    /// Returns the outputs of rows that finished, and, when the decode step ran out of memory,
    /// `OutOfMemory` for every other row: those are paused (see [`GenBatch::admit`]).
    /// Greedy rows draft up to `speculate` tokens from their own sequence for the next step; the
    /// step verifies them in its forward and keeps those the model chooses itself.
    pub fn step(&mut self, d: &dyn CausalLm, hf: &Hf, speculate: usize, sink: &mut dyn Sink) -> Result<Vec<Finished>, EngineError> {
        let choices = match self.state.as_ref().expect("rows imply state").choices(d) {
            Ok(choices) => choices,
            Err(e @ EngineError::OutOfMemory(_)) => return Ok(self.pause_all().into_iter().map(|job| (job, Err(e.clone()))).collect()),
            Err(e) => return Err(e),
        };
        let state = self.state.as_mut().expect("rows imply state");
        // Per row: position 0 follows its last token, position j its j-th draft.
        let greedy = choices.greedy()?;
        // Rows that sample or want top log-probs draft nothing: they read position 0 only.
        let sampled = self.rows.iter().any(|r| r.input.sampling.temperature > 0.0);
        let per_row: Vec<usize> = self.rows.iter().map(|r| r.input.top_logprobs).collect();
        let next = (sampled || per_row.iter().any(|&k| k > 0)).then(|| choices.next());
        let cpu_logits = next.as_ref().filter(|_| sampled).map(|n| n.to_device(Device::Cpu));
        let mut tops = match next.as_ref().filter(|_| per_row.iter().any(|&k| k > 0)) {
            Some(next) => hf.top_logprobs(&next.f_log_softmax(-1, Kind::Float).map_err(tch_err)?, &per_row)?.into_iter(),
            None => Vec::new().into_iter(),
        };
        let disagree = || EngineError::Model("logits and rows disagree".into());
        // Drafts each row kept: its cache holds them already.
        let mut accepted = Vec::with_capacity(self.rows.len());
        for (b, row) in self.rows.iter_mut().enumerate() {
            row.top.extend(tops.next().filter(|t| !t.ids.is_empty()));
            let tok = match &cpu_logits {
                Some(l) if row.input.sampling.temperature > 0.0 => {
                    let logits = Vec::<f32>::try_from(l.f_get(b as i64).map_err(tch_err)?).map_err(tch_err)?;
                    sample(&logits, &row.input.sampling, &mut row.rng)
                }
                _ => greedy.get(b).and_then(|g| g.first()).and_then(|&t| u32::try_from(t).ok()).ok_or_else(disagree)?,
            };
            row.take(tok, hf, sink)?;
            // Drafts agreeing with the model's choices are in the cache already: their next
            // tokens are chosen from the logits that follow them, each token through every stop.
            let drafts = std::mem::take(&mut row.drafts);
            let mut kept = 0;
            while row.finish.is_none() && drafts.get(kept) == row.generated.last() {
                kept += 1;
                let tok = greedy.get(b).and_then(|g| g.get(kept)).and_then(|&t| u32::try_from(t).ok()).ok_or_else(disagree)?;
                row.take(tok, hf, sink)?;
            }
            row.budget.update(drafts.len(), kept, speculate);
            self.stats.accepted += kept as u64;
            accepted.push(kept as i64);
        }
        // Finished rows leave the batch at once.
        let (done, live): (Vec<(usize, Row)>, Vec<(usize, Row)>) = std::mem::take(&mut self.rows).into_iter().enumerate().partition(|(_, r)| r.finish.is_some());
        let mut outputs = Vec::with_capacity(done.len());
        for (_, row) in done {
            let text = if row.track_text { row.text.clone() } else { hf.tokenizer.decode(&row.generated, true).map_err(|e| EngineError::Model(format!("decode: {e}")))? };
            if row.stream {
                sink.emit(StreamChunk { job: row.job, index: row.chunks, text: String::new(), tokens: Vec::new(), top: Vec::new(), done: true });
            }
            let out = Output::Generate {
                text,
                tokens: row.generated,
                finish_reason: row.finish.expect("finished"),
                prompt_tokens: row.input.prompt.len(),
                top: row.top,
            };
            outputs.push((row.job, Ok(out)));
        }
        if live.is_empty() {
            self.state = None;
            return Ok(outputs);
        }
        // A finished row's slot is taken by the last live row (one row's copy), so the live rows
        // stay the first slots, in the order of `self.rows`.
        let mut live: Vec<Option<(usize, Row)>> = live.into_iter().map(Some).collect();
        let n = live.len();
        let mut order: Vec<(usize, Row)> = Vec::with_capacity(n);
        let mut moves = Vec::new();
        let mut lens = Vec::with_capacity(n);
        for slot in 0..n {
            let taken = live.iter().position(|r| r.as_ref().is_some_and(|(b, _)| *b == slot));
            let (b, row) = match taken {
                Some(i) => live[i].take().expect("present"),
                None => live.iter_mut().rev().find_map(Option::take).expect("a live row beyond the live count"),
            };
            // Its cache: the tokens before its last one (rejected drafts past them are dropped).
            let held = state.lens[b] + accepted[b];
            if b != slot {
                moves.push((b as i64, slot as i64, held));
            }
            lens.push(held + 1);
            order.push((b, row));
        }
        let device = choices.logits.device();
        self.rows = order.into_iter().map(|(_, r)| r).collect();
        // Speculation within the batch's budget of verified positions: a big batch has no spare
        // compute for guesses that may be rejected.
        let k = speculate.min((MAX_VERIFIED_POSITIONS / n).saturating_sub(1));
        let mut drafts: Vec<Vec<u32>> = self.rows.iter_mut().map(|r| r.draft(k, hf.max_length)).collect();
        let w = verified(&drafts.iter().map(Vec::len).collect::<Vec<_>>());
        drafts.iter_mut().for_each(|d| d.truncate(w));
        let fed: Vec<Vec<i64>> = self.rows.iter().zip(&drafts).map(|(r, d)| [*r.generated.last().expect("one token")].iter().chain(d).map(|&t| i64::from(t)).collect()).collect();
        let width = fed.iter().map(Vec::len).max().expect("live rows");
        let decoded = catch_oom(|| {
            for &(from, to, len) in &moves {
                state.cache.move_slot(from, to, len);
            }
            if width == 1 {
                let next = Tensor::from_slice(&fed.concat()).view([n as i64, 1]).to_device(device);
                let cols = Tensor::from_slice(&lens.iter().map(|l| l - 1).collect::<Vec<_>>()).to_device(device);
                let len = lens.iter().copied().max().expect("live rows");
                state.cache.reserve(n as i64, len);
                state.cache.write = Write::Decode { cols: cols.shallow_clone(), len };
                let keep = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(0).lt_tensor(&(&cols + 1).unsqueeze(1));
                let layout = Layout::step(cols.unsqueeze(1), &keep);
                return d.forward(&next, &layout, Some(&mut state.cache));
            }
            // Each row's last token and its drafts, right-padded, written after its cached tokens
            // and attending causally over them: one forward verifies every draft.
            let held: Vec<usize> = lens.iter().map(|&l| l as usize - 1).collect();
            let (ids, _) = right_pad(&fed, device);
            let layout = write_after(&mut state.cache, 0, &held, &fed, device);
            d.forward(&ids, &layout, Some(&mut state.cache))
        });
        match decoded {
            Ok(hidden) => {
                state.pending = vec![hidden];
                state.lens = lens;
                self.stats.drafted += drafts.iter().map(|d| d.len() as u64).sum::<u64>();
                for (row, d) in self.rows.iter_mut().zip(drafts) {
                    row.drafts = d;
                }
            }
            // The cache is dropped (partly moved, partly written); every live row resumes by
            // prefilling what it has, with the token just chosen last.
            Err(e) => outputs.extend(self.pause_all().into_iter().map(|job| (job, Err(e.clone())))),
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::{GenerateInput, TopLogprobs};

    /// Rows paused mid-generation (as out of memory pauses them: the cache dropped) and joining
    /// again generate the tokens and text they generate uninterrupted, drafts pending at the pause
    /// (unverified: dropped) too.
    #[test]
    fn paused_rows_resume_to_what_they_generate_uninterrupted() {
        use crate::engine::LoadedModel;
        use crate::job::JobInput;
        // Random weights, and weights that echo the last token (every row drafts, so drafts are
        // pending at every pause).
        let mut pending = false;
        for echo in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let dir = dir.path().join("lm");
            jetbatch_testkit::write_tiny_lm(&dir, 3, 32, 2).unwrap();
            if echo {
                jetbatch_testkit::make_echo(&dir).unwrap();
            }
            let spec = crate::plan::ModelPlan::load(&dir).unwrap();
            let mut hf = Hf::load(&spec, Device::Cpu).unwrap();
            // What the engine reads at load to derive a token budget on CUDA: K and V, 2 layers,
            // 2 KV heads of 8 dims, f32; a probe of more tokens than max_length runs as several rows.
            assert_eq!(hf.kv_bytes_per_token(), 2 * 2 * 2 * 8 * 4);
            hf.probe(3 * hf.max_length + 1).unwrap();
            let sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None };
            let jobs = || -> Vec<(u64, JobInput, bool)> {
                [vec![5u32, 9, 13], vec![40, 41], vec![7, 8, 9, 10, 7, 8, 9, 10, 7, 8]]
                    .into_iter()
                    .enumerate()
                    .map(|(i, prompt)| (i as u64, JobInput::Generate(GenerateInput { prompt, max_new_tokens: 10 + i, sampling: sampling.clone(), stop: vec![], stop_token_ids: vec![], top_logprobs: if i == 1 { 2 } else { 0 } }), true))
                    .collect()
            };
            /// What each job's chunks carried.
            #[derive(Debug, Clone, Default, PartialEq)]
            struct Streamed {
                text: String,
                tokens: Vec<u32>,
                top: Vec<TopLogprobs>,
            }
            struct Chunks(Vec<Streamed>);
            impl Sink for Chunks {
                fn wants(&self, _: usize) -> bool {
                    true
                }
                fn emit(&mut self, chunk: StreamChunk) {
                    let s = &mut self.0[chunk.job];
                    s.text.push_str(&chunk.text);
                    s.tokens.extend(&chunk.tokens);
                    s.top.extend(chunk.top);
                }
            }
            let mut generate = |hf: &mut Hf, pause_after: Option<usize>| {
                hf.join(jobs()).unwrap();
                let mut sink = Chunks(vec![Streamed::default(); 3]);
                let mut out = vec![None; 3];
                for step in 1.. {
                    for (job, r) in hf.step(&mut sink) {
                        let Output::Generate { tokens, text, top, .. } = r.unwrap() else { panic!("a generation") };
                        // The chunks carry the output's tokens and their log-probs, in order (the
                        // last ones may add no text, and be in no chunk).
                        let s = &sink.0[job as usize];
                        assert!(!s.tokens.is_empty() && tokens.starts_with(&s.tokens), "job {job}: {:?} of {tokens:?}", s.tokens);
                        let asked = if job == 1 { tokens.len() } else { 0 };
                        assert_eq!(top.len(), asked, "job {job}");
                        assert_eq!(s.top.as_slice(), &top[..s.tokens.len().min(asked)], "job {job}");
                        out[job as usize] = Some((tokens, text));
                    }
                    if hf.generating() == 0 {
                        break;
                    }
                    if Some(step) == pause_after {
                        pending |= hf.gen.rows.iter().any(|r| !r.drafts.is_empty());
                        let running = hf.generating();
                        let paused = hf.gen.pause_all();
                        assert_eq!(paused.len(), running);
                        hf.join(jobs().into_iter().filter(|(j, ..)| paused.contains(&(*j as usize))).collect()).unwrap();
                        assert!(hf.gen.paused.is_empty(), "every row resumed");
                    }
                }
                (out, sink.0)
            };
            let (want, want_streamed) = generate(&mut hf, None);
            assert!(want_streamed[1].top.iter().all(|t| t.ids.len() == 2), "top_logprobs: 2 in every chunk of job 1");
            assert!(want.iter().all(|o| o.as_ref().is_some_and(|(t, _)| t.len() >= 10)));
            // (Log-probs after a resume come from its prefill: equal to float noise only.)
            let sent = |s: &[Streamed]| s.iter().map(|s| (s.text.clone(), s.tokens.clone(), s.top.len())).collect::<Vec<_>>();
            for pause_after in 1..9 {
                let (got, streamed) = generate(&mut hf, Some(pause_after));
                assert_eq!(got, want, "tokens and text as uninterrupted (paused after step {pause_after})");
                assert_eq!(sent(&streamed), sent(&want_streamed), "nothing streamed twice (paused after step {pause_after})");
            }
        }
        assert!(pending, "some pause dropped drafts");
    }

    /// Token by token, the incremental text is the whole decode's (less an incomplete UTF-8
    /// tail, which the last call flushes): byte-level tokens split multi-byte characters.
    #[test]
    fn incremental_detokenization_equals_decoding_the_whole_generation() {
        let dir = tempfile::tempdir().unwrap();
        jetbatch_testkit::write_tiny_lm(dir.path(), 1, 8, 1).unwrap();
        let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let ids = tokenizer.encode("héllo wörld, 東京 ✓  end", false).unwrap().get_ids().to_vec();
        assert!(ids.len() > 20, "byte-level: one token per byte");
        let sampling = Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None };
        let input = GenerateInput { prompt: vec![1], max_new_tokens: 64, sampling, stop: vec![], stop_token_ids: vec![], top_logprobs: 0 };
        // The first byte of '✓' last: held back, then flushed as the whole decode writes it.
        let cut = ids.len() - 7;
        let mut row = Row::new(0, input, true);
        let mut held = 0;
        for &t in &ids[..cut] {
            row.generated.push(t);
            row.detokenize(&tokenizer, false).unwrap();
            let whole = tokenizer.decode(&row.generated, true).unwrap();
            let complete = whole.trim_end_matches('\u{FFFD}');
            held += (complete.len() < whole.len()) as usize;
            assert_eq!(row.text, complete, "after {} tokens", row.generated.len());
        }
        assert!(held > 0, "some steps end inside a character");
        row.detokenize(&tokenizer, true).unwrap();
        assert_eq!(row.text, tokenizer.decode(&row.generated, true).unwrap());
        assert!(row.generated.len() - row.prefix < 8, "only a tail is decoded");
    }
}
