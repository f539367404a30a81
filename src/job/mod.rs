//! The wire contract at the edge: decoding job payloads (MessagePack or JSON) into an [`Envelope`],
//! and encoding results. `schemas/` holds the same contract as JSON Schema for producers.
//!
//! Parsing is split in two: [`decode`] checks what every job shares (id, model, kind, size), and the
//! model's [`crate::plan::ModelPlan::validate`] turns the kind-specific `input` into a
//! [`ValidJob`]. Nothing past the edge re-checks input, and every error names the offending field.
//!
//! Here: the envelope, its strict decoder, [`ValidJob`] and the result message. Beside it:
//! `subject` (names that become subject tokens, the `reply_to` policy) and `scan` (the lenient
//! reading of a refused payload's id, model and kind).

mod scan;
mod subject;
#[cfg(test)]
mod testdocs;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rmpv::Value;
use serde::{Deserialize, Serialize};

pub use crate::deadline::Deadline;
pub use crate::encoding::Encoding;
use crate::encoding::BOM;
pub use crate::error::{ErrorCode, JobError, MAX_ERROR_MESSAGE_BYTES};
use crate::error::excerpt;
pub use crate::kinds::{ChatPrompt, FinishReason, JobInput, JobKind, Output, ValidationError};
use crate::kinds::fields::{self, Place};
use crate::priority::Priority;
use crate::tensor::TensorData;
use scan::{be, scan_fields};
use subject::check_reply_to;
pub use subject::{check_reply_prefix, model_token, token_model, valid_job_id, valid_model_name, DEFAULT_REPLY_PREFIXES, MAX_REPLY_TO_BYTES, MODEL_NAME_RULE};

/// Nesting levels a job document may have (the top-level map is the first), like serde_json's
/// own limit. Deeper documents are rejected before anything recurses further.
pub const MAX_NESTING: usize = 128;

/// Limits and policy enforced while decoding, before any model is consulted.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_tensor_elements: usize,
    /// Subjects (`a.b`) or subject prefixes (`a.b.>`) a job's `reply_to` must match.
    pub reply_prefixes: Vec<String>,
    /// Our subject prefix: `<prefix>.jobs|results|dead|metrics|stream` are never a `reply_to`.
    pub prefix: String,
}

impl Limits {
    /// The given sizes with the default reply policy ([`DEFAULT_REPLY_PREFIXES`], prefix `jetbatch`).
    pub fn new(max_payload_bytes: usize, max_tensor_elements: usize) -> Limits {
        Limits {
            max_payload_bytes,
            max_tensor_elements,
            reply_prefixes: DEFAULT_REPLY_PREFIXES.iter().map(|p| p.to_string()).collect(),
            prefix: "jetbatch".to_string(),
        }
    }
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
    pub deadline: Option<Deadline>,
    pub encoding: Encoding,
    /// The `priority` field, if given; on the bus it must equal its subject's level.
    pub priority: Option<Priority>,
}

/// A payload that cannot become a job. `id` is set when it could be read, so an error result can
/// still reach the producer; otherwise the payload goes to the invalid dead-letter subject.
/// `model` is set only to a valid model name and `kind` only to a known kind (they become metric
/// labels and result fields).
#[derive(Debug, Clone)]
pub struct Rejection {
    pub id: Option<String>,
    pub model: Option<String>,
    pub kind: Option<String>,
    pub encoding: Encoding,
    pub error: JobError,
}

/// The top-level entries of a job, in order, duplicates kept; an error names the field.
fn read_top_level(payload: &[u8], encoding: Encoding) -> Result<Vec<(String, Value)>, String> {
    match encoding {
        Encoding::Json => read_json_top_level(payload),
        Encoding::MsgPack => read_msgpack_top_level(payload),
    }
}

fn read_json_top_level(payload: &[u8]) -> Result<Vec<(String, Value)>, String> {
    use serde::de::{Deserializer as _, MapAccess, Visitor};
    use std::cell::RefCell;

    if payload.starts_with(BOM) {
        return Err("payload: starts with a byte-order mark (send JSON without one)".into());
    }
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("payload: expected a map (a JSON object) at the top level".into());
    }
    /// Collects the entries, remembering the key being read so an error can name it.
    struct Top<'a>(&'a RefCell<Option<String>>);
    impl<'de> Visitor<'de> for Top<'_> {
        type Value = Vec<(String, Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a job map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            loop {
                *self.0.borrow_mut() = None;
                let Some(key) = map.next_key::<String>()? else { break };
                *self.0.borrow_mut() = Some(key.clone());
                let value = map.next_value::<Value>()?;
                entries.push((key, value));
            }
            Ok(entries)
        }
    }
    let current = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(payload);
    let described = |e: serde_json::Error| {
        let at = current.borrow().as_deref().map(excerpt).unwrap_or_else(|| "payload".into());
        let text = e.to_string();
        if text.starts_with("recursion limit exceeded") {
            format!("{at}: nested deeper than {MAX_NESTING} levels")
        } else if at == "payload" {
            format!("payload: undecodable JSON: {text}")
        } else {
            format!("{at}: {text}")
        }
    };
    let entries = de.deserialize_map(Top(&current)).map_err(described)?;
    de.end().map_err(|e| format!("payload: trailing characters after the job ({e})"))?;
    Ok(entries)
}

fn read_msgpack_top_level(payload: &[u8]) -> Result<Vec<(String, Value)>, String> {
    let invalid = |at: &str, e: &dyn std::fmt::Display| format!("{at}: truncated or invalid MessagePack ({e})");
    let (pairs, header) = match payload.first() {
        None => return Err("payload: empty".into()),
        Some(&m @ 0x80..=0x8f) => ((m & 0x0f) as usize, 1),
        Some(0xde) => (be(payload, 1, 2).ok_or("payload: truncated map header")?, 3),
        Some(0xdf) => (be(payload, 1, 4).ok_or("payload: truncated map header")?, 5),
        Some(0x90..=0x9f | 0xdc | 0xdd) => return Err("payload: expected a map at the top level, not an array".into()),
        Some(_) => return Err("payload: expected a map at the top level".into()),
    };
    let mut rd = &payload[header..];
    // rmpv counts a container twice and a string three times; this admits MAX_NESTING levels.
    let max_depth = 2 * MAX_NESTING + 1;
    let read = |rd: &mut &[u8], at: &str| {
        rmpv::decode::read_value_with_max_depth(rd, max_depth).map_err(|e| match e {
            rmpv::decode::Error::DepthLimitExceeded => format!("{at}: nested deeper than {MAX_NESTING} levels"),
            e => invalid(at, &e),
        })
    };
    let mut entries = Vec::new();
    for _ in 0..pairs {
        let key = match read(&mut rd, "payload")? {
            Value::String(s) => s.into_str().ok_or("payload: a top-level key is not valid UTF-8")?,
            _ => return Err("payload: top-level keys must be strings".into()),
        };
        let value = read(&mut rd, &excerpt(&key))?;
        entries.push((key, value));
    }
    if !rd.is_empty() {
        return Err(format!("payload: {} trailing bytes after the job", rd.len()));
    }
    Ok(entries)
}

fn expect_str(field: &str, v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => s.into_str().ok_or_else(|| format!("{field}: not valid UTF-8")),
        _ => Err(format!("{field}: expected a string")),
    }
}

/// Decodes the shared fields of a job published on the subject of `subject_model`.
pub fn decode(
    payload: &[u8],
    content_type: Option<&str>,
    subject_model: &str,
    limits: &Limits,
) -> Result<Envelope, Rejection> {
    let encoding = Encoding::detect(content_type, payload);
    let reject = |error: JobError| {
        let (id, model, kind) = scan_fields(payload, encoding);
        Rejection { id, model, kind, encoding, error }
    };
    let bad = |message: String| reject(JobError::bad_request(message));
    if payload.len() > limits.max_payload_bytes {
        return Err(bad(format!(
            "payload: {} bytes is over the limit of {} bytes",
            payload.len(),
            limits.max_payload_bytes
        )));
    }
    let entries = read_top_level(payload, encoding).map_err(bad)?;
    let mut fields: BTreeMap<String, Value> = BTreeMap::new();
    for (key, value) in entries {
        if fields.contains_key(&key) {
            return Err(bad(format!("{}: appears more than once", excerpt(&key))));
        }
        fields.insert(key, value);
    }
    let mut take = |name: &str| fields.remove(name);
    let id = expect_str("id", take("id").ok_or("id: missing field `id`").map_err(|e| bad(e.into()))?).map_err(bad)?;
    if !valid_job_id(&id) {
        return Err(bad("id: must be 1-256 of [A-Za-z0-9_:.-] with no empty dot-separated token".into()));
    }
    let model = expect_str("model", take("model").ok_or("model: missing field `model`").map_err(|e| bad(e.into()))?).map_err(bad)?;
    if !valid_model_name(&model) {
        return Err(bad(format!("model: '{}' is not a model name ({})", excerpt(&model), subject::MODEL_NAME_RULE)));
    }
    if model != subject_model {
        return Err(bad(format!("model: '{model}' differs from the subject's model token '{}'", excerpt(subject_model))));
    }
    let kind = expect_str("kind", take("kind").ok_or("kind: missing field `kind`").map_err(|e| bad(e.into()))?).map_err(bad)?;
    let Some(kind) = JobKind::parse(&kind) else {
        return Err(reject(JobError::new(ErrorCode::UnsupportedKind, format!("kind: unknown kind '{}'", excerpt(&kind)))));
    };
    let input = take("input").ok_or_else(|| bad("input: missing field `input`".into()))?;
    if !input.is_map() {
        return Err(bad("input: expected a map".into()));
    }
    let params = match take("params") {
        None => BTreeMap::new(),
        Some(Value::Map(entries)) => {
            let mut params = BTreeMap::new();
            for (k, v) in entries {
                let k = expect_str("params: key", k).map_err(|_| bad("params: keys must be strings".into()))?;
                if params.contains_key(&k) {
                    return Err(bad(format!("params.{}: appears more than once", excerpt(&k))));
                }
                params.insert(k, v);
            }
            params
        }
        Some(_) => return Err(bad("params: expected a map".into())),
    };
    let reply_to = match take("reply_to") {
        None => None,
        Some(v) => {
            let r = expect_str("reply_to", v).map_err(bad)?;
            check_reply_to(&r, &limits.reply_prefixes, &limits.prefix).map_err(|e| bad(format!("reply_to: {e}")))?;
            Some(r)
        }
    };
    let use_cache = match take("cache") {
        None => true,
        Some(Value::Boolean(b)) => b,
        Some(_) => return Err(bad("cache: expected true or false".into())),
    };
    let timeout = match take("timeout_ms") {
        None => None,
        Some(v) => Some(Duration::from_millis(
            v.as_u64().ok_or_else(|| bad("timeout_ms: expected a non-negative integer".into()))?,
        )),
    };
    let priority = match take("priority") {
        None => None,
        Some(v) => {
            let p = expect_str("priority", v).map_err(bad)?;
            Some(Priority::parse(&p).ok_or_else(|| bad(format!("priority: '{}' is not one of high, normal, low", excerpt(&p))))?)
        }
    };
    let deadline = take("deadline").map(|v| Deadline::parse(&v)).transpose().map_err(bad)?;
    // Checked last, so a wrong known field is named first; a misspelt key gets our name for it.
    if let Some(key) = fields.keys().next() {
        return Err(reject(fields::unknown_key(Place::Top, key, fields::TOP_LEVEL, None).into()));
    }
    Ok(Envelope { id, model, kind, input, params, reply_to, use_cache, timeout, deadline, encoding, priority })
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
    /// Past it the job is answered `timeout` unstarted, and a generation stops (not part of the
    /// cache key: it changes whether a result comes, not what it is).
    pub deadline: Option<Deadline>,
    pub encoding: Encoding,
    /// Its level: the batcher picks jobs highest level first.
    pub priority: Priority,
    /// Its `messages` as the chat template rendered them (not part of the cache key: the tokens are).
    pub chat: Option<ChatPrompt>,
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
    /// What produced the result; absent where the job named no model the worker serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// What produced a result (`provenance` in `schemas/result.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The model folder's fingerprint (its config and every file): other weights, another value.
    pub model_fingerprint: String,
    pub dtype: String,
    /// `cpu` or `cuda:N`, as the answering worker resolved the model's device.
    pub device: String,
    /// The answering worker's version.
    pub jetbatch: String,
    /// Where the job sent `messages`: the chat template's hash and the prompt it rendered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatPrompt>,
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
    use testdocs::{deep_json, deep_msgpack, mp_str, msgpack, raw_map};

    fn limits() -> Limits {
        Limits::new(1 << 20, 1 << 20)
    }

    fn json(s: &str) -> Result<Envelope, Rejection> {
        decode(s.as_bytes(), None, "m", &limits())
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
        let e = decode(&mp, None, "m", &limits()).unwrap();
        assert_eq!((e.encoding, e.use_cache, e.params.len()), (Encoding::MsgPack, true, 1));
    }

    #[test]
    fn rejections_keep_the_id_and_name_the_field() {
        let r = json(r#"{"id":"j1","model":"m","kind":"tensor"}"#).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("j1"));
        assert_eq!(r.error.message, "input: missing field `input`");
        let r = json(r#"{"id":"j2","model":"other","kind":"tensor","input":{}}"#).unwrap_err();
        assert!(r.error.message.starts_with("model: 'other' differs"), "{}", r.error.message);
        let r = json(r#"{"id":"j3","model":"m","kind":"dance","input":{}}"#).unwrap_err();
        assert_eq!(r.error.code, ErrorCode::UnsupportedKind);
        let r = json(r#"{"id":"a.>","model":"m","kind":"tensor","input":{}}"#).unwrap_err();
        assert_eq!((r.id, r.error.code), (None, ErrorCode::BadRequest));
        let r = decode(b"\xc1garbage", None, "m", &limits()).unwrap_err();
        assert!(r.id.is_none() && r.error.message.starts_with("payload: expected a map"), "{}", r.error.message);
        let r = json(r#"{"id":"j4","model":"m","kind":"tensor","input":{},"reply_to":"a.*"}"#).unwrap_err();
        assert!(r.error.message.starts_with("reply_to"));
    }

    #[test]
    fn oversize_payloads_are_rejected_with_their_id() {
        let big = format!(r#"{{"id":"big","model":"m","kind":"tensor","input":{{"pad":"{}"}}}}"#, "x".repeat(200));
        let r = decode(big.as_bytes(), None, "m", &Limits::new(100, 1)).unwrap_err();
        assert_eq!(r.id.as_deref(), Some("big"));
        assert!(r.error.message.contains("over the limit"));
    }

    #[test]
    fn a_deadline_is_read_as_a_timestamp_or_epoch_milliseconds() {
        let job = |extra: &str| format!(r#"{{"id":"s","model":"m","kind":"tensor","input":{{}}{extra}}}"#);
        let noon = Deadline::from_unix_ms(1_795_694_400_000);
        assert_eq!(json(&job(r#","deadline":"2026-11-26T12:00:00Z""#)).unwrap().deadline, noon);
        assert_eq!(json(&job(r#","deadline":1795694400000,"timeout_ms":50"#)).unwrap().deadline, noon);
        assert_eq!(json(&job("")).unwrap().deadline, None);
        let r = json(&job(r#","deadline":"noon""#)).unwrap_err();
        assert_eq!((r.id.as_deref(), r.error.code), (Some("s"), ErrorCode::BadRequest), "answered under its id");
        assert!(r.error.message.starts_with("deadline: 'noon' is not an RFC 3339 timestamp"), "{}", r.error.message);
        assert_eq!(json(&job(r#","deadlines":1"#)).unwrap_err().error.message, "deadlines: unknown; did you mean deadline?");
    }

    #[test]
    fn the_envelope_is_decoded_strictly_and_errors_name_the_field() {
        let msg = |doc: &str| json(doc).unwrap_err().error.message;
        let job = |extra: &str| format!(r#"{{"id":"s","model":"m","kind":"tensor","input":{{}}{extra}}}"#);
        assert_eq!(msg(&job(r#","params":5"#)), "params: expected a map");
        assert_eq!(msg(&job(r#","params":null"#)), "params: expected a map");
        assert_eq!(msg(&job(r#","cache":"yes""#)), "cache: expected true or false");
        assert_eq!(msg(&job(r#","timeout_ms":-1"#)), "timeout_ms: expected a non-negative integer");
        assert_eq!(msg(&job(r#","reply_to":5"#)), "reply_to: expected a string");
        assert_eq!(msg(&job(r#","model":"m""#)), "model: appears more than once");
        assert_eq!(msg(r#"{"id":"s","model":7,"kind":"tensor","input":{}}"#), "model: expected a string");
        assert_eq!(msg(r#"{"id":7,"model":"m","kind":"tensor","input":{}}"#), "id: expected a string");
        assert_eq!(msg(r#"{"id":"s","model":"m","kind":["tensor"],"input":{}}"#), "kind: expected a string");
        assert_eq!(msg(r#"{"id":"s","model":"m","kind":"tensor","input":[]}"#), "input: expected a map");
        assert_eq!(msg(r#"{"id":"s","model":"m","kind":"tensor","input":{}} x"#).split(' ').next(), Some("payload:"));
        assert!(msg(&deep_json(200)).starts_with("input: nested deeper than 128 levels"), "{}", msg(&deep_json(200)));
        // Unknown top-level keys are refused, naming the key (ours where one is meant); a modest depth is fine.
        assert_eq!(msg(&job(r#","timeout":5"#)), "timeout: unknown; did you mean timeout_ms?");
        assert_eq!(msg(&job(r#","use_cache":false"#)), "use_cache: unknown; did you mean cache?");
        assert!(msg(&job(r#","extra":{"a":[1,2]}"#)).starts_with("extra: unknown; the keys are id, model, kind, input, params"));
        assert_eq!(json(&job(r#","extra":1"#)).unwrap_err().id.as_deref(), Some("s"));
        assert!(json(&deep_json(100)).is_ok());

        let mp = |bytes: &[u8]| decode(bytes, None, "m", &limits()).unwrap_err().error.message;
        let good = msgpack(&serde_json::json!({"id": "s", "model": "m", "kind": "tensor", "input": {}}));
        assert!(decode(&good, None, "m", &limits()).is_ok());
        assert_eq!(mp(&[good.as_slice(), &[1, 2, 3]].concat()), "payload: 3 trailing bytes after the job");
        assert_eq!(mp(&msgpack(&serde_json::json!(["s", "m", "tensor", {}]))), "payload: expected a map at the top level, not an array");
        let utf8 = raw_map(&[("id", mp_str(b"s")), ("model", mp_str(b"m\xff")), ("kind", mp_str(b"tensor")), ("input", vec![0x80])]);
        assert_eq!(mp(&utf8), "model: not valid UTF-8");
        assert_eq!(mp(&deep_msgpack(2000)), "input: nested deeper than 128 levels");
        assert!(decode(&deep_msgpack(100), None, "m", &limits()).is_ok());
        let bom = [b"\xEF\xBB\xBF".as_slice(), br#"{"id":"bom","model":"m","kind":"tensor","input":{}}"#].concat();
        let r = decode(&bom, None, "m", &limits()).unwrap_err();
        assert_eq!((r.id.as_deref(), r.encoding), (Some("bom"), Encoding::Json));
        assert!(r.error.message.starts_with("payload: starts with a byte-order mark"), "{}", r.error.message);
        let dup = raw_map(&[("id", mp_str(b"s")), ("id", mp_str(b"s")), ("model", mp_str(b"m")), ("kind", mp_str(b"tensor")), ("input", vec![0x80])]);
        assert_eq!(mp(&dup), "id: appears more than once");
    }

    #[test]
    fn error_messages_are_bounded_and_header_safe() {
        let control: String = std::iter::repeat(['\u{1}', '\n', '\r', '\u{b}', '\u{7f}', '\u{85}']).take(300_000).flatten().collect();
        assert!(control.len() > 1_700_000);
        for text in [control, "x".repeat(70_000), "é".repeat(70_000)] {
            let e = JobError::bad_request(format!("kind: unknown kind '{text}'"));
            assert!(e.message.len() <= MAX_ERROR_MESSAGE_BYTES, "{}", e.message.len());
            assert!(!e.message.chars().any(char::is_control), "{:?}", e.message);
            assert!(e.message.starts_with("kind: unknown kind '") && e.message.ends_with('…'));
        }
        assert_eq!(JobError::bad_request("short\tmessage").message, "short\u{FFFD}message");
        // Through the decoder: a 70 KB wrong field and a huge control-character kind.
        let r = json(&format!(r#"{{"id":"b","model":"m","kind":"tensor","input":{{}},"cache":"{}"}}"#, "y".repeat(70_000))).unwrap_err();
        assert_eq!(r.error.message, "cache: expected true or false");
        let r = json(&format!(r#"{{"id":"b","model":"m","kind":"{}","input":{{}}}}"#, "\\u0001".repeat(300_000))).unwrap_err();
        assert!(r.error.message.len() <= MAX_ERROR_MESSAGE_BYTES && !r.error.message.chars().any(char::is_control));
        let r = json(&format!(r#"{{"id":"b","model":"m","kind":"tensor","input":{{}},"{}":1,"{0}":2}}"#, "k".repeat(70_000))).unwrap_err();
        assert!(r.error.message.len() <= MAX_ERROR_MESSAGE_BYTES && r.error.message.ends_with("appears more than once"), "{}", r.error.message);
    }

    #[test]
    fn reply_to_is_limited_to_allowed_prefixes() {
        let with = |reply: &str, limits: &Limits| {
            let doc = serde_json::json!({"id": "r", "model": "m", "kind": "tensor", "input": {}, "reply_to": reply});
            decode(doc.to_string().as_bytes(), None, "m", limits).map(|e| e.reply_to.unwrap()).map_err(|r| (r.id, r.error.message))
        };
        for ok in ["_INBOX.abc", "_INBOX.abc.def", "jetbatch.reply.client-1.x"] {
            assert_eq!(with(ok, &limits()).as_deref(), Ok(ok));
        }
        for (bad, needle) in [
            ("$JS.API.STREAM.PURGE.JETBATCH_RESULTS", "'$'"),
            ("$SYS.REQ.SERVER.PING", "'$'"),
            ("jetbatch.jobs.mlp", "jetbatch.jobs"),
            ("jetbatch.dead.x", "jetbatch.dead"),
            ("jetbatch.results.other", "jetbatch.results"),
            ("jetbatch.metrics", "jetbatch.metrics"),
            ("jetbatch.stream.x", "jetbatch.stream"),
            ("a\u{b}b", "byte 0x0b"),
            ("_INBOX.a b", "byte 0x20"),
            ("_INBOX.*", "wildcards"),
            ("_INBOX.>", "wildcards"),
            ("_INBOX.a>", "wildcards"),
            ("_INBOX..a", "empty"),
            ("", "1-256 bytes"),
            ("_INBOX", "not under an allowed prefix (_INBOX.>, jetbatch.reply.>)"),
            ("jetbatch.reply", "not under an allowed prefix"),
            ("other.subject", "not under an allowed prefix"),
        ] {
            let (id, message) = with(bad, &limits()).unwrap_err();
            assert_eq!(id.as_deref(), Some("r"));
            assert!(message.starts_with("reply_to: ") && message.contains(needle), "{bad:?}: {message}");
        }
        let long = format!("_INBOX.{}", "a".repeat(250));
        assert!(with(&long, &limits()).unwrap_err().1.contains("1-256 bytes"));
        // A configured prefix and policy.
        let mut custom = limits();
        custom.prefix = "acme.jb".into();
        custom.reply_prefixes = vec!["acme.replies.>".into(), "svc.answer".into()];
        assert!(with("acme.replies.x", &custom).is_ok() && with("svc.answer", &custom).is_ok());
        assert!(with("svc.answer.x", &custom).is_err() && with("_INBOX.x", &custom).is_err());
        assert!(with("acme.jb.jobs.m", &custom).unwrap_err().1.contains("acme.jb.jobs is the worker's own"));
        assert!(with("jetbatch.jobs.m", &custom).unwrap_err().1.contains("not under an allowed prefix"));
    }

    #[test]
    fn non_finite_outputs_are_strings_in_json() {
        let score = Output::Score { logprob: f64::NEG_INFINITY, is_greedy: None, tokens: 1, top: Vec::new() };
        let emb = Output::Embedding { embedding: vec![f32::NAN, f32::INFINITY, 0.5], tokens: 3 };
        let json_of = |o: &Output| serde_json::to_value(o.to_wire(Encoding::Json)).unwrap();
        assert_eq!(json_of(&score)["logprob"], "-Infinity");
        assert_eq!(json_of(&emb)["embedding"], serde_json::json!(["NaN", "Infinity", 0.5]));
        let cls = Output::Classification { logits: vec![f32::NEG_INFINITY], probs: vec![f32::NAN], label: "l".into(), label_id: 0 };
        assert_eq!((json_of(&cls)["logits"][0].clone(), json_of(&cls)["probs"][0].clone()), ("-Infinity".into(), "NaN".into()));
        // MessagePack keeps native floats.
        let wire = score.to_wire(Encoding::MsgPack);
        let logprob = wire.as_map().unwrap().iter().find(|(k, _)| k.as_str() == Some("logprob")).unwrap().1.as_f64();
        assert_eq!(logprob, Some(f64::NEG_INFINITY));
        // A tensor result round-trips through JSON.
        let t = TensorData::from((&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.5][..], vec![4]));
        let result = JobResult {
            id: "x".into(),
            model: "m".into(),
            kind: "tensor".into(),
            status: Status::Ok,
            output: Some(Output::Tensor(vec![t.clone()]).to_wire(Encoding::Json)),
            error: None,
            cached: false,
            worker: "w".into(),
            timing: Timing::default(),
            provenance: None,
        };
        let bytes = Encoding::Json.encode(&result);
        assert!(!String::from_utf8_lossy(&bytes).contains("null"));
        assert_eq!(JobResult::decode(&bytes).unwrap().output_tensors().unwrap(), vec![t]);
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
            provenance: Some(Provenance {
                model_fingerprint: "0123456789abcdef".into(),
                dtype: "f32".into(),
                device: "cpu".into(),
                jetbatch: "0.1.0".into(),
                chat_template: Some(ChatPrompt { template_hash: "fedcba9876543210".into(), prompt: "<|user|>hi\n".into() }),
            }),
        };
        for enc in [Encoding::MsgPack, Encoding::Json] {
            assert_eq!(JobResult::decode(&enc.encode(&r)).unwrap(), r);
        }
    }
}
