//! `classify`: a sequence-classification head over a text (or pair). Output: `Classification`
//! (`logits`, `probs`, `label`, `label_id`).

use rmpv::Value;

use super::encoder;
use super::fields::Input;
use super::validation::ValidationError;
use super::{JobInput, Request};
use crate::encoding::Encoding;
use crate::lm::LmSpec;

pub const INPUT_KEYS: &[&str] = &["text", "text_pair"];
pub const PARAM_KEYS: &[&str] = &[];

pub fn parse(lm: &LmSpec, input: &Input) -> Result<Request, ValidationError> {
    let text = input.text("text")?.ok_or(ValidationError::Missing { field: "input.text".into(), or: None })?;
    let pair = input.text("text_pair")?;
    let (ids, type_ids) = encoder::encode(lm, text, pair)?;
    // The encoder input is shared with `embed`; `normalize` does not apply and stays at its
    // default, so cache keys are as before kinds had their own params.
    Ok(Request::new(ids.len(), JobInput::Encode { ids, type_ids, normalize: true }))
}

/// The `Classification` output on the wire.
pub fn to_wire(logits: &[f32], probs: &[f32], label: &str, label_id: usize, encoding: Encoding) -> Value {
    super::wire_map(vec![
        ("logits", super::wire_floats(logits, encoding)),
        ("probs", super::wire_floats(probs, encoding)),
        ("label", Value::from(label)),
        ("label_id", Value::from(label_id as u64)),
    ])
}
