//! The architecture table: the one place an architecture is named. The request edge reads which
//! kinds an architecture serves from here; the engine reads its constructor. Adding an
//! architecture is a file beside this one (its `check` and `load`) and one line in [`ARCHS`].

use crate::hf_config::HfConfig;
use super::weights::Scope;
use super::{bert, gemma, gpt2, llama, phi3, qwen3, xlm_roberta, EngineError, Net};
use crate::kinds::kind::JobKind;

/// The kinds a causal LM serves.
pub const DECODER: &[JobKind] = &[JobKind::Generate, JobKind::Loglikelihood, JobKind::LoglikelihoodRolling];

/// One architecture: the `architectures[0]` name in `config.json`, the kinds it serves, the
/// prefixes its checkpoints put before weight names, a config check run when the model folder is
/// scanned (a field we do not implement is refused there, by name) and the constructor.
pub struct ArchEntry {
    pub name: &'static str,
    pub kinds: &'static [JobKind],
    pub(super) prefixes: &'static [&'static str],
    pub(super) check: fn(&HfConfig) -> Result<(), String>,
    pub(super) load: fn(&HfConfig, &Scope) -> Result<Net, EngineError>,
}

#[rustfmt::skip]
pub static ARCHS: &[ArchEntry] = &[
    ArchEntry { name: "LlamaForCausalLM", kinds: DECODER, prefixes: &["model.", ""], check: llama::check, load: llama::load_llama },
    ArchEntry { name: "MistralForCausalLM", kinds: DECODER, prefixes: &["model.", ""], check: llama::check, load: llama::load_mistral },
    ArchEntry { name: "Qwen2ForCausalLM", kinds: DECODER, prefixes: &["model.", ""], check: llama::check, load: llama::load_qwen2 },
    ArchEntry { name: "Qwen3ForCausalLM", kinds: DECODER, prefixes: &["model.", ""], check: qwen3::check, load: qwen3::load },
    ArchEntry { name: "Gemma2ForCausalLM", kinds: DECODER, prefixes: &["model.", ""], check: gemma::check2, load: gemma::load2 },
    ArchEntry { name: "Gemma3ForCausalLM", kinds: DECODER, prefixes: &["model.", ""], check: gemma::check3, load: gemma::load3 },
    ArchEntry { name: "Phi3ForCausalLM", kinds: DECODER, prefixes: &["model.", ""], check: phi3::check, load: phi3::load },
    ArchEntry { name: "GPT2LMHeadModel", kinds: DECODER, prefixes: &["transformer.", ""], check: gpt2::check, load: gpt2::load },
    ArchEntry { name: "BertModel", kinds: &[JobKind::Embed], prefixes: &["bert.", ""], check: bert::check, load: bert::load },
    ArchEntry { name: "BertForSequenceClassification", kinds: &[JobKind::Classify, JobKind::Embed], prefixes: &["bert.", ""], check: bert::check, load: bert::load },
    ArchEntry { name: "XLMRobertaModel", kinds: &[JobKind::Embed], prefixes: &["roberta.", ""], check: xlm_roberta::check, load: xlm_roberta::load },
    ArchEntry { name: "XLMRobertaForSequenceClassification", kinds: &[JobKind::Classify, JobKind::Embed], prefixes: &["roberta.", ""], check: xlm_roberta::check, load: xlm_roberta::load },
];

/// An architecture of [`ARCHS`].
#[derive(Clone, Copy)]
pub struct Arch(pub(super) &'static ArchEntry);

impl Arch {
    pub fn name(self) -> &'static str {
        self.0.name
    }

    pub fn kinds(self) -> &'static [JobKind] {
        self.0.kinds
    }

    pub fn is_decoder(self) -> bool {
        self.0.kinds.contains(&JobKind::Generate)
    }
}

impl PartialEq for Arch {
    fn eq(&self, other: &Arch) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Arch {}

impl std::fmt::Debug for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.name)
    }
}

impl HfConfig {
    /// The architecture of `architectures[0]`, its config checked.
    pub fn arch(&self) -> Result<Arch, String> {
        let name = self.architectures.first().ok_or("config.json: architectures is missing")?;
        let entry = ARCHS.iter().find(|a| a.name == name).ok_or_else(|| {
            let names: Vec<&str> = ARCHS.iter().map(|a| a.name).collect();
            format!("config.json: architecture '{name}' is not supported (supported: {})", names.join(", "))
        })?;
        (entry.check)(self)?;
        Ok(Arch(entry))
    }

}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf_config::sample as config;

    #[test]
    fn every_architecture_has_one_line_and_refuses_what_it_does_not_implement_by_name() {
        for entry in ARCHS {
            assert_eq!(ARCHS.iter().filter(|a| a.name == entry.name).count(), 1, "{}", entry.name);
        }
        let refused = [
            ("Qwen3ForCausalLM", serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}), "rope_type 'yarn'"),
            ("Qwen3ForCausalLM", serde_json::json!({"layer_types": ["full_attention", "chunked_attention"]}), "layer_types"),
            ("Gemma2ForCausalLM", serde_json::json!({"hidden_activation": "relu6"}), "relu6"),
            ("Gemma3ForCausalLM", serde_json::json!({"use_bidirectional_attention": true}), "use_bidirectional_attention"),
            ("Phi3ForCausalLM", serde_json::json!({"partial_rotary_factor": 0.5}), "partial_rotary_factor"),
            ("XLMRobertaModel", serde_json::json!({"position_embedding_type": "relative_key"}), "position_embedding_type"),
            ("FalconForCausalLM", serde_json::json!({}), "architecture 'FalconForCausalLM' is not supported"),
        ];
        for (arch, extra, field) in refused {
            let err = config(arch, extra).arch().unwrap_err();
            assert!(err.contains(field), "{arch}: {err}");
        }
        for ok in ["Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "XLMRobertaModel"] {
            let arch = config(ok, serde_json::json!({})).arch().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(arch.name(), ok);
        }
    }
}
