//! A streamed `generate` result, piece by piece: [`StreamChunk`] as the engine emits it and the
//! runner passes it on, and its wire form (`schemas/stream-chunk.schema.json`), the message on
//! core NATS `<prefix>.stream.<id>`. It sits low, beside its schema, so that the engine that makes
//! chunks and the adapters that publish them meet here and not in each other.

/// A piece of a streamed `generate` result; `job` is the job's index in its batch.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamChunk {
    pub job: usize,
    pub index: usize,
    pub text: String,
    pub token: u32,
    /// The last chunk of a job (no text).
    pub done: bool,
}

/// A chunk as the schema has it: `{id, index, text, token}`, or `{id, done: true}` last.
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct WireChunk<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    done: bool,
}

impl StreamChunk {
    /// The wire form of this chunk of job `id`.
    pub fn wire<'a>(&'a self, id: &'a str) -> WireChunk<'a> {
        if self.done {
            WireChunk { id, index: None, text: None, token: None, done: true }
        } else {
            WireChunk { id, index: Some(self.index), text: Some(&self.text), token: Some(self.token), done: false }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_carries_its_text_and_the_last_one_only_says_done() {
        let chunk = StreamChunk { job: 3, index: 1, text: "lo".into(), token: 42, done: false };
        assert_eq!(serde_json::to_value(chunk.wire("a")).unwrap(), serde_json::json!({"id": "a", "index": 1, "text": "lo", "token": 42}));
        let last = StreamChunk { done: true, ..chunk };
        assert_eq!(serde_json::to_value(last.wire("a")).unwrap(), serde_json::json!({"id": "a", "done": true}));
    }
}
