//! Phi-3: the Llama layout with fused `qkv_proj` and `gate_up_proj` (run fused, as every
//! architecture's projections are), a sliding window on every layer when configured, and
//! LongRoPE where `rope_scaling` says so.

use crate::hf_config::HfConfig;
use super::layers::{Act, Attention, Mlp, Norm, Rotary};
use super::llama::{lm_head, Block, Llama};
use super::weights::Scope;
use super::{EngineError, Net};

fn act(c: &HfConfig) -> Result<Act, String> {
    Act::parse(c.hidden_act.as_deref().unwrap_or("silu")).map_err(|e| format!("config.json: hidden_act: {e}"))
}

pub(super) fn check(c: &HfConfig) -> Result<(), String> {
    c.rope()?;
    act(c)?;
    Ok(())
}

pub(super) fn load(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    let eps = c.rms_norm_eps.unwrap_or(1e-5);
    let (heads, kv_heads, head_dim) = (c.num_attention_heads as i64, c.kv_heads() as i64, c.head_dim() as i64);
    let inter = c.intermediate_size.ok_or_else(|| EngineError::Load("config.json: intermediate_size is missing".into()))? as i64;
    let act = act(c).map_err(EngineError::Load)?;
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            let l = w.pp("layers").pp(i);
            Ok(Block {
                norm1: Norm::rms(&l, "input_layernorm", eps)?,
                attn: Attention {
                    qkv: l.pp("self_attn").linear("qkv_proj", false)?.expect_rows((heads + 2 * kv_heads) * head_dim, "qkv_proj")?,
                    o: l.pp("self_attn").linear("o_proj", false)?,
                    heads,
                    kv_heads,
                    head_dim,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    softcap: None,
                },
                norm2: Norm::rms(&l, "post_attention_layernorm", eps)?,
                mlp: Mlp::Gated { gate_up: l.pp("mlp").linear("gate_up_proj", false)?.expect_rows(2 * inter, "gate_up_proj")?, down: l.pp("mlp").linear("down_proj", false)?, act },
            })
        })
        .collect::<Result<_, EngineError>>()?;
    let embed = w.get("embed_tokens.weight")?;
    Ok(Net::Decoder(Box::new(Llama {
        lm_head: lm_head(c, w, &embed),
        embed,
        layers,
        norm: Norm::rms(w, "norm", eps)?,
        rotary: Rotary::new(&c.rope().map_err(EngineError::Load)?, head_dim as usize, w.device())?,
        sliding_window: c.sliding_window.map(|w| w as i64),
    })))
}
