//! Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with their HTTP
//! status, and the mapping of a worker's error result onto them: the worker validates every job
//! (the gateway is a producer and does not repeat that), and its messages name the job's field,
//! which is turned back into the request's name for it (`params.max_new_tokens` → `max_tokens`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// A request's failure, as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`…
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, where there is one.
    pub param: Option<String>,
    /// A short code: the worker's error code, or the gateway's own (`model_not_found`…).
    pub code: Option<String>,
    /// Seconds after which trying again may help (503, 504, 429).
    pub retry_after: Option<u64>,
}

/// How long a client is told to wait before retrying when the pool cannot answer now.
const RETRY_AFTER_SECS: u64 = 5;

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: None, retry_after: None }
    }

    /// 400 naming the request field `param`.
    pub fn bad(param: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError { param: Some(param.to_string()), ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("{param}: {message}")) }
    }

    pub fn unknown_model(model: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found".into()),
            ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("model: '{model}' is not served by any worker of the pool (GET /v1/models lists them)"))
        }
    }

    pub fn no_worker(why: impl Into<String>) -> ApiError {
        ApiError { retry_after: Some(RETRY_AFTER_SECS), code: Some("no_worker".into()), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", why) }
    }

    /// The request's deadline passed before its result came.
    pub fn deadline(what: impl Into<String>) -> ApiError {
        ApiError { retry_after: Some(RETRY_AFTER_SECS), code: Some("timeout".into()), ..ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", what) }
    }

    pub fn bus(e: impl std::fmt::Display) -> ApiError {
        ApiError { retry_after: Some(RETRY_AFTER_SECS), ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", format!("nats: {e}")) }
    }

    pub fn unauthorized() -> ApiError {
        ApiError { code: Some("invalid_api_key".into()), ..ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", "missing or unknown API key (Authorization: Bearer <key>)") }
    }

    pub fn busy(limit: usize) -> ApiError {
        ApiError { retry_after: Some(1), ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", format!("the gateway is handling {limit} requests, its limit; try again shortly")) }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("request body: over the limit of {limit} bytes"))
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("{path}: no such route (the gateway serves /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models)"))
    }

    /// A worker's error result (`code`, `message`) for a job of `model`.
    pub fn from_job(model: &str, code: &str, message: &str) -> ApiError {
        let with_code = |e: ApiError| ApiError { code: Some(code.to_string()), ..e };
        match code {
            "bad_request" | "unsupported_kind" => {
                let (param, rest) = request_field(message);
                let mut e = with_code(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message));
                if let Some(param) = param {
                    e.message = format!("{param}: {rest}");
                    e.param = Some(param);
                }
                e
            }
            "unknown_model" => with_code(ApiError::unknown_model(model)),
            "timeout" => with_code(ApiError::deadline(message)),
            "out_of_memory" => ApiError { retry_after: Some(RETRY_AFTER_SECS), ..with_code(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)) },
            _ => with_code(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)),
        }
    }

    /// The error as JSON (also the `data` of an error event in a stream).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The job fields the gateway fills from request fields of another name.
const RENAMED: &[(&str, &str)] = &[
    ("params.max_new_tokens", "max_tokens"),
    ("input.text", "input"),
    ("input.prompt_tokens", "prompt"),
    ("input.context_tokens", "prompt"),
    ("input.continuation_tokens", "prompt"),
];

/// The request field a worker's message names (its leading `path: `), and the rest of it.
/// `params.x` and `input.x` are request fields `x` (the gateway passes request fields through
/// under their own names) unless [`RENAMED`] says otherwise.
fn request_field(message: &str) -> (Option<String>, &str) {
    let Some((path, rest)) = message.split_once(": ") else { return (None, message) };
    if path.contains(' ') {
        return (None, message);
    }
    let (head, tail) = path.find('[').map_or((path, ""), |i| path.split_at(i));
    let field = RENAMED
        .iter()
        .find(|(from, _)| *from == head)
        .map(|(_, to)| to.to_string())
        .or_else(|| head.strip_prefix("params.").or_else(|| head.strip_prefix("input.")).map(str::to_string))
        .unwrap_or_else(|| head.to_string());
    (Some(format!("{field}{tail}")), rest)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, [(header::CONTENT_TYPE, "application/json")], self.body().to_string()).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_bad_request_names_the_request_field() {
        let e = ApiError::from_job("m", "bad_request", "params.max_new_tokens: expected a non-negative integer");
        assert_eq!((e.status, e.param.as_deref(), e.message.as_str()), (StatusCode::BAD_REQUEST, Some("max_tokens"), "max_tokens: expected a non-negative integer"));
        let e = ApiError::from_job("m", "bad_request", "params.frequency_penalty: unknown key (not supported)");
        assert_eq!(e.param.as_deref(), Some("frequency_penalty"));
        let e = ApiError::from_job("m", "bad_request", "input.messages[1].role: expected a string");
        assert_eq!(e.param.as_deref(), Some("messages[1].role"));
        let e = ApiError::from_job("m", "bad_request", "the model refuses this");
        assert_eq!((e.param, e.message.as_str()), (None, "the model refuses this"));
    }

    #[test]
    fn codes_map_to_statuses_with_retry_after_where_waiting_helps() {
        let status = |code| ApiError::from_job("m", code, "x").status;
        assert_eq!(status("unknown_model"), StatusCode::NOT_FOUND);
        assert_eq!(status("unsupported_kind"), StatusCode::BAD_REQUEST);
        assert_eq!(status("model_error"), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status("timeout"), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(status("out_of_memory"), StatusCode::SERVICE_UNAVAILABLE);
        let r = ApiError::from_job("m", "timeout", "x").into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        assert!(ApiError::bad("n", "x").into_response().headers().get(header::RETRY_AFTER).is_none());
    }
}
