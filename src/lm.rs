//! What the request edge knows of a Hugging Face model folder: its `config.json` (through the
//! engine's architecture table), its `tokenizer.json`, and the request limits. The job kinds
//! (`crate::kinds`) parse their inputs into token ids with it.

use std::collections::BTreeMap;
use std::path::Path;

use crate::chat::{ChatError, ChatTemplate};
use crate::engine::hf::archs::Arch;
use crate::hf_config::HfConfig;

/// What the edge knows of an `hf` model: its config and tokenizer, and the request limits.
pub struct LmSpec {
    pub config: HfConfig,
    pub arch: Arch,
    pub tokenizer: tokenizers::Tokenizer,
    /// Longest sequence the model reads.
    pub max_length: usize,
    /// The token an empty context (and the first rolling window) is conditioned on: BOS, else EOS.
    pub prefix_token: u32,
    /// Whether producer text is encoded with the tokenizer's special tokens (lm-evaluation-
    /// harness's `add_bos_token`, from jetbatch.toml); unset: the tokenizer's own default (with
    /// them), as the harness does when not told. See [`crate::kinds::text::encode_text`].
    pub add_bos: Option<bool>,
    /// The prefix token's text: a text that starts with it is encoded without special tokens.
    pub prefix_text: String,
    /// The tokenizer's BOS token text, where it has one: a prompt that starts with it is encoded
    /// without special tokens.
    pub bos_text: Option<String>,
    /// The chat template `generate` renders `messages` with, or why the model has none usable.
    pub chat: Result<ChatTemplate, ChatError>,
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
    /// What the operator should hear of the model at load: a chat template past its bounds (a
    /// missing one is normal for base models).
    pub fn warnings(&self) -> Vec<String> {
        match &self.chat {
            Err(e @ ChatError::Bound { .. }) => vec![format!("generate jobs with messages fail: {e}")],
            _ => Vec::new(),
        }
    }

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
        let special = SpecialTokens::read(dir)?;
        let from_tokenizer = if arch.is_decoder() && special.found { special.prefix(&tokenizer)? } else { None };
        let prefix_token = match from_tokenizer.or_else(|| config.bos_token_id.or_else(|| config.eos_ids().first().copied())) {
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
        let max_length = max_length.or(st_length).unwrap_or(config.max_positions()).min(config.max_positions());
        if max_length == 0 {
            return Err("max_length: must be at least 1 (and the model's max_position_embeddings too)".into());
        }
        if arch.is_decoder() && (prefix_token as usize) >= config.vocab_size {
            return Err(format!("config.json: the prefix token {prefix_token} is not below vocab_size {}", config.vocab_size));
        }
        let prefix_text = tokenizer.decode(&[prefix_token], false).map_err(|e| format!("tokenizer.json: decoding the prefix token: {e}"))?;
        let bos_text = special.text.get("bos_token").cloned();
        // A template that cannot be read or compiled, or that runs past its bounds on a probe
        // conversation, fails only the jobs that need it.
        let no_template = || "the model has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja)".to_string();
        let chat = match arch.is_decoder() {
            true => ChatTemplate::source(dir, special.tokenizer_config.as_ref())
                .and_then(|source| source.ok_or_else(no_template))
                .map_err(ChatError::Unavailable)
                .and_then(|(origin, source)| ChatTemplate::new(origin, source, special.text))
                .and_then(|template| template.probe().map(|()| template)),
            false => Err(ChatError::Unavailable(no_template())),
        };
        if let Err(e @ ChatError::Bound { .. }) = &chat {
            tracing::warn!(model = %dir.display(), error = %e, "jobs with messages will be answered model_error");
        }
        Ok(LmSpec { config, arch, tokenizer, max_length, prefix_token, add_bos: None, prefix_text, bos_text, chat, max_new_tokens_limit, max_input_bytes: DEFAULT_MAX_INPUT_BYTES })
    }
}

/// The tokenizer's special tokens, as transformers loads them: from `tokenizer_config.json`, then
/// `special_tokens_map.json` (the first file naming a key decides; null there means none). A token
/// is a string or an AddedToken map with `content`.
struct SpecialTokens {
    /// Whether either file is there (else `config.json`'s ids stand in).
    found: bool,
    /// `bos_token`, `eos_token`, `unk_token`, `pad_token` → their text, where set.
    text: BTreeMap<&'static str, String>,
    /// `tokenizer_config.json`, for its `chat_template`.
    tokenizer_config: Option<serde_json::Value>,
}

impl SpecialTokens {
    fn read(dir: &Path) -> Result<SpecialTokens, String> {
        let files: Vec<(&str, serde_json::Value)> = ["tokenizer_config.json", "special_tokens_map.json"]
            .into_iter()
            .filter_map(|f| {
                let text = std::fs::read_to_string(dir.join(f)).ok()?;
                Some(serde_json::from_str(&text).map(|v| (f, v)).map_err(|e| format!("{f}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let mut text = BTreeMap::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let Some((file, value)) = files.iter().find_map(|(f, v)| v.get(key).map(|x| (*f, x))) else { continue };
            let content = match value {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) => s.as_str(),
                other => other.get("content").and_then(|c| c.as_str()).ok_or_else(|| format!("{file}: {key} is neither a string nor a token"))?,
            };
            text.insert(key, content.to_string());
        }
        let tokenizer_config = files.iter().find(|(f, _)| *f == "tokenizer_config.json").map(|(_, v)| v.clone());
        Ok(SpecialTokens { found: !files.is_empty(), text, tokenizer_config })
    }

    /// The prefix token as lm-evaluation-harness picks it (`prefix_token_id`): the tokenizer's BOS
    /// token if it has one, else its EOS token. `None` when the folder has neither file (then
    /// `config.json`'s ids are used). This matters where they differ: Qwen's tokenizer has no BOS
    /// and ends turns with `<|im_end|>` while its config.json names `<|endoftext|>`.
    fn prefix(&self, tokenizer: &tokenizers::Tokenizer) -> Result<Option<u32>, String> {
        let Some((key, content)) = ["bos_token", "eos_token"].into_iter().find_map(|k| self.text.get(k).map(|c| (k, c))) else { return Ok(None) };
        tokenizer.token_to_id(content).map(Some).ok_or_else(|| format!("tokenizer files: {key} '{content}' is not in tokenizer.json's vocabulary"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_token_is_the_tokenizers_bos_else_its_eos_as_the_harness_picks_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        jetbatch_testkit::write_tiny_lm(&dir, 1, 32, 1).unwrap();
        let load = || LmSpec::load(&dir, None, 16).unwrap().prefix_token;
        assert_eq!(load(), 0, "no tokenizer_config.json: config.json's bos_token_id");
        // Qwen-style: no BOS in the tokenizer, EOS `</s>` (id 1), while config.json says bos 0.
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": null, "eos_token": "</s>"}"#).unwrap();
        assert_eq!(load(), 1);
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"bos_token": {"content": "<pad>", "special": true}, "eos_token": "</s>"}"#).unwrap();
        assert_eq!(load(), 2, "the tokenizer's BOS first");
        std::fs::write(dir.join("tokenizer_config.json"), r#"{}"#).unwrap();
        std::fs::write(dir.join("special_tokens_map.json"), r#"{"eos_token": {"content": "</s>"}}"#).unwrap();
        assert_eq!(load(), 1, "special_tokens_map.json when tokenizer_config.json is silent");
        std::fs::write(dir.join("special_tokens_map.json"), r#"{"bos_token": "<nope>"}"#).unwrap();
        assert!(LmSpec::load(&dir, None, 16).unwrap_err().contains("<nope>"));
    }
}
