//! Scoring and encoding heads: log-likelihoods of scored windows, pooled embeddings, and the
//! classifier on the first token.

use tch::{Device, Kind, Tensor};

use super::bert::Bert;
use super::layers::{Layout, Outputs};
use super::prefix::PrefixedRow;
use super::{left_pad, pad_left, tch_err, CausalLm, EngineError, Hf, Pooling};
use crate::job::{JobKind, Output};
use crate::kinds::{TopLogprobs, Window};

impl Hf {
    /// Checks the invariant every scored window keeps (`LmSpec::parse` builds them so): a
    /// non-empty context and continuation, context + continuation - 1 <= max_length, ids in the
    /// vocabulary. Without it a continuation token would be conditioned on padding or on nothing.
    pub(super) fn check_window(&self, d: &dyn CausalLm, w: &Window) -> Result<(), EngineError> {
        let vocab = d.vocab();
        let (c, n) = (w.context.len(), w.continuation.len());
        if c == 0 || n == 0 || c + n - 1 > self.max_length {
            return Err(EngineError::Model(format!(
                "window of {c} context and {n} continuation tokens breaks the scoring invariant \
                 (a non-empty context, context + continuation - 1 <= max_length {})",
                self.max_length
            )));
        }
        if let Some(t) = w.context.iter().chain(&w.continuation).find(|&&t| i64::from(t) >= vocab) {
            return Err(EngineError::Model(format!("token id {t} is not below the vocabulary size {vocab}")));
        }
        Ok(())
    }

    /// The `per_row[r]` most likely tokens of each row of `logp` (`[rows, vocab]` log-probs), with
    /// their text; one top-k for the batch, only `rows × k` values leave the device.
    pub(super) fn top_logprobs(&self, logp: &Tensor, per_row: &[usize]) -> Result<Vec<TopLogprobs>, EngineError> {
        let k = per_row.iter().copied().max().unwrap_or(0) as i64;
        let (values, ids) = logp.f_topk(k, -1, true, true).map_err(tch_err)?;
        let values = Vec::<f32>::try_from(values.f_to_device(Device::Cpu).map_err(tch_err)?.f_reshape([-1]).map_err(tch_err)?).map_err(tch_err)?;
        let ids = Vec::<i64>::try_from(ids.f_to_device(Device::Cpu).map_err(tch_err)?.f_reshape([-1]).map_err(tch_err)?).map_err(tch_err)?;
        per_row
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                let at = r * k as usize;
                let ids: Vec<u32> = ids[at..at + n].iter().map(|&i| i as u32).collect();
                let tokens = ids
                    .iter()
                    .map(|&i| self.tokenizer.decode(&[i], false).map_err(|e| EngineError::Model(format!("decode: {e}"))))
                    .collect::<Result<_, _>>()?;
                Ok(TopLogprobs { ids, tokens, logprobs: values[at..at + n].to_vec() })
            })
            .collect()
    }

    /// Log-prob sums, greedy flags and (where a window asks) the top log-probs at each continuation
    /// position of windows, one each, in order. Windows with identical
    /// context tokens (a multiple-choice question sent as one job per option, or one job's
    /// choices) share a row: see [`pack`]. One context with several continuations is scored by
    /// passing one window per continuation.
    pub(super) fn score(&self, d: &dyn CausalLm, windows: &[&Window]) -> Result<Vec<(f64, bool, Vec<TopLogprobs>)>, EngineError> {
        for w in windows {
            self.check_window(d, w)?;
        }
        let packed = pack(windows, d.packs());
        // Each row's scored positions (its windows', in order): the only final hidden states the
        // forward computes, `[B, T', H]`; `at` is where each window's positions land among them.
        let mut wanted: Vec<Vec<usize>> = vec![Vec::new(); packed.rows.len()];
        let mut at = Vec::new();
        let mut targets = Vec::new();
        for (w, (r, scored)) in windows.iter().zip(&packed.scored) {
            for &p in scored {
                at.push((*r, wanted[*r].len()));
                wanted[*r].push(p);
            }
            targets.extend(w.continuation.iter().map(|&t| i64::from(t)));
        }
        let hidden = match self.prefix_on(d) {
            true => {
                let contexts: Vec<&[u32]> = packed.first.iter().map(|&i| windows[i].context.as_slice()).collect();
                self.prefill_shared(d, &contexts.iter().map(|c| &c[..c.len() - 1]).collect::<Vec<_>>())?;
                let rows: Vec<PrefixedRow> = contexts
                    .iter()
                    .enumerate()
                    .map(|(r, c)| PrefixedRow {
                        cacheable: &c[..c.len() - 1],
                        store: c,
                        ids: packed.rows[r].clone(),
                        pos: packed.pos[r].clone(),
                        seg: packed.segments.as_ref().map_or_else(|| vec![0; packed.rows[r].len()], |s| s[r].clone()),
                    })
                    .collect();
                self.forward_prefixed(d, &rows, packed.segments.is_some(), &wanted)?
            }
            false => {
                let (ids, keep, layout) = left_pad(&packed.rows, self.device);
                let layout = match &packed.segments {
                    Some(segments) => Layout::packed(pad_left(&packed.pos, self.device), pad_left(segments, self.device), &keep),
                    None => layout,
                };
                // Row r's tokens are the last of its T columns (left padding).
                let t = ids.size()[1];
                let columns: Vec<Vec<i64>> = wanted.iter().zip(&packed.rows).map(|(w, row)| w.iter().map(|&p| t - row.len() as i64 + p as i64).collect()).collect();
                d.forward_to(&ids, &layout, None, Some(&Outputs::new(&columns, &layout)))
            }
        };
        // The scored positions gathered into one contiguous `[n, hidden]` block, so the LM head
        // (vocab × hidden: most of the work at real vocabularies) runs as one dense GEMM on them;
        // a narrowed 3-D view would go down a batched path that repacks the weight per row. Only
        // n log-probs and n greedy flags leave the device.
        let (width, hidden_size) = (hidden.size()[1], hidden.size()[2]);
        let at: Vec<i64> = at.iter().map(|&(r, j)| r as i64 * width + j as i64).collect();
        let at = Tensor::from_slice(&at).to_device(self.device);
        let targets = Tensor::from_slice(&targets).to_device(self.device);
        let scored = hidden.f_reshape([-1, hidden_size]).and_then(|h| h.f_index_select(0, &at)).map_err(tch_err)?;
        let logp = d.logits(&scored).f_log_softmax(-1, Kind::Float).map_err(tch_err)?;
        let picked = logp.f_gather(1, &targets.f_unsqueeze(1).map_err(tch_err)?, false).and_then(|p| p.f_squeeze_dim(1)).map_err(tch_err)?;
        let greedy = logp.f_argmax(-1, false).and_then(|g| g.f_eq_tensor(&targets)).map_err(tch_err)?;
        let picked = Vec::<f32>::try_from(picked.f_to_device(Device::Cpu).map_err(tch_err)?).map_err(tch_err)?;
        let greedy = Vec::<bool>::try_from(greedy.f_to_device(Device::Cpu).map_err(tch_err)?).map_err(tch_err)?;
        let per_position: Vec<usize> = windows.iter().flat_map(|w| std::iter::repeat_n(w.top_logprobs, w.continuation.len())).collect();
        let mut top = match per_position.iter().any(|&k| k > 0) {
            true => self.top_logprobs(&logp, &per_position)?.into_iter(),
            false => Vec::new().into_iter(),
        };
        let mut out = Vec::with_capacity(windows.len());
        let mut start = 0;
        for w in windows {
            let end = start + w.continuation.len();
            let logprob = picked[start..end].iter().map(|&p| f64::from(p)).sum();
            // Windows that did not ask have empty entries (or none): they get no list.
            let tops = top.by_ref().take(w.continuation.len()).filter(|t| !t.ids.is_empty()).collect();
            out.push((logprob, greedy[start..end].iter().all(|&g| g), tops));
            start = end;
        }
        Ok(out)
    }

    pub(super) fn encode(&self, b: &Bert, kind: JobKind, jobs: &[(&Vec<u32>, &Vec<u32>, bool)]) -> Result<Vec<Output>, EngineError> {
        let (vocab, positions, types) = (b.word.size()[0], b.max_positions(), b.token_type.size()[0]);
        for (ids, type_ids, _) in jobs {
            if ids.is_empty() || ids.len() != type_ids.len() || ids.len() > self.max_length || ids.len() as i64 > positions {
                return Err(EngineError::Model(format!(
                    "an input of {} tokens ({} type ids) does not fit 1..={} positions",
                    ids.len(),
                    type_ids.len(),
                    self.max_length.min(positions as usize)
                )));
            }
            if ids.iter().any(|&t| i64::from(t) >= vocab) || type_ids.iter().any(|&t| i64::from(t) >= types) {
                return Err(EngineError::Model("token or type id out of the embeddings' range".into()));
            }
        }
        let len = jobs.iter().map(|(ids, _, _)| ids.len()).max().unwrap_or(0);
        let pad = |v: &Vec<u32>| -> Vec<i64> { v.iter().map(|&t| t as i64).chain(std::iter::repeat_n(0, len - v.len())).collect() };
        let shape = [jobs.len() as i64, len as i64];
        let ids = Tensor::from_slice(&jobs.iter().flat_map(|(i, _, _)| pad(i)).collect::<Vec<_>>()).view(shape).to_device(self.device);
        let types = Tensor::from_slice(&jobs.iter().flat_map(|(_, t, _)| pad(t)).collect::<Vec<_>>()).view(shape).to_device(self.device);
        let keep: Vec<i64> = jobs.iter().flat_map(|(i, _, _)| (0..len).map(move |j| (j < i.len()) as i64)).collect();
        let keep = Tensor::from_slice(&keep).view(shape).to_device(self.device);
        let hidden = b.forward(&ids, &types, &keep);
        if kind == JobKind::Classify {
            let head = b.classifier.as_ref().ok_or_else(|| EngineError::Model("no classification head".into()))?;
            let logits = head.forward(&hidden.f_select(1, 0).map_err(tch_err)?).to_kind(Kind::Float).to_device(Device::Cpu);
            let probs = logits.f_softmax(-1, Kind::Float).map_err(tch_err)?;
            return (0..jobs.len() as i64)
                .map(|r| {
                    let logits = Vec::<f32>::try_from(logits.f_get(r).map_err(tch_err)?).map_err(tch_err)?;
                    let probs = Vec::<f32>::try_from(probs.f_get(r).map_err(tch_err)?).map_err(tch_err)?;
                    let label_id = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
                    let label = self.labels.get(label_id).cloned().unwrap_or_else(|| format!("LABEL_{label_id}"));
                    Ok(Output::Classification { logits, probs, label, label_id })
                })
                .collect();
        }
        let pooled = match self.pooling {
            Pooling::Cls => hidden.f_select(1, 0).map_err(tch_err)?.to_kind(Kind::Float),
            Pooling::Mean => {
                let m = keep.unsqueeze(-1).to_kind(Kind::Float);
                (hidden.to_kind(Kind::Float) * &m).sum_dim_intlist(1, false, Kind::Float) / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9)
            }
        };
        let pooled = pooled.to_device(Device::Cpu);
        (0..jobs.len())
            .map(|r| {
                let mut e = pooled.f_get(r as i64).map_err(tch_err)?;
                if jobs[r].2 {
                    e = &e / e.norm().clamp_min(1e-12);
                }
                Ok(Output::Embedding { embedding: Vec::<f32>::try_from(e).map_err(tch_err)?, tokens: jobs[r].0.len() })
            })
            .collect()
    }
}

/// The rows of a scoring batch.
struct Packed {
    rows: Vec<Vec<i64>>,
    /// Positions of each row's tokens, and their segments when some row packs several windows.
    pos: Vec<Vec<i64>>,
    segments: Option<Vec<Vec<i64>>>,
    /// Per window: its row and the indices (in the row) whose next token it scores.
    scored: Vec<(usize, Vec<usize>)>,
    /// Per row: a window whose context the row starts with.
    first: Vec<usize>,
}

/// One row per distinct context: the context once, then each window's continuation but its last
/// token (segments 1, 2, …: each sees the context and itself causally, its positions continuing
/// the context's). A window scores from the context's last token and its own segment, so its
/// numbers are those of its own row `context + continuation[..n-1]`. With `share` false (or no
/// context repeated), one plain row per window.
fn pack(windows: &[&Window], share: bool) -> Packed {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_context: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
    for (i, w) in windows.iter().enumerate() {
        match by_context.get(w.context.as_slice()) {
            Some(&g) if share => groups[g].push(i),
            _ => {
                by_context.insert(&w.context, groups.len());
                groups.push(vec![i]);
            }
        }
    }
    let mut p = Packed { rows: Vec::new(), pos: Vec::new(), segments: None, scored: vec![(0, Vec::new()); windows.len()], first: groups.iter().map(|g| g[0]).collect() };
    let mut segments = Vec::new();
    for (r, group) in groups.iter().enumerate() {
        let context = &windows[group[0]].context;
        let c = context.len();
        let mut row: Vec<i64> = context.iter().map(|&t| i64::from(t)).collect();
        let mut pos: Vec<i64> = (0..c as i64).collect();
        let mut seg = vec![0i64; c];
        for (k, &i) in group.iter().enumerate() {
            let own = &windows[i].continuation[..windows[i].continuation.len() - 1];
            let start = row.len();
            p.scored[i] = (r, std::iter::once(c - 1).chain(start..start + own.len()).collect());
            row.extend(own.iter().map(|&t| i64::from(t)));
            pos.extend((c..c + own.len()).map(|q| q as i64));
            seg.extend(std::iter::repeat_n(k as i64 + 1, own.len()));
        }
        p.rows.push(row);
        p.pos.push(pos);
        segments.push(seg);
    }
    if groups.iter().any(|g| g.len() > 1) {
        p.segments = Some(segments);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(context: &[u32], continuation: &[u32]) -> Window {
        Window { context: context.to_vec(), continuation: continuation.to_vec(), top_logprobs: 0 }
    }

    #[test]
    fn windows_sharing_a_context_share_a_row() {
        let (a, b, c, d) = (w(&[1, 2, 3], &[4, 5]), w(&[9], &[8]), w(&[1, 2, 3], &[6]), w(&[1, 2, 3], &[7, 8, 9]));
        let p = pack(&[&a, &b, &c, &d], true);
        assert_eq!(p.rows, vec![vec![1, 2, 3, 4, 7, 8], vec![9]]);
        assert_eq!(p.pos, vec![vec![0, 1, 2, 3, 3, 4], vec![0]]);
        assert_eq!(p.segments, Some(vec![vec![0, 0, 0, 1, 3, 3], vec![0]]));
        assert_eq!(p.scored, vec![(0, vec![2, 3]), (1, vec![0]), (0, vec![2]), (0, vec![2, 4, 5])]);
        let alone = pack(&[&a, &b, &c, &d], false);
        assert_eq!(alone.rows, vec![vec![1, 2, 3, 4], vec![9], vec![1, 2, 3], vec![1, 2, 3, 7, 8]]);
        assert_eq!(alone.segments, None);
        assert_eq!(alone.scored, vec![(0, vec![2, 3]), (1, vec![0]), (2, vec![2]), (3, vec![2, 3, 4])]);
    }
}
