//! The generation batch (continuous batching): rows join at step boundaries with their prompt
//! prefilled, the left-padded KV caches merged, and leave when finished; sampling draws from each
//! job's own seeded stream so a row's tokens do not depend on its neighbours.

use tch::{Device, Kind, Tensor};

use super::layers::KvCache;
use super::{left_pad, tch_err, CausalLm, EngineError, Hf};
use crate::engine::{Sink, StreamChunk};
use crate::job::{FinishReason, Output};
use crate::kinds::{GenerateInput, Sampling, TopLogprobs};

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
    emitted: usize,
    chunks: usize,
    finish: Option<FinishReason>,
    /// With `top_logprobs`: the most likely tokens at each generated position.
    top: Vec<TopLogprobs>,
}

impl Row {
    pub fn new(job: usize, input: GenerateInput, stream: bool) -> Row {
        // An unseeded sampled job draws from fresh entropy (such jobs are never cached).
        let seed = input.sampling.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ (job as u64).rotate_left(32)
        });
        let track_text = stream || !input.stop.is_empty();
        Row { job, rng: Rng(seed), generated: Vec::new(), track_text, stream, text: String::new(), emitted: 0, chunks: 0, finish: None, top: Vec::new(), input }
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

    fn emit(&mut self, end: usize, token: u32, sink: &mut dyn Sink) {
        if self.stream && end > self.emitted {
            sink.emit(StreamChunk { job: self.job, index: self.chunks, text: self.text[self.emitted..end].to_string(), token, done: false });
            self.chunks += 1;
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

/// Rows generating together: their KV cache `[B, kv, S, D]`, key mask `[B, S]`, last positions
/// `[B, 1]` and the logits `[B, V]` the next token is chosen from. Rows join (`admit`) and leave
/// (finished rows are dropped in `step`) at step boundaries.
#[derive(Default)]
pub(super) struct GenBatch {
    pub rows: Vec<Row>,
    state: Option<GenState>,
}

struct GenState {
    cache: KvCache,
    keep: Tensor,
    last_pos: Tensor,
    logits: Tensor,
}

impl GenBatch {
    /// Prefills `rows` and merges them into the batch (left-padding the shorter cache).
    pub fn admit(&mut self, d: &dyn CausalLm, device: Device, rows: Vec<Row>) -> Result<(), EngineError> {
        if rows.is_empty() {
            return Ok(());
        }
        let prompts: Vec<Vec<i64>> = rows.iter().map(|r| r.input.prompt.iter().map(|&t| t as i64).collect()).collect();
        let (ids, keep, pos) = left_pad(&prompts, device);
        let mut cache = KvCache::new(d.num_layers());
        let hidden = d.forward(&ids, &pos, &keep, Some(&mut cache));
        let last = hidden.f_narrow(1, hidden.size()[1] - 1, 1).map_err(tch_err)?;
        let logits = d.logits(&last.f_squeeze_dim(1).map_err(tch_err)?);
        let new = GenState { cache, keep, last_pos: pos.f_narrow(1, pos.size()[1] - 1, 1).map_err(tch_err)?, logits };
        self.state = Some(match self.state.take() {
            None => new,
            Some(old) => {
                let s = old.keep.size()[1].max(new.keep.size()[1]);
                let pad_keys = |t: &Tensor, dim: i64| {
                    let missing = s - t.size()[dim as usize];
                    if missing == 0 {
                        return t.shallow_clone();
                    }
                    let mut shape = t.size();
                    shape[dim as usize] = missing;
                    Tensor::cat(&[&Tensor::zeros(&shape, (t.kind(), t.device())), t], dim)
                };
                let layers = old
                    .cache
                    .layers
                    .iter()
                    .zip(&new.cache.layers)
                    .map(|(a, b)| {
                        let ((ak, av), (bk, bv)) = (a.as_ref().expect("prefilled"), b.as_ref().expect("prefilled"));
                        Some((Tensor::cat(&[pad_keys(ak, 2), pad_keys(bk, 2)], 0), Tensor::cat(&[pad_keys(av, 2), pad_keys(bv, 2)], 0)))
                    })
                    .collect();
                GenState {
                    cache: KvCache { layers },
                    keep: Tensor::cat(&[pad_keys(&old.keep, 1), pad_keys(&new.keep, 1)], 0),
                    last_pos: Tensor::cat(&[&old.last_pos, &new.last_pos], 0),
                    logits: Tensor::cat(&[&old.logits, &new.logits], 0),
                }
            }
        });
        self.rows.extend(rows);
        Ok(())
    }

    /// Chooses every row's next token, finishes rows, and runs one decode step for the rest.
    /// Returns the outputs of rows that finished.
    pub fn step(&mut self, d: &dyn CausalLm, hf: &Hf, sink: &mut dyn Sink) -> Result<Vec<(usize, Output)>, EngineError> {
        let state = self.state.as_mut().expect("rows imply state");
        let greedy: Vec<i64> = Vec::<i64>::try_from(state.logits.argmax(-1, false).to_device(Device::Cpu)).map_err(tch_err)?;
        let sampled = self.rows.iter().any(|r| r.input.sampling.temperature > 0.0);
        let cpu_logits = if sampled { Some(state.logits.to_device(Device::Cpu)) } else { None };
        let per_row: Vec<usize> = self.rows.iter().map(|r| r.input.top_logprobs).collect();
        let mut tops = match per_row.iter().any(|&k| k > 0) {
            true => hf.top_logprobs(&state.logits.f_log_softmax(-1, Kind::Float).map_err(tch_err)?, &per_row)?.into_iter(),
            false => Vec::new().into_iter(),
        };
        for (b, row) in self.rows.iter_mut().enumerate() {
            row.top.extend(tops.next().filter(|t| !t.ids.is_empty()));
            let tok = match &cpu_logits {
                Some(l) if row.input.sampling.temperature > 0.0 => {
                    let logits = Vec::<f32>::try_from(l.f_get(b as i64).map_err(tch_err)?).map_err(tch_err)?;
                    sample(&logits, &row.input.sampling, &mut row.rng)
                }
                _ => greedy.get(b).and_then(|&t| u32::try_from(t).ok()).ok_or_else(|| EngineError::Model("logits and rows disagree".into()))?,
            };
            row.generated.push(tok);
            if row.track_text {
                row.text = hf.tokenizer.decode(&row.generated, true).map_err(|e| EngineError::Model(format!("decode: {e}")))?;
                let stop_at = row.input.stop.iter().filter_map(|s| row.text.find(s.as_str())).min();
                if let Some(at) = stop_at {
                    row.text.truncate(at);
                    row.finish = Some(FinishReason::Stop);
                }
            }
            if row.finish.is_none() && row.input.stop_token_ids.contains(&tok) {
                row.finish = Some(if hf.eos.contains(&tok) { FinishReason::Eos } else { FinishReason::Stop });
            } else if row.finish.is_none()
                && (row.generated.len() >= row.input.max_new_tokens || row.input.prompt.len() + row.generated.len() >= hf.max_length)
            {
                row.finish = Some(FinishReason::Length);
            }
            let end = if row.finish.is_some() { row.text.len() } else { row.safe_end() };
            row.emit(end, tok, sink);
        }
        // Finished rows leave the batch at once.
        let (done, live): (Vec<(usize, Row)>, Vec<(usize, Row)>) = std::mem::take(&mut self.rows).into_iter().enumerate().partition(|(_, r)| r.finish.is_some());
        let mut outputs = Vec::with_capacity(done.len());
        for (_, row) in done {
            let text = if row.track_text { row.text.clone() } else { hf.tokenizer.decode(&row.generated, true).map_err(|e| EngineError::Model(format!("decode: {e}")))? };
            if row.stream {
                sink.emit(StreamChunk { job: row.job, index: row.chunks, text: String::new(), token: 0, done: true });
            }
            let out = Output::Generate {
                text,
                tokens: row.generated,
                finish_reason: row.finish.expect("finished"),
                prompt_tokens: row.input.prompt.len(),
                top: row.top,
            };
            outputs.push((row.job, out));
        }
        if live.is_empty() {
            self.state = None;
            return Ok(outputs);
        }
        let keep_rows = Tensor::from_slice(&live.iter().map(|(b, _)| *b as i64).collect::<Vec<_>>()).to_device(state.keep.device());
        let next = Tensor::from_slice(&live.iter().map(|(_, r)| *r.generated.last().expect("one token") as i64).collect::<Vec<_>>())
            .view([live.len() as i64, 1])
            .to_device(state.keep.device());
        self.rows = live.into_iter().map(|(_, r)| r).collect();
        for layer in state.cache.layers.iter_mut() {
            let (k, v) = layer.take().expect("prefilled");
            *layer = Some((k.index_select(0, &keep_rows), v.index_select(0, &keep_rows)));
        }
        let ones = Tensor::ones([self.rows.len() as i64, 1], (Kind::Int64, state.keep.device()));
        state.keep = Tensor::cat(&[&state.keep.index_select(0, &keep_rows), &ones], 1);
        state.last_pos = state.last_pos.index_select(0, &keep_rows) + 1;
        let hidden = d.forward(&next, &state.last_pos, &state.keep, Some(&mut state.cache));
        state.logits = d.logits(&hidden.squeeze_dim(1));
        Ok(outputs)
    }
}
