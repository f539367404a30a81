//! Dev-only fixtures for jetbatch's tests, benches and loadtest (never part of the product):
//! [`NatsServer`], a nats-server with JetStream on a free loopback port; and models written from
//! fixed seeds (nothing downloaded) — TorchScript modules and a tiny Llama-architecture decoder.

use std::path::{Path, PathBuf};
use std::process::Child;

use tch::{CModule, Kind, Tensor};

/// Seed of the fixture models' weights.
pub const SEED: i64 = 20261125;

/// Writes the fixture repository into `dir`:
/// - `mlp`: `f32[16] → f32[4]`, a two-layer perceptron with fixed shapes.
/// - `seqproj`: `f32[-1, 8] → f32[-1, 3]`, a per-position projection over a variable-length
///   sequence, padded in batches and trimmed back per job.
/// - `tiny-lm`: a 2-layer Llama-architecture decoder (random weights, byte-level tokenizer) served
///   by the `hf` backend: `generate`, `loglikelihood`, `loglikelihood_rolling`.
pub fn write_fixture_models(dir: &Path) -> Result<(), String> {
    write_model(&dir.join("mlp"), &mlp_module(SEED)?, MLP_TOML)?;
    write_model(&dir.join("seqproj"), &seqproj_module(SEED)?, SEQPROJ_TOML)?;
    write_tiny_lm(&dir.join("tiny-lm"), SEED, 64, 2)
}

/// A Hugging Face folder for a tiny `LlamaForCausalLM` (GQA: 4 heads over 2 KV heads) with a
/// byte-level BPE tokenizer of 3 special and 256 byte tokens.
pub fn write_tiny_lm(dir: &Path, seed: i64, hidden: i64, layers: i64) -> Result<(), String> {
    write_lm(dir, seed, hidden, layers, 259, 256)
}

/// Makes the decoder [`write_lm`] wrote in `dir` echo: its attention and MLP outputs zero (the
/// residual stream keeps the token's embedding) and its LM head the embedding table, so greedy
/// generation repeats the last token — text that repeats itself, at a real model's cost per step
/// (the zeros are multiplied all the same).
pub fn make_echo(dir: &Path) -> Result<(), String> {
    let path = dir.join("model.safetensors");
    let tensors = Tensor::read_safetensors(&path).map_err(|e| e.to_string())?;
    let embed = tensors.iter().find(|(n, _)| n == "model.embed_tokens.weight").map(|(_, t)| t.copy()).ok_or("no embedding")?;
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| match n.as_str() {
            "lm_head.weight" => (n, embed.copy()),
            _ if n.ends_with("o_proj.weight") || n.ends_with("down_proj.weight") => (n, t.zeros_like()),
            _ => (n, t),
        })
        .collect();
    Tensor::write_safetensors(&tensors, &path).map_err(|e| e.to_string())
}

/// [`write_tiny_lm`] with `vocab` (at least 259) embedding and LM-head rows — a real vocabulary's
/// cost, where text reaches only the byte tokens (as padded vocabularies have) — and `positions`.
pub fn write_lm(dir: &Path, seed: i64, hidden: i64, layers: i64, vocab: i64, positions: i64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let inter = 2 * hidden;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
        "max_position_embeddings": positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 2, "tie_word_embeddings": false, "hidden_act": "silu"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).expect("json")).map_err(|e| e.to_string())?;
    let _no_grad = tch::no_grad_guard();
    tch::manual_seed(seed + 2);
    let opts = (Kind::Float, tch::Device::Cpu);
    let w = |shape: &[i64]| Tensor::randn(shape, opts) * 0.25;
    let mut tensors = vec![("model.embed_tokens.weight".to_string(), w(&[vocab, hidden]))];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj", [hidden, hidden]),
            ("self_attn.k_proj", [hidden / 2, hidden]),
            ("self_attn.v_proj", [hidden / 2, hidden]),
            ("self_attn.o_proj", [hidden, hidden]),
            ("mlp.gate_proj", [inter, hidden]),
            ("mlp.up_proj", [inter, hidden]),
            ("mlp.down_proj", [hidden, inter]),
        ] {
            tensors.push((format!("{p}.{name}.weight"), w(&shape)));
        }
        tensors.push((format!("{p}.input_layernorm.weight"), Tensor::ones([hidden], opts)));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), Tensor::ones([hidden], opts)));
    }
    tensors.push(("model.norm.weight".to_string(), Tensor::ones([hidden], opts)));
    tensors.push(("lm_head.weight".to_string(), w(&[vocab, hidden])));
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("tokenizer.json"), byte_level_tokenizer()?).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("jetbatch.toml"), TINY_LM_TOML).map_err(|e| e.to_string())
}

/// `tokenizer.json` of a byte-level BPE without merges: every byte is one token.
fn byte_level_tokenizer() -> Result<String, String> {
    let specials = ["<s>", "</s>", "<pad>"];
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().map(|s| s.to_string()).chain(alphabet.iter().map(|c| c.to_string())).enumerate() {
        vocab.insert(t, i.into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string();
    // Parse it back: what is written must load.
    json.parse::<tokenizers::Tokenizer>().map_err(|e| format!("tokenizer: {e}"))?;
    Ok(json)
}

pub const TINY_LM_TOML: &str = r#"# Test fixture: a tiny random Llama-architecture decoder from a Hugging Face folder.
backend = "hf"
max_batch_size = 16
max_wait_ms = 5
max_new_tokens_limit = 128
"#;

/// The demo perceptron `tanh(x W1ᵀ + b1) W2ᵀ + b2` with weights drawn from `seed`.
pub fn mlp_module(seed: i64) -> Result<CModule, String> {
    let _no_grad = tch::no_grad_guard();
    tch::manual_seed(seed);
    let opts = (Kind::Float, tch::Device::Cpu);
    let (w1, b1) = (Tensor::randn([32, 16], opts) * 0.25, Tensor::randn([32], opts) * 0.1);
    let (w2, b2) = (Tensor::randn([4, 32], opts) * 0.25, Tensor::randn([4], opts) * 0.1);
    CModule::create_by_tracing("DemoMlp", "forward", &[Tensor::zeros([2, 16], opts)], &mut |x| {
        vec![x[0].linear(&w1, Some(&b1)).tanh().linear(&w2, Some(&b2))]
    })
    .map_err(|e| e.to_string())
}

/// The demo per-position projection `relu(x Wᵀ + b)` over `[batch, n, 8]`, weights from `seed`.
pub fn seqproj_module(seed: i64) -> Result<CModule, String> {
    let _no_grad = tch::no_grad_guard();
    tch::manual_seed(seed + 1);
    let opts = (Kind::Float, tch::Device::Cpu);
    let (w, b) = (Tensor::randn([3, 8], opts) * 0.3, Tensor::randn([3], opts) * 0.1);
    CModule::create_by_tracing("DemoSeqProj", "forward", &[Tensor::zeros([2, 5, 8], opts)], &mut |x| {
        vec![x[0].linear(&w, Some(&b)).relu()]
    })
    .map_err(|e| e.to_string())
}

/// Writes `model.pt` and `jetbatch.toml` into the model folder `dir`.
pub fn write_model(dir: &Path, module: &CModule, toml: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    module.save(dir.join("model.pt")).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("jetbatch.toml"), toml).map_err(|e| e.to_string())
}

pub const MLP_TOML: &str = r#"# Test fixture: a two-layer perceptron, f32[16] -> f32[4].
backend = "torchscript"
max_batch_size = 64
max_wait_ms = 2
device = "auto"
preload = true

[[inputs]]
name = "x"
dtype = "f32"
shape = [16]
"#;

pub const SEQPROJ_TOML: &str = r#"# Test fixture: a per-position projection over a variable-length sequence, f32[n, 8] -> f32[n, 3].
backend = "torchscript"
max_batch_size = 32
max_wait_ms = 2
# Padded elements per batch (longest sequence x 8 x jobs).
max_batch_tokens = 65536
device = "auto"

[[inputs]]
name = "x"
dtype = "f32"
shape = [-1, 8]
pad_value = 0.0
max_len = 1024

[[outputs]]
name = "y"
# Output dim 0 follows input 0's dim 0: padding rows are cut off per job.
trim = [{ dim = 0, input = 0, input_dim = 0 }]
"#;

/// A nats-server with JetStream on a free loopback port, killed on drop.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub store: PathBuf,
    bin: PathBuf,
}

impl NatsServer {
    /// The binary: `JETBATCH_NATS_SERVER`, the project venv's, or `nats-server` on PATH.
    pub fn find_binary() -> PathBuf {
        jetbatch::demo::nats_server_binary()
    }

    pub fn start(bin: &Path, store: &Path) -> std::io::Result<NatsServer> {
        NatsServer::start_on(bin, store, jetbatch::demo::free_port()?)
    }

    /// Starts (or restarts, with the same store) a server on `port`.
    pub fn start_on(bin: &Path, store: &Path, port: u16) -> std::io::Result<NatsServer> {
        let child = jetbatch::demo::spawn_nats_server(bin, store, port)?;
        Ok(NatsServer { child, port, store: store.to_path_buf(), bin: bin.to_path_buf() })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id (the loadtest accounts its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server and starts it again on the same port and store.
    pub fn restart(mut self) -> std::io::Result<NatsServer> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        NatsServer::start_on(&self.bin.clone(), &self.store.clone(), self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
