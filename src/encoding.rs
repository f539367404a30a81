//! How a job and its result are encoded on the wire: MessagePack (maps with field names) or JSON.
//! A leaf module: the tensor wire form, the job decoder and the results stage all use it.

use serde::{Deserialize, Serialize};

/// A UTF-8 byte-order mark (JSON payloads must not start with one).
pub(crate) const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Encoding of a job; its result is encoded the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    MsgPack,
    Json,
}

impl Encoding {
    /// JSON when the `Content-Type` says so or the payload starts with `{` (after whitespace, or
    /// after a UTF-8 byte-order mark, which [`crate::job::decode`] then rejects); MessagePack otherwise.
    pub fn detect(content_type: Option<&str>, payload: &[u8]) -> Encoding {
        let json_header = content_type.is_some_and(|c| c.trim().starts_with("application/json"));
        let first = payload.strip_prefix(BOM).unwrap_or(payload).iter().find(|b| !b.is_ascii_whitespace());
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
