//! A model's plan: what the repository resolved for one model folder — what to load and from
//! where (backend, files, fingerprint, size), on which device and in which dtype, its batch and
//! token budgets, and what it can do (its kinds; an HF model's config and tokenizer). The
//! repository (`crate::repository`) builds plans from `jetbatch.toml` and the folder; the engine
//! and every stage read them, read-only, and nothing here reads a file or a CLI option.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::kinds::kind::JobKind;
use crate::tensor::DType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `model.pt`: a TorchScript module whose `forward` takes the job's tensors, stacked.
    Torchscript,
    /// A Hugging Face model folder (`config.json`, `*.safetensors`, `tokenizer.json`) run natively.
    Hf,
}

/// Where a model runs. `auto` means CUDA device 0 when present, else CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// The device this choice comes to on a machine with `cuda_devices` CUDA devices, as results
    /// name it: `cpu` or `cuda:N` (`auto` is cuda:0 where there is one, as the engine loads it).
    pub fn resolved(self, cuda_devices: usize) -> String {
        match self {
            DeviceChoice::Auto if cuda_devices > 0 => "cuda:0".into(),
            DeviceChoice::Auto | DeviceChoice::Cpu => "cpu".into(),
            DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| serde::de::Error::custom(format!("device: '{s}' is not auto, cpu, cuda or cuda:N"))),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Generation {
    #[default]
    Continuous,
    Static,
}

/// One input of a TorchScript model, without the batch dimension.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DType,
    /// Sizes without the batch dimension; `-1` marks a variable dim that is padded in a batch.
    pub shape: Vec<i64>,
    /// Value written into the padding of variable dims.
    #[serde(default)]
    pub pad_value: f64,
    /// Largest size accepted for a variable dim.
    #[serde(default = "default_max_len")]
    pub max_len: i64,
}

fn default_max_len() -> i64 {
    4096
}

/// An output dim whose length follows a variable input dim, so padding is cut off per job.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trim {
    /// The output's dim (without batch dimension).
    pub dim: usize,
    /// Index of the input whose length this dim has.
    pub input: usize,
    /// That input's dim (without batch dimension).
    pub input_dim: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    #[serde(default)]
    pub trim: Vec<Trim>,
}

/// `jetbatch.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub backend: Backend,
    /// The name jobs use for this model, where the folder's name is not the one producers know
    /// (default: the folder's name).
    #[serde(default)]
    pub name: Option<String>,
    /// Most jobs in one forward pass.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// How long the first job of a batch waits for company.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Budget of a batch in elements of its inputs (0: no limit besides `max_batch_size`); for
    /// `hf` generation, the tokens (prompt + `max_new_tokens`) its running batch may hold. Unset
    /// (0) on CUDA, the generation budget is derived from free device memory at load (logged).
    #[serde(default)]
    pub max_batch_tokens: usize,
    #[serde(default = "default_device")]
    pub device: DeviceChoice,
    /// Floating-point dtype of the weights and activations (`f16`, `bf16`; default `f32`), on
    /// any device: `hf` keeps norms, softmax and log-probs in f32 and answers in f32.
    #[serde(default)]
    pub dtype: Option<DType>,
    /// Run a dummy batch right after loading.
    #[serde(default = "default_true")]
    pub warmup: bool,
    /// Load when the worker starts rather than on the first job.
    #[serde(default)]
    pub preload: bool,
    /// Append an `i64` tensor of each job's length of input 0's first variable dim.
    #[serde(default)]
    pub lengths_input: bool,
    /// `hf`: longest sequence read (default and upper bound: the model's max positions).
    #[serde(default)]
    pub max_length: Option<usize>,
    /// `hf` generate: `continuous` (jobs join the running batch at step boundaries, finished ones
    /// leave at once) or `static` (a batch runs until its last job is done; for comparison).
    #[serde(default)]
    pub generation: Generation,
    /// `hf`: the largest `max_new_tokens` a `generate` job may ask for.
    #[serde(default = "default_max_new_tokens_limit")]
    pub max_new_tokens_limit: usize,
    /// `hf` decoders: MiB of keys and values of scored prefixes kept for later jobs (0: none;
    /// unset: the worker's `--prefix-cache-mb`).
    #[serde(default)]
    pub prefix_cache_mb: Option<u64>,
    /// `hf` decoders, greedy `generate` rows: tokens drafted per step from the row's own sequence
    /// and verified in one forward (0: none; unset: the worker's `--speculate-tokens`).
    #[serde(default)]
    pub speculate_tokens: Option<usize>,
    /// `hf` `loglikelihood_rolling`: the largest text in bytes (it is tokenised and scored whole;
    /// default [`crate::lm::DEFAULT_MAX_INPUT_BYTES`]). Other kinds read bounded windows of text.
    #[serde(default)]
    pub max_input_bytes: Option<usize>,
    /// `hf` decoders: the token an empty context and the first rolling window are conditioned on
    /// (lm-evaluation-harness's `prefix_token_id`); default: the tokenizer's BOS, else its EOS.
    #[serde(default)]
    pub prefix_token: Option<u32>,
    /// `hf` decoders: whether producer text is encoded with the tokenizer's special tokens
    /// (lm-evaluation-harness's `add_bos_token`); default: the tokenizer's own default, as the
    /// harness does when not told.
    #[serde(default)]
    pub add_bos_token: Option<bool>,
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    #[serde(default)]
    pub outputs: Vec<OutputSpec>,
}

fn default_max_batch_size() -> usize {
    32
}
fn default_max_wait_ms() -> u64 {
    5
}
fn default_max_new_tokens_limit() -> usize {
    2048
}
fn default_device() -> DeviceChoice {
    DeviceChoice::Auto
}
fn default_true() -> bool {
    true
}

/// One model as the repository resolved it; shared by every stage (read-only).
#[derive(Debug)]
pub struct ModelPlan {
    pub name: Arc<str>,
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// blake3 of the config and every file in the folder.
    pub fingerprint: Arc<str>,
    /// Bytes of the model's files: the estimate of its memory when loaded.
    pub size_bytes: u64,
    /// `hf` models: config and tokenizer, for parsing LM jobs at the edge.
    pub lm: Option<crate::lm::LmSpec>,
}

impl ModelPlan {
    /// The job kinds this model serves.
    pub fn kinds(&self) -> &'static [JobKind] {
        match &self.lm {
            Some(lm) => lm.arch.kinds(),
            None => &[JobKind::Tensor],
        }
    }
}
