//! GPT-2: learned positions, LayerNorm, fused Conv1D q/k/v, `gelu_new` MLP.

use tch::{Kind, Tensor};

use crate::hf_config::HfConfig;
use super::layers::{embed, Act, Attention, KvCache, Layout, Linear, Mlp, Norm, Outputs};
use super::weights::Scope;
use super::{CausalLm, EngineError, Net};

struct Block {
    ln1: Norm,
    attn: Attention,
    ln2: Norm,
    mlp: Mlp,
}

struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    layers: Vec<Block>,
    ln_f: Norm,
    lm_head: Linear,
}

pub(super) fn check(c: &HfConfig) -> Result<(), String> {
    if let Some(a) = c.get("activation_function").and_then(|v| v.as_str()) {
        Act::parse(a).map_err(|e| format!("config.json: activation_function: {e}"))?;
    }
    Ok(())
}

pub(super) fn load(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    let eps = c.layer_norm_eps.unwrap_or(1e-5);
    let heads = c.num_attention_heads as i64;
    let head_dim = (c.hidden_size / c.num_attention_heads) as i64;
    let hidden = c.hidden_size as i64;
    let act = Act::parse(c.get("activation_function").and_then(|v| v.as_str()).unwrap_or("gelu_new")).map_err(EngineError::Load)?;
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            let l = w.pp("h").pp(i);
            Ok(Block {
                ln1: Norm::layer(&l, "ln_1", eps)?,
                attn: Attention {
                    qkv: l.conv1d("attn.c_attn")?.expect_rows(3 * hidden, "attn.c_attn")?,
                    o: l.conv1d("attn.c_proj")?,
                    heads,
                    kv_heads: heads,
                    head_dim,
                    scale: 1.0 / (head_dim as f64).sqrt(),
                    softcap: None,
                },
                ln2: Norm::layer(&l, "ln_2", eps)?,
                mlp: Mlp::Plain { fc: l.conv1d("mlp.c_fc")?, proj: l.conv1d("mlp.c_proj")?, act },
            })
        })
        .collect::<Result<_, EngineError>>()?;
    let wte = w.get("wte.weight")?;
    Ok(Net::Decoder(Box::new(Gpt2 {
        lm_head: Linear::new(w.try_get("lm_head.weight").unwrap_or_else(|| wte.shallow_clone()), None),
        wte,
        wpe: w.get("wpe.weight")?,
        layers,
        ln_f: Norm::layer(w, "ln_f", eps)?,
    })))
}

impl CausalLm for Gpt2 {
    fn vocab(&self) -> i64 {
        self.wte.size()[0]
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn forward_to(&self, ids: &Tensor, layout: &Layout, mut cache: Option<&mut KvCache>, out: Option<&Outputs>) -> Tensor {
        let mut x = embed(&self.wte, &layout.pack(ids)) + embed(&self.wpe, &layout.pack(&layout.pos));
        let mask_all = layout.mask(None, x.kind());
        for (i, l) in self.layers.iter().enumerate() {
            let (q, k, v) = l.attn.qkv(&l.ln1.forward(&x), layout);
            let last = Outputs::at_layer(out, i, self.layers.len());
            let mask = last.map(|o| o.mask(None, x.kind()));
            let h = l.attn.attend(q, k, v, None, mask.as_ref().unwrap_or(&mask_all), layout, last, cache.as_deref_mut().map(|c| (c, i)));
            x = Outputs::pick_of(last, x) + h;
            x += l.mlp.forward(&l.ln2.forward(&x));
        }
        layout.unpack(&self.ln_f.forward(&x), out)
    }

    fn packs(&self) -> bool {
        true
    }

    fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden).to_kind(Kind::Float)
    }
}
