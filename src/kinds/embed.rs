//! `embed`: a text's pooled (by default L2-normalised) embedding. Output: `Embedding`
//! (`embedding`, `dim`, and `tokens`: how many tokens the model read, special ones included).

use rmpv::Value;

use super::encoder;
use super::fields::{Input, Params};
use super::validation::ValidationError;
use super::{JobInput, Request};
use crate::encoding::Encoding;
use crate::lm::LmSpec;

pub const INPUT_KEYS: &[&str] = &["text"];
pub const PARAM_KEYS: &[&str] = &["normalize"];

pub fn parse(lm: &LmSpec, input: &Input, params: &Params) -> Result<Request, ValidationError> {
    let normalize = params.boolean("normalize")?.unwrap_or(true);
    let text = input.text("text")?.ok_or(ValidationError::Missing { field: "input.text".into(), or: None })?;
    let (ids, type_ids) = encoder::encode(lm, text, None)?;
    Ok(Request::new(ids.len(), JobInput::Encode { ids, type_ids, normalize }))
}

/// The `Embedding` output on the wire.
pub fn to_wire(embedding: &[f32], tokens: usize, encoding: Encoding) -> Value {
    super::wire_map(vec![
        ("embedding", super::wire_floats(embedding, encoding)),
        ("dim", Value::from(embedding.len() as u64)),
        ("tokens", Value::from(tokens as u64)),
    ])
}
