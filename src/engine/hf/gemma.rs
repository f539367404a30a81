//! Gemma 2 and Gemma 3 (text): embeddings scaled by sqrt(hidden), (1 + w) RMSNorms before and
//! after attention and the MLP, GeGLU (gelu-tanh), `query_pre_attn_scalar`, sliding-window and
//! global layers by `layer_types` with their own RoPE (Gemma 3: `rope_local_base_freq` or
//! per-type `rope_parameters`), attention and final logit soft-capping, and (Gemma 3) q/k norms.

use serde_json::Value;
use tch::{Kind, Tensor};

use crate::hf_config::{HfConfig, Rope};
use super::layers::{embed, Act, Attention, KvCache, Layout, Linear, Mlp, Norm, Outputs, Rotary};
use super::weights::Scope;
use super::{CausalLm, EngineError, Net};

struct Block {
    input_norm: Norm,
    attn: Attention,
    /// Gemma 3's q/k norms.
    qk_norm: Option<(Norm, Norm)>,
    post_attn_norm: Norm,
    pre_ff_norm: Norm,
    mlp: Mlp,
    post_ff_norm: Norm,
    sliding: bool,
}

struct Gemma {
    embed: Tensor,
    embed_scale: f64,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    /// Global and sliding layers' rotary embeddings.
    rope_global: Rotary,
    rope_local: Rotary,
    sliding_window: Option<i64>,
    final_softcap: Option<f64>,
}

fn sliding_layers(c: &HfConfig, gemma3: bool) -> Result<Vec<bool>, String> {
    let n = c.num_hidden_layers;
    let Some(types) = c.get("layer_types") else {
        // transformers' defaults: Gemma 2 alternates (sliding first), Gemma 3 has every 6th global.
        let pattern = if gemma3 { c.get_f64("sliding_window_pattern").unwrap_or(6.0) as usize } else { 2 };
        return Ok((0..n).map(|i| (i + 1) % pattern != 0).collect());
    };
    let types: Vec<&str> = types.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    if types.len() != n {
        return Err("config.json: layer_types must name one type per layer".into());
    }
    types
        .iter()
        .map(|t| match *t {
            "full_attention" => Ok(false),
            "sliding_attention" => Ok(true),
            other => Err(format!("config.json: layer_types: '{other}' is not supported (full_attention, sliding_attention)")),
        })
        .collect()
}

/// Global and local RoPE: per-type `rope_parameters` (transformers 5), else `rope_theta` and
/// `rope_scaling` for global layers and `rope_local_base_freq` (10000) for local ones.
fn ropes(c: &HfConfig, gemma3: bool) -> Result<(Rope, Rope), String> {
    let per_type = c.rope_parameters.as_ref().filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    if let Some(p) = per_type {
        let global = c.rope_from(p.get("full_attention"), c.rope_theta.unwrap_or(10_000.0))?;
        let local = c.rope_from(p.get("sliding_attention"), c.get_f64("rope_local_base_freq").unwrap_or(10_000.0))?;
        return Ok((global, local));
    }
    let global = c.rope()?;
    if !gemma3 {
        return Ok((global.clone(), global));
    }
    let local = c.rope_from(None, c.get_f64("rope_local_base_freq").unwrap_or(10_000.0))?;
    Ok((global, local))
}

fn act(c: &HfConfig) -> Result<Act, String> {
    let name = c.get("hidden_activation").and_then(Value::as_str).or(c.hidden_act.as_deref()).unwrap_or("gelu_pytorch_tanh");
    Act::parse(name).map_err(|e| format!("config.json: hidden_activation: {e}"))
}

fn check(c: &HfConfig, gemma3: bool) -> Result<(), String> {
    ropes(c, gemma3)?;
    sliding_layers(c, gemma3)?;
    act(c)?;
    if c.get_bool("use_bidirectional_attention") == Some(true) {
        return Err("config.json: use_bidirectional_attention is not supported".into());
    }
    Ok(())
}

pub(super) fn check2(c: &HfConfig) -> Result<(), String> {
    check(c, false)
}

pub(super) fn check3(c: &HfConfig) -> Result<(), String> {
    check(c, true)
}

pub(super) fn load2(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    load(c, w, false)
}

pub(super) fn load3(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    load(c, w, true)
}

fn load(c: &HfConfig, w: &Scope, gemma3: bool) -> Result<Net, EngineError> {
    let eps = c.rms_norm_eps.unwrap_or(1e-6);
    let head_dim = c.head_dim() as i64;
    let bias = c.attention_bias.unwrap_or(false);
    let act = act(c).map_err(EngineError::Load)?;
    let sliding = sliding_layers(c, gemma3).map_err(EngineError::Load)?;
    let scale = c.get_f64("query_pre_attn_scalar").unwrap_or(256.0).powf(-0.5);
    let softcap = c.get_f64("attn_logit_softcapping");
    let norm = |s: &Scope, name: &str| Norm::rms_unit_offset(s, name, eps);
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            let l = w.pp("layers").pp(i);
            let (a, p) = (l.pp("self_attn"), l.pp("mlp"));
            Ok(Block {
                input_norm: norm(&l, "input_layernorm")?,
                attn: Attention {
                    qkv: a.fused(&["q_proj", "k_proj", "v_proj"], bias)?,
                    o: a.linear("o_proj", bias)?,
                    heads: c.num_attention_heads as i64,
                    kv_heads: c.kv_heads() as i64,
                    head_dim,
                    scale,
                    softcap,
                },
                qk_norm: if gemma3 { Some((norm(&a, "q_norm")?, norm(&a, "k_norm")?)) } else { None },
                post_attn_norm: norm(&l, "post_attention_layernorm")?,
                pre_ff_norm: norm(&l, "pre_feedforward_layernorm")?,
                mlp: Mlp::Gated { gate_up: p.fused(&["gate_proj", "up_proj"], false)?, down: p.linear("down_proj", false)?, act },
                post_ff_norm: norm(&l, "post_feedforward_layernorm")?,
                sliding: sliding[i],
            })
        })
        .collect::<Result<_, EngineError>>()?;
    let embed = w.get("embed_tokens.weight")?;
    let (global, local) = ropes(c, gemma3).map_err(EngineError::Load)?;
    Ok(Net::Decoder(Box::new(Gemma {
        lm_head: Linear::new(
            match w.try_get("lm_head.weight") {
                Some(h) if c.tie_word_embeddings == Some(false) => h,
                _ => embed.shallow_clone(),
            },
            None,
        ),
        embed,
        embed_scale: (c.hidden_size as f64).sqrt(),
        layers,
        norm: norm(w, "norm")?,
        rope_global: Rotary::new(&global, head_dim as usize, w.device())?,
        rope_local: Rotary::new(&local, head_dim as usize, w.device())?,
        sliding_window: c.sliding_window.map(|w| w as i64),
        final_softcap: c.get_f64("final_logit_softcapping"),
    })))
}

impl CausalLm for Gemma {
    fn vocab(&self) -> i64 {
        self.embed.size()[0]
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn forward_to(&self, ids: &Tensor, layout: &Layout, mut cache: Option<&mut KvCache>, out: Option<&Outputs>) -> Tensor {
        let x = embed(&self.embed, &layout.pack(ids));
        let kind = x.kind();
        // transformers: the scale as a tensor of the weights' dtype.
        let mut x = x * Tensor::from(self.embed_scale as f32).to_kind(kind).to_device(ids.device());
        let (full, local) = (layout.mask(None, kind), layout.mask(self.sliding_window, kind));
        let (rope_g, rope_l) = (self.rope_global.cos_sin(&layout.pos, kind), self.rope_local.cos_sin(&layout.pos, kind));
        for (i, l) in self.layers.iter().enumerate() {
            let (q, k, v) = l.attn.qkv(&l.input_norm.forward(&x), layout);
            let (q, k) = match &l.qk_norm {
                Some((qn, kn)) => (qn.forward(&q), kn.forward(&k)),
                None => (q, k),
            };
            let (mask, rope) = if l.sliding { (&local, &rope_l) } else { (&full, &rope_g) };
            let last = Outputs::at_layer(out, i, self.layers.len());
            let kept = last.map(|o| o.mask(if l.sliding { self.sliding_window } else { None }, kind));
            let h = l.attn.attend(q, k, v, Some(rope), kept.as_ref().unwrap_or(mask), layout, last, cache.as_deref_mut().map(|c| (c, i)));
            x = Outputs::pick_of(last, x) + l.post_attn_norm.forward(&h);
            x += l.post_ff_norm.forward(&l.mlp.forward(&l.pre_ff_norm.forward(&x)));
        }
        layout.unpack(&self.norm.forward(&x), out)
    }

    fn packs(&self) -> bool {
        !self.rope_global.varies_by_length() && !self.rope_local.varies_by_length()
    }

    fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = self.lm_head.forward(hidden);
        match self.final_softcap {
            Some(cap) => ((logits / cap).tanh() * cap).to_kind(Kind::Float),
            None => logits.to_kind(Kind::Float),
        }
    }
}
