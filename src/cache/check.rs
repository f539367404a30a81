//! Whether a cached answer can be the answer to a job. Anyone who can write the shared bucket can
//! put any value under any key, so a hit is served only when it has the job's kind and the shape
//! the job and its model imply (an embedding of the model's hidden size, one probability per
//! label, one score per choice, a generation no longer than asked, tensors whose bytes match
//! their shape and whose trimmed dims match the job's inputs) and its numbers are finite where the
//! kind's are. A value that passes can still be a wrong number of the right shape: the check
//! refuses garbage and mix-ups, it cannot prove a value was computed, which is why only the
//! workers may write the bucket.

use crate::job::{JobInput, JobKind, Output, ValidJob};
use crate::kinds::FinishReason;
use crate::plan::ModelPlan;
use crate::tensor::TensorData;

/// Why a cached value is not the job's answer (the field it fails on, as the wire names it).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error("stored under another key (its key digest differs)")]
    Key,
    #[error("a {found} answer for a {kind} job")]
    Kind { kind: &'static str, found: &'static str },
    #[error("output.{field}: {found}, expected {expected}")]
    Count { field: &'static str, expected: usize, found: usize },
    #[error("output.tensors[{index}]: {message}")]
    Tensor { index: usize, message: String },
    #[error("output.{field}: {found}, at most {most}")]
    TooMany { field: &'static str, most: usize, found: usize },
    #[error("output.{field}: not a finite number")]
    NotFinite { field: &'static str },
    #[error("output.{field}: {value} is not a log-probability")]
    NotLogprob { field: &'static str, value: f64 },
    #[error("output.{field}: '{found}', expected '{expected}'")]
    Label { field: &'static str, expected: String, found: String },
    #[error("output.finish_reason: 'deadline' (a cut-short generation is never cached)")]
    Partial,
}

/// Checks `output` against `job` (validated for `spec`).
pub fn check(job: &ValidJob, spec: &ModelPlan, output: &Output) -> Result<(), Mismatch> {
    let wrong_kind = || Mismatch::Kind { kind: job.kind.as_str(), found: name(output) };
    let lm = spec.lm.as_ref();
    match (job.kind, &job.input, output) {
        (JobKind::Tensor, JobInput::Tensor(inputs), Output::Tensor(outputs)) => tensors(spec, inputs, outputs),
        (JobKind::Generate, JobInput::Generate(g), Output::Generate { tokens, finish_reason, prompt_tokens, top, .. }) => {
            if *finish_reason == FinishReason::Deadline {
                return Err(Mismatch::Partial);
            }
            count("prompt_tokens", g.prompt.len(), *prompt_tokens)?;
            at_most("tokens", g.max_new_tokens, tokens.len())?;
            at_most("top_logprobs", if g.top_logprobs == 0 { 0 } else { tokens.len() }, top.len())?;
            logprobs("top_logprobs", top.iter().flat_map(|t| &t.logprobs).map(|&p| f64::from(p)))
        }
        (JobKind::Loglikelihood | JobKind::LoglikelihoodRolling, JobInput::Score(windows), Output::Score { logprob, is_greedy, tokens, .. }) => {
            count("tokens", windows.iter().map(|w| w.continuation.len()).sum(), *tokens)?;
            if is_greedy.is_some() != (job.kind == JobKind::Loglikelihood) {
                return Err(wrong_kind());
            }
            logprobs("logprob", [*logprob])
        }
        (JobKind::Loglikelihood, JobInput::Choices(windows), Output::Choices { logprobs: lps, is_greedy, tokens, .. }) => {
            count("logprobs", windows.len(), lps.len())?;
            count("is_greedy", windows.len(), is_greedy.len())?;
            count("tokens", windows.len(), tokens.len())?;
            for (w, &t) in windows.iter().zip(tokens) {
                count("tokens", w.continuation.len(), t)?;
            }
            logprobs("logprobs", lps.iter().copied())
        }
        (JobKind::Embed, JobInput::Encode { ids, .. }, Output::Embedding { embedding: e, tokens }) => {
            // The engine pools the encoder's last hidden state: one value per hidden unit.
            if let Some(lm) = lm {
                count("embedding", lm.config.hidden_size, e.len())?;
            }
            finite("embedding", e)?;
            count("tokens", ids.len(), *tokens)
        }
        (JobKind::Classify, JobInput::Encode { .. }, Output::Classification { logits, probs, label, label_id }) => {
            let labels = lm.map(|lm| lm.config.labels()).unwrap_or_default();
            let n = if labels.is_empty() { logits.len() } else { labels.len() };
            count("logits", n, logits.len())?;
            count("probs", n, probs.len())?;
            finite("logits", logits)?;
            finite("probs", probs)?;
            at_most("label_id", n.saturating_sub(1), *label_id)?;
            let expected = labels.get(*label_id).cloned().unwrap_or_else(|| format!("LABEL_{label_id}"));
            if *label != expected {
                return Err(Mismatch::Label { field: "label", expected, found: label.clone() });
            }
            Ok(())
        }
        _ => Err(wrong_kind()),
    }
}

/// TorchScript outputs: each one's bytes match its dtype and shape, and a dim the model's
/// `trim` rules cut to an input's length has that length.
fn tensors(spec: &ModelPlan, inputs: &[TensorData], outputs: &[TensorData]) -> Result<(), Mismatch> {
    if outputs.is_empty() || outputs.len() < spec.config.outputs.len() {
        return Err(Mismatch::Count { field: "tensors", expected: spec.config.outputs.len().max(1), found: outputs.len() });
    }
    for (index, t) in outputs.iter().enumerate() {
        let bad = |message: String| Mismatch::Tensor { index, message };
        let numel = t.shape.iter().try_fold(1usize, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)));
        let bytes = numel.and_then(|n| n.checked_mul(t.dtype.size())).ok_or_else(|| bad(format!("shape {:?} is not a shape", t.shape)))?;
        if bytes != t.data.len() {
            return Err(bad(format!("{} bytes for shape {:?} of {}", t.data.len(), t.shape, t.dtype.name())));
        }
        for trim in spec.config.outputs.get(index).map(|s| s.trim.as_slice()).unwrap_or_default() {
            let want = inputs.get(trim.input).and_then(|x| x.shape.get(trim.input_dim));
            let got = t.shape.get(trim.dim);
            if want != got {
                return Err(bad(format!("dim {} is {got:?}, input {} dim {} is {want:?}", trim.dim, trim.input, trim.input_dim)));
            }
        }
    }
    Ok(())
}

fn name(output: &Output) -> &'static str {
    match output {
        Output::Tensor(_) => "tensor",
        Output::Score { .. } => "score",
        Output::Generate { .. } => "generate",
        Output::Embedding { .. } => "embedding",
        Output::Classification { .. } => "classification",
        Output::Choices { .. } => "choices",
    }
}

fn count(field: &'static str, expected: usize, found: usize) -> Result<(), Mismatch> {
    (expected == found).then_some(()).ok_or(Mismatch::Count { field, expected, found })
}

fn at_most(field: &'static str, most: usize, found: usize) -> Result<(), Mismatch> {
    (found <= most).then_some(()).ok_or(Mismatch::TooMany { field, most, found })
}

fn finite(field: &'static str, xs: &[f32]) -> Result<(), Mismatch> {
    xs.iter().all(|x| x.is_finite()).then_some(()).ok_or(Mismatch::NotFinite { field })
}

/// Log-probabilities are at most 0; -inf is one (a token the model rules out), NaN is not.
fn logprobs(field: &'static str, xs: impl IntoIterator<Item = f64>) -> Result<(), Mismatch> {
    match xs.into_iter().find(|x| x.is_nan() || *x > 0.0) {
        Some(value) => Err(Mismatch::NotLogprob { field, value }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::kinds::{GenerateInput, Sampling, TopLogprobs, Window};

    fn job(kind: JobKind, input: JobInput) -> ValidJob {
        ValidJob {
            id: "j".into(),
            model: Arc::from("m"),
            kind,
            input,
            params: BTreeMap::new(),
            fingerprint: Arc::from("f"),
            cost: 1,
            reply_to: None,
            use_cache: true,
            stream: false,
            timeout: None,
            deadline: None,
            encoding: crate::encoding::Encoding::MsgPack,
            priority: crate::priority::Priority::Normal,
            chat: None,
        }
    }

    /// The demo decoder's spec, with three labels (an encoder's config says as much).
    fn lm_spec() -> (tempfile::TempDir, ModelPlan) {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("tiny");
        std::fs::create_dir(&folder).unwrap();
        jetbatch_testkit::write_tiny_lm(&folder, 1, 8, 1).unwrap();
        let mut spec = ModelPlan::load(&folder).unwrap();
        let labels = [("0", "neg"), ("1", "neutral"), ("2", "pos")].map(|(k, v)| (k.to_string(), v.to_string()));
        spec.lm.as_mut().unwrap().config.id2label = Some(labels.into_iter().collect());
        (dir, spec)
    }

    fn encode() -> JobInput {
        JobInput::Encode { ids: vec![1, 2], type_ids: vec![0, 0], normalize: true }
    }

    #[test]
    fn embeddings_and_classifications_have_the_models_shape_and_finite_numbers() {
        let (_d, spec) = lm_spec();
        let dim = spec.lm.as_ref().unwrap().config.hidden_size;
        let embed = job(JobKind::Embed, encode());
        let embedding = |embedding: Vec<f32>, tokens: usize| Output::Embedding { embedding, tokens };
        assert_eq!(check(&embed, &spec, &embedding(vec![0.5; dim], 2)), Ok(()));
        assert_eq!(check(&embed, &spec, &embedding(vec![0.5; 3], 2)), Err(Mismatch::Count { field: "embedding", expected: dim, found: 3 }));
        assert_eq!(check(&embed, &spec, &embedding(vec![0.5; dim], 5)), Err(Mismatch::Count { field: "tokens", expected: 2, found: 5 }));
        let mut nan = vec![0.5; dim];
        nan[1] = f32::NAN;
        assert_eq!(check(&embed, &spec, &embedding(nan, 2)), Err(Mismatch::NotFinite { field: "embedding" }));
        let generated = Output::Generate { text: "x".into(), tokens: vec![1], finish_reason: FinishReason::Eos, prompt_tokens: 2, top: vec![] };
        assert_eq!(check(&embed, &spec, &generated), Err(Mismatch::Kind { kind: "embed", found: "generate" }));
        assert_eq!(check(&embed, &spec, &generated).unwrap_err().to_string(), "a generate answer for a embed job");

        let classify = job(JobKind::Classify, encode());
        let class = |n: usize, label: &str, label_id: usize| Output::Classification { logits: vec![0.0; n], probs: vec![1.0 / n as f32; n], label: label.into(), label_id };
        assert_eq!(check(&classify, &spec, &class(3, "pos", 2)), Ok(()));
        assert_eq!(check(&classify, &spec, &class(2, "neg", 0)), Err(Mismatch::Count { field: "logits", expected: 3, found: 2 }));
        assert_eq!(check(&classify, &spec, &class(3, "neg", 2)), Err(Mismatch::Label { field: "label", expected: "pos".into(), found: "neg".into() }));
        assert_eq!(check(&classify, &spec, &class(3, "pos", 3)), Err(Mismatch::TooMany { field: "label_id", most: 2, found: 3 }));
        assert_eq!(check(&classify, &spec, &embedding(vec![0.5; dim], 2)), Err(Mismatch::Kind { kind: "classify", found: "embedding" }));
    }

    #[test]
    fn scores_and_generations_match_the_jobs_windows_and_limits() {
        let (_d, spec) = lm_spec();
        let window = |n: usize| Window { context: vec![1], continuation: vec![2; n], top_logprobs: 0 };
        let ll = job(JobKind::Loglikelihood, JobInput::Score(vec![window(3)]));
        let score = |logprob: f64, greedy: Option<bool>, tokens: usize| Output::Score { logprob, is_greedy: greedy, tokens, top: vec![] };
        assert_eq!(check(&ll, &spec, &score(-1.5, Some(true), 3)), Ok(()));
        assert_eq!(check(&ll, &spec, &score(f64::NEG_INFINITY, Some(false), 3)), Ok(()), "a token the model rules out");
        assert_eq!(check(&ll, &spec, &score(-1.5, Some(true), 2)), Err(Mismatch::Count { field: "tokens", expected: 3, found: 2 }));
        assert!(matches!(check(&ll, &spec, &score(f64::NAN, Some(true), 3)), Err(Mismatch::NotLogprob { field: "logprob", .. })));
        assert_eq!(check(&ll, &spec, &score(0.5, Some(true), 3)), Err(Mismatch::NotLogprob { field: "logprob", value: 0.5 }));
        assert_eq!(check(&ll, &spec, &score(-1.5, None, 3)), Err(Mismatch::Kind { kind: "loglikelihood", found: "score" }), "a rolling score");
        let rolling = job(JobKind::LoglikelihoodRolling, JobInput::Score(vec![window(3), window(2)]));
        assert_eq!(check(&rolling, &spec, &score(-9.0, None, 5)), Ok(()));

        let choices = job(JobKind::Loglikelihood, JobInput::Choices(vec![window(1), window(2)]));
        let chosen = |tokens: Vec<usize>| Output::Choices { logprobs: vec![-1.0, -2.0], is_greedy: vec![true, false], tokens, top: vec![] };
        assert_eq!(check(&choices, &spec, &chosen(vec![1, 2])), Ok(()));
        assert_eq!(check(&choices, &spec, &chosen(vec![2, 1])), Err(Mismatch::Count { field: "tokens", expected: 1, found: 2 }));
        assert_eq!(check(&choices, &spec, &score(-1.0, Some(true), 3)), Err(Mismatch::Kind { kind: "loglikelihood", found: "score" }));

        let input = GenerateInput { prompt: vec![1, 2, 3], max_new_tokens: 4, sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None }, stop: vec![], stop_token_ids: vec![], top_logprobs: 0 };
        let gen = job(JobKind::Generate, JobInput::Generate(input));
        let generated = |tokens: Vec<u32>, finish_reason, prompt_tokens, top: Vec<TopLogprobs>| Output::Generate { text: "ab".into(), tokens, finish_reason, prompt_tokens, top };
        assert_eq!(check(&gen, &spec, &generated(vec![5, 6], FinishReason::Eos, 3, vec![])), Ok(()));
        assert_eq!(check(&gen, &spec, &generated(vec![5; 5], FinishReason::Length, 3, vec![])), Err(Mismatch::TooMany { field: "tokens", most: 4, found: 5 }));
        assert_eq!(check(&gen, &spec, &generated(vec![5], FinishReason::Eos, 7, vec![])), Err(Mismatch::Count { field: "prompt_tokens", expected: 3, found: 7 }));
        assert_eq!(check(&gen, &spec, &generated(vec![5], FinishReason::Deadline, 3, vec![])), Err(Mismatch::Partial));
        let top = TopLogprobs { ids: vec![5], tokens: vec!["a".into()], logprobs: vec![-0.1] };
        assert_eq!(check(&gen, &spec, &generated(vec![5], FinishReason::Eos, 3, vec![top])), Err(Mismatch::TooMany { field: "top_logprobs", most: 0, found: 1 }), "not asked");
    }

    #[test]
    fn tensors_have_bytes_for_their_shape_and_trimmed_dims_of_the_jobs_length() {
        let toml = "backend = \"torchscript\"\n[[inputs]]\nname=\"x\"\ndtype=\"f32\"\nshape=[-1]\n[[outputs]]\nname=\"y\"\ntrim=[{dim=0, input=0, input_dim=0}]";
        let spec = ModelPlan { name: "t".into(), dir: ".".into(), config: toml::from_str(toml).unwrap(), fingerprint: "f".into(), size_bytes: 1, lm: None };
        let t = |shape: Vec<i64>, bytes: usize| TensorData { dtype: crate::tensor::DType::F32, shape, data: vec![0; bytes] };
        let tensor = job(JobKind::Tensor, JobInput::Tensor(vec![t(vec![3], 12)]));
        assert_eq!(check(&tensor, &spec, &Output::Tensor(vec![t(vec![3], 12)])), Ok(()));
        assert_eq!(check(&tensor, &spec, &Output::Tensor(vec![t(vec![3], 12), t(vec![2, 2], 16)])), Ok(()), "an output without trim rules");
        assert_eq!(check(&tensor, &spec, &Output::Tensor(vec![])), Err(Mismatch::Count { field: "tensors", expected: 1, found: 0 }));
        let err = check(&tensor, &spec, &Output::Tensor(vec![t(vec![3], 8)])).unwrap_err();
        assert_eq!(err.to_string(), "output.tensors[0]: 8 bytes for shape [3] of f32");
        let err = check(&tensor, &spec, &Output::Tensor(vec![t(vec![2], 8)])).unwrap_err();
        assert_eq!(err.to_string(), "output.tensors[0]: dim 0 is Some(2), input 0 dim 0 is Some(3)");
        let err = check(&tensor, &spec, &Output::Tensor(vec![t(vec![-1, -4], 16)])).unwrap_err();
        assert_eq!(err.to_string(), "output.tensors[0]: shape [-1, -4] is not a shape");
        assert_eq!(check(&tensor, &spec, &Output::Embedding { embedding: vec![1.0], tokens: 1 }), Err(Mismatch::Kind { kind: "tensor", found: "embedding" }));
    }
}
