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
use crate::repository::ModelSpec;
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
pub fn check(job: &ValidJob, spec: &ModelSpec, output: &Output) -> Result<(), Mismatch> {
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
        (JobKind::Embed, JobInput::Encode { .. }, Output::Embedding(e)) => {
            // The engine pools the encoder's last hidden state: one value per hidden unit.
            if let Some(lm) = lm {
                count("embedding", lm.config.hidden_size, e.len())?;
            }
            finite("embedding", e)
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
fn tensors(spec: &ModelSpec, inputs: &[TensorData], outputs: &[TensorData]) -> Result<(), Mismatch> {
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
        Output::Embedding(_) => "embedding",
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
