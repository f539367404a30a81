//! Typed validation errors, after TGI's `router/src/validation.rs`: each names the field it is
//! about (its `Display` starts with the field's path, `input.prompt: …`), [`ValidationError::code`]
//! gives the contract's [`ErrorCode`], and it converts into the wire [`JobError`] (which bounds the
//! message).

use crate::error::{ErrorCode, JobError};

use super::JobKind;

/// A token count in a message: exact, or "more than N" when a bounded read stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Exactly(usize),
    MoreThan(usize),
}

impl std::fmt::Display for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Count::Exactly(n) => write!(f, "{n}"),
            Count::MoreThan(n) => write!(f, "more than {n}"),
        }
    }
}

/// Why a job's `input` or `params` (or a top-level key) is refused. `field` is the path in the job
/// (`params.top_p`, `input.inputs[0].shape`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A key the contract does not have; `hint` suggests ours or says it is not supported.
    #[error("{field}: unknown; {hint}")]
    UnknownKey { field: String, hint: String },
    #[error("{field}: appears more than once")]
    Duplicate { field: String },
    #[error("{field}: keys must be strings")]
    KeyNotString { field: String },
    /// A required field is absent; `or` names the alternative that may be given instead.
    #[error("{field}: missing{}", or.map(|o| format!(" (or {o})")).unwrap_or_default())]
    Missing { field: String, or: Option<&'static str> },
    #[error("{field}: expected {expected}")]
    Expected { field: String, expected: &'static str },
    #[error("{field}: token ids must be integers below the vocabulary size {vocab}")]
    TokenIds { field: String, vocab: usize },
    #[error("{field}: encodes to no tokens")]
    NoTokens { field: String },
    #[error("{field}: cannot tokenize: {reason}")]
    Tokenize { field: String, reason: String },
    #[error("{field}: {tokens} tokens; the model scores at most {max} continuation tokens (its max_length)")]
    ContinuationTooLong { field: String, tokens: Count, max: usize },
    #[error("{field}: {tokens} tokens leave no room to generate within the model's {max} positions (params.truncate \"left\" keeps its end)")]
    NoRoomToGenerate { field: String, tokens: Count, max: usize },
    #[error("{field}: {bytes} bytes, over this model's max_input_bytes ({max}) for loglikelihood_rolling")]
    TooManyBytes { field: String, bytes: usize, max: usize },
    #[error("{field}: must be {range}")]
    OutOfRange { field: String, range: String },
    /// Anything else wrong with a field's value (tensor dtypes and shapes, combinations).
    #[error("{field}: {detail}")]
    Invalid { field: String, detail: String },
    /// The model's chat template could not render `messages` (its code says whose fault).
    #[error("{field}: {error}")]
    Chat { field: String, error: crate::chat::ChatError },
    #[error("kind: model '{model}' does not serve '{}'", kind.as_str())]
    UnsupportedKind { model: String, kind: JobKind },
}

impl ValidationError {
    /// The contract's error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ValidationError::UnsupportedKind { .. } => ErrorCode::UnsupportedKind,
            ValidationError::Chat { error, .. } => error.code(),
            _ => ErrorCode::BadRequest,
        }
    }

    /// The path of the field the error is about.
    pub fn field(&self) -> &str {
        use ValidationError::*;
        match self {
            UnknownKey { field, .. }
            | Duplicate { field }
            | KeyNotString { field }
            | Missing { field, .. }
            | Expected { field, .. }
            | TokenIds { field, .. }
            | NoTokens { field }
            | Tokenize { field, .. }
            | ContinuationTooLong { field, .. }
            | TooManyBytes { field, .. }
            | NoRoomToGenerate { field, .. }
            | OutOfRange { field, .. }
            | Invalid { field, .. }
            | Chat { field, .. } => field,
            UnsupportedKind { .. } => "kind",
        }
    }

    /// An error message of the form `field: detail` (as [`crate::tensor::TensorData::from_wire`]
    /// writes them) as a typed error.
    pub fn from_message(message: &str) -> ValidationError {
        match message.split_once(": ") {
            Some((field, detail)) => ValidationError::Invalid { field: field.into(), detail: detail.into() },
            None => ValidationError::Invalid { field: "input".into(), detail: message.into() },
        }
    }
}

impl From<ValidationError> for JobError {
    fn from(e: ValidationError) -> JobError {
        JobError::new(e.code(), e.to_string())
    }
}
