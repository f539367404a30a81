//! Qwen3: the Llama layout with an explicit `head_dim`, RMSNorm of each query and key head
//! (before RoPE), and per-layer sliding windows where `layer_types` says so.

use tch::{Kind, Tensor};

use crate::hf_config::HfConfig;
use super::layers::{embed, Act, Attention, KvCache, Layout, Linear, Mlp, Norm, Outputs, Rotary};
use super::weights::Scope;
use super::llama::lm_head;
use super::{CausalLm, EngineError, Net};

struct Block {
    norm1: Norm,
    attn: Attention,
    q_norm: Norm,
    k_norm: Norm,
    sliding: bool,
    norm2: Norm,
    mlp: Mlp,
}

struct Qwen3 {
    embed: Tensor,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    rotary: Rotary,
    sliding_window: Option<i64>,
}

/// `layer_types` (default: all full attention); a sliding layer needs `sliding_window`.
fn sliding_layers(c: &HfConfig) -> Result<Vec<bool>, String> {
    let Some(types) = c.get("layer_types") else { return Ok(vec![false; c.num_hidden_layers]) };
    let types: Vec<&str> = types.as_array().map(|a| a.iter().filter_map(|t| t.as_str()).collect()).unwrap_or_default();
    if types.len() != c.num_hidden_layers {
        return Err("config.json: layer_types must name one type per layer".into());
    }
    types
        .iter()
        .map(|t| match *t {
            "full_attention" => Ok(false),
            "sliding_attention" if c.sliding_window.is_some() => Ok(true),
            "sliding_attention" => Err("config.json: layer_types has sliding_attention layers but sliding_window is not set".into()),
            other => Err(format!("config.json: layer_types: '{other}' is not supported (full_attention, sliding_attention)")),
        })
        .collect()
}

pub(super) fn check(c: &HfConfig) -> Result<(), String> {
    c.rope()?;
    sliding_layers(c)?;
    Act::parse(c.hidden_act.as_deref().unwrap_or("silu")).map_err(|e| format!("config.json: hidden_act: {e}"))?;
    Ok(())
}

pub(super) fn load(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    let eps = c.rms_norm_eps.unwrap_or(1e-6);
    let head_dim = c.head_dim() as i64;
    let bias = c.attention_bias.unwrap_or(false);
    let act = Act::parse(c.hidden_act.as_deref().unwrap_or("silu")).map_err(EngineError::Load)?;
    let sliding = sliding_layers(c).map_err(EngineError::Load)?;
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            let l = w.pp("layers").pp(i);
            let (a, p) = (l.pp("self_attn"), l.pp("mlp"));
            Ok(Block {
                norm1: Norm::rms(&l, "input_layernorm", eps)?,
                attn: Attention {
                    qkv: a.fused(&["q_proj", "k_proj", "v_proj"], bias)?,
                    o: a.linear("o_proj", bias)?,
                    heads: c.num_attention_heads as i64,
                    kv_heads: c.kv_heads() as i64,
                    head_dim,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    softcap: None,
                },
                q_norm: Norm::rms(&a, "q_norm", eps)?,
                k_norm: Norm::rms(&a, "k_norm", eps)?,
                sliding: sliding[i],
                norm2: Norm::rms(&l, "post_attention_layernorm", eps)?,
                mlp: Mlp::Gated { gate_up: p.fused(&["gate_proj", "up_proj"], false)?, down: p.linear("down_proj", false)?, act },
            })
        })
        .collect::<Result<_, EngineError>>()?;
    let embed = w.get("embed_tokens.weight")?;
    Ok(Net::Decoder(Box::new(Qwen3 {
        lm_head: lm_head(c, w, &embed),
        embed,
        layers,
        norm: Norm::rms(w, "norm", eps)?,
        rotary: Rotary::new(&c.rope().map_err(EngineError::Load)?, head_dim as usize, w.device())?,
        sliding_window: c.sliding_window.map(|w| w as i64),
    })))
}

impl CausalLm for Qwen3 {
    fn vocab(&self) -> i64 {
        self.embed.size()[0]
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn forward_to(&self, ids: &Tensor, layout: &Layout, mut cache: Option<&mut KvCache>, out: Option<&Outputs>) -> Tensor {
        let mut x = embed(&self.embed, &layout.pack(ids));
        let kind = x.kind();
        let full = layout.mask(None, kind);
        let sliding = self.layers.iter().any(|l| l.sliding).then(|| layout.mask(self.sliding_window, kind));
        let rope = self.rotary.cos_sin(&layout.pos, kind);
        for (i, l) in self.layers.iter().enumerate() {
            let (q, k, v) = l.attn.qkv(&l.norm1.forward(&x), layout);
            let (q, k) = (l.q_norm.forward(&q), l.k_norm.forward(&k));
            let mask = if l.sliding { sliding.as_ref().expect("sliding mask") } else { &full };
            let last = Outputs::at_layer(out, i, self.layers.len());
            let kept = last.map(|o| o.mask(if l.sliding { self.sliding_window } else { None }, kind));
            let h = l.attn.attend(q, k, v, Some(&rope), kept.as_ref().unwrap_or(mask), layout, last, cache.as_deref_mut().map(|c| (c, i)));
            x = Outputs::pick_of(last, x) + h;
            x += l.mlp.forward(&l.norm2.forward(&x));
        }
        layout.unpack(&self.norm.forward(&x), out)
    }

    fn packs(&self) -> bool {
        !self.rotary.varies_by_length()
    }

    fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden).to_kind(Kind::Float)
    }
}
