//! The layers every architecture builds from: linear, norms, MLPs, rotary embeddings with their
//! scaling types, attention with its mask and KV cache. Numerics follow transformers' eager
//! implementations: RMSNorm and softmax in f32, RoPE from f32 inverse frequencies.

use tch::{Device, Kind, Tensor};

use crate::hf_config::{Rope, RopeScaling};
use super::weights::Scope;
use super::EngineError;

/// `x·wᵀ + b`. On CPU in f32 the weight is held in oneDNN's blocked layout, packed once at load
/// instead of by every call: oneDNN's AVX-512 kernels run these GEMMs at 1.3–3× MKL's on the AMD
/// EPYC hosts we measure on (MKL takes its AVX2 path there; `loadtest/README.md`), with the same
/// f32 arithmetic in another order (outputs within 1e-5). `JETBATCH_CPU_GEMM=mkl` keeps the
/// dense weight and PyTorch's default GEMM.
pub(crate) struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    rows: i64,
}

/// Whether CPU f32 weights are packed for oneDNN (read once: `JETBATCH_CPU_GEMM`).
fn onednn() -> bool {
    static ONEDNN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONEDNN.get_or_init(|| std::env::var("JETBATCH_CPU_GEMM").map_or(true, |v| !v.eq_ignore_ascii_case("mkl")))
}

impl Linear {
    /// A projection of weight `[out, in]`.
    pub fn new(w: Tensor, b: Option<Tensor>) -> Linear {
        let rows = w.size()[0];
        let packs = w.device() == Device::Cpu && w.kind() == Kind::Float && onednn();
        Linear { w: if packs { w.contiguous().to_mkldnn() } else { w }, b, rows }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if !self.w.is_mkldnn() {
            return x.linear(&self.w, self.b.as_ref());
        }
        let mut shape = x.size();
        let flat = x.reshape([-1, *shape.last().expect("a hidden dimension")]).contiguous();
        *shape.last_mut().expect("a hidden dimension") = self.rows;
        flat.to_mkldnn().mkldnn_linear(&self.w, self.b.as_ref()).to_dense(None, false).view(shape.as_slice())
    }

    /// Its weight has `rows` output rows (a fused checkpoint's parts add up), else a load error.
    pub fn expect_rows(self, rows: i64, name: &str) -> Result<Linear, EngineError> {
        match self.rows == rows {
            true => Ok(self),
            false => Err(EngineError::Load(format!("{name}: {} output rows, the config implies {rows}", self.rows))),
        }
    }

    /// One projection of several over the same input (weights and biases, `[a + b + …, in]`):
    /// one GEMM instead of several smaller ones, which matters most to decode steps of small
    /// models (each op is a parallel region). A part without a bias gets zeros where another has
    /// one.
    pub fn fuse(parts: Vec<(Tensor, Option<Tensor>)>) -> Linear {
        let w = Tensor::cat(&parts.iter().map(|(w, _)| w).collect::<Vec<_>>(), 0);
        let b = parts.iter().any(|(_, b)| b.is_some()).then(|| {
            let each: Vec<Tensor> = parts.iter().map(|(w, b)| b.as_ref().map_or_else(|| Tensor::zeros([w.size()[0]], (w.kind(), w.device())), Tensor::shallow_clone)).collect();
            Tensor::cat(&each, 0)
        });
        Linear::new(w, b)
    }
}

pub(crate) enum Norm {
    /// Llama's RMSNorm: `w * normed.to(kind)`.
    Rms { w: Tensor, eps: f64 },
    /// Gemma's: `(normed * (1 + w)).to(kind)`, all in f32 (`w1` holds `1 + w` in f32).
    RmsUnitOffset { w1: Tensor, eps: f64 },
    Layer { w: Tensor, b: Tensor, eps: f64 },
}

impl Norm {
    pub fn rms(s: &Scope, name: &str, eps: f64) -> Result<Norm, EngineError> {
        Ok(Norm::Rms { w: s.pp(name).get("weight")?, eps })
    }

    pub fn rms_unit_offset(s: &Scope, name: &str, eps: f64) -> Result<Norm, EngineError> {
        Ok(Norm::RmsUnitOffset { w1: s.pp(name).get("weight")?.to_kind(Kind::Float) + 1.0, eps })
    }

    pub fn layer(s: &Scope, name: &str, eps: f64) -> Result<Norm, EngineError> {
        let s = s.pp(name);
        Ok(Norm::Layer { w: s.get("weight")?, b: s.get("bias")?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let rms = |h: &Tensor, eps: f64| {
            let var = h.pow_tensor_scalar(2).mean_dim(Some([-1i64].as_slice()), true, Kind::Float);
            h * (var + eps).rsqrt()
        };
        match self {
            Norm::Rms { w, eps } => w * rms(&x.to_kind(Kind::Float), *eps).to_kind(x.kind()),
            Norm::RmsUnitOffset { w1, eps } => (rms(&x.to_kind(Kind::Float), *eps) * w1).to_kind(x.kind()),
            Norm::Layer { w, b, eps } => x.layer_norm([*w.size().last().expect("1-d")], Some(w), Some(b), *eps, false),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Act {
    Silu,
    /// `gelu_pytorch_tanh`, `gelu_new`.
    GeluTanh,
    /// Exact (erf) GELU.
    Gelu,
}

impl Act {
    /// transformers' `ACT2FN` names we implement.
    pub fn parse(name: &str) -> Result<Act, String> {
        Ok(match name {
            "silu" | "swish" => Act::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Act::GeluTanh,
            "gelu" => Act::Gelu,
            other => return Err(format!("activation '{other}' is not supported (silu, gelu, gelu_pytorch_tanh, gelu_new)")),
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Act::Silu => x.silu(),
            Act::GeluTanh => x.gelu("tanh"),
            Act::Gelu => x.gelu("none"),
        }
    }
}

pub(crate) enum Mlp {
    /// `down(act(gate(x)) * up(x))` (SwiGLU, GeGLU), gate and up fused (see [`Linear::fuse`]).
    Gated { gate_up: Linear, down: Linear, act: Act },
    /// `proj(act(fc(x)))`.
    Plain { fc: Linear, proj: Linear, act: Act },
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Gated { gate_up, down, act } => {
                let y = gate_up.forward(x);
                let half = y.size().last().copied().expect("features") / 2;
                down.forward(&(act.forward(&y.narrow(-1, 0, half)) * y.narrow(-1, half, half)))
            }
            Mlp::Plain { fc, proj, act } => proj.forward(&act.forward(&fc.forward(x))),
        }
    }
}

/// Inverse frequencies for `head_dim`, as transformers computes them (scaling included); for
/// LongRoPE, the short factors (`long` picks the long ones).
pub(crate) fn inv_freq(rope: &Rope, head_dim: usize, long: bool) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let f = 1.0 / (rope.theta as f32).powf((2 * i) as f32 / head_dim as f32);
            match &rope.scaling {
                RopeScaling::None => f,
                RopeScaling::Linear { factor } => (f as f64 / factor) as f32,
                RopeScaling::LongRope { short_factor, long_factor, .. } => {
                    let ext = if long { long_factor } else { short_factor };
                    // transformers: 1 / (ext * base ** (arange(0, dim, 2) / dim)), in f32.
                    1.0 / (ext[i] as f32 * (rope.theta as f32).powf((2 * i) as f32 / head_dim as f32))
                }
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: orig } => {
                    let (low_wavelen, high_wavelen) = (orig / low_freq_factor, orig / high_freq_factor);
                    let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        (f as f64 / factor) as f32
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * f as f64 / factor + smooth * f as f64) as f32
                    }
                }
            }
        })
        .collect()
}

/// Rotary position embedding of one head size: f32 inverse frequencies and a cos/sin scale.
/// With LongRoPE, a row whose sequence is longer than `original_max_position_embeddings` (its
/// largest position + 1, as transformers decides per forward) uses the long factors.
pub(crate) struct Rotary {
    inv_freq: Tensor,
    long: Option<(Tensor, f64)>,
    scale: f64,
}

impl Rotary {
    pub fn new(rope: &Rope, head_dim: usize, device: Device) -> Result<Rotary, EngineError> {
        let freqs = |long: bool| Tensor::from_slice(&inv_freq(rope, head_dim, long)).to_device(device);
        let (scale, long) = match &rope.scaling {
            RopeScaling::LongRope { short_factor, long_factor, attention_factor, original_max_position_embeddings } => {
                if short_factor.len() != head_dim / 2 || long_factor.len() != head_dim / 2 {
                    return Err(EngineError::Load(format!("config.json: longrope short_factor and long_factor must have head_dim / 2 = {} entries", head_dim / 2)));
                }
                (*attention_factor, Some((freqs(true), *original_max_position_embeddings)))
            }
            _ => (1.0, None),
        };
        Ok(Rotary { inv_freq: freqs(false), long, scale })
    }

    /// `cos, sin` `[B, 1, T, D]` for positions `pos [B, T]`, in `kind`.
    /// Whether a row's factors depend on its largest position (LongRoPE).
    pub fn varies_by_length(&self) -> bool {
        self.long.is_some()
    }

    pub fn cos_sin(&self, pos: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let inv = match &self.long {
            None => self.inv_freq.view([1, 1, -1]),
            Some((long, original)) => {
                let is_long = (pos.amax([-1i64].as_slice(), true) + 1).gt(*original).unsqueeze(-1);
                long.view([1, 1, -1]).where_self(&is_long, &self.inv_freq.view([1, 1, -1]))
            }
        };
        let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * inv;
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = if self.scale == 1.0 { (emb.cos(), emb.sin()) } else { (emb.cos() * self.scale, emb.sin() * self.scale) };
        (cos.to_kind(kind).unsqueeze(1), sin.to_kind(kind).unsqueeze(1))
    }
}

pub(crate) fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().expect("head dim") / 2;
    Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)
}

pub(crate) fn apply_rotary(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> Tensor {
    x * cos + rotate_half(x) * sin
}

pub(crate) fn min_value(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// Where a padded batch's real tokens are: `[B·T, C]` rows packed to `[N, C]` and back. The
/// token-wise layers (embeddings, norms, projections, MLPs) run on the packed rows, so padding
/// costs them no arithmetic (a batch of questions of mixed lengths pads a fifth to a third of its
/// columns); only attention, which needs rows, sees the padded shape.
pub(crate) enum Tokens {
    /// No padding: packed is padded.
    Dense,
    /// The flat indices of the real tokens, and `B·T`.
    Some(Tensor, i64),
}

impl Tokens {
    /// The real tokens of `keep [B, T]` (non-zero: real).
    pub fn of(keep: &Tensor) -> Tokens {
        let all = keep.numel() as i64;
        let at = keep.reshape([-1]).nonzero().squeeze_dim(1);
        match at.size()[0] == all {
            true => Tokens::Dense,
            false => Tokens::Some(at, all),
        }
    }

    /// `[B·T, …]` → the real tokens' rows `[N, …]`.
    pub fn pack(&self, padded: &Tensor) -> Tensor {
        match self {
            Tokens::Dense => padded.shallow_clone(),
            Tokens::Some(at, _) => padded.index_select(0, at),
        }
    }

    /// `[N, C]` → `[B·T, C]`, zeros at the padding.
    pub fn unpack(&self, packed: &Tensor) -> Tensor {
        match self {
            Tokens::Dense => packed.shallow_clone(),
            Tokens::Some(at, all) => Tensor::zeros([*all, packed.size()[1]], (packed.kind(), packed.device())).index_copy(0, at, packed),
        }
    }

    /// The packed row of each flat index `[M]` (of real tokens).
    fn rows_of(&self, flat: &Tensor) -> Tensor {
        match self {
            Tokens::Dense => flat.shallow_clone(),
            Tokens::Some(at, all) => {
                let rows = Tensor::arange(at.size()[0], (Kind::Int64, at.device()));
                Tensor::zeros([*all], (Kind::Int64, at.device())).index_copy(0, at, &rows).index_select(0, flat)
            }
        }
    }
}

/// Who attends to whom in one forward: the position of every query `[B, T]` and of every key
/// `[B, S]` (the cached keys, then the new ones; -1 for padding), and, for rows packing several
/// sequences, their segments. A query sees the real keys at or before its position (within a
/// window, if given) of its own segment or of segment 0, which every segment shares. Which
/// queries are real ([`Tokens`]) says where the token-wise layers run.
pub(crate) struct Layout {
    pub pos: Tensor,
    key_pos: Tensor,
    /// Segments of the queries `[B, T]` and keys `[B, S]`.
    segments: Option<(Tensor, Tensor)>,
    /// Every row is T real tokens and nothing is cached: plain causal attention, which SDPA
    /// runs without a mask.
    dense: bool,
    tokens: Tokens,
}

impl Layout {
    /// Queries at `pos` over keys `keep [B, T]` (which tokens are real; a row's real keys are its
    /// tokens in order, so a key's position is the count of real keys before it).
    pub fn new(pos: Tensor, keep: &Tensor, dense: bool) -> Layout {
        let key_pos = counted(keep);
        let tokens = if dense { Tokens::Dense } else { Tokens::of(keep) };
        Layout { pos, key_pos, segments: None, dense, tokens }
    }

    /// One new query a row (a decode step), at `pos [B, 1]`, over its cached keys `keep [B, S]`
    /// (positioned as in [`Layout::new`]).
    pub fn step(pos: Tensor, keep: &Tensor) -> Layout {
        Layout { pos, key_pos: counted(keep), segments: None, dense: false, tokens: Tokens::Dense }
    }

    /// Packed rows: a shared context (segment 0) and continuations (segments 1, 2, …) after it,
    /// whose positions continue the context's; `pos`, `segments [B, T]` of the new tokens, which
    /// are all the keys (nothing is cached), `keep` says which are real.
    pub fn packed(pos: Tensor, segments: Tensor, keep: &Tensor) -> Layout {
        let key_pos = pos.where_scalarother(&keep.ne(0), -1);
        Layout { pos, key_pos, segments: Some((segments.shallow_clone(), segments)), dense: false, tokens: Tokens::of(keep) }
    }

    /// Queries at `pos [B, T]` (`keep` marks the real ones) over keys at `key_pos [B, S]` (-1:
    /// padding), with the segments of queries `[B, T]` and keys `[B, S]` where rows pack several
    /// sequences: the general form, for keys that are not all new (cached prefixes before the
    /// new tokens).
    pub fn general(pos: Tensor, key_pos: Tensor, segments: Option<(Tensor, Tensor)>, keep: &Tensor) -> Layout {
        Layout { pos, key_pos, segments, dense: false, tokens: Tokens::of(keep) }
    }

    /// The real tokens' rows `[N, …]` of `x [B, T, …]` (or of ids `[B, T]`).
    pub fn pack(&self, x: &Tensor) -> Tensor {
        let mut flat = x.size();
        let bt = flat.remove(0) * flat.remove(0);
        flat.insert(0, bt);
        self.tokens.pack(&x.reshape(flat.as_slice()))
    }

    /// Final hidden states `[N, H]` (or `[B·T', H]` of `out`'s columns) as `[B, T, H]` (`[B, T',
    /// H]`); padding columns hold zeros.
    pub fn unpack(&self, x: &Tensor, out: Option<&Outputs>) -> Tensor {
        let (b, h) = (self.pos.size()[0], x.size()[1]);
        match out {
            Some(_) => x.view([b, -1, h]),
            None => self.tokens.unpack(x).view([b, -1, h]),
        }
    }

    /// `[N, C]` of the real tokens as `[B, T, C]`.
    fn rows(&self, x: &Tensor) -> Tensor {
        let s = self.pos.size();
        self.tokens.unpack(x).view([s[0], s[1], -1])
    }

    /// The mask of attention within `window` (positions) if given, for scores in `kind`.
    pub fn mask(&self, window: Option<i64>, kind: Kind) -> AttnMask {
        let t = self.pos.size()[1];
        if self.dense && window.is_none_or(|w| w >= t) {
            return AttnMask::Causal;
        }
        let q = self.pos.unsqueeze(2);
        let k = self.key_pos.unsqueeze(1);
        let mut allowed = k.ge(0).logical_and(&k.le_tensor(&q));
        if let Some(w) = window {
            allowed = allowed.logical_and(&(&q - &k).lt(w));
        }
        if let Some((sq, sk)) = &self.segments {
            let sk = sk.unsqueeze(1);
            allowed = allowed.logical_and(&sk.eq(0).logical_or(&sk.eq_tensor(&sq.unsqueeze(2))));
        }
        let (b, s) = (allowed.size()[0], allowed.size()[2]);
        // Additive with a finite minimum (as transformers): a query that sees no key (padding)
        // averages all of them instead of producing NaN.
        AttnMask::Additive(Tensor::zeros([b, 1, t, s], (kind, q.device())).masked_fill(&allowed.logical_not().unsqueeze(1), min_value(kind)))
    }
}

/// The positions of keys `keep [B, S]`: the count of real keys before each, -1 for padding.
fn counted(keep: &Tensor) -> Tensor {
    (keep.cumsum(1, Kind::Int64) - 1).where_scalarother(&keep.ne(0), -1)
}

/// The columns of a forward whose final hidden states are used (the scored positions; a
/// prefill's last token), `[B, T']` (a row with fewer repeats one). Only the last layer's output
/// feeds nothing but the result: it runs attention queries, the output projection and the MLP
/// for these columns alone, while every column still gives its keys and values (to the cache,
/// and to the earlier layers). The same arithmetic for the columns kept, none for the rest.
pub(crate) struct Outputs {
    index: Tensor,
    /// The packed rows ([`Tokens`]) of these columns, `[B·T']`.
    rows: Tensor,
    /// The layout with only these queries.
    layout: Layout,
}

impl Outputs {
    /// `columns[r]`: the columns of row r (in `0..T`) whose hidden states are wanted, in the
    /// order the result gives them; at least one a row.
    pub fn new(columns: &[Vec<i64>], layout: &Layout) -> Outputs {
        let width = columns.iter().map(Vec::len).max().unwrap_or(1);
        let flat: Vec<i64> = columns.iter().flat_map(|c| (0..width).map(move |j| c[j.min(c.len() - 1)])).collect();
        let index = Tensor::from_slice(&flat).view([columns.len() as i64, width as i64]).to_device(layout.pos.device());
        let segments = layout.segments.as_ref().map(|(q, k)| (q.gather(1, &index, false), k.shallow_clone()));
        let t = layout.pos.size()[1];
        let flat = (&index + Tensor::arange(columns.len() as i64, (Kind::Int64, index.device())).unsqueeze(1) * t).view([-1]);
        let rows = layout.tokens.rows_of(&flat);
        let layout = Layout { pos: layout.pos.gather(1, &index, false), key_pos: layout.key_pos.shallow_clone(), segments, dense: false, tokens: Tokens::Dense };
        Outputs { index, rows, layout }
    }

    /// Which of `layers` layers (this is `i`) runs on the outputs' columns alone: the last.
    pub fn at_layer(out: Option<&Outputs>, i: usize, layers: usize) -> Option<&Outputs> {
        out.filter(|_| i + 1 == layers)
    }

    /// The mask of the kept queries (see [`Layout::mask`]).
    pub fn mask(&self, window: Option<i64>, kind: Kind) -> AttnMask {
        self.layout.mask(window, kind)
    }

    /// The kept columns of the packed `x [N, H]` (`[B·T', H]`) where a layer runs on `out`'s alone.
    pub fn pick_of(out: Option<&Outputs>, x: Tensor) -> Tensor {
        match out {
            Some(o) => x.index_select(0, &o.rows),
            None => x,
        }
    }

    /// The kept queries of `q [B, heads, T, D]`: `[B, heads, T', D]`.
    fn pick_heads(&self, q: &Tensor) -> Tensor {
        let s = q.size();
        q.gather(2, &self.index.view([s[0], 1, -1, 1]).expand([-1, s[1], -1, s[3]], false), false)
    }
}

pub(crate) enum AttnMask {
    /// Query i sees keys 0..=i.
    Causal,
    /// `[B, 1, T, S]`, added to the scores.
    Additive(Tensor),
}

/// The additive key mask `[B, 1, 1, T]` of right-padded encoder rows.
pub(crate) fn key_mask(keep: &Tensor, kind: Kind) -> Tensor {
    let (b, t) = (keep.size()[0], keep.size()[1]);
    Tensor::zeros([b, 1, 1, t], (kind, keep.device())).masked_fill(&keep.eq(0).view([b, 1, 1, t]), min_value(kind))
}

/// Rows of the cache allocated at a time.
const CACHE_ROW_BLOCK: i64 = 8;
/// Key positions allocated at a time.
const CACHE_COL_BLOCK: i64 = 64;

/// The KV cache of a generation batch, preallocated: per layer, keys and values `[slots,
/// kv_heads, columns, D]`, grown by blocks of slots and columns (never per step). Row r of the
/// running batch is slot r and holds its tokens in columns 0..len (left-aligned: a key's column is
/// its position), so the rows attended are a view of the first slots, and each step writes its
/// new keys in place.
pub(crate) struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Allocated slots and columns (layers are allocated at their first write).
    rows: i64,
    cols: i64,
    pub write: Write,
}

/// Where a forward puts its keys and values.
pub(crate) enum Write {
    /// `n` joining rows, right-padded to T, into slots `first..first + n`, columns 0..T; they
    /// attend to their own keys only.
    Prefill { first: i64 },
    /// One new key per running row (slot b) at column `cols[b]`; rows attend to columns 0..`len`.
    Decode { cols: Tensor, len: i64 },
    /// `n` joining rows whose slots `first..first + n` already hold a cached prefix: new key j of
    /// row r goes to column `cols[r][j]`; the rows attend to columns 0..`len` of their slots.
    PrefillOver { first: i64, cols: Tensor, len: i64 },
    /// Rows over cached prefixes: each layer's new keys and values follow `past` (that layer's
    /// cached ones, `[B, kv_heads, P, D]`; none: nothing cached), and the columns `keep` names
    /// (row, first column, count) of the new ones are copied out into `kept` (per layer, per
    /// entry of `keep`) for the prefix cache.
    Extend { past: Vec<(Tensor, Tensor)>, keep: Vec<(i64, i64, i64)>, kept: Vec<Vec<(Tensor, Tensor)>> },
}

impl KvCache {
    pub fn new(layers: usize) -> KvCache {
        KvCache { layers: (0..layers).map(|_| None).collect(), rows: 0, cols: 0, write: Write::Prefill { first: 0 } }
    }

    /// A forward over cached prefixes (see [`Write::Extend`]); nothing is allocated.
    pub fn extend(past: Vec<(Tensor, Tensor)>, keep: Vec<(i64, i64, i64)>) -> KvCache {
        KvCache { layers: Vec::new(), rows: 0, cols: 0, write: Write::Extend { past, keep, kept: Vec::new() } }
    }

    /// Room for `rows` slots of `cols` keys, rounded up to whole blocks; growing copies the cache
    /// once.
    pub fn reserve(&mut self, rows: i64, cols: i64) {
        if rows <= self.rows && cols <= self.cols {
            return;
        }
        let round = |n: i64, block: i64| (n + block - 1) / block * block;
        let (rows, cols) = (round(rows.max(self.rows), CACHE_ROW_BLOCK), round(cols.max(self.cols), CACHE_COL_BLOCK));
        let grow = |t: &Tensor| {
            let s = t.size();
            let bigger = Tensor::zeros([rows, s[1], cols, s[3]], (t.kind(), t.device()));
            bigger.narrow(0, 0, s[0]).narrow(2, 0, s[2]).copy_(t);
            bigger
        };
        for (k, v) in self.layers.iter_mut().flatten() {
            (*k, *v) = (grow(k), grow(v));
        }
        (self.rows, self.cols) = (rows, cols);
    }

    /// Moves slot `from` into slot `to` (columns 0..`len`): a leaving row's slot taken by the last
    /// row, so the running rows stay the first slots without copying the others.
    pub fn move_slot(&mut self, from: i64, to: i64, len: i64) {
        for (k, v) in self.layers.iter_mut().flatten() {
            for t in [k, v] {
                let src = t.narrow(0, from, 1).narrow(2, 0, len).copy();
                t.narrow(0, to, 1).narrow(2, 0, len).copy_(&src);
            }
        }
    }

    /// Writes a cached prefix (per layer `[kv_heads, n, D]`) into columns 0..n of `slot`.
    pub fn copy_in(&mut self, slot: i64, prefix: &[(Tensor, Tensor)]) {
        let (rows, cols) = (self.rows, self.cols);
        for (layer, (k, v)) in self.layers.iter_mut().zip(prefix) {
            let (ck, cv) = layer.get_or_insert_with(|| {
                let s = k.size();
                let alloc = || Tensor::zeros([rows, s[0], cols, s[2]], (k.kind(), k.device()));
                (alloc(), alloc())
            });
            let n = k.size()[1];
            ck.get(slot).narrow(1, 0, n).copy_(k);
            cv.get(slot).narrow(1, 0, n).copy_(v);
        }
    }

    /// Copies columns `from..to` of `slot` out of every layer (`[kv_heads, to - from, D]`).
    pub fn copy_out(&self, slot: i64, from: i64, to: i64) -> Vec<(Tensor, Tensor)> {
        self.layers.iter().flatten().map(|(k, v)| (k.get(slot).narrow(1, from, to - from).copy(), v.get(slot).narrow(1, from, to - from).copy())).collect()
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|(k, v)| (k.numel() * k.kind().elt_size_in_bytes() + v.numel() * v.kind().elt_size_in_bytes()) as u64).sum()
    }

    /// Writes layer `i`'s new keys and values `[B, kv_heads, T, D]`; returns those to attend over.
    fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        if let Write::Extend { past, keep, kept } = &mut self.write {
            let columns = |t: &Tensor, &(r, c, n): &(i64, i64, i64)| t.get(r).narrow(1, c, n).copy();
            kept.push(keep.iter().map(|at| (columns(&k, at), columns(&v, at))).collect());
            return match past.get(i) {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2), Tensor::cat(&[pv, &v], 2)),
                None => (k, v),
            };
        }
        let (rows, cols) = (self.rows, self.cols);
        let (ck, cv) = self.layers[i].get_or_insert_with(|| {
            let s = k.size();
            let alloc = || Tensor::zeros([rows, s[1], cols, s[3]], (k.kind(), k.device()));
            (alloc(), alloc())
        });
        match &self.write {
            Write::Prefill { first } => {
                let (n, t) = (k.size()[0], k.size()[2]);
                ck.narrow(0, *first, n).narrow(2, 0, t).copy_(&k);
                cv.narrow(0, *first, n).narrow(2, 0, t).copy_(&v);
                (k, v)
            }
            Write::Decode { cols, len } => {
                let b = k.size()[0];
                let slots = Tensor::arange(b, (Kind::Int64, k.device()));
                let at = [Some(slots), None, Some(cols.shallow_clone())];
                let _ = ck.index_put_(&at, &k.squeeze_dim(2), false);
                let _ = cv.index_put_(&at, &v.squeeze_dim(2), false);
                (ck.narrow(0, 0, b).narrow(2, 0, *len), cv.narrow(0, 0, b).narrow(2, 0, *len))
            }
            Write::PrefillOver { first, cols, len } => {
                let n = k.size()[0];
                let slots = Tensor::arange_start(*first, *first + n, (Kind::Int64, k.device())).unsqueeze(1);
                // Advanced indices apart: the values' dims are [n, T, kv_heads, D].
                let at = [Some(slots), None, Some(cols.shallow_clone())];
                let _ = ck.index_put_(&at, &k.permute([0, 2, 1, 3]), false);
                let _ = cv.index_put_(&at, &v.permute([0, 2, 1, 3]), false);
                (ck.narrow(0, *first, n).narrow(2, 0, *len), cv.narrow(0, *first, n).narrow(2, 0, *len))
            }
            Write::Extend { .. } => unreachable!("handled above"),
        }
    }
}

/// Multi-head attention with grouped KV heads: projections, then (for the caller's hooks, such
/// as q/k norms) `attend` with rotary positions, the cache, soft-capping and the output
/// projection.
pub(crate) struct Attention {
    /// q, k and v fused (see [`Linear::fuse`]): `[(heads + 2 kv_heads) × head_dim, hidden]`.
    pub qkv: Linear,
    pub o: Linear,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// Multiplies `q·k` (`1/sqrt(head_dim)` unless configured).
    pub scale: f64,
    /// `cap * tanh(scores / cap)` before the mask (Gemma 2).
    pub softcap: Option<f64>,
}

impl Attention {
    /// `q, k, v` `[B, heads, T, D]` of the packed `h [N, H]` of `layout`'s real tokens (zeros at
    /// the padding).
    pub fn qkv(&self, h: &Tensor, layout: &Layout) -> (Tensor, Tensor, Tensor) {
        let y = layout.rows(&self.qkv.forward(h));
        let (b, t) = (y.size()[0], y.size()[1]);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let split = |from: i64, n: i64| y.narrow(-1, from, n * self.head_dim).view([b, t, n, self.head_dim]).transpose(1, 2);
        (split(0, self.heads), split(q, self.kv_heads), split(q + kv, self.kv_heads))
    }

    /// Attention of `q` over `k, v` (written to layer `i` of the cache, and then over the keys it
    /// holds): packed `[N, H]` as `layout` says, or `[B·T', H]` for the queries of `out` alone
    /// (whose mask `mask` is).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(&self, q: Tensor, k: Tensor, v: Tensor, rope: Option<&(Tensor, Tensor)>, mask: &AttnMask, layout: &Layout, out: Option<&Outputs>, cache: Option<(&mut KvCache, usize)>) -> Tensor {
        let (q, k, v) = match rope {
            Some(cs) => (apply_rotary(&q, cs), apply_rotary(&k, cs), v),
            None => (q, k, v),
        };
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, k, v),
            None => (k, v),
        };
        let q = match out {
            Some(o) => o.pick_heads(&q),
            None => q,
        };
        let (b, t) = (q.size()[0], q.size()[2]);
        let attn = match (self.softcap, mask) {
            // One query a row (a decode step): two batched GEMMs. The fused CPU kernel would make
            // a GEMV call per row, head and block of keys (its share of a 64-row step was 39 %).
            (None, AttnMask::Additive(_)) if t == 1 && q.device() == Device::Cpu => self.explicit(&q, &k, &v, None, mask),
            // The fused kernel (flash on CPU and for unpadded causal rows on CUDA, memory-efficient
            // with a mask) reads grouped KV heads in place (`enable_gqa`).
            (None, AttnMask::Causal) => Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, self.scale, self.kv_heads < self.heads),
            (None, AttnMask::Additive(m)) => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, self.scale, self.kv_heads < self.heads),
            (Some(cap), mask) => self.explicit(&q, &k, &v, Some(cap), mask),
        };
        let flat = attn.transpose(1, 2).contiguous().view([b * t, self.heads * self.head_dim]);
        self.o.forward(&if out.is_some() { flat } else { layout.tokens.pack(&flat) })
    }

    /// Attention spelled out (soft-capped with `cap`: no fused kernel caps scores): each group of
    /// query heads against its KV head by broadcasting, without copying K/V per query head.
    fn explicit(&self, q: &Tensor, k: &Tensor, v: &Tensor, cap: Option<f64>, mask: &AttnMask) -> Tensor {
        let (b, t, s, d) = (q.size()[0], q.size()[2], k.size()[2], self.head_dim);
        let (kind, g) = (q.kind(), self.heads / self.kv_heads);
        let q = q.reshape([b, self.kv_heads, g * t, d]);
        let scores = q.matmul(&k.transpose(-2, -1)) * self.scale;
        let scores = match cap {
            Some(cap) => (scores / cap).tanh() * cap,
            None => scores,
        }
        .view([b, self.heads, t, s]);
        let scores = match mask {
            AttnMask::Additive(m) => scores + m,
            AttnMask::Causal => {
                let future = Tensor::ones([t, s], (Kind::Bool, q.device())).triu(1);
                scores.masked_fill(&future, min_value(kind))
            }
        };
        let probs = scores.softmax(-1, Kind::Float).to_kind(kind).view([b, self.kv_heads, g * t, s]);
        probs.matmul(v).view([b, self.heads, t, d])
    }
}

/// Row-wise embedding look-up.
pub(crate) fn embed(table: &Tensor, ids: &Tensor) -> Tensor {
    Tensor::embedding(table, ids, -1, false, false)
}

/// `out(tanh(dense(first token)))`: BERT's pooler + classifier, RoBERTa's classification head.
pub(crate) struct ClassifierHead {
    pub dense: Linear,
    pub out: Linear,
}

impl ClassifierHead {
    pub fn forward(&self, first: &Tensor) -> Tensor {
        self.out.forward(&self.dense.forward(first).tanh())
    }
}

/// Layers read from a checkpoint scope.
impl Scope<'_> {
    /// `name.weight` and, if `bias`, `name.bias`.
    pub fn linear(&self, name: &str, bias: bool) -> Result<Linear, EngineError> {
        let (w, b) = self.weights(name, bias)?;
        Ok(Linear::new(w, b))
    }

    /// `names` (projections of one input) read and fused into one (see [`Linear::fuse`]).
    pub fn fused(&self, names: &[&str], bias: bool) -> Result<Linear, EngineError> {
        Ok(Linear::fuse(names.iter().map(|n| self.weights(n, bias)).collect::<Result<_, _>>()?))
    }

    fn weights(&self, name: &str, bias: bool) -> Result<(Tensor, Option<Tensor>), EngineError> {
        let s = self.pp(name);
        Ok((s.get("weight")?, if bias { Some(s.get("bias")?) } else { None }))
    }

    /// GPT-2's Conv1D stores `[in, out]`; transposed once here to a linear `[out, in]`.
    pub fn conv1d(&self, name: &str) -> Result<Linear, EngineError> {
        let s = self.pp(name);
        Ok(Linear::new(s.get("weight")?.t_().contiguous(), Some(s.get("bias")?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct values per (row, head, column, dim), offset by `base`.
    fn keys(n: i64, t: i64, base: f64) -> Tensor {
        Tensor::arange(n * 2 * t * 4, (Kind::Float, Device::Cpu)).view([n, 2, t, 4]) + base
    }

    #[test]
    fn the_kv_cache_grows_by_blocks_keeps_its_keys_and_writes_in_place() {
        let mut c = KvCache::new(1);
        c.reserve(2, 3);
        assert_eq!((c.rows, c.cols), (CACHE_ROW_BLOCK, CACHE_COL_BLOCK));
        let first = keys(2, 3, 0.0);
        c.write = Write::Prefill { first: 0 };
        let (k, _) = c.append(0, first.shallow_clone(), first.shallow_clone() + 0.5);
        assert!(k.equal(&first), "a prefill attends to its own keys");
        // A row of 5 tokens joins in slot 2: nothing to grow, nothing else copied.
        let joined = keys(1, 5, 1000.0);
        c.reserve(3, 5);
        assert_eq!((c.rows, c.cols), (CACHE_ROW_BLOCK, CACHE_COL_BLOCK));
        c.write = Write::Prefill { first: 2 };
        let _ = c.append(0, joined.shallow_clone(), joined.shallow_clone());
        // One decode step: each row writes at its own column.
        let new = keys(3, 1, 5000.0);
        c.write = Write::Decode { cols: Tensor::from_slice(&[3i64, 3, 5]), len: 6 };
        let (k, v) = c.append(0, new.shallow_clone(), new.shallow_clone() + 0.5);
        assert_eq!(k.size(), [3, 2, 6, 4]);
        assert!(k.narrow(0, 0, 2).narrow(2, 0, 3).equal(&first));
        assert!(v.narrow(0, 0, 2).narrow(2, 0, 3).equal(&(&first + 0.5)));
        assert!(k.narrow(0, 2, 1).narrow(2, 0, 5).equal(&joined));
        for (row, col) in [(0, 3), (1, 3), (2, 5)] {
            assert!(k.get(row).select(1, col).equal(&new.get(row).select(1, 0)), "row {row} wrote column {col}");
        }
        let before = k.copy();
        // Past a block: the cache grows by whole blocks and keeps every key.
        c.reserve(CACHE_ROW_BLOCK + 1, CACHE_COL_BLOCK + 1);
        assert_eq!((c.rows, c.cols), (2 * CACHE_ROW_BLOCK, 2 * CACHE_COL_BLOCK));
        let (ck, _) = c.layers[0].as_ref().unwrap();
        assert!(ck.narrow(0, 0, 3).narrow(2, 0, 6).equal(&before));
        assert_eq!(c.bytes(), 2 * (2 * CACHE_ROW_BLOCK * 2 * 2 * CACHE_COL_BLOCK * 4 * 4) as u64);
        // The last row takes a leaving row's slot.
        c.move_slot(2, 0, 6);
        let (ck, _) = c.layers[0].as_ref().unwrap();
        assert!(ck.get(0).narrow(1, 0, 6).equal(&before.get(2)));
        assert!(ck.get(1).narrow(1, 0, 6).equal(&before.get(1)), "other rows stay");
    }
}
