//! The Llama family: Llama (Llama 3's RoPE too), Mistral (sliding window) and Qwen2 (q/k/v
//! biases), one pre-norm decoder whose differences are [`Flags`].

use tch::{Kind, Tensor};

use crate::hf_config::HfConfig;
use super::layers::{embed, Act, Attention, KvCache, Layout, Linear, Mlp, Norm, Outputs, Rotary};
use super::weights::Scope;
use super::{CausalLm, EngineError, Net};

/// What sets a family member apart.
#[derive(Clone, Copy, Default)]
pub(super) struct Flags {
    /// Biases on q, k and v (Qwen2), besides `attention_bias`.
    pub qkv_bias: bool,
    /// Attention sees the last `sliding_window` keys only (Mistral).
    pub sliding_window: bool,
}

pub(super) struct Block {
    pub norm1: Norm,
    pub attn: Attention,
    pub norm2: Norm,
    pub mlp: Mlp,
}

pub(super) struct Llama {
    pub embed: Tensor,
    pub layers: Vec<Block>,
    pub norm: Norm,
    pub lm_head: Linear,
    pub rotary: Rotary,
    pub sliding_window: Option<i64>,
}

pub(super) fn check(c: &HfConfig) -> Result<(), String> {
    c.rope()?;
    act(c)?;
    Ok(())
}

fn act(c: &HfConfig) -> Result<Act, String> {
    Act::parse(c.hidden_act.as_deref().unwrap_or("silu")).map_err(|e| format!("config.json: hidden_act: {e}"))
}

pub(super) fn load_llama(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    Ok(Net::Decoder(Box::new(Llama::load(c, w, Flags::default())?)))
}

pub(super) fn load_mistral(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    Ok(Net::Decoder(Box::new(Llama::load(c, w, Flags { sliding_window: true, ..Flags::default() })?)))
}

pub(super) fn load_qwen2(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    Ok(Net::Decoder(Box::new(Llama::load(c, w, Flags { qkv_bias: true, ..Flags::default() })?)))
}

/// The tied or separate LM head.
pub(super) fn lm_head(c: &HfConfig, w: &Scope, embed: &Tensor) -> Linear {
    let head = match w.try_get("lm_head.weight") {
        Some(h) if !c.tie_word_embeddings.unwrap_or(false) => h,
        _ => embed.shallow_clone(),
    };
    Linear::new(head, None)
}

impl Llama {
    pub fn load(c: &HfConfig, w: &Scope, flags: Flags) -> Result<Llama, EngineError> {
        let eps = c.rms_norm_eps.unwrap_or(1e-6);
        let head_dim = c.head_dim() as i64;
        let bias = c.attention_bias.unwrap_or(false);
        let act = act(c).map_err(EngineError::Load)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = w.pp("layers").pp(i);
                let a = l.pp("self_attn");
                let p = l.pp("mlp");
                Ok(Block {
                    norm1: Norm::rms(&l, "input_layernorm", eps)?,
                    norm2: Norm::rms(&l, "post_attention_layernorm", eps)?,
                    attn: Attention {
                        qkv: a.fused(&["q_proj", "k_proj", "v_proj"], bias || flags.qkv_bias)?,
                        o: a.linear("o_proj", bias)?,
                        heads: c.num_attention_heads as i64,
                        kv_heads: c.kv_heads() as i64,
                        head_dim,
                        scale: 1.0 / (head_dim as f64).sqrt(),
                        softcap: None,
                    },
                    mlp: Mlp::Gated { gate_up: p.fused(&["gate_proj", "up_proj"], false)?, down: p.linear("down_proj", false)?, act },
                })
            })
            .collect::<Result<_, EngineError>>()?;
        let embed = w.get("embed_tokens.weight")?;
        Ok(Llama {
            lm_head: lm_head(c, w, &embed),
            embed,
            layers,
            norm: Norm::rms(w, "norm", eps)?,
            rotary: Rotary::new(&c.rope().map_err(EngineError::Load)?, head_dim as usize, w.device())?,
            sliding_window: if flags.sliding_window { c.sliding_window.map(|w| w as i64) } else { None },
        })
    }
}

impl CausalLm for Llama {
    fn vocab(&self) -> i64 {
        self.embed.size()[0]
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn forward_to(&self, ids: &Tensor, layout: &Layout, mut cache: Option<&mut KvCache>, out: Option<&Outputs>) -> Tensor {
        let mut x = embed(&self.embed, &layout.pack(ids));
        let kind = x.kind();
        let mask_all = layout.mask(self.sliding_window, kind);
        let rope = self.rotary.cos_sin(&layout.pos, kind);
        for (i, l) in self.layers.iter().enumerate() {
            let (q, k, v) = l.attn.qkv(&l.norm1.forward(&x), layout);
            let last = Outputs::at_layer(out, i, self.layers.len());
            let mask = last.map(|o| o.mask(self.sliding_window, kind));
            let h = l.attn.attend(q, k, v, Some(&rope), mask.as_ref().unwrap_or(&mask_all), layout, last, cache.as_deref_mut().map(|c| (c, i)));
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
