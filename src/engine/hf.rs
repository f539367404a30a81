//! The `hf` backend: Hugging Face model folders run natively with tch (no Python at run time).
//!
//! Decoders (Llama, Mistral, Qwen2, GPT-2) batch with left padding: an additive attention mask
//! hides padding and the future, and position ids count each row's own tokens, so a row's result
//! does not depend on the rows beside it. Generation keeps a KV cache. Encoders (BERT) batch
//! with right padding and a key mask. Numerics follow transformers' eager implementations: RMSNorm
//! and softmax in f32, RoPE from f32 inverse frequencies.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::{EngineError, LoadedModel, Sink, StreamChunk};
use crate::job::{FinishReason, JobInput, JobKind, Output};
use crate::lm::{Arch, GenerateInput, HfConfig, Sampling, Window};
use crate::repository::ModelSpec;

fn load_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(e.to_string())
}

fn tch_err(e: tch::TchError) -> EngineError {
    EngineError::from_tch(e)
}

/// The tensors of `*.safetensors` (single file or sharded with an index), on `device` in `kind`.
fn load_weights(dir: &Path, device: Device, kind: Kind) -> Result<HashMap<String, Tensor>, EngineError> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(load_err)?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(load_err)?;
        let mut shards: Vec<String> = v["weight_map"].as_object().ok_or_else(|| load_err("index without weight_map"))?.values().filter_map(|f| f.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut weights = HashMap::new();
    for file in files {
        for (name, t) in Tensor::read_safetensors(&file).map_err(|e| load_err(format!("{}: {e}", file.display())))? {
            let t = if t.is_floating_point() { t.to_kind(kind) } else { t };
            weights.insert(name, t.to_device(device));
        }
    }
    Ok(weights)
}

/// Looks weights up by name, trying each prefix (checkpoints differ: `model.`, `bert.`, none).
struct Weights {
    map: HashMap<String, Tensor>,
    prefixes: Vec<&'static str>,
}

impl Weights {
    fn get(&self, name: &str) -> Result<Tensor, EngineError> {
        self.try_get(name).ok_or_else(|| EngineError::Load(format!("weight '{name}' is missing from the safetensors")))
    }

    fn try_get(&self, name: &str) -> Option<Tensor> {
        self.prefixes.iter().find_map(|p| self.map.get(&format!("{p}{name}"))).map(|t| t.shallow_clone())
    }

    fn linear(&self, name: &str, bias: bool) -> Result<Linear, EngineError> {
        Ok(Linear { w: self.get(&format!("{name}.weight"))?, b: if bias { Some(self.get(&format!("{name}.bias"))?) } else { None } })
    }

    /// GPT-2's Conv1D stores `[in, out]`; transposed once here to a linear `[out, in]`.
    fn conv1d(&self, name: &str) -> Result<Linear, EngineError> {
        Ok(Linear { w: self.get(&format!("{name}.weight"))?.t_().contiguous(), b: Some(self.get(&format!("{name}.bias"))?) })
    }
}

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.w, self.b.as_ref())
    }
}

enum Norm {
    Rms { w: Tensor, eps: f64 },
    Layer { w: Tensor, b: Tensor, eps: f64 },
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Norm::Rms { w, eps } => {
                let kind = x.kind();
                let h = x.to_kind(Kind::Float);
                let var = h.pow_tensor_scalar(2).mean_dim(Some([-1i64].as_slice()), true, Kind::Float);
                w * (h * (var + *eps).rsqrt()).to_kind(kind)
            }
            Norm::Layer { w, b, eps } => x.layer_norm([*w.size().last().expect("1-d")], Some(w), Some(b), *eps, false),
        }
    }
}

enum Mlp {
    /// Llama family: `down(silu(gate(x)) * up(x))`.
    Gated { gate: Linear, up: Linear, down: Linear },
    /// GPT-2: `proj(gelu_tanh(fc(x)))`.
    Gpt2 { fc: Linear, proj: Linear },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Mlp::Gated { gate, up, down } => down.forward(&(gate.forward(x).silu() * up.forward(x))),
            Mlp::Gpt2 { fc, proj } => proj.forward(&fc.forward(x).gelu("tanh")),
        }
    }
}

struct Layer {
    norm1: Norm,
    norm2: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp: Mlp,
}

/// Keys and values of every layer for the rows of a generation batch: `[B, kv_heads, S, D]`.
struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

struct Decoder {
    embed: Tensor,
    /// GPT-2's learned positions.
    wpe: Option<Tensor>,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Tensor,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    /// RoPE inverse frequencies (f32); none for GPT-2.
    inv_freq: Option<Tensor>,
    sliding_window: Option<i64>,
}

impl Decoder {
    fn load(c: &HfConfig, arch: Arch, w: &Weights, device: Device) -> Result<Decoder, EngineError> {
        let heads = c.num_attention_heads as i64;
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads) as i64;
        let kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads) as i64;
        if arch == Arch::Gpt2 {
            let eps = c.layer_norm_eps.unwrap_or(1e-5);
            let ln = |name: &str| -> Result<Norm, EngineError> { Ok(Norm::Layer { w: w.get(&format!("{name}.weight"))?, b: w.get(&format!("{name}.bias"))?, eps }) };
            let layers = (0..c.num_hidden_layers)
                .map(|i| {
                    let p = format!("h.{i}");
                    let qkv = w.conv1d(&format!("{p}.attn.c_attn"))?;
                    let ws = qkv.w.chunk(3, 0);
                    let bs = qkv.b.as_ref().expect("conv1d has bias").chunk(3, 0);
                    let part = |j: usize| Linear { w: ws[j].shallow_clone(), b: Some(bs[j].shallow_clone()) };
                    Ok(Layer {
                        norm1: ln(&format!("{p}.ln_1"))?,
                        norm2: ln(&format!("{p}.ln_2"))?,
                        q: part(0),
                        k: part(1),
                        v: part(2),
                        o: w.conv1d(&format!("{p}.attn.c_proj"))?,
                        mlp: Mlp::Gpt2 { fc: w.conv1d(&format!("{p}.mlp.c_fc"))?, proj: w.conv1d(&format!("{p}.mlp.c_proj"))? },
                    })
                })
                .collect::<Result<_, EngineError>>()?;
            let embed = w.get("wte.weight")?;
            return Ok(Decoder {
                lm_head: w.try_get("lm_head.weight").unwrap_or_else(|| embed.shallow_clone()),
                embed,
                wpe: Some(w.get("wpe.weight")?),
                layers,
                norm: ln("ln_f")?,
                heads,
                kv_heads: heads,
                head_dim,
                inv_freq: None,
                sliding_window: None,
            });
        }
        let eps = c.rms_norm_eps.unwrap_or(1e-6);
        let rms = |name: &str| -> Result<Norm, EngineError> { Ok(Norm::Rms { w: w.get(&format!("{name}.weight"))?, eps }) };
        let qkv_bias = arch == Arch::Qwen2 || c.attention_bias.unwrap_or(false);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("layers.{i}");
                Ok(Layer {
                    norm1: rms(&format!("{p}.input_layernorm"))?,
                    norm2: rms(&format!("{p}.post_attention_layernorm"))?,
                    q: w.linear(&format!("{p}.self_attn.q_proj"), qkv_bias)?,
                    k: w.linear(&format!("{p}.self_attn.k_proj"), qkv_bias)?,
                    v: w.linear(&format!("{p}.self_attn.v_proj"), qkv_bias)?,
                    o: w.linear(&format!("{p}.self_attn.o_proj"), c.attention_bias.unwrap_or(false))?,
                    mlp: Mlp::Gated {
                        gate: w.linear(&format!("{p}.mlp.gate_proj"), false)?,
                        up: w.linear(&format!("{p}.mlp.up_proj"), false)?,
                        down: w.linear(&format!("{p}.mlp.down_proj"), false)?,
                    },
                })
            })
            .collect::<Result<_, EngineError>>()?;
        let embed = w.get("embed_tokens.weight")?;
        let lm_head = match w.try_get("lm_head.weight") {
            Some(h) if !c.tie_word_embeddings.unwrap_or(false) => h,
            _ => embed.shallow_clone(),
        };
        let inv_freq = Tensor::from_slice(&c.rope().map_err(EngineError::Load)?.inv_freq(head_dim as usize)).to_device(device);
        Ok(Decoder {
            embed,
            wpe: None,
            layers,
            norm: rms("norm")?,
            lm_head,
            heads,
            kv_heads,
            head_dim,
            inv_freq: Some(inv_freq),
            sliding_window: if arch == Arch::Mistral { c.sliding_window.map(|w| w as i64) } else { None },
        })
    }

    /// Hidden states `[B, T, H]` of `ids [B, T]` at `pos [B, T]`. `keep [B, S]` says which keys are
    /// real (S = cached + T); with a cache, keys and values are appended to it.
    fn forward(&self, ids: &Tensor, pos: &Tensor, keep: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let s = keep.size()[1];
        let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);
        if let Some(wpe) = &self.wpe {
            x += Tensor::embedding(wpe, pos, -1, false, false);
        }
        let kind = x.kind();
        // Query i sits at key index s - t + i: it sees real keys at or before it (and within the window).
        let q_idx = Tensor::arange_start(s - t, s, (Kind::Int64, x.device())).view([t, 1]);
        let k_idx = Tensor::arange(s, (Kind::Int64, x.device())).view([1, s]);
        let mut allowed = k_idx.le_tensor(&q_idx).unsqueeze(0) * keep.unsqueeze(1);
        if let Some(wnd) = self.sliding_window {
            allowed *= (q_idx - k_idx).lt(wnd).unsqueeze(0);
        }
        let mask = Tensor::zeros([b, 1, t, s], (kind, x.device())).masked_fill(&allowed.logical_not().unsqueeze(1), min_value(kind));
        let rope = self.inv_freq.as_ref().map(|inv| {
            let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * inv.view([1, 1, -1]);
            let emb = Tensor::cat(&[&freqs, &freqs], -1);
            (emb.cos().to_kind(kind).unsqueeze(1), emb.sin().to_kind(kind).unsqueeze(1))
        });
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.norm1.forward(&x);
            let q = layer.q.forward(&h).view([b, t, self.heads, self.head_dim]).transpose(1, 2);
            let mut k = layer.k.forward(&h).view([b, t, self.kv_heads, self.head_dim]).transpose(1, 2);
            let mut v = layer.v.forward(&h).view([b, t, self.kv_heads, self.head_dim]).transpose(1, 2);
            let q = match &rope {
                Some((cos, sin)) => {
                    k = &k * cos + rotate_half(&k) * sin;
                    &q * cos + rotate_half(&q) * sin
                }
                None => q,
            };
            if let Some(cache) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &cache.layers[i] {
                    k = Tensor::cat(&[pk, &k], 2);
                    v = Tensor::cat(&[pv, &v], 2);
                }
                cache.layers[i] = Some((k.shallow_clone(), v.shallow_clone()));
            }
            let rep = self.heads / self.kv_heads;
            let (k, v) = if rep > 1 { (k.repeat_interleave_self_int(rep, 1, None), v.repeat_interleave_self_int(rep, 1, None)) } else { (k, v) };
            let scores = q.matmul(&k.transpose(-2, -1)) * (1.0 / (self.head_dim as f64).sqrt()) + &mask;
            let attn = scores.softmax(-1, Kind::Float).to_kind(kind).matmul(&v);
            let attn = attn.transpose(1, 2).contiguous().view([b, t, self.heads * self.head_dim]);
            x += layer.o.forward(&attn);
            let h = layer.norm2.forward(&x);
            x += layer.mlp.forward(&h);
        }
        self.norm.forward(&x)
    }

    fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear(&self.lm_head, None::<&Tensor>).to_kind(Kind::Float)
    }
}

fn min_value(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().expect("head dim") / 2;
    Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1)
}

/// Left-padded rows: ids `[B, L]`, keep mask `[B, L]`, and positions counting real tokens.
fn left_pad(rows: &[Vec<i64>], device: Device) -> (Tensor, Tensor, Tensor) {
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * len);
    let mut keep = Vec::with_capacity(rows.len() * len);
    for r in rows {
        ids.extend(std::iter::repeat_n(0, len - r.len()).chain(r.iter().copied()));
        keep.extend(std::iter::repeat_n(0i64, len - r.len()).chain(std::iter::repeat_n(1, r.len())));
    }
    let shape = [rows.len() as i64, len as i64];
    let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
    let keep = Tensor::from_slice(&keep).view(shape).to_device(device);
    let pos = (keep.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    (ids, keep, pos)
}

struct Bert {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<BertLayer>,
    pooler: Option<Linear>,
    classifier: Option<Linear>,
    heads: i64,
    head_dim: i64,
}

struct BertLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    inter: Linear,
    out: Linear,
    out_norm: Norm,
}

impl Bert {
    fn load(c: &HfConfig, w: &Weights) -> Result<Bert, EngineError> {
        let eps = c.layer_norm_eps.unwrap_or(1e-12);
        let ln = |name: &str| -> Result<Norm, EngineError> { Ok(Norm::Layer { w: w.get(&format!("{name}.weight"))?, b: w.get(&format!("{name}.bias"))?, eps }) };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(BertLayer {
                    q: w.linear(&format!("{p}.attention.self.query"), true)?,
                    k: w.linear(&format!("{p}.attention.self.key"), true)?,
                    v: w.linear(&format!("{p}.attention.self.value"), true)?,
                    attn_out: w.linear(&format!("{p}.attention.output.dense"), true)?,
                    attn_norm: ln(&format!("{p}.attention.output.LayerNorm"))?,
                    inter: w.linear(&format!("{p}.intermediate.dense"), true)?,
                    out: w.linear(&format!("{p}.output.dense"), true)?,
                    out_norm: ln(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(Bert {
            word: w.get("embeddings.word_embeddings.weight")?,
            position: w.get("embeddings.position_embeddings.weight")?,
            token_type: w.get("embeddings.token_type_embeddings.weight")?,
            emb_norm: ln("embeddings.LayerNorm")?,
            layers,
            pooler: w.linear("pooler.dense", true).ok(),
            classifier: w.linear("classifier", true).ok(),
            heads: c.num_attention_heads as i64,
            head_dim: (c.hidden_size / c.num_attention_heads) as i64,
        })
    }

    /// Hidden states `[B, T, H]` of right-padded rows.
    fn forward(&self, ids: &Tensor, type_ids: &Tensor, keep: &Tensor) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let pos = Tensor::arange(t, (Kind::Int64, ids.device())).unsqueeze(0);
        let x = Tensor::embedding(&self.word, ids, -1, false, false)
            + Tensor::embedding(&self.position, &pos, -1, false, false)
            + Tensor::embedding(&self.token_type, type_ids, -1, false, false);
        let mut x = self.emb_norm.forward(&x);
        let kind = x.kind();
        let mask = Tensor::zeros([b, 1, 1, t], (kind, x.device())).masked_fill(&keep.eq(0).view([b, 1, 1, t]), min_value(kind));
        let split = |y: Tensor| y.view([b, t, self.heads, self.head_dim]).transpose(1, 2);
        for l in &self.layers {
            let (q, k, v) = (split(l.q.forward(&x)), split(l.k.forward(&x)), split(l.v.forward(&x)));
            let scores = q.matmul(&k.transpose(-2, -1)) * (1.0 / (self.head_dim as f64).sqrt()) + &mask;
            let ctx = scores.softmax(-1, Kind::Float).to_kind(kind).matmul(&v).transpose(1, 2).contiguous().view([b, t, self.heads * self.head_dim]);
            x = l.attn_norm.forward(&(l.attn_out.forward(&ctx) + &x));
            let h = l.inter.forward(&x).gelu("none");
            x = l.out_norm.forward(&(l.out.forward(&h) + &x));
        }
        x
    }
}

enum Net {
    Decoder(Decoder),
    Encoder(Bert),
}

#[derive(Clone, Copy)]
enum Pooling {
    Mean,
    Cls,
}

pub struct Hf {
    net: Net,
    /// The running generation (continuous batching).
    gen: GenBatch,
    device: Device,
    tokenizer: tokenizers::Tokenizer,
    eos: Vec<u32>,
    max_length: usize,
    labels: Vec<String>,
    pooling: Pooling,
}

impl Hf {
    pub fn load(spec: &ModelSpec, device: Device) -> Result<Hf, EngineError> {
        let lm = spec.lm.as_ref().ok_or_else(|| load_err("an hf model without its LM spec"))?;
        let kind = match spec.config.dtype.filter(|_| device.is_cuda()) {
            Some(crate::tensor::DType::F16) => Kind::Half,
            Some(crate::tensor::DType::Bf16) => Kind::BFloat16,
            _ => Kind::Float,
        };
        let map = load_weights(&spec.dir, device, kind)?;
        let c = &lm.config;
        let net = match lm.arch {
            Arch::Gpt2 => Net::Decoder(Decoder::load(c, lm.arch, &Weights { map, prefixes: vec!["transformer.", ""] }, device)?),
            a if a.is_decoder() => Net::Decoder(Decoder::load(c, a, &Weights { map, prefixes: vec!["model.", ""] }, device)?),
            _ => Net::Encoder(Bert::load(c, &Weights { map, prefixes: vec!["bert.", ""] })?),
        };
        let labels = match &c.id2label {
            Some(m) => {
                let mut pairs: Vec<(usize, String)> = m.iter().filter_map(|(k, v)| k.parse().ok().map(|k| (k, v.clone()))).collect();
                pairs.sort();
                pairs.into_iter().map(|(_, v)| v).collect()
            }
            None => Vec::new(),
        };
        // sentence-transformers folders say how to pool in 1_Pooling/config.json.
        let pooling = std::fs::read_to_string(spec.dir.join("1_Pooling/config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| if v["pooling_mode_cls_token"].as_bool() == Some(true) { Pooling::Cls } else { Pooling::Mean })
            .unwrap_or(Pooling::Mean);
        Ok(Hf { net, gen: GenBatch::default(), device, tokenizer: lm.tokenizer.clone(), eos: c.eos_ids(), max_length: lm.max_length, labels, pooling })
    }

    /// Checks the invariant every scored window keeps (`LmSpec::parse` builds them so): a
    /// non-empty context and continuation, context + continuation - 1 <= max_length, ids in the
    /// vocabulary. Without it a continuation token would be conditioned on padding or on nothing.
    fn check_window(&self, d: &Decoder, w: &Window) -> Result<(), EngineError> {
        let vocab = d.embed.size()[0];
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

    /// Log-prob sums (and greedy flags) of windows, one row each.
    fn score(&self, d: &Decoder, windows: &[&Window]) -> Result<Vec<(f64, bool)>, EngineError> {
        for w in windows {
            self.check_window(d, w)?;
        }
        let rows: Vec<Vec<i64>> = windows
            .iter()
            .map(|w| {
                let mut all: Vec<i64> = w.context.iter().chain(&w.continuation).map(|&t| t as i64).collect();
                all.pop();
                all
            })
            .collect();
        let (ids, keep, pos) = left_pad(&rows, self.device);
        let hidden = d.forward(&ids, &pos, &keep, None);
        let t = hidden.size()[1];
        let c_max = windows.iter().map(|w| w.continuation.len()).max().unwrap_or(1) as i64;
        if c_max > t {
            return Err(EngineError::Model(format!("{c_max} continuation tokens in rows of {t}")));
        }
        // Only the last positions are scored: the LM head runs on those alone.
        let last = hidden.f_narrow(1, t - c_max, c_max).map_err(tch_err)?;
        let logp = d.logits(&last).f_log_softmax(-1, Kind::Float).map_err(tch_err)?.to_device(Device::Cpu);
        let greedy = logp.f_argmax(-1, false).map_err(tch_err)?;
        let mut out = Vec::with_capacity(windows.len());
        for (r, w) in windows.iter().enumerate() {
            let n = w.continuation.len() as i64;
            let targets = Tensor::from_slice(&w.continuation.iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
            let row = logp.f_get(r as i64).and_then(|row| row.f_narrow(0, c_max - n, n)).map_err(tch_err)?;
            let picked = row.f_gather(-1, &targets.f_unsqueeze(-1).map_err(tch_err)?, false).map_err(tch_err)?;
            let is_greedy = greedy
                .f_get(r as i64)
                .and_then(|g| g.f_narrow(0, c_max - n, n))
                .and_then(|g| g.f_eq_tensor(&targets))
                .and_then(|g| g.f_all())
                .and_then(|g| g.f_int64_value(&[]))
                .map_err(tch_err)?
                == 1;
            let logprob = picked.f_sum(Kind::Double).and_then(|p| p.f_double_value(&[])).map_err(tch_err)?;
            out.push((logprob, is_greedy));
        }
        Ok(out)
    }

    fn encode(&self, b: &Bert, kind: JobKind, jobs: &[(&Vec<u32>, &Vec<u32>, bool)]) -> Result<Vec<Output>, EngineError> {
        let (vocab, positions, types) = (b.word.size()[0], b.position.size()[0], b.token_type.size()[0]);
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
            let (pooler, classifier) = b.pooler.as_ref().zip(b.classifier.as_ref()).ok_or_else(|| EngineError::Model("no classification head".into()))?;
            let first = hidden.f_select(1, 0).map_err(tch_err)?;
            let logits = classifier.forward(&pooler.forward(&first).tanh()).to_kind(Kind::Float).to_device(Device::Cpu);
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
                Ok(Output::Embedding(Vec::<f32>::try_from(e).map_err(tch_err)?))
            })
            .collect()
    }
}

impl LoadedModel for Hf {
    fn run(&mut self, kind: JobKind, inputs: &[&JobInput]) -> Result<Vec<Output>, EngineError> {
        match (&self.net, kind) {
            (Net::Decoder(d), JobKind::Loglikelihood | JobKind::LoglikelihoodRolling) => {
                // Every window of every job is a row; a rolling job's windows are summed back.
                let windows: Vec<&Window> = inputs.iter().flat_map(|i| match i { JobInput::Score(w) => w.iter(), _ => [].iter() }).collect();
                let mut scores = self.score(d, &windows)?.into_iter();
                Ok(inputs
                    .iter()
                    .map(|i| {
                        let JobInput::Score(ws) = i else { unreachable!("validated kind") };
                        let parts: Vec<(f64, bool)> = scores.by_ref().take(ws.len()).collect();
                        Output::Score {
                            logprob: parts.iter().map(|p| p.0).sum(),
                            is_greedy: (kind == JobKind::Loglikelihood).then(|| parts.iter().all(|p| p.1)),
                            tokens: ws.iter().map(|w| w.continuation.len()).sum(),
                        }
                    })
                    .collect())
            }
            (Net::Encoder(b), JobKind::Embed | JobKind::Classify) => {
                let jobs: Vec<(&Vec<u32>, &Vec<u32>, bool)> = inputs
                    .iter()
                    .map(|i| match i {
                        JobInput::Encode { ids, type_ids, normalize } => (ids, type_ids, *normalize),
                        _ => unreachable!("validated kind"),
                    })
                    .collect();
                self.encode(b, kind, &jobs)
            }
            (_, kind) => Err(EngineError::Model(format!("kind {} is not served by this model", kind.as_str()))),
        }
    }

    fn join(&mut self, jobs: Vec<(u64, JobInput, bool)>) -> Result<(), EngineError> {
        let Net::Decoder(d) = &self.net else { return Err(EngineError::Model("an encoder does not generate".into())) };
        let vocab = d.embed.size()[0];
        let rows = jobs
            .into_iter()
            .map(|(job, input, stream)| match input {
                // `LmSpec::parse` admits only these; checked again as the cache and positions rely on it.
                JobInput::Generate(g) if g.prompt.is_empty() || g.prompt.len() >= self.max_length => Err(EngineError::Model(format!(
                    "a prompt of {} tokens does not fit 1..{} positions",
                    g.prompt.len(),
                    self.max_length
                ))),
                JobInput::Generate(g) if g.prompt.iter().any(|&t| i64::from(t) >= vocab) => {
                    Err(EngineError::Model(format!("a prompt token is not below the vocabulary size {vocab}")))
                }
                JobInput::Generate(g) => Ok(Row::new(job as usize, g, stream)),
                other => Err(EngineError::Model(format!("not a generate job: {other:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.gen.admit(d, self.device, rows)
    }

    fn step(&mut self, sink: &mut dyn Sink) -> Vec<(u64, Result<Output, EngineError>)> {
        let Net::Decoder(d) = &self.net else { return Vec::new() };
        if self.gen.rows.is_empty() {
            return Vec::new();
        }
        let mut gen = std::mem::take(&mut self.gen);
        let result = gen.step(d, self, sink);
        match result {
            Ok(done) => {
                self.gen = gen;
                done.into_iter().map(|(job, out)| (job as u64, Ok(out))).collect()
            }
            // A failed step fails every row; the batch starts afresh.
            Err(e) => gen.rows.iter().map(|r| (r.job as u64, Err(e.clone()))).collect(),
        }
    }

    fn generating(&self) -> usize {
        self.gen.rows.len()
    }

    fn warmup(&mut self) -> Result<(), EngineError> {
        match &self.net {
            Net::Decoder(d) => self.score(d, &[&Window { context: vec![0], continuation: vec![0] }]).map(|_| ()),
            Net::Encoder(b) => self.encode(b, JobKind::Embed, &[(&vec![0, 0], &vec![0, 0], true)]).map(|_| ()),
        }
    }
}

/// One generation in a [`GenBatch`].
struct Row {
    job: usize,
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
}

impl Row {
    fn new(job: usize, input: GenerateInput, stream: bool) -> Row {
        // An unseeded sampled job draws from fresh entropy (such jobs are never cached).
        let seed = input.sampling.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ (job as u64).rotate_left(32)
        });
        let track_text = stream || !input.stop.is_empty();
        Row { job, rng: Rng(seed), generated: Vec::new(), track_text, stream, text: String::new(), emitted: 0, chunks: 0, finish: None, input }
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
struct GenBatch {
    rows: Vec<Row>,
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
    fn admit(&mut self, d: &Decoder, device: Device, rows: Vec<Row>) -> Result<(), EngineError> {
        if rows.is_empty() {
            return Ok(());
        }
        let prompts: Vec<Vec<i64>> = rows.iter().map(|r| r.input.prompt.iter().map(|&t| t as i64).collect()).collect();
        let (ids, keep, pos) = left_pad(&prompts, device);
        let mut cache = KvCache { layers: (0..d.layers.len()).map(|_| None).collect() };
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
    fn step(&mut self, d: &Decoder, hf: &Hf, sink: &mut dyn Sink) -> Result<Vec<(usize, Output)>, EngineError> {
        let state = self.state.as_mut().expect("rows imply state");
        let greedy: Vec<i64> = Vec::<i64>::try_from(state.logits.argmax(-1, false).to_device(Device::Cpu)).map_err(tch_err)?;
        let sampled = self.rows.iter().any(|r| r.input.sampling.temperature > 0.0);
        let cpu_logits = if sampled { Some(state.logits.to_device(Device::Cpu)) } else { None };
        for (b, row) in self.rows.iter_mut().enumerate() {
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
            let out = Output::Generate { text, tokens: row.generated, finish_reason: row.finish.expect("finished"), prompt_tokens: row.input.prompt.len() };
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
