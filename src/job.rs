//! The wire contract at the edge: decoding job payloads (MessagePack or JSON) into an [`Envelope`],
//! and encoding results. `schemas/` holds the same contract as JSON Schema for producers.
//!
//! Parsing is split in two: [`decode`] checks what every job shares (id, model, kind, size), and the
//! model's [`crate::repository::ModelSpec::validate`] turns the kind-specific `input` into a
//! [`ValidJob`]. Nothing past the edge re-checks input, and every error names the offending field.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::tensor::TensorData;

/// Encoding of a job; its result is encoded the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    MsgPack,
    Json,
}

impl Encoding {
    /// JSON when the `Content-Type` says so or the payload starts with `{`; MessagePack otherwise.
    pub fn detect(content_type: Option<&str>, payload: &[u8]) -> Encoding {
        let json_header = content_type.is_some_and(|c| c.trim().starts_with("application/json"));
        let first = payload.iter().find(|b| !b.is_ascii_whitespace());
        if json_header || first == Some(&b'{') {
            Encoding::Json
        } else {
            Encoding::MsgPack
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::MsgPack => "application/msgpack",
            Encoding::Json => "application/json",
        }
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Vec<u8> {
        match self {
            // Serializing our own plain structs into a Vec cannot fail.
            Encoding::MsgPack => rmp_serde::to_vec_named(value).expect("msgpack encoding"),
            Encoding::Json => serde_json::to_vec(value).expect("json encoding"),
        }
    }

    pub fn decode<T: for<'de> Deserialize<'de>>(self, payload: &[u8]) -> Result<T, String> {
        match self {
            Encoding::MsgPack => rmp_serde::from_slice(payload).map_err(|e| e.to_string()),
            Encoding::Json => serde_json::from_slice(payload).map_err(|e| e.to_string()),
        }
    }
}

/// Job kinds of the contract. The engine's backends say which they serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Tensor,
    Generate,
    Loglikelihood,
    LoglikelihoodRolling,
    Embed,
    Classify,
}

impl JobKind {
    pub const ALL: [JobKind; 6] = [
        JobKind::Tensor,
        JobKind::Generate,
        JobKind::Loglikelihood,
        JobKind::LoglikelihoodRolling,
        JobKind::Embed,
        JobKind::Classify,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Tensor => "tensor",
            JobKind::Generate => "generate",
            JobKind::Loglikelihood => "loglikelihood",
            JobKind::LoglikelihoodRolling => "loglikelihood_rolling",
            JobKind::Embed => "embed",
            JobKind::Classify => "classify",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Error codes of the contract (`schemas/result.schema.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownModel,
    UnsupportedKind,
    ModelError,
    OutOfMemory,
    Timeout,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::UnsupportedKind => "unsupported_kind",
            ErrorCode::ModelError => "model_error",
            ErrorCode::OutOfMemory => "out_of_memory",
            ErrorCode::Timeout => "timeout",
        }
    }
}

/// An error that is reported to the producer as a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        JobError { code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        JobError::new(ErrorCode::BadRequest, message)
    }
}

/// Limits enforced while decoding, before any model is consulted.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_tensor_elements: usize,
}

/// A job whose shared fields are valid; `input` is still the raw map for the model to parse.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub id: String,
    pub model: String,
    pub kind: JobKind,
    pub input: Value,
    pub params: BTreeMap<String, Value>,
    pub reply_to: Option<String>,
    pub use_cache: bool,
    pub timeout: Option<Duration>,
    pub encoding: Encoding,
}

/// A payload that cannot become a job. `id` is set when it could be read, so an error result can
/// still reach the producer; otherwise the payload goes to the invalid dead-letter subject.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub id: Option<String>,
    pub model: Option<String>,
    pub kind: Option<String>,
    pub encoding: Encoding,
    pub error: JobError,
}

#[derive(Deserialize)]
struct WireJob {
    id: String,
    model: String,
    kind: String,
    input: Value,
    #[serde(default)]
    params: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    cache: Option<bool>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// What is readable from a payload that failed to decode as a whole.
#[derive(Deserialize, Default)]
struct PartialJob {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// Names: `[A-Za-z0-9_-]{1,64}` — they become subject tokens and folder names, so no dots,
/// wildcards or path separators.
pub fn valid_model_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Job ids become the last tokens of result subjects: `[A-Za-z0-9_:.-]{1,256}` without empty tokens.
pub fn valid_job_id(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:-.".contains(&b))
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
}

/// A subject a producer may ask results to be sent to: dot-separated tokens, no wildcards.
fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.split('.').all(|t| !t.is_empty() && !t.contains(['*', '>', ' ', '\t', '\r', '\n']))
}

/// Decodes the shared fields of a job published on the subject of `subject_model`.
pub fn decode(
    payload: &[u8],
    content_type: Option<&str>,
    subject_model: &str,
    limits: &Limits,
) -> Result<Envelope, Rejection> {
    let encoding = Encoding::detect(content_type, payload);
    let reject = |partial: PartialJob, error: JobError| Rejection {
        id: partial.id.filter(|id| valid_job_id(id)),
        model: partial.model,
        kind: partial.kind,
        encoding,
        error,
    };
    let partial = || encoding.decode::<PartialJob>(payload).unwrap_or_default();
    if payload.len() > limits.max_payload_bytes {
        return Err(reject(
            partial(),
            JobError::bad_request(format!(
                "payload of {} bytes is over the limit of {} bytes",
                payload.len(),
                limits.max_payload_bytes
            )),
        ));
    }
    let wire: WireJob = encoding.decode(payload).map_err(|e| {
        let what = match encoding {
            Encoding::MsgPack => "MessagePack",
            Encoding::Json => "JSON",
        };
        reject(partial(), JobError::bad_request(format!("undecodable {what} job: {e}")))
    })?;
    let partial = PartialJob {
        id: Some(wire.id.clone()),
        model: Some(wire.model.clone()),
        kind: Some(wire.kind.clone()),
    };
    if !valid_job_id(&wire.id) {
        return Err(reject(
            partial,
            JobError::bad_request("id: must be 1-256 of [A-Za-z0-9_:.-] with no empty dot-separated token"),
        ));
    }
    if !valid_model_name(&wire.model) {
        return Err(reject(partial, JobError::bad_request("model: must match [A-Za-z0-9_-]{1,64}")));
    }
    if wire.model != subject_model {
        return Err(reject(
            partial,
            JobError::bad_request(format!(
                "model: '{}' differs from the subject's model token '{subject_model}'",
                wire.model
            )),
        ));
    }
    let Some(kind) = JobKind::parse(&wire.kind) else {
        return Err(reject(
            partial,
            JobError::new(ErrorCode::UnsupportedKind, format!("kind: unknown kind '{}'", wire.kind)),
        ));
    };
    if let Some(reply_to) = &wire.reply_to {
        if !valid_subject(reply_to) {
            return Err(reject(partial, JobError::bad_request("reply_to: not a valid subject without wildcards")));
        }
    }
    if !wire.input.is_map() {
        return Err(reject(partial, JobError::bad_request("input: expected a map")));
    }
    Ok(Envelope {
        id: wire.id,
        model: wire.model,
        kind,
        input: wire.input,
        params: wire.params.unwrap_or_default(),
        reply_to: wire.reply_to,
        use_cache: wire.cache.unwrap_or(true),
        timeout: wire.timeout_ms.map(Duration::from_millis),
        encoding,
    })
}

/// Kind-specific, validated input: everything that determines the result (it is the cache key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobInput {
    Tensor(Vec<TensorData>),
    /// `loglikelihood` (one window) and `loglikelihood_rolling` (disjoint windows), in token ids.
    Score(Vec<crate::lm::Window>),
    Generate(crate::lm::GenerateInput),
    /// `embed` and `classify`: the encoder's input with its special tokens.
    Encode { ids: Vec<u32>, type_ids: Vec<u32>, normalize: bool },
}

/// A job ready for the cache and the batcher.
#[derive(Debug, Clone)]
pub struct ValidJob {
    pub id: String,
    pub model: Arc<str>,
    pub kind: JobKind,
    pub input: JobInput,
    /// Parameters that change the result, canonically ordered; part of the cache key.
    pub params: BTreeMap<String, Value>,
    /// The model's fingerprint when the job was validated; part of the cache key.
    pub fingerprint: Arc<str>,
    /// Budget units this job uses in a batch (elements of its variable-length dims).
    pub cost: usize,
    pub reply_to: Option<String>,
    pub use_cache: bool,
    /// `generate` with `stream: true`: chunks go on `<prefix>.stream.<id>` before the result.
    pub stream: bool,
    pub timeout: Option<Duration>,
    pub encoding: Encoding,
}

impl ValidJob {
    /// Cache key: hash of (fingerprint, kind, canonical input, result-affecting params). The
    /// canonical input is our typed form re-encoded, so JSON and MessagePack jobs share entries.
    pub fn cache_key(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(self.fingerprint.as_bytes());
        h.update(&[0]);
        h.update(self.kind.as_str().as_bytes());
        h.update(&[0]);
        h.update(&rmp_serde::to_vec(&self.input).expect("encode input"));
        h.update(&rmp_serde::to_vec(&self.params).expect("encode params"));
        *h.finalize().as_bytes()
    }
}

/// What a model produces for one job; stored as-is in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Output {
    Tensor(Vec<TensorData>),
    /// `loglikelihood` (with `is_greedy`) and `loglikelihood_rolling` (without).
    Score { logprob: f64, is_greedy: Option<bool>, tokens: usize },
    Generate { text: String, tokens: Vec<u32>, finish_reason: FinishReason, prompt_tokens: usize },
    Embedding(Vec<f32>),
    Classification { logits: Vec<f32>, probs: Vec<f32>, label: String, label_id: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Length,
    Stop,
    Eos,
}

impl Output {
    pub fn to_wire(&self, encoding: Encoding) -> Value {
        let map = |pairs: Vec<(&str, Value)>| Value::Map(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect());
        let floats = |xs: &[f32]| Value::Array(xs.iter().map(|&x| Value::from(x)).collect());
        match self {
            Output::Tensor(ts) => map(vec![("outputs", Value::Array(ts.iter().map(|t| t.to_wire(encoding)).collect()))]),
            Output::Score { logprob, is_greedy, tokens } => {
                let mut pairs = vec![("logprob", Value::from(*logprob)), ("tokens", Value::from(*tokens as u64))];
                if let Some(g) = is_greedy {
                    pairs.push(("is_greedy", Value::Boolean(*g)));
                }
                map(pairs)
            }
            Output::Generate { text, tokens, finish_reason, prompt_tokens } => map(vec![
                ("text", Value::from(text.as_str())),
                ("tokens", Value::Array(tokens.iter().map(|&t| Value::from(t)).collect())),
                ("finish_reason", Value::from(match finish_reason {
                    FinishReason::Length => "length",
                    FinishReason::Stop => "stop",
                    FinishReason::Eos => "eos",
                })),
                ("prompt_tokens", Value::from(*prompt_tokens as u64)),
            ]),
            Output::Embedding(e) => map(vec![("embedding", floats(e)), ("dim", Value::from(e.len() as u64))]),
            Output::Classification { logits, probs, label, label_id } => map(vec![
                ("logits", floats(logits)),
                ("probs", floats(probs)),
                ("label", Value::from(label.as_str())),
                ("label_id", Value::from(*label_id as u64)),
            ]),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub queued_ms: f64,
    pub compute_ms: f64,
    pub batch_size: usize,
}

/// The result message (`schemas/result.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub id: String,
    pub model: String,
    pub kind: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    pub cached: bool,
    pub worker: String,
    pub timing: Timing,
}

impl JobResult {
    /// Decodes a result whichever way it was encoded (for `submit`, tests and the loadtest).
    pub fn decode(payload: &[u8]) -> Result<JobResult, String> {
        Encoding::detect(None, payload).decode(payload)
    }

    /// The tensors of an ok `tensor` result.
    pub fn output_tensors(&self) -> Result<Vec<TensorData>, String> {
        let outputs = self
            .output
            .as_ref()
            .and_then(|o| o.as_map())
            .and_then(|m| m.iter().find(|(k, _)| k.as_str() == Some("outputs")))
            .and_then(|(_, v)| v.as_array())
            .ok_or("result has no output.outputs")?;
        outputs
            .iter()
            .enumerate()
            .map(|(i, t)| TensorData::from_wire(t, &format!("output.outputs[{i}]"), usize::MAX))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_payload_bytes: 1 << 20, max_tensor_elements: 1 << 20 };

    fn json(s: &str) -> Result<Envelope, Rejection> {
        decode(s.as_bytes(), None, "m", &LIMITS)
    }

    #[test]
    fn decodes_json_and_msgpack_alike() {
        let e = json(r#"{"id":"a-1","model":"m","kind":"tensor","input":{"inputs":[]},"cache":false}"#)
            .unwrap();
        assert_eq!((e.id.as_str(), e.kind, e.use_cache, e.encoding), ("a-1", JobKind::Tensor, false, Encoding::Json));
        let v: serde_json::Value = serde_json::from_str(
            r#"{"id":"a-1","model":"m","kind":"tensor","input":{"inputs":[]},"params":{"x":1}}"#,
        )
        .unwrap();
        let mp = rmp_serde::to_vec_named(&v).unwrap();
        let e = decode(&mp, None, "m", &LIMITS).unwrap();
        assert_eq!((e.encoding, e.use_cache, e.params.len()), (Encoding::MsgPack, true, 1));
    }

    #[test]
    fn rejections_keep_the_id_and_name_the_field() {
        let r = json(r#"{"id":"j1","model":"m","kind":"tensor"}"#).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("j1"));
        assert!(r.error.message.contains("missing field `input`"), "{}", r.error.message);
        let r = json(r#"{"id":"j2","model":"other","kind":"tensor","input":{}}"#).unwrap_err();
        assert!(r.error.message.starts_with("model: 'other' differs"), "{}", r.error.message);
        let r = json(r#"{"id":"j3","model":"m","kind":"dance","input":{}}"#).unwrap_err();
        assert_eq!(r.error.code, ErrorCode::UnsupportedKind);
        let r = json(r#"{"id":"a.>","model":"m","kind":"tensor","input":{}}"#).unwrap_err();
        assert_eq!((r.id, r.error.code), (None, ErrorCode::BadRequest));
        let r = decode(b"\xc1garbage", None, "m", &LIMITS).unwrap_err();
        assert!(r.id.is_none() && r.error.message.starts_with("undecodable MessagePack"));
        let r = json(r#"{"id":"j4","model":"m","kind":"tensor","input":{},"reply_to":"a.*"}"#).unwrap_err();
        assert!(r.error.message.starts_with("reply_to"));
    }

    #[test]
    fn oversize_payloads_are_rejected_with_their_id() {
        let big = format!(r#"{{"id":"big","model":"m","kind":"tensor","input":{{"pad":"{}"}}}}"#, "x".repeat(200));
        let r = decode(big.as_bytes(), None, "m", &Limits { max_payload_bytes: 100, max_tensor_elements: 1 }).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("big"));
        assert!(r.error.message.contains("over the limit"));
    }

    #[test]
    fn names_and_ids() {
        assert!(valid_model_name("demo-mlp_2"));
        for bad in ["", "a.b", "../x", "a*", "a>", "a b", &"x".repeat(65)] {
            assert!(!valid_model_name(bad), "{bad}");
        }
        assert!(valid_job_id("run-1:task.7"));
        for bad in ["", ".a", "a.", "a..b", "a*", "a b"] {
            assert!(!valid_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn results_round_trip_in_both_encodings() {
        let r = JobResult {
            id: "x".into(),
            model: "m".into(),
            kind: "tensor".into(),
            status: Status::Error,
            output: None,
            error: Some(JobError::bad_request("input: bad")),
            cached: false,
            worker: "w".into(),
            timing: Timing { queued_ms: 1.0, compute_ms: 2.0, batch_size: 3 },
        };
        for enc in [Encoding::MsgPack, Encoding::Json] {
            assert_eq!(JobResult::decode(&enc.encode(&r)).unwrap(), r);
        }
    }
}
