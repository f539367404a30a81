//! A Hugging Face model's `config.json`: the fields every architecture reads, and RoPE settings.
//! It sits below both of its readers: the request edge (`lm.rs`) reads max positions, vocabulary
//! and BOS/EOS from here, the engine's model code (`engine/hf/`) the rest; the architecture table
//! is the engine's (`engine/hf/archs.rs`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// `config.json`, the fields every architecture reads. Names follow transformers (GPT-2's own
/// too); an architecture's own fields are read from `extra` by its module.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(alias = "n_embd")]
    pub hidden_size: usize,
    #[serde(alias = "n_layer")]
    pub num_hidden_layers: usize,
    #[serde(alias = "n_head")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default, alias = "n_inner")]
    pub intermediate_size: Option<usize>,
    pub vocab_size: usize,
    #[serde(alias = "n_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub rms_norm_eps: Option<f64>,
    #[serde(default, alias = "layer_norm_epsilon")]
    pub layer_norm_eps: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    #[serde(default)]
    pub type_vocab_size: Option<usize>,
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Every other field, for the architecture modules.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl HfConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The first position an input reads: RoBERTa's models (`model_type` roberta, xlm-roberta)
    /// start at `pad_token_id + 1`.
    pub fn position_offset(&self) -> usize {
        match self.get("model_type").and_then(Value::as_str) {
            Some("roberta" | "xlm-roberta") => self.get("pad_token_id").and_then(Value::as_u64).unwrap_or(1) as usize + 1,
            _ => 0,
        }
    }

    /// Positions an input may fill.
    pub fn max_positions(&self) -> usize {
        self.max_position_embeddings.saturating_sub(self.position_offset())
    }

    /// A classifier's labels by id (`id2label`, its keys read as numbers); empty without one.
    pub fn labels(&self) -> Vec<String> {
        let mut pairs: Vec<(usize, String)> =
            self.id2label.iter().flatten().filter_map(|(k, v)| k.parse().ok().map(|k| (k, v.clone()))).collect();
        pairs.sort();
        pairs.into_iter().map(|(_, v)| v).collect()
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// An architecture-specific field.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.extra.get(field).filter(|v| !v.is_null())
    }

    pub fn get_f64(&self, field: &str) -> Option<f64> {
        self.get(field).and_then(Value::as_f64)
    }

    pub fn get_bool(&self, field: &str) -> Option<bool> {
        self.get(field).and_then(Value::as_bool)
    }

    /// RoPE settings: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
    pub fn rope(&self) -> Result<Rope, String> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()).filter(|p| !p.is_null());
        self.rope_from(params, self.rope_theta.unwrap_or(10_000.0))
    }

    /// RoPE settings from one parameter object (`rope_theta`, `rope_type` and the scaling's
    /// fields), `theta` when it names none.
    pub fn rope_from(&self, params: Option<&Value>, theta: f64) -> Result<Rope, String> {
        let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).unwrap_or(theta);
        let kind = params.and_then(|p| p.get("rope_type").or(p.get("type"))).and_then(Value::as_str).unwrap_or("default");
        let num = |k: &str| params.and_then(|p| p.get(k)).and_then(Value::as_f64).ok_or_else(|| format!("config.json: {kind} RoPE needs {k}"));
        let list = |k: &str| -> Result<Vec<f64>, String> {
            params
                .and_then(|p| p.get(k))
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| format!("config.json: {kind} RoPE needs {k} (a list of numbers)"))
        };
        if let Some(f) = params.and_then(|p| p.get("partial_rotary_factor")).and_then(Value::as_f64).or(self.get_f64("partial_rotary_factor")) {
            if f != 1.0 {
                return Err(format!("config.json: partial_rotary_factor {f} is not supported (1.0 only)"));
            }
        }
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            "longrope" => {
                let original = params
                    .and_then(|p| p.get("original_max_position_embeddings"))
                    .and_then(Value::as_f64)
                    .or(self.get_f64("original_max_position_embeddings"))
                    .ok_or("config.json: longrope RoPE needs original_max_position_embeddings")?;
                let factor = params.and_then(|p| p.get("factor")).and_then(Value::as_f64).unwrap_or(self.max_position_embeddings as f64 / original);
                let attention_factor = params.and_then(|p| p.get("attention_factor")).and_then(Value::as_f64).unwrap_or_else(|| {
                    if factor <= 1.0 {
                        1.0
                    } else {
                        (1.0 + factor.ln() / original.ln()).sqrt()
                    }
                });
                RopeScaling::LongRope { short_factor: list("short_factor")?, long_factor: list("long_factor")?, original_max_position_embeddings: original, attention_factor }
            }
            other => return Err(format!("config.json: rope_type '{other}' is not supported (default, linear, llama3, longrope)")),
        };
        Ok(Rope { theta, scaling })
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).map(|n| vec![n]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(|n| n.as_u64()).filter_map(|n| u32::try_from(n).ok()).collect(),
            _ => Vec::new(),
        }
    }
}

/// Rotary position settings as configured (the numerics are in `layers`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (frequencies, equivalently).
    Linear { factor: f64 },
    /// Llama 3's frequency-dependent rescaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// Phi-3's LongRoPE: per-frequency factors, short or long by sequence length, and a
    /// cos/sin scale.
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original_max_position_embeddings: f64, attention_factor: f64 },
}

/// A config of `arch` with `extra` fields on top of a small valid base, for tests.
#[cfg(test)]
pub(crate) fn sample(arch: &str, extra: Value) -> HfConfig {
    let mut v = serde_json::json!({
        "architectures": [arch], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64,
        "bos_token_id": 1, "eos_token_id": 2
    });
    for (k, val) in extra.as_object().expect("an object") {
        v[k] = val.clone();
    }
    serde_json::from_value(v).expect("a valid config")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> HfConfig {
        sample("LlamaForCausalLM", extra)
    }

    #[test]
    fn gpt2_names_eos_lists_and_roberta_positions_read_as_transformers_reads_them() {
        let gpt2: HfConfig = serde_json::from_value(serde_json::json!({"n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10, "n_positions": 16})).unwrap();
        assert_eq!((gpt2.hidden_size, gpt2.head_dim(), gpt2.kv_heads(), gpt2.max_positions()), (8, 4, 2, 16));
        assert_eq!(config(serde_json::json!({"eos_token_id": [2, 7]})).eos_ids(), vec![2, 7]);
        assert_eq!(config(serde_json::json!({"eos_token_id": 2})).eos_ids(), vec![2]);
        let roberta = config(serde_json::json!({"model_type": "xlm-roberta", "pad_token_id": 1}));
        assert_eq!((roberta.position_offset(), roberta.max_positions()), (2, 62));
        assert_eq!(config(serde_json::json!({"id2label": {"1": "pos", "0": "neg"}})).labels(), vec!["neg", "pos"]);
    }

    #[test]
    fn rope_reads_both_spellings_and_refuses_what_it_does_not_implement_by_name() {
        assert_eq!(config(serde_json::json!({})).rope().unwrap(), Rope { theta: 10_000.0, scaling: RopeScaling::None });
        let linear = config(serde_json::json!({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}));
        assert_eq!(linear.rope().unwrap(), Rope { theta: 5e5, scaling: RopeScaling::Linear { factor: 2.0 } });
        let v5 = config(serde_json::json!({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}));
        assert_eq!(v5.rope().unwrap().theta, 1e6);
        let err = config(serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})).rope().unwrap_err();
        assert!(err.contains("rope_type 'yarn'"), "{err}");
        let err = config(serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})).rope().unwrap_err();
        assert!(err.contains("llama3 RoPE needs low_freq_factor"), "{err}");
    }
}
