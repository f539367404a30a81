//! Language-model requests at the edge: the Hugging Face model folder's `config.json` and
//! `tokenizer.json`, and the parsing of `loglikelihood`, `loglikelihood_rolling`, `generate`,
//! `embed` and `classify` inputs into token ids — with lm-evaluation-harness semantics — so the
//! engine receives only validated token sequences and the cache key covers exactly what is run.

use std::path::Path;

use serde::Deserialize;

use crate::job::JobKind;

/// The architectures the `hf` backend implements (`config.json` `architectures[0]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Gpt2,
    Bert,
    BertForSequenceClassification,
}

impl Arch {
    fn parse(name: &str) -> Option<Arch> {
        Some(match name {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "GPT2LMHeadModel" => Arch::Gpt2,
            "BertModel" => Arch::Bert,
            "BertForSequenceClassification" => Arch::BertForSequenceClassification,
            _ => return None,
        })
    }

    pub fn is_decoder(self) -> bool {
        matches!(self, Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Gpt2)
    }

    pub fn kinds(self) -> &'static [JobKind] {
        match self {
            Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Gpt2 => {
                &[JobKind::Generate, JobKind::Loglikelihood, JobKind::LoglikelihoodRolling]
            }
            Arch::Bert => &[JobKind::Embed],
            Arch::BertForSequenceClassification => &[JobKind::Classify, JobKind::Embed],
        }
    }
}

/// `config.json`, the fields the `hf` backend reads. Names follow transformers (GPT-2's own too).
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
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub type_vocab_size: Option<usize>,
    #[serde(default)]
    pub id2label: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

impl HfConfig {
    pub fn arch(&self) -> Result<Arch, String> {
        let name = self.architectures.first().ok_or("config.json: architectures is missing")?;
        Arch::parse(name).ok_or_else(|| {
            format!(
                "config.json: architecture '{name}' is not supported (supported: LlamaForCausalLM, MistralForCausalLM, \
                 Qwen2ForCausalLM, GPT2LMHeadModel, BertModel, BertForSequenceClassification)"
            )
        })
    }

    /// RoPE settings: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
    pub fn rope(&self) -> Result<Rope, String> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()).filter(|p| !p.is_null());
        let theta = params.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64()).or(self.rope_theta).unwrap_or(10_000.0);
        let kind = params.and_then(|p| p.get("rope_type").or(p.get("type"))).and_then(|t| t.as_str()).unwrap_or("default");
        let num = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64()).ok_or_else(|| format!("config.json: llama3 RoPE needs {k}"));
        let llama3 = match kind {
            "default" => None,
            "llama3" => Some(Llama3Rope {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            }),
            other => return Err(format!("config.json: rope_type '{other}' is not supported (default, llama3)")),
        };
        Ok(Rope { theta, llama3 })
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).map(|n| vec![n]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|n| n.as_u64()).filter_map(|n| u32::try_from(n).ok()).collect(),
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub llama3: Option<Llama3Rope>,
}

/// Llama 3's frequency-dependent rescaling of the rotary frequencies.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

impl Rope {
    /// Inverse frequencies for `head_dim`, as transformers computes them (llama3 rescaling included).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / (self.theta as f32).powf((2 * i) as f32 / head_dim as f32);
                let Some(l) = &self.llama3 else { return f };
                let (low_wavelen, high_wavelen) = (l.original_max_position_embeddings / l.low_freq_factor, l.original_max_position_embeddings / l.high_freq_factor);
                let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    (f as f64 / l.factor) as f32
                } else {
                    let smooth = (l.original_max_position_embeddings / wavelen - l.low_freq_factor) / (l.high_freq_factor - l.low_freq_factor);
                    ((1.0 - smooth) * f as f64 / l.factor + smooth * f as f64) as f32
                }
            })
            .collect()
    }
}

/// What the edge knows of an `hf` model: its config and tokenizer, and the request limits.
pub struct LmSpec {
    pub config: HfConfig,
    pub arch: Arch,
    pub tokenizer: tokenizers::Tokenizer,
    /// Longest sequence the model reads.
    pub max_length: usize,
    /// The token an empty context (and the first rolling window) is conditioned on: BOS, else EOS.
    pub prefix_token: u32,
    pub max_new_tokens_limit: usize,
    /// Largest `loglikelihood_rolling` text, in bytes: that kind tokenises and scores the whole
    /// text, so this bounds its cost (`max_input_bytes` in jetbatch.toml; see
    /// [`DEFAULT_MAX_INPUT_BYTES`]). Other kinds read a bounded window of their texts whatever
    /// their size (see [`crate::kinds::text`]).
    pub max_input_bytes: usize,
}

/// Default `max_input_bytes`: 4 MiB, half the worker's default payload limit (8 MiB). A rolling
/// text that size is ~1M tokens to score, so tokenising it (~5 s) is a small part of its cost.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 4 << 20;

impl std::fmt::Debug for LmSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmSpec").field("arch", &self.arch).field("max_length", &self.max_length).finish()
    }
}

impl LmSpec {
    pub fn load(dir: &Path, max_length: Option<usize>, max_new_tokens_limit: usize) -> Result<LmSpec, String> {
        let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| format!("config.json: {e}"))?;
        let config: HfConfig = serde_json::from_str(&text).map_err(|e| format!("config.json: {e}"))?;
        let arch = config.arch()?;
        if arch.is_decoder() {
            config.rope()?;
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| format!("tokenizer.json: {e}"))?;
        // Batching pads and truncation follows the kind's rules; a tokenizer.json's own settings
        // (sentence-transformers ship fixed padding) would put pad tokens into the inputs.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| format!("tokenizer.json: {e}"))?;
        let prefix_token = match config.bos_token_id.or_else(|| config.eos_ids().first().copied()) {
            Some(t) => t,
            None if arch.is_decoder() => return Err("config.json: neither bos_token_id nor eos_token_id is set (needed as the prefix token)".into()),
            // Encoders score nothing: no prefix token.
            None => 0,
        };
        // sentence-transformers folders carry the length their embeddings were made with.
        let st_length = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .map(|n| n as usize);
        let max_length = max_length.or(st_length).unwrap_or(config.max_position_embeddings).min(config.max_position_embeddings);
        if max_length == 0 {
            return Err("max_length: must be at least 1 (and the model's max_position_embeddings too)".into());
        }
        if arch.is_decoder() && (prefix_token as usize) >= config.vocab_size {
            return Err(format!("config.json: the prefix token {prefix_token} is not below vocab_size {}", config.vocab_size));
        }
        Ok(LmSpec { config, arch, tokenizer, max_length, prefix_token, max_new_tokens_limit, max_input_bytes: DEFAULT_MAX_INPUT_BYTES })
    }
}

// Kept while the engine imports these from here; they live in their kind modules now.
pub use crate::kinds::{GenerateInput, Sampling, Window};
