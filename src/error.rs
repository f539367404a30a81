//! The wire error of a job: an [`ErrorCode`] of the contract and a bounded message. Every layer's
//! producer-facing error (validation, engine, timeouts) ends up as a [`JobError`] in the result.

use serde::{Deserialize, Serialize};

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
    /// The message is bounded: control characters replaced, at most [`MAX_ERROR_MESSAGE_BYTES`].
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        JobError { code, message: bound_message(&message.into()) }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        JobError::new(ErrorCode::BadRequest, message)
    }
}

/// Longest error message kept, in bytes (cut on a char boundary, ending in `…`). Messages quote
/// producer input; they travel in result bodies and dead-letter headers, so they stay small.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 300;

/// `message` with control characters (and Unicode line/paragraph separators) replaced by U+FFFD
/// and cut to [`MAX_ERROR_MESSAGE_BYTES`]. Work is bounded by the output, not the input.
pub(crate) fn bound_message(message: &str) -> String {
    const ELLIPSIS: char = '…';
    let mut out = String::with_capacity(message.len().min(MAX_ERROR_MESSAGE_BYTES));
    for c in message.chars() {
        let c = if c.is_control() || c == '\u{2028}' || c == '\u{2029}' { '\u{FFFD}' } else { c };
        if out.len() + c.len_utf8() > MAX_ERROR_MESSAGE_BYTES {
            while out.len() + ELLIPSIS.len_utf8() > MAX_ERROR_MESSAGE_BYTES {
                out.pop();
            }
            out.push(ELLIPSIS);
            break;
        }
        out.push(c);
    }
    out
}

/// At most 64 chars of producer text, for quoting in an error message.
pub(crate) fn excerpt(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
