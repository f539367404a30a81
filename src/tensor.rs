//! Plain tensors as they cross the wire and the engine boundary: a dtype, a shape and little-endian
//! bytes. No libtorch types here, so the edge (parsing), the cache and the results stage never touch
//! `tch`; only the engine thread turns these into `tch::Tensor`s.

use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::encoding::Encoding;

/// Element types accepted on the wire (`schemas/tensor.schema.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    F16,
    Bf16,
    I64,
    I32,
    U8,
    Bool,
}

impl DType {
    pub const ALL: [DType; 8] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::Bf16,
        DType::I64,
        DType::I32,
        DType::U8,
        DType::Bool,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::U8 | DType::Bool => 1,
        }
    }

    /// Little-endian bytes of one element given as a JSON/msgpack number (for float dtypes also
    /// one of the strings "NaN", "Infinity", "-Infinity", as JSON results write them).
    fn push_number(self, v: &Value, out: &mut Vec<u8>) -> Option<()> {
        let f = || v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)).or_else(|| non_finite(v.as_str()?));
        match self {
            DType::F32 => out.extend_from_slice(&(f()? as f32).to_le_bytes()),
            DType::F64 => out.extend_from_slice(&f()?.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f64(f()?).to_le_bytes()),
            DType::Bf16 => out.extend_from_slice(&half::bf16::from_f64(f()?).to_le_bytes()),
            DType::I64 => out.extend_from_slice(&v.as_i64()?.to_le_bytes()),
            DType::I32 => out.extend_from_slice(&i32::try_from(v.as_i64()?).ok()?.to_le_bytes()),
            DType::U8 => out.push(u8::try_from(v.as_u64()?).ok()?),
            DType::Bool => out.push(match v {
                Value::Boolean(b) => *b as u8,
                _ => match v.as_u64()? {
                    0 => 0,
                    1 => 1,
                    _ => return None,
                },
            }),
        }
        Some(())
    }

    /// One element of little-endian `bytes` as a wire number (JSON results).
    fn number_at(self, bytes: &[u8]) -> Value {
        let a = |n: usize| -> [u8; 8] {
            let mut b = [0u8; 8];
            b[..n].copy_from_slice(&bytes[..n]);
            b
        };
        match self {
            DType::F32 => Value::from(f32::from_le_bytes(a(4)[..4].try_into().unwrap())),
            DType::F64 => Value::from(f64::from_le_bytes(a(8))),
            DType::F16 => Value::from(half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()),
            DType::Bf16 => Value::from(half::bf16::from_le_bytes([bytes[0], bytes[1]]).to_f32()),
            DType::I64 => Value::from(i64::from_le_bytes(a(8))),
            DType::I32 => Value::from(i32::from_le_bytes(a(4)[..4].try_into().unwrap())),
            DType::U8 => Value::from(bytes[0]),
            DType::Bool => Value::Boolean(bytes[0] != 0),
        }
    }
}

/// The names JSON uses for the floats it cannot write as numbers.
pub const NON_FINITE_NAMES: [&str; 3] = ["NaN", "Infinity", "-Infinity"];

fn non_finite(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// A float `Value` for a JSON document: non-finite floats become "NaN", "Infinity" or
/// "-Infinity" (JSON numbers cannot say them); everything else is returned as it is.
pub fn json_float(v: Value) -> Value {
    let x = match v {
        Value::F32(x) => x as f64,
        Value::F64(x) => x,
        other => return other,
    };
    match x {
        x if x.is_nan() => Value::from(NON_FINITE_NAMES[0]),
        x if x == f64::INFINITY => Value::from(NON_FINITE_NAMES[1]),
        x if x == f64::NEG_INFINITY => Value::from(NON_FINITE_NAMES[2]),
        _ => v,
    }
}

/// A dense tensor: `data` holds `numel * dtype.size()` little-endian bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorData {
    pub dtype: DType,
    pub shape: Vec<i64>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl TensorData {
    pub fn numel(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    /// Parses the wire form `{dtype, shape, data}`; `field` names the place in the job for errors.
    /// `max_elements` bounds the allocation before anything is copied.
    pub fn from_wire(v: &Value, field: &str, max_elements: usize) -> Result<TensorData, String> {
        let map = v.as_map().ok_or_else(|| format!("{field}: expected a map {{dtype, shape, data}}"))?;
        let get = |key: &str| map.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v);
        let dtype = get("dtype")
            .ok_or_else(|| format!("{field}.dtype: missing"))?
            .as_str()
            .and_then(DType::parse)
            .ok_or_else(|| {
                format!("{field}.dtype: expected one of f32, f64, f16, bf16, i64, i32, u8, bool")
            })?;
        let shape: Vec<i64> = get("shape")
            .ok_or_else(|| format!("{field}.shape: missing"))?
            .as_array()
            .ok_or_else(|| format!("{field}.shape: expected a list of non-negative integers"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| i64::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("{field}.shape: expected a list of non-negative integers"))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
            .filter(|&n| n <= max_elements)
            .ok_or_else(|| format!("{field}.shape: more than {max_elements} elements"))?;
        let data = match get("data").ok_or_else(|| format!("{field}.data: missing"))? {
            Value::Binary(b) => {
                if b.len() != numel * dtype.size() {
                    return Err(format!(
                        "{field}.data: {} bytes, but shape {shape:?} of {} needs {}",
                        b.len(),
                        dtype.name(),
                        numel * dtype.size()
                    ));
                }
                b.clone()
            }
            Value::Array(items) => {
                if items.len() != numel {
                    return Err(format!(
                        "{field}.data: {} values, but shape {shape:?} needs {numel}",
                        items.len()
                    ));
                }
                let mut out = Vec::with_capacity(numel * dtype.size());
                for (i, item) in items.iter().enumerate() {
                    dtype.push_number(item, &mut out).ok_or_else(|| {
                        format!("{field}.data[{i}]: not a valid {} value", dtype.name())
                    })?;
                }
                out
            }
            _ => return Err(format!("{field}.data: expected binary (msgpack) or a list of numbers")),
        };
        Ok(TensorData { dtype, shape, data })
    }

    /// The wire form: binary data for MessagePack, a flat number list for JSON (non-finite floats
    /// as "NaN", "Infinity", "-Infinity").
    pub fn to_wire(&self, encoding: Encoding) -> Value {
        let data = match encoding {
            Encoding::MsgPack => Value::Binary(self.data.clone()),
            Encoding::Json => Value::Array(
                self.data.chunks_exact(self.dtype.size()).map(|c| json_float(self.dtype.number_at(c))).collect(),
            ),
        };
        Value::Map(vec![
            (Value::from("dtype"), Value::from(self.dtype.name())),
            (Value::from("shape"), Value::Array(self.shape.iter().map(|&d| Value::from(d)).collect())),
            (Value::from("data"), data),
        ])
    }

    /// Values as f64, for tests and tolerant comparisons.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.data
            .chunks_exact(self.dtype.size())
            .map(|c| {
                let v = self.dtype.number_at(c);
                v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)).unwrap_or_else(|| {
                    v.as_bool().map(|b| b as u8 as f64).unwrap_or(f64::NAN)
                })
            })
            .collect()
    }
}

/// Convenience for callers building f32 tensors (tests, demo jobs, the loadtest).
impl From<(&[f32], Vec<i64>)> for TensorData {
    fn from((values, shape): (&[f32], Vec<i64>)) -> Self {
        TensorData {
            dtype: DType::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(dtype: &str, shape: Vec<u64>, data: Value) -> Value {
        Value::Map(vec![
            (Value::from("dtype"), Value::from(dtype)),
            (Value::from("shape"), Value::Array(shape.into_iter().map(Value::from).collect())),
            (Value::from("data"), data),
        ])
    }

    #[test]
    fn json_numbers_and_msgpack_bytes_decode_to_the_same_tensor() {
        let from_list = TensorData::from_wire(
            &wire("f32", vec![2], Value::Array(vec![Value::from(1.5), Value::from(-2)])),
            "input.inputs[0]",
            100,
        )
        .unwrap();
        let bytes: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let from_bin =
            TensorData::from_wire(&wire("f32", vec![2], Value::Binary(bytes)), "x", 100).unwrap();
        assert_eq!(from_list, from_bin);
        assert_eq!(from_list.to_f64_vec(), vec![1.5, -2.0]);
    }

    #[test]
    fn every_dtype_round_trips_through_json_numbers() {
        for dtype in DType::ALL {
            let items = vec![Value::from(0), Value::from(1)];
            let t = TensorData::from_wire(&wire(dtype.name(), vec![2], Value::Array(items)), "x", 10)
                .unwrap();
            assert_eq!(t.data.len(), 2 * dtype.size());
            let back = TensorData::from_wire(&t.to_wire(Encoding::Json), "x", 10).unwrap();
            assert_eq!(back, t, "{dtype:?}");
            assert_eq!(t.to_f64_vec(), vec![0.0, 1.0]);
        }
    }

    #[test]
    fn non_finite_floats_are_strings_in_json_and_read_back() {
        for dtype in [DType::F32, DType::F64, DType::F16, DType::Bf16] {
            let items = ["NaN", "Infinity", "-Infinity"].map(Value::from).into_iter().chain([Value::from(2)]).collect();
            let t = TensorData::from_wire(&wire(dtype.name(), vec![4], Value::Array(items)), "x", 10).unwrap();
            let json = t.to_wire(Encoding::Json);
            let data = json.as_map().unwrap().iter().find(|(k, _)| k.as_str() == Some("data")).unwrap().1.clone();
            assert_eq!(&data.as_array().unwrap()[..3], &["NaN", "Infinity", "-Infinity"].map(Value::from)[..], "{dtype:?}");
            assert_eq!(TensorData::from_wire(&json, "x", 10).unwrap(), t, "{dtype:?}");
            let v = t.to_f64_vec();
            assert!(v[0].is_nan() && v[1] == f64::INFINITY && v[2] == f64::NEG_INFINITY && v[3] == 2.0);
        }
        // Integer dtypes take numbers only.
        let err = TensorData::from_wire(&wire("i32", vec![1], Value::Array(vec![Value::from("NaN")])), "t", 10).unwrap_err();
        assert_eq!(err, "t.data[0]: not a valid i32 value");
        assert!(TensorData::from_wire(&wire("f32", vec![1], Value::Array(vec![Value::from("nan")])), "t", 10).is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let err = TensorData::from_wire(&wire("f32", vec![3], Value::Binary(vec![0; 4])), "input.inputs[1]", 10)
            .unwrap_err();
        assert!(err.starts_with("input.inputs[1].data: 4 bytes"), "{err}");
        let err = TensorData::from_wire(&wire("f7", vec![1], Value::Array(vec![])), "t", 10).unwrap_err();
        assert!(err.starts_with("t.dtype"), "{err}");
        let err = TensorData::from_wire(&wire("u8", vec![1000, 1000], Value::Array(vec![])), "t", 10)
            .unwrap_err();
        assert!(err.contains("more than 10 elements"), "{err}");
        let err = TensorData::from_wire(&wire("u8", vec![1], Value::Array(vec![Value::from(300)])), "t", 10)
            .unwrap_err();
        assert_eq!(err, "t.data[0]: not a valid u8 value");
    }
}
