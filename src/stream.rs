//! A streamed `generate` result, piece by piece: [`StreamChunk`] as the engine emits it and the
//! runner passes it on, and its wire form (`schemas/stream-chunk.schema.json`), the message on
//! core NATS `<prefix>.stream.<id>`. It sits low, beside its schema, so that the engine that makes
//! chunks and the adapters that publish them meet here and not in each other.

use crate::encoding::Encoding;
use crate::kinds::{top_to_wire, TopLogprobs};

/// A piece of a streamed `generate` result; `job` is the job's index in its batch.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamChunk {
    pub job: usize,
    pub index: usize,
    pub text: String,
    /// The tokens generated since the previous chunk, whose text this one carries (a token may
    /// add no whole character, so a chunk may cover several, and the last tokens of a generation,
    /// an end-of-sequence say, may be in no chunk: the result has them all).
    pub tokens: Vec<u32>,
    /// With `top_logprobs`: the most likely tokens at each of `tokens`' positions, as in the
    /// result (empty otherwise).
    pub top: Vec<TopLogprobs>,
    /// The last chunk of a job (no text).
    pub done: bool,
}

/// A chunk as the schema has it: `{id, index, text, token, tokens[, top_logprobs]}`, or
/// `{id, done: true}` last.
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct WireChunk<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<rmpv::Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    done: bool,
}

impl StreamChunk {
    /// The wire form of this chunk of job `id`; its log-probs are floats as in the result's
    /// `encoding` (JSON spells non-finite ones as strings).
    pub fn wire<'a>(&'a self, id: &'a str, encoding: Encoding) -> WireChunk<'a> {
        if self.done {
            return WireChunk { id, index: None, text: None, token: None, tokens: None, top_logprobs: None, done: true };
        }
        WireChunk {
            id,
            index: Some(self.index),
            text: Some(&self.text),
            token: Some(self.tokens.last().copied().unwrap_or(0)),
            tokens: Some(&self.tokens),
            top_logprobs: (!self.top.is_empty()).then(|| top_to_wire(&self.top, encoding)),
            done: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_carries_its_text_and_tokens_and_the_last_one_only_says_done() {
        let chunk = StreamChunk { job: 3, index: 1, text: "lo".into(), tokens: vec![41, 42], top: Vec::new(), done: false };
        assert_eq!(serde_json::to_value(chunk.wire("a", Encoding::Json)).unwrap(), serde_json::json!({"id": "a", "index": 1, "text": "lo", "token": 42, "tokens": [41, 42]}));
        let last = StreamChunk { done: true, ..chunk };
        assert_eq!(serde_json::to_value(last.wire("a", Encoding::Json)).unwrap(), serde_json::json!({"id": "a", "done": true}));
    }

    #[test]
    fn a_chunks_top_logprobs_are_spelled_as_the_results() {
        let top = vec![TopLogprobs { ids: vec![42, 7], tokens: vec!["lo".into(), "x".into()], logprobs: vec![-0.25, f32::NEG_INFINITY] }];
        let chunk = StreamChunk { job: 0, index: 0, text: "lo".into(), tokens: vec![42], top, done: false };
        let wire = serde_json::to_value(chunk.wire("a", Encoding::Json)).unwrap();
        assert_eq!(wire["top_logprobs"], serde_json::json!([{"ids": [42, 7], "tokens": ["lo", "x"], "logprobs": [-0.25, "-Infinity"]}]));
        let packed: rmpv::Value = rmp_serde::from_slice(&Encoding::MsgPack.encode(&chunk.wire("a", Encoding::MsgPack))).unwrap();
        let logprobs = &packed["top_logprobs"][0]["logprobs"];
        assert_eq!((logprobs[0].as_f64(), logprobs[1].as_f64()), (Some(-0.25), Some(f64::NEG_INFINITY)));
    }
}
