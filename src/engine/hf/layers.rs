//! The layers every architecture builds from: linear, norms, MLPs, rotary embeddings with their
//! scaling types, attention with its mask and KV cache. Numerics follow transformers' eager
//! implementations: RMSNorm and softmax in f32, RoPE from f32 inverse frequencies.

use tch::{Device, Kind, Tensor};

use super::config::{Rope, RopeScaling};
use super::weights::Scope;
use super::EngineError;

pub(crate) struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, self.b.as_ref())
    }

    /// Splits a fused projection (`[a + b + …, in]`) into its parts by output rows.
    pub fn split(&self, sizes: &[i64]) -> Vec<Linear> {
        let ws = self.w.split_with_sizes(sizes, 0);
        let bs = self.b.as_ref().map(|b| b.split_with_sizes(sizes, 0));
        ws.into_iter().enumerate().map(|(i, w)| Linear { w, b: bs.as_ref().map(|b| b[i].shallow_clone()) }).collect()
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
    /// `down(act(gate(x)) * up(x))` (SwiGLU, GeGLU).
    Gated { gate: Linear, up: Linear, down: Linear, act: Act },
    /// `proj(act(fc(x)))`.
    Plain { fc: Linear, proj: Linear, act: Act },
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Gated { gate, up, down, act } => down.forward(&(act.forward(&gate.forward(x)) * up.forward(x))),
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

/// The additive mask `[B, 1, T, S]` for `t` new queries over keys `keep [B, S]` (which keys are
/// real; the queries are the last `t`): query i sits at key index s - t + i and sees real keys at
/// or before it, within `window` if given.
pub(crate) fn causal_mask(keep: &Tensor, t: i64, window: Option<i64>, kind: Kind) -> Tensor {
    let (b, s) = (keep.size()[0], keep.size()[1]);
    let device = keep.device();
    let q_idx = Tensor::arange_start(s - t, s, (Kind::Int64, device)).view([t, 1]);
    let k_idx = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
    let mut allowed = k_idx.le_tensor(&q_idx).unsqueeze(0) * keep.unsqueeze(1);
    if let Some(wnd) = window {
        allowed *= (q_idx - k_idx).lt(wnd).unsqueeze(0);
    }
    Tensor::zeros([b, 1, t, s], (kind, device)).masked_fill(&allowed.logical_not().unsqueeze(1), min_value(kind))
}

/// The additive key mask `[B, 1, 1, T]` of right-padded encoder rows.
pub(crate) fn key_mask(keep: &Tensor, kind: Kind) -> Tensor {
    let (b, t) = (keep.size()[0], keep.size()[1]);
    Tensor::zeros([b, 1, 1, t], (kind, keep.device())).masked_fill(&keep.eq(0).view([b, 1, 1, t]), min_value(kind))
}

/// Keys and values of every layer for the rows of a batch: `[B, kv_heads, S, D]`.
pub(crate) struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(layers: usize) -> KvCache {
        KvCache { layers: (0..layers).map(|_| None).collect() }
    }
}

/// Multi-head attention with grouped KV heads: projections, then (for the caller's hooks, such
/// as q/k norms) `attend` with rotary positions, the cache, soft-capping and the output
/// projection.
pub(crate) struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
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
    /// `q, k, v` `[B, heads, T, D]` of `h [B, T, H]`.
    pub fn qkv(&self, h: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (h.size()[0], h.size()[1]);
        let split = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2);
        (split(self.q.forward(h), self.heads), split(self.k.forward(h), self.kv_heads), split(self.v.forward(h), self.kv_heads))
    }

    /// Attention of `q` over `k, v` (plus the cached ones, which `slot` then holds): `[B, T, H]`.
    pub fn attend(&self, q: Tensor, k: Tensor, v: Tensor, rope: Option<&(Tensor, Tensor)>, mask: &Tensor, slot: Option<&mut Option<(Tensor, Tensor)>>) -> Tensor {
        let (b, t) = (q.size()[0], q.size()[2]);
        let kind = q.kind();
        let (q, mut k, mut v) = match rope {
            Some(cs) => (apply_rotary(&q, cs), apply_rotary(&k, cs), v),
            None => (q, k, v),
        };
        if let Some(slot) = slot {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let rep = self.heads / self.kv_heads;
        let (k, v) = if rep > 1 { (k.repeat_interleave_self_int(rep, 1, None), v.repeat_interleave_self_int(rep, 1, None)) } else { (k, v) };
        let mut scores = q.matmul(&k.transpose(-2, -1)) * self.scale;
        if let Some(cap) = self.softcap {
            scores = (scores / cap).tanh() * cap;
        }
        let attn = (scores + mask).softmax(-1, Kind::Float).to_kind(kind).matmul(&v);
        self.o.forward(&attn.transpose(1, 2).contiguous().view([b, t, self.heads * self.head_dim]))
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
        let s = self.pp(name);
        Ok(Linear { w: s.get("weight")?, b: if bias { Some(s.get("bias")?) } else { None } })
    }

    /// GPT-2's Conv1D stores `[in, out]`; transposed once here to a linear `[out, in]`.
    pub fn conv1d(&self, name: &str) -> Result<Linear, EngineError> {
        let s = self.pp(name);
        Ok(Linear { w: s.get("weight")?.t_().contiguous(), b: Some(s.get("bias")?) })
    }
}
