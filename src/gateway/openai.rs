//! The OpenAI side of the mapping, shared by the routes: a request body's fields the gateway
//! reads itself (model, prompt shapes, the extra fields and headers for level, deadline and cache)
//! and the generation parameters it renames onto a `generate` job; the generated tokens'
//! log-probs read out of a result's `top_logprobs`; `usage`.
//!
//! Only what decides which jobs to publish is checked here (a field's shape, `n`); values go to the
//! worker as they are and the worker's `bad_request` names them. A request field the gateway does
//! not know goes to the job's `params` under its own name, so the worker refuses it by name.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::jobs::{float, JobOptions};
use crate::priority::Priority;

/// The `model` field.
pub fn model(body: &Map<String, Value>) -> Result<String, ApiError> {
    match body.get("model") {
        Some(Value::String(m)) if crate::job::valid_model_name(m) => Ok(m.clone()),
        Some(Value::String(m)) => Err(ApiError::unknown_model(m)),
        _ => Err(ApiError::bad("model", "expected the name of a model the pool serves (a string)")),
    }
}

/// A value of the request's extra field `field` or, failing that, of header `x-jetbatch-<field>`
/// (as a JSON value if it reads as one, else a string).
fn extra(body: &mut Map<String, Value>, headers: &HeaderMap, field: &str) -> Option<Value> {
    body.remove(field).or_else(|| {
        let text = headers.get(format!("x-jetbatch-{}", field.replace('_', "-")))?.to_str().ok()?;
        Some(serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string())))
    })
}

/// The level, deadline and cache of a request's jobs: extra fields `priority`, `deadline` (RFC
/// 3339 or milliseconds since the epoch, as on the bus), `timeout_ms`, `cache`, or headers
/// `X-Jetbatch-Priority`, `-Deadline`, `-Timeout-Ms`, `-Cache`. No deadline: now + `default`.
pub fn job_options(body: &mut Map<String, Value>, headers: &HeaderMap, default: std::time::Duration) -> Result<JobOptions, ApiError> {
    let priority = match extra(body, headers, "priority") {
        None => Priority::default(),
        Some(v) => v.as_str().and_then(Priority::parse).ok_or_else(|| ApiError::bad("priority", "expected one of high, normal, low"))?,
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let deadline_ms = match (extra(body, headers, "deadline"), extra(body, headers, "timeout_ms")) {
        (Some(d), _) => {
            let at = rmpv::ext::to_value(&d).map_err(|e| ApiError::bad("deadline", e))?;
            let at = crate::deadline::Deadline::parse(&at).map_err(|e| ApiError::bad("deadline", e.trim_start_matches("deadline: ")))?;
            at.unix_ms()
        }
        (None, Some(t)) => now.as_millis() as u64 + t.as_u64().ok_or_else(|| ApiError::bad("timeout_ms", "expected a non-negative integer"))?,
        (None, None) => (now + default).as_millis() as u64,
    };
    let cache = match extra(body, headers, "cache") {
        None => None,
        Some(v) => Some(v.as_bool().ok_or_else(|| ApiError::bad("cache", "expected true or false"))?),
    };
    Ok(JobOptions { priority, deadline_ms, cache })
}

/// `n`: one choice per prompt is all a job gives.
pub fn check_n(body: &mut Map<String, Value>) -> Result<(), ApiError> {
    match body.remove("n") {
        None | Some(Value::Null) => Ok(()),
        Some(v) if v.as_u64() == Some(1) => Ok(()),
        Some(_) => Err(ApiError::bad("n", "only n = 1 is served (send the request again for more samples; give each a seed)")),
    }
}

/// Fields OpenAI clients send with values that ask for nothing (penalties of 0, an empty
/// `logit_bias`, `best_of` 1, `user`): dropped. Any other value goes on to the worker, which
/// refuses it by name.
fn drop_no_ops(body: &mut Map<String, Value>) {
    body.remove("user");
    body.remove("stream_options");
    for (field, none) in [("frequency_penalty", json!(0)), ("presence_penalty", json!(0)), ("best_of", json!(1)), ("logit_bias", json!({}))] {
        if body.get(field).is_some_and(|v| v.is_null() || v.as_f64() == none.as_f64() && none.is_number() || *v == none) {
            body.remove(field);
        }
    }
}

/// The `params` of a `generate` job from what is left of the request: `max_tokens` (or
/// `max_completion_tokens`) as `max_new_tokens`, a single `stop` string as a list, the rest as it is.
pub fn generation_params(mut body: Map<String, Value>, default_max_tokens: Option<u64>) -> Map<String, Value> {
    drop_no_ops(&mut body);
    let max = body.remove("max_completion_tokens").or_else(|| body.remove("max_tokens")).filter(|v| !v.is_null());
    if let Some(max) = max.or(default_max_tokens.map(Value::from)) {
        body.insert("max_new_tokens".into(), max);
    }
    match body.remove("stop") {
        Some(Value::String(s)) => {
            body.insert("stop".into(), json!([s]));
        }
        Some(Value::Null) | None => {}
        Some(other) => {
            body.insert("stop".into(), other);
        }
    }
    body.retain(|_, v| !v.is_null());
    body
}

/// How many of the most likely tokens a job is asked for when log-probs are wanted: the most the
/// worker gives, so a generated (or scored) token is found among them as often as can be.
pub const TOP_ASKED: u64 = 20;

/// One token of a `generate` or `loglikelihood` result with its log-prob, as far as the result's
/// `top_logprobs` tell: its text and log-prob are known when it is among the [`TOP_ASKED`] most
/// likely at its position (always, for greedy tokens), else its text is `token_id:<id>` and its
/// log-prob `None`. `top` holds the `k` most likely, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub text: String,
    pub logprob: Option<f64>,
    pub top: Vec<(String, f64)>,
}

/// The token `id` at one position of a result's `top_logprobs` (`{ids, tokens, logprobs}`).
pub fn token_logprob(id: u64, at: &Value, k: usize) -> TokenLogprob {
    let ids = at["ids"].as_array().map(Vec::as_slice).unwrap_or_default();
    let texts = at["tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
    let logprobs = at["logprobs"].as_array().map(Vec::as_slice).unwrap_or_default();
    let entry = |i: usize| (texts.get(i).and_then(Value::as_str).unwrap_or_default().to_string(), logprobs.get(i).and_then(float).unwrap_or(f64::NAN));
    let found = ids.iter().position(|t| t.as_u64() == Some(id));
    TokenLogprob {
        text: found.map_or_else(|| format!("token_id:{id}"), |i| entry(i).0),
        logprob: found.map(|i| entry(i).1),
        top: (0..ids.len().min(k)).map(entry).collect(),
    }
}

/// The generated tokens of a `generate` output with their log-probs.
pub fn generated_logprobs(output: &Value, k: usize) -> Vec<TokenLogprob> {
    let tokens = output["tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
    let top = output["top_logprobs"].as_array().map(Vec::as_slice).unwrap_or_default();
    tokens.iter().zip(top).map(|(t, at)| token_logprob(t.as_u64().unwrap_or(u64::MAX), at, k)).collect()
}

/// OpenAI's `finish_reason` for a `generate` output's: `eos` and `stop` are `stop`; `length`, and
/// `deadline` (the job's deadline cut it short), are `length`.
pub fn finish_reason(output: &Value) -> &'static str {
    match output["finish_reason"].as_str() {
        Some("stop" | "eos") => "stop",
        _ => "length",
    }
}

/// A 200 with a JSON body.
pub fn json_response(v: Value) -> axum::response::Response {
    use axum::response::IntoResponse;
    ([(axum::http::header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// Seconds since the epoch, for `created`.
pub fn created() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

pub fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn generation_params_rename_and_pass_the_rest_through() {
        let p = generation_params(map(json!({"max_tokens": 5, "stop": "\n", "temperature": 0, "frequency_penalty": 0, "presence_penalty": 0.5, "seed": null, "top_k": 3})), Some(16));
        assert_eq!(Value::Object(p), json!({"max_new_tokens": 5, "stop": ["\n"], "temperature": 0, "presence_penalty": 0.5, "top_k": 3}));
        let p = generation_params(map(json!({})), Some(16));
        assert_eq!(Value::Object(p), json!({"max_new_tokens": 16}));
        assert!(generation_params(map(json!({})), None).is_empty());
    }

    #[test]
    fn options_come_from_fields_or_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-jetbatch-priority", "high".parse().unwrap());
        headers.insert("x-jetbatch-deadline", "2030-01-01T00:00:00Z".parse().unwrap());
        let o = job_options(&mut Map::new(), &headers, std::time::Duration::from_secs(1)).unwrap();
        assert_eq!((o.priority, o.deadline_ms, o.cache), (Priority::High, 1_893_456_000_000, None));
        let mut body = map(json!({"priority": "low", "timeout_ms": 0, "cache": false, "prompt": "x"}));
        let o = job_options(&mut body, &HeaderMap::new(), std::time::Duration::from_secs(1)).unwrap();
        assert_eq!((o.priority, o.cache, body.len()), (Priority::Low, Some(false), 1));
        let e = job_options(&mut map(json!({"priority": "urgent"})), &HeaderMap::new(), std::time::Duration::ZERO).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("priority"));
        let e = job_options(&mut map(json!({"deadline": "tomorrow"})), &HeaderMap::new(), std::time::Duration::ZERO).unwrap_err();
        assert!(e.message.starts_with("deadline: 'tomorrow' is not an RFC 3339 timestamp"), "{}", e.message);
    }

    #[test]
    fn a_token_outside_the_top_list_has_no_logprob() {
        let at = json!({"ids": [7, 3], "tokens": ["a", "b"], "logprobs": [-0.1, "-Infinity"]});
        let t = token_logprob(3, &at, 1);
        assert_eq!(t, TokenLogprob { text: "b".into(), logprob: Some(f64::NEG_INFINITY), top: vec![("a".into(), -0.1)] });
        assert_eq!(token_logprob(9, &at, 2).text, "token_id:9");
        assert_eq!(token_logprob(9, &at, 2).logprob, None);
    }
}
