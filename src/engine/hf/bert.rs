//! BERT-style encoders: post-norm layers over word + position + token-type embeddings, with
//! right padding and a key mask. XLM-RoBERTa loads into the same [`Bert`] with its position
//! offset and classifier head.
//!
//! A batch's rows come right-padded to its longest, but padding is only needed where tokens meet:
//! in attention. The projections, the MLP and the norms (nearly all of the arithmetic) run on the
//! real tokens alone, packed one after another; a batch of sentences of mixed lengths does about
//! half the work a padded forward does (what sentence-transformers and transformers do).

use tch::{Kind, Tensor};

use crate::hf_config::HfConfig;
use super::layers::{Act, ClassifierHead, Linear, Norm, Tokens, embed, key_mask};
use super::weights::Scope;
use super::{EngineError, Net};

pub(crate) struct Bert {
    pub word: Tensor,
    pub position: Tensor,
    pub token_type: Tensor,
    emb_norm: Norm,
    layers: Vec<Layer>,
    /// Row i reads position embedding `position_offset + i` (RoBERTa: `padding_idx + 1`).
    pub position_offset: i64,
    pub classifier: Option<ClassifierHead>,
    heads: i64,
    head_dim: i64,
    act: Act,
}

struct Layer {
    /// Query, key and value projections fused (one GEMM).
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    inter: Linear,
    out: Linear,
    out_norm: Norm,
}

pub(super) fn check(c: &HfConfig) -> Result<(), String> {
    if let Some(p) = c.get("position_embedding_type").and_then(|v| v.as_str()).filter(|&p| p != "absolute") {
        return Err(format!("config.json: position_embedding_type '{p}' is not supported (absolute)"));
    }
    Act::parse(c.hidden_act.as_deref().unwrap_or("gelu")).map_err(|e| format!("config.json: hidden_act: {e}"))?;
    Ok(())
}

/// `BertModel` and `BertForSequenceClassification` (pooler → tanh → classifier).
pub(super) fn load(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    let classifier = match (w.linear("pooler.dense", true), w.linear("classifier", true)) {
        (Ok(dense), Ok(out)) => Some(ClassifierHead { dense, out }),
        _ => None,
    };
    Ok(Net::Encoder(Bert::load(c, w, 0, classifier)?))
}

impl Bert {
    pub fn load(c: &HfConfig, w: &Scope, position_offset: i64, classifier: Option<ClassifierHead>) -> Result<Bert, EngineError> {
        let eps = c.layer_norm_eps.unwrap_or(1e-12);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = w.pp("encoder.layer").pp(i);
                Ok(Layer {
                    qkv: l.fused(&["attention.self.query", "attention.self.key", "attention.self.value"], true)?,
                    attn_out: l.linear("attention.output.dense", true)?,
                    attn_norm: Norm::layer(&l, "attention.output.LayerNorm", eps)?,
                    inter: l.linear("intermediate.dense", true)?,
                    out: l.linear("output.dense", true)?,
                    out_norm: Norm::layer(&l, "output.LayerNorm", eps)?,
                })
            })
            .collect::<Result<_, EngineError>>()?;
        let e = w.pp("embeddings");
        Ok(Bert {
            word: e.get("word_embeddings.weight")?,
            position: e.get("position_embeddings.weight")?,
            token_type: e.get("token_type_embeddings.weight")?,
            emb_norm: Norm::layer(&e, "LayerNorm", eps)?,
            layers,
            position_offset,
            classifier,
            heads: c.num_attention_heads as i64,
            head_dim: (c.hidden_size / c.num_attention_heads) as i64,
            act: Act::parse(c.hidden_act.as_deref().unwrap_or("gelu")).map_err(EngineError::Load)?,
        })
    }

    /// Positions an input may fill.
    pub fn max_positions(&self) -> i64 {
        self.position.size()[0] - self.position_offset
    }

    /// Hidden states `[B, T, H]` of right-padded rows (`keep` marks the real tokens; the padded
    /// positions of the result hold zeros).
    pub fn forward(&self, ids: &Tensor, type_ids: &Tensor, keep: &Tensor) -> Tensor {
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let pos = Tensor::arange_start(self.position_offset, self.position_offset + t, (Kind::Int64, ids.device())).unsqueeze(0);
        let x = embed(&self.word, ids) + embed(&self.position, &pos) + embed(&self.token_type, type_ids);
        let kind = x.kind();
        let width = self.heads * self.head_dim;
        let mask = key_mask(keep, kind);
        let tokens = Tokens::of(keep);
        let mut x = tokens.pack(&self.emb_norm.forward(&x).view([b * t, width]));
        for l in &self.layers {
            let qkv = tokens.unpack(&l.qkv.forward(&x)).view([b, t, 3, self.heads, self.head_dim]).permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
            // The fused kernel (as transformers' SDPA attention): no `[B, heads, T, T]` scores
            // and probabilities materialised and re-read.
            let ctx = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, 1.0 / (self.head_dim as f64).sqrt(), false);
            let ctx = ctx.transpose(1, 2).contiguous().view([b * t, width]);
            x = l.attn_norm.forward(&(l.attn_out.forward(&tokens.pack(&ctx)) + &x));
            let h = self.act.forward(&l.inter.forward(&x));
            x = l.out_norm.forward(&(l.out.forward(&h) + &x));
        }
        tokens.unpack(&x).view([b, t, width])
    }
}
