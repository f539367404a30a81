//! `tensor`: a TorchScript model's `forward` over the job's tensors, in the order of the model's
//! `[[inputs]]`. Output: `Tensor` (`outputs`). Tensor jobs take no params.

use rmpv::Value;

use super::fields::Input;
use super::validation::ValidationError;
use super::{JobInput, Request};
use crate::encoding::Encoding;
use crate::tensor::{DType, TensorData};

pub const INPUT_KEYS: &[&str] = &["inputs"];
pub const PARAM_KEYS: &[&str] = &[];

/// One input a tensor model takes (its `[[inputs]]` entry in jetbatch.toml), without batch dim.
#[derive(Debug, Clone, Copy)]
pub struct Slot<'a> {
    pub name: &'a str,
    pub dtype: DType,
    /// `-1` marks a variable dim, any of `1..=max_len`.
    pub shape: &'a [i64],
    pub max_len: i64,
}

/// Parses `input.inputs` against the model's `slots`; `max_elements` bounds each tensor before
/// anything is copied. The cost is the number of elements (at least 1).
pub fn parse(model: &str, slots: &[Slot], max_elements: usize, input: &Input) -> Result<Request, ValidationError> {
    let list = input
        .get("inputs")
        .ok_or(ValidationError::Missing { field: "input.inputs".into(), or: None })?
        .as_array()
        .ok_or(ValidationError::Expected { field: "input.inputs".into(), expected: "a list of tensors" })?;
    if list.len() != slots.len() {
        return Err(ValidationError::Invalid {
            field: "input.inputs".into(),
            detail: format!(
                "model '{model}' takes {} tensor(s) ({}), got {}",
                slots.len(),
                slots.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
                list.len()
            ),
        });
    }
    let mut tensors = Vec::with_capacity(list.len());
    let mut cost = 0;
    for (i, (wire, slot)) in list.iter().zip(slots).enumerate() {
        let field = format!("input.inputs[{i}]");
        let t = TensorData::from_wire(wire, &field, max_elements).map_err(|e| ValidationError::from_message(&e))?;
        if t.dtype != slot.dtype {
            return Err(ValidationError::Invalid {
                field: format!("{field}.dtype"),
                detail: format!("input '{}' is {}, got {}", slot.name, slot.dtype.name(), t.dtype.name()),
            });
        }
        let fits = t.shape.len() == slot.shape.len()
            && t.shape.iter().zip(slot.shape).all(|(&got, &want)| if want < 0 { (1..=slot.max_len).contains(&got) } else { got == want });
        if !fits {
            let variable = if slot.shape.contains(&-1) { format!(" (-1: any of 1..={})", slot.max_len) } else { String::new() };
            return Err(ValidationError::Invalid {
                field: format!("{field}.shape"),
                detail: format!("input '{}' takes {:?}{variable}, got {:?}", slot.name, slot.shape, t.shape),
            });
        }
        cost += t.numel();
        tensors.push(t);
    }
    Ok(Request::new(cost.max(1), JobInput::Tensor(tensors)))
}

/// The `Tensor` output on the wire.
pub fn to_wire(tensors: &[TensorData], encoding: Encoding) -> Value {
    super::wire_map(vec![("outputs", Value::Array(tensors.iter().map(|t| t.to_wire(encoding)).collect()))])
}
