//! `POST /v1/chat/completions`: `messages` go to a `generate` job as they are, and the worker
//! renders them with the model's own chat template (its refusal names `messages`); `stream: true`
//! streams the chunks; `logprobs: true` (with `top_logprobs: k`) reports the generated tokens'
//! log-probs, streamed or not (the same values).

use std::sync::Arc;

use axum::response::Response;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::jobs::{JobOptions, JobSpec};
use super::openai::{self, TokenLogprob, TOP_ASKED};
use super::sse::{self, Piece};
use super::App;

pub async fn handle(app: Arc<App>, mut body: Map<String, Value>, options: JobOptions) -> Result<Response, ApiError> {
    let model = openai::model(&body)?;
    app.models.require(&model).await?;
    body.remove("model");
    openai::check_n(&mut body)?;
    let messages = body.remove("messages").ok_or_else(|| ApiError::bad("messages", "missing: a list of {role, content}"))?;
    let stream = match body.remove("stream") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::bad("stream", "expected true or false"))?,
    };
    let logprobs = match body.remove("logprobs") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::bad("logprobs", "expected true or false"))?,
    };
    let top = match body.remove("top_logprobs") {
        None | Some(Value::Null) => 0,
        Some(v) if logprobs => v.as_u64().filter(|k| *k <= TOP_ASKED).ok_or_else(|| ApiError::bad("top_logprobs", format!("expected an integer from 0 to {TOP_ASKED}")))? as usize,
        Some(_) => return Err(ApiError::bad("top_logprobs", "needs logprobs: true")),
    };
    let mut params = openai::generation_params(body, None);
    if logprobs {
        params.insert("top_logprobs".into(), TOP_ASKED.into());
    }
    let spec = JobSpec { model: &model, kind: "generate", input: json!({"messages": messages}), params, options: &options };
    let (id, created) = (format!("chatcmpl-{}", app.bus.next_id()), openai::created());
    if stream {
        let name = model.clone();
        let render = Box::new(move |piece: Piece| {
            let (delta, logprobs, finish, usage) = match piece {
                Piece::Text { text, logprobs, .. } => (json!({"role": "assistant", "content": text}), logprobs.map(content_logprobs), Value::Null, Value::Null),
                Piece::Finish(output) => (json!({}), None, openai::finish_reason(output).into(), usage(output)),
            };
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], "usage": usage})
        });
        return sse::respond(&app.bus, spec, app.stream_idle, logprobs.then_some(top), render).await;
    }
    let output = app.bus.run(spec).await?;
    let logprobs = logprobs.then(|| content_logprobs(&openai::generated_logprobs(&output, top)));
    Ok(openai::json_response(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output["text"]}, "logprobs": logprobs, "finish_reason": openai::finish_reason(&output)}],
        "usage": usage(&output),
    })))
}

/// A choice's `logprobs`: `{content: [{token, logprob, bytes, top_logprobs}]}`.
fn content_logprobs(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t.top.iter().map(|(s, l)| json!({"token": s, "logprob": l, "bytes": s.as_bytes()})).collect();
            json!({"token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes(), "top_logprobs": top})
        })
        .collect();
    json!({"content": content})
}

fn usage(output: &Value) -> Value {
    openai::usage(output["prompt_tokens"].as_u64().unwrap_or(0), output["tokens"].as_array().map_or(0, |t| t.len() as u64))
}
