//! `POST /v1/embeddings`: `input` (a string or a list of strings) → one `embed` job each; the rest
//! of the request goes to the jobs' `params` (`normalize`; anything else the worker refuses by
//! name). `encoding_format: "base64"` (the OpenAI SDKs' default) sends each vector as the base64
//! of its little-endian f32s. `usage` counts the tokens the model read (each `embed` output's
//! `tokens`: special tokens included).

use std::sync::Arc;

use axum::response::Response;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::jobs::{float, JobOptions, JobSpec};
use super::openai;
use super::App;

pub async fn handle(app: Arc<App>, mut body: Map<String, Value>, options: JobOptions) -> Result<Response, ApiError> {
    let model = openai::model(&body)?;
    app.models.require(&model).await?;
    body.remove("model");
    body.remove("user");
    let bad = || ApiError::bad("input", "expected a string or a list of strings (token-id inputs need a tokenizer the gateway does not hold)");
    let texts: Vec<String> = match body.remove("input") {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) if !items.is_empty() => items.into_iter().map(|v| v.as_str().map(str::to_string).ok_or_else(bad)).collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    let base64 = match body.remove("encoding_format") {
        None | Some(Value::Null) => false,
        Some(v) if v == "float" => false,
        Some(v) if v == "base64" => true,
        Some(_) => return Err(ApiError::bad("encoding_format", "expected float or base64")),
    };
    let jobs = texts.into_iter().map(|text| app.bus.run(JobSpec { model: &model, kind: "embed", input: json!({"text": text}), params: body.clone(), options: &options }));
    let outputs = futures::future::try_join_all(jobs).await?;
    let data: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(index, out)| {
            let vector: Vec<f64> = out["embedding"].as_array().map(|v| v.iter().map(|x| float(x).unwrap_or(f64::NAN)).collect()).unwrap_or_default();
            let embedding = if base64 { Value::from(encode(&vector)) } else { json!(vector) };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = outputs.iter().filter_map(|out| out["tokens"].as_u64()).sum();
    Ok(openai::json_response(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})))
}

/// A vector as OpenAI's base64 encoding: little-endian f32s.
fn encode(vector: &[f64]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_vectors_are_little_endian_f32() {
        assert_eq!(super::encode(&[1.0, -2.5]), "AACAPwAAIMA=");
    }
}
