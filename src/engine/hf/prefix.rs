//! Forwards over the prefix cache ([`crate::engine::prefix`]): a row's leading tokens whose keys
//! and values are cached are not run again; its new tokens attend to the cached keys, then to
//! their own. What a forward computes of the rows' contexts is cached in turn. Rows of one batch
//! sharing a long prefix that is not cached yet have it computed once first
//! ([`Hf::prefill_shared`]), so a cold cache gains within the first batch too.
//!
//! The cached keys are those a full forward computes at the same positions (rotary positions are
//! absolute, masks are built from positions), so answers do not depend on what is cached beyond
//! float rounding: the tests hold them within 1e-4 of the same rows with the cache off.

use tch::{Kind, Tensor};

use super::layers::{KvCache, Layout, Outputs};
use super::{pad_left, CausalLm, EngineError, Hf};
use crate::engine::prefix::{Hit, PrefixTree, Segment};

/// The keys and values of `n` tokens, per layer `[kv_heads, n, D]`.
pub(super) struct Kv(Vec<(Tensor, Tensor)>);

impl Segment for Kv {
    fn split(self, at: usize) -> (Kv, Kv) {
        let at = at as i64;
        let part = |t: &Tensor, from: i64, n: i64| t.narrow(1, from, n).copy();
        let (head, tail) = self
            .0
            .iter()
            .map(|(k, v)| {
                let n = k.size()[1];
                ((part(k, 0, at), part(v, 0, at)), (part(k, at, n - at), part(v, at, n - at)))
            })
            .unzip();
        (Kv(head), Kv(tail))
    }
}

pub(super) type KvTree = PrefixTree<Kv>;

/// A hit's keys and values joined, per layer `[kv_heads, hit.len, D]` (none for an empty hit).
pub(super) fn gather(hit: &Hit<'_, Kv>, layers: usize) -> Vec<(Tensor, Tensor)> {
    if hit.len == 0 {
        return Vec::new();
    }
    (0..layers)
        .map(|l| {
            let part = |pick: fn(&(Tensor, Tensor)) -> &Tensor| {
                let parts: Vec<Tensor> = hit.parts.iter().map(|(kv, n)| pick(&kv.0[l]).narrow(1, 0, *n as i64)).collect();
                Tensor::cat(&parts, 1)
            };
            (part(|kv| &kv.0), part(|kv| &kv.1))
        })
        .collect()
}

/// Caches `tokens`, whose keys and values slot `slot` of a generation's cache holds.
pub(super) fn store_slot(tree: &mut KvTree, tokens: &[u32], cache: &KvCache, slot: i64) {
    tree.insert(tokens, |from| Some(Kv(cache.copy_out(slot, from as i64, tokens.len() as i64))));
}

/// Shortest prefix shared by rows of a batch worth a forward of its own.
const MIN_SHARED: usize = 16;

/// One row of a forward over the prefix cache.
pub(super) struct PrefixedRow<'a> {
    /// Its leading tokens that may come from the cache (a scored row: its context but the last
    /// token, whose hidden state is needed).
    pub cacheable: &'a [u32],
    /// Its leading tokens to cache afterwards (a scored row: its context).
    pub store: &'a [u32],
    /// The whole row: token ids, positions and segments (0: the shared context).
    pub ids: Vec<i64>,
    pub pos: Vec<i64>,
    pub seg: Vec<i64>,
}

impl Hf {
    /// Whether `d`'s rows go through the prefix cache: it is on, and a key depends only on the
    /// tokens before it (not under LongRoPE, whose factors follow each row's length).
    pub(super) fn prefix_on(&self, d: &dyn CausalLm) -> bool {
        self.prefix.borrow().enabled() && d.packs()
    }

    /// Final hidden states `[B, T', H]` of `rows` at the positions `out[r]` of each (indices into
    /// its `ids`, past its `cacheable` tokens; at least one a row), with each row's cached prefix
    /// taken from the cache. Each row's `store` tokens are cached afterwards.
    pub(super) fn forward_prefixed(&self, d: &dyn CausalLm, rows: &[PrefixedRow], segments: bool, out: &[Vec<usize>]) -> Result<Tensor, EngineError> {
        let mut tree = self.prefix.borrow_mut();
        // Each distinct cached prefix gathered once per layer ([kv_heads, len, D]), rows pointing at it.
        let mut hits: Vec<(usize, Vec<(Tensor, Tensor)>)> = Vec::new();
        let mut seen: Vec<(usize, usize, usize)> = Vec::new();
        let mut row_hit = Vec::with_capacity(rows.len());
        for row in rows {
            let hit = tree.lookup(row.cacheable);
            if hit.len == 0 {
                row_hit.push(None);
                continue;
            }
            let (last, used) = hit.parts.last().map(|(v, n)| (*v as *const Kv as usize, *n)).expect("a hit has parts");
            let key = (hit.len, last, used);
            if let Some(i) = seen.iter().position(|k| *k == key) {
                row_hit.push(Some(i));
                continue;
            }
            let layers = gather(&hit, d.num_layers());
            seen.push(key);
            row_hit.push(Some(hits.len()));
            hits.push((hit.len, layers));
        }
        let skip: Vec<usize> = row_hit.iter().map(|h| h.map_or(0, |i| hits[i].0)).collect();
        let past_len = skip.iter().copied().max().unwrap_or(0) as i64;
        let new: Vec<&[i64]> = rows.iter().zip(&skip).map(|(r, &s)| &r.ids[s..]).collect();
        let t = new.iter().map(|n| n.len()).max().unwrap_or(0) as i64;
        let b = rows.len() as i64;
        let device = self.device;
        // Keys: the cached prefix, left-padded to `past_len`, then the new tokens, left-padded to T.
        let past: Vec<(Tensor, Tensor)> = match hits.is_empty() {
            true => Vec::new(),
            false => (0..d.num_layers())
                .map(|l| {
                    let stacked = |pick: fn(&(Tensor, Tensor)) -> &Tensor| {
                        let first = pick(&hits[0].1[l]);
                        let (kvh, dim) = (first.size()[0], first.size()[2]);
                        let pad = |n: i64| Tensor::zeros([kvh, n, dim], (first.kind(), device));
                        let mut each: Vec<Tensor> = hits.iter().map(|(n, layers)| Tensor::cat(&[pad(past_len - *n as i64), pick(&layers[l]).shallow_clone()], 1)).collect();
                        each.push(pad(past_len));
                        let none = hits.len() as i64;
                        let index: Vec<i64> = row_hit.iter().map(|h| h.map_or(none, |i| i as i64)).collect();
                        Tensor::stack(&each, 0).index_select(0, &Tensor::from_slice(&index).to_device(device))
                    };
                    (stacked(|kv| &kv.0), stacked(|kv| &kv.1))
                })
                .collect(),
        };
        let keep = pad_left(&new.iter().map(|n| vec![1i64; n.len()]).collect::<Vec<_>>(), device);
        // Each row's positions (or segments) past its cached prefix.
        let tail = |of: for<'r> fn(&'r PrefixedRow<'_>) -> &'r [i64]| -> Vec<Vec<i64>> { rows.iter().zip(&skip).map(|(r, &s)| of(r)[s..].to_vec()).collect() };
        let pos = pad_left(&tail(|r| &r.pos), device);
        let segs = segments.then(|| pad_left(&tail(|r| &r.seg), device));
        let layout = match (past_len, segs) {
            // Nothing cached: the layout of a forward without the cache (dense rows attend causally
            // with no mask).
            (0, None) => Layout::new(pos, &keep, new.iter().all(|n| n.len() as i64 == t)),
            (0, Some(q)) => Layout::packed(pos, q, &keep),
            (_, segs) => {
                let key_past: Vec<i64> = skip.iter().flat_map(|&s| std::iter::repeat_n(-1, past_len as usize - s).chain(0..s as i64)).collect();
                let key_past = Tensor::from_slice(&key_past).view([b, past_len]).to_device(device);
                let key_pos = Tensor::cat(&[key_past, pos.where_scalarother(&keep.ne(0), -1)], 1);
                let segs = segs.map(|q| (q.shallow_clone(), Tensor::cat(&[Tensor::zeros([b, past_len], (Kind::Int64, device)), q], 1)));
                Layout::general(pos, key_pos, segs, &keep)
            }
        };
        let ids = pad_left(&new.iter().map(|n| n.to_vec()).collect::<Vec<_>>(), device);
        // Copy out what is new of each row's `store` tokens (the new tokens sit at the end of T).
        let stored: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].store.len() > skip[r]).collect();
        let keep_cols = stored.iter().map(|&r| (r as i64, t - new[r].len() as i64, (rows[r].store.len() - skip[r]) as i64)).collect();
        let mut cache = KvCache::extend(past, keep_cols);
        // Row r's new tokens are the last of its T columns (left padding).
        let columns: Vec<Vec<i64>> = out.iter().zip(rows).map(|(o, r)| o.iter().map(|&p| t - r.ids.len() as i64 + p as i64).collect()).collect();
        let hidden = d.forward_to(&ids, &layout, Some(&mut cache), Some(&Outputs::new(&columns, &layout)));
        let kept = match cache.write {
            super::layers::Write::Extend { kept, .. } => kept,
            _ => unreachable!("an extend cache"),
        };
        for (j, &r) in stored.iter().enumerate() {
            let from_skip = skip[r];
            tree.insert(rows[r].store, |from| {
                // Only what this forward computed can be stored (the rest was evicted meanwhile).
                let off = from.checked_sub(from_skip)? as i64;
                Some(Kv(kept.iter().map(|layer| {
                    let (k, v) = &layer[j];
                    let n = k.size()[1];
                    (k.narrow(1, off, n - off), v.narrow(1, off, n - off))
                }).collect()))
            });
        }
        Ok(hidden)
    }

    /// Computes once, and caches, the prefixes rows of this batch share (beyond what is cached)
    /// when at least [`MIN_SHARED`] tokens long: for each of `contexts` (the part that may come
    /// from the cache), the longest prefix it shares with another. Done before the batch's own
    /// forward, whose rows then find them cached.
    pub(super) fn prefill_shared(&self, d: &dyn CausalLm, contexts: &[&[u32]]) -> Result<(), EngineError> {
        let mut order: Vec<usize> = (0..contexts.len()).collect();
        order.sort_by_key(|&i| contexts[i]);
        let lcp = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
        let tree = self.prefix.borrow();
        let mut wanted: Vec<&[u32]> = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let before = k.checked_sub(1).map_or(0, |p| lcp(contexts[order[p]], contexts[i]));
            let after = order.get(k + 1).map_or(0, |&n| lcp(contexts[n], contexts[i]));
            let shared = &contexts[i][..before.max(after)];
            if shared.len() >= tree.cached_len(shared) + MIN_SHARED && !wanted.contains(&shared) {
                wanted.push(shared);
            }
        }
        drop(tree);
        if wanted.is_empty() {
            return Ok(());
        }
        let rows: Vec<PrefixedRow> = wanted
            .iter()
            .map(|s| PrefixedRow { cacheable: &s[..s.len() - 1], store: s, ids: s.iter().map(|&t| i64::from(t)).collect(), pos: (0..s.len() as i64).collect(), seg: vec![0; s.len()] })
            .collect();
        // Only their keys and values are wanted: the last layer runs one query a row.
        let last: Vec<Vec<usize>> = rows.iter().map(|r| vec![r.ids.len() - 1]).collect();
        self.forward_prefixed(d, &rows, false, &last).map(|_| ())
    }
}
