//! XLM-RoBERTa (bge-m3, multilingual-e5, bge rerankers): the BERT encoder with RoBERTa's
//! positions (row i reads position `padding_idx + 1 + i`; inputs hold no padding ids, which real
//! tokenizers never emit inside a text) and the classification head `out_proj(tanh(dense(<s>)))`.

use super::bert::Bert;
use crate::hf_config::HfConfig;
use super::layers::ClassifierHead;
use super::weights::Scope;
use super::{EngineError, Net};

pub(super) fn check(c: &HfConfig) -> Result<(), String> {
    super::bert::check(c)
}

pub(super) fn load(c: &HfConfig, w: &Scope) -> Result<Net, EngineError> {
    let head = w.pp("classifier");
    let classifier = match (head.linear("dense", true), head.linear("out_proj", true)) {
        (Ok(dense), Ok(out)) => Some(ClassifierHead { dense, out }),
        _ => None,
    };
    Ok(Net::Encoder(Bert::load(c, w, c.position_offset() as i64, classifier)?))
}
