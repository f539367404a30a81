//! What the encoder kinds share (`embed`, `classify`): a text (or pair) tokenised with the
//! tokenizer's special tokens, truncated from the right to the model's length, keeping the final
//! separator — read from bounded windows of the texts whatever their size.

use super::text;
use super::validation::ValidationError;
use crate::lm::LmSpec;

/// The encoder's input ids and type ids of `text_a` (and `pair`), at most `max_length` tokens.
pub fn encode(lm: &LmSpec, text_a: &str, pair: Option<&str>) -> Result<(Vec<u32>, Vec<u32>), ValidationError> {
    // Truncation keeps the first max_length - 1 tokens, which a bounded start of each text has,
    // and the last token, which a bounded end of the last text has.
    let a = text::bounded_head(lm, text_a, lm.max_length)?;
    let b = pair.map(|b| text::bounded_head(lm, b, lm.max_length)).transpose()?;
    let tokenize = |a: &str, b: Option<&str>| {
        match b {
            Some(b) => lm.tokenizer.encode((a, b), true),
            None => lm.tokenizer.encode(a, true),
        }
        .map_err(|e| ValidationError::Tokenize { field: "input.text".into(), reason: e.to_string() })
    };
    let enc = tokenize(a, b)?;
    let mut ids = enc.get_ids().to_vec();
    let mut type_ids = enc.get_type_ids().to_vec();
    if ids.is_empty() {
        return Err(ValidationError::NoTokens { field: "input.text".into() });
    }
    if ids.len() > lm.max_length {
        let last_cut = match (pair, b) {
            (Some(whole), Some(b)) => b.len() < whole.len(),
            _ => a.len() < text_a.len(),
        };
        let last = if last_cut {
            let end = match (pair, b) {
                (Some(whole), Some(_)) => tokenize(a, Some(text::bounded_tail(lm, whole, 1)?))?,
                _ => tokenize(text::bounded_tail(lm, text_a, 1)?, None)?,
            };
            (*end.get_ids().last().expect("non-empty"), *end.get_type_ids().last().expect("non-empty"))
        } else {
            (*ids.last().expect("non-empty"), *type_ids.last().expect("non-empty"))
        };
        ids.truncate(lm.max_length - 1);
        type_ids.truncate(lm.max_length - 1);
        ids.push(last.0);
        type_ids.push(last.1);
    }
    Ok((ids, type_ids))
}
