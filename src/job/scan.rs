//! The lenient scanner: when a payload cannot become a job, its top-level `id`, `model` and
//! `kind` are still read from it (JSON or MessagePack, without a full parse) so that the refusal
//! reaches the producer under the job's id. Bounded work, no recursion, and whatever is wrong
//! elsewhere in the payload is tolerated.

use super::subject::{valid_job_id, valid_model_name};
use crate::encoding::{Encoding, BOM};
use crate::kinds::JobKind;

/// What the lenient scanner read of `id`, `model` and `kind`.
#[derive(Debug, Default, Clone, PartialEq)]
enum Seen {
    #[default]
    Absent,
    /// Present once (or repeated with the same value); `None` when not a readable string.
    Value(Option<String>),
    /// Present with different values: ambiguous.
    Conflict,
}

impl Seen {
    fn record(&mut self, value: Option<String>) {
        *self = match std::mem::take(self) {
            Seen::Absent => Seen::Value(value),
            Seen::Value(old) if old == value => Seen::Value(old),
            _ => Seen::Conflict,
        };
    }

    fn get(self) -> Option<String> {
        match self {
            Seen::Value(v) => v,
            _ => None,
        }
    }
}

/// The top-level `id`, `model` and `kind` of a payload, read leniently.
#[derive(Debug, Default)]
struct Scanned {
    id: Seen,
    model: Seen,
    kind: Seen,
}

impl Scanned {
    fn slot(&mut self, key: &[u8]) -> Option<&mut Seen> {
        match key {
            b"id" => Some(&mut self.id),
            b"model" => Some(&mut self.model),
            b"kind" => Some(&mut self.kind),
            _ => None,
        }
    }
}

/// Reads only the top-level `id`, `model` and `kind` of a JSON object or MessagePack map,
/// skipping every other value without recursion (bounded work, linear in the payload) and
/// tolerating whatever is wrong elsewhere: wrong types, invalid UTF-8, any nesting, trailing
/// bytes, a byte-order mark. An `id` present twice with different values is not readable, nor is
/// one in a map cut off before its end (a second, different `id` may have followed).
/// The values returned are bounded: a valid job id, a valid model name, a known kind.
pub(super) fn scan_fields(payload: &[u8], encoding: Encoding) -> (Option<String>, Option<String>, Option<String>) {
    let scanned = match encoding {
        Encoding::Json => scan_json(payload),
        Encoding::MsgPack => scan_msgpack(payload),
    };
    (
        scanned.id.get().filter(|id| valid_job_id(id)),
        scanned.model.get().filter(|m| valid_model_name(m)),
        scanned.kind.get().and_then(|k| JobKind::parse(&k)).map(|k| k.as_str().to_string()),
    )
}

/// Longest string token decoded for `id`/`model`/`kind`: a 256-byte id with every byte escaped.
const MAX_SCANNED_TOKEN: usize = 2 + 6 * 256;

fn scan_json(p: &[u8]) -> Scanned {
    scan_json_map(p).unwrap_or_default()
}

/// `None` unless the top-level object is complete: a cut-off document may have hidden a second,
/// different `id`.
fn scan_json_map(p: &[u8]) -> Option<Scanned> {
    let mut out = Scanned::default();
    let ws = |p: &[u8], mut i: usize| {
        while p.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
            i += 1;
        }
        i
    };
    let mut i = ws(p, if p.starts_with(BOM) { BOM.len() } else { 0 });
    if p.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = ws(p, i);
        match p.get(i) {
            Some(b'}') => return Some(out),
            Some(b'"') => {}
            _ => return None,
        }
        let end = json_string_end(p, i)?;
        // Keys we look for are short even when escaped; others are not decoded.
        let key = if end - i <= 40 { serde_json::from_slice::<String>(&p[i..end]).ok() } else { None };
        i = ws(p, end);
        if p.get(i) != Some(&b':') {
            return None;
        }
        i = ws(p, i + 1);
        let slot = key.as_deref().and_then(|k| out.slot(k.as_bytes()));
        if p.get(i) == Some(&b'"') {
            let end = json_string_end(p, i)?;
            if let Some(slot) = slot {
                let token = &p[i..end];
                slot.record((token.len() <= MAX_SCANNED_TOKEN).then(|| serde_json::from_slice::<String>(token).ok()).flatten());
            }
            i = end;
        } else {
            let end = json_skip_value(p, i)?;
            if end == i {
                return None;
            }
            if let Some(slot) = slot {
                slot.record(None);
            }
            i = end;
        }
        i = ws(p, i);
        match p.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

/// `p[start]` is `"`: the index after the closing quote.
fn json_string_end(p: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < p.len() {
        match p[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Skips one JSON value (leniently) starting at `i`: the index after it.
fn json_skip_value(p: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    loop {
        match *p.get(i)? {
            b'"' => {
                i = json_string_end(p, i)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                if depth == 0 {
                    return Some(i);
                }
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ if depth == 0 => {
                while p.get(i).is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b'"' | b'{' | b'[') && !b.is_ascii_whitespace()) {
                    i += 1;
                }
                return Some(i);
            }
            _ => i += 1,
        }
    }
}

/// The `n` bytes at `i` read as a big-endian number (MessagePack lengths), if all are there.
pub(super) fn be(p: &[u8], i: usize, n: usize) -> Option<usize> {
    Some(p.get(i..i.checked_add(n)?)?.iter().fold(0usize, |acc, &b| (acc << 8) | b as usize))
}

/// A MessagePack string at `i`: its bytes' range.
fn msgpack_str(p: &[u8], i: usize) -> Option<(usize, usize)> {
    let (len, start) = match *p.get(i)? {
        m @ 0xa0..=0xbf => ((m & 0x1f) as usize, i + 1),
        0xd9 => (be(p, i + 1, 1)?, i + 2),
        0xda => (be(p, i + 1, 2)?, i + 3),
        0xdb => (be(p, i + 1, 4)?, i + 5),
        _ => return None,
    };
    let end = start.checked_add(len)?;
    (end <= p.len()).then_some((start, end))
}

/// Skips one MessagePack value at `i` without recursion: the index after it.
fn msgpack_skip(p: &[u8], mut i: usize) -> Option<usize> {
    let mut remaining: u64 = 1;
    while remaining > 0 {
        let m = *p.get(i)?;
        i += 1;
        remaining -= 1;
        let skip = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
            0x80..=0x8f => {
                remaining = remaining.saturating_add(2 * (m & 0x0f) as u64);
                0
            }
            0x90..=0x9f => {
                remaining = remaining.saturating_add((m & 0x0f) as u64);
                0
            }
            0xa0..=0xbf => (m & 0x1f) as usize,
            0xc4 | 0xd9 => 1 + be(p, i, 1)?,
            0xc5 | 0xda => 2 + be(p, i, 2)?,
            0xc6 | 0xdb => 4 + be(p, i, 4)?,
            0xc7 => 2 + be(p, i, 1)?,
            0xc8 => 3 + be(p, i, 2)?,
            0xc9 => 5 + be(p, i, 4)?,
            0xcc | 0xd0 => 1,
            0xcd | 0xd1 => 2,
            0xca | 0xce | 0xd2 => 4,
            0xcb | 0xcf | 0xd3 => 8,
            0xd4 => 2,
            0xd5 => 3,
            0xd6 => 5,
            0xd7 => 9,
            0xd8 => 17,
            0xdc => {
                remaining = remaining.saturating_add(be(p, i, 2)? as u64);
                2
            }
            0xdd => {
                remaining = remaining.saturating_add(be(p, i, 4)? as u64);
                4
            }
            0xde => {
                remaining = remaining.saturating_add(2 * be(p, i, 2)? as u64);
                2
            }
            0xdf => {
                remaining = remaining.saturating_add(2 * be(p, i, 4)? as u64);
                4
            }
            0xc1 => return None,
        };
        i = i.checked_add(skip)?;
        if i > p.len() {
            return None;
        }
    }
    Some(i)
}

fn scan_msgpack(p: &[u8]) -> Scanned {
    scan_msgpack_map(p).unwrap_or_default()
}

/// `None` unless every entry of the top-level map is there (see [`scan_json_map`]).
fn scan_msgpack_map(p: &[u8]) -> Option<Scanned> {
    let mut out = Scanned::default();
    let (pairs, mut i) = match *p.first()? {
        m @ 0x80..=0x8f => ((m & 0x0f) as usize, 1),
        0xde => (be(p, 1, 2)?, 3),
        0xdf => (be(p, 1, 4)?, 5),
        _ => return None,
    };
    for _ in 0..pairs {
        let key = match msgpack_str(p, i) {
            Some((start, end)) => {
                i = end;
                Some(&p[start..end])
            }
            None => {
                i = msgpack_skip(p, i)?;
                None
            }
        };
        let slot = key.and_then(|k| out.slot(k));
        match msgpack_str(p, i) {
            Some((start, end)) => {
                if let Some(slot) = slot {
                    let bytes = &p[start..end];
                    slot.record((bytes.len() <= MAX_SCANNED_TOKEN).then(|| std::str::from_utf8(bytes).ok().map(String::from)).flatten());
                }
                i = end;
            }
            None => {
                i = msgpack_skip(p, i)?;
                if let Some(slot) = slot {
                    slot.record(None);
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::testdocs::{deep_json, deep_msgpack, mp_str, msgpack, raw_map};

    /// The id a refusal of `payload` is answered under.
    fn id(payload: impl AsRef<[u8]>) -> Option<String> {
        let payload = payload.as_ref();
        scan_fields(payload, Encoding::detect(None, payload)).0
    }

    #[test]
    fn the_id_is_read_on_its_own() {
        // A wrong type elsewhere, a duplicate key, invalid UTF-8, deep nesting: the id survives.
        assert_eq!(id(r#"{"id":"x","model":7,"kind":"tensor","input":{}}"#).as_deref(), Some("x"));
        assert_eq!(id(r#"{"id":"x","model":"m","model":"m","kind":"tensor","input":{}}"#).as_deref(), Some("x"));
        let utf8 = raw_map(&[("id", mp_str(b"u8")), ("model", mp_str(b"m\xff")), ("kind", mp_str(b"tensor")), ("input", vec![0x80])]);
        assert_eq!(id(&utf8).as_deref(), Some("u8"));
        assert_eq!(id(deep_json(5000)).as_deref(), Some("deep"));
        assert_eq!(id(deep_msgpack(100_000)).as_deref(), Some("deep"));
        // The id is read after junk values and with escapes; an invalid id is not read.
        assert_eq!(id(r#"{"junk":[{"a":"}\"]"},1e5,null],"model":7,"\u0069d":"a\u002d1","kind":"tensor"}"#).as_deref(), Some("a-1"));
        assert_eq!(id(r#"{"id":"a b","model":7}"#), None);
        // Twice with different values: ambiguous, no id. Twice alike: that id.
        assert_eq!(id(r#"{"id":"a","id":"b","model":"m","kind":"tensor","input":{}}"#), None);
        assert_eq!(id(r#"{"id":"a","model":"m","kind":"tensor","input":{},"id":7}"#), None);
        assert_eq!(id(r#"{"id":"a","id":"a","model":"m","kind":"tensor","input":{}}"#).as_deref(), Some("a"));
        // A cut-off map may have hidden a second id: none.
        assert_eq!(id(r#"{"id":"cut-off","model":"#), None);
        let cut = msgpack(&serde_json::json!({"id": "cut", "model": "m", "kind": "tensor", "input": {}}));
        assert_eq!(id(&cut[..cut.len() - 1]), None);
        assert_eq!(id([cut.as_slice(), &[0xc1]].concat()).as_deref(), Some("cut"));
        // Nested ids, and ids in a top-level array, are not the job's.
        assert_eq!(id(r#"{"input":{"id":"n"},"model":7}"#), None);
        assert_eq!(id(msgpack(&serde_json::json!(["arr", "m", "tensor", {}]))), None);
        // Past a long value, and behind a byte-order mark.
        assert_eq!(id(format!(r#"{{"model":7,"pad":"{}","id":"big"}}"#, "x".repeat(200))).as_deref(), Some("big"));
        let bom = [b"\xEF\xBB\xBF".as_slice(), br#"{"id":"bom","model":"m","kind":"tensor","input":{}}"#].concat();
        assert_eq!((id(&bom).as_deref(), Encoding::detect(None, &bom)), (Some("bom"), Encoding::Json));
    }

    #[test]
    fn model_and_kind_of_a_rejection_are_bounded() {
        let model_kind = |doc: &str| {
            let (_, model, kind) = scan_fields(doc.as_bytes(), Encoding::Json);
            (model, kind)
        };
        assert_eq!(model_kind(r#"{"id":"a","model":"../x","kind":"dance","input":7}"#), (None, None));
        let (model, kind) = model_kind(r#"{"id":"a","model":"m","kind":"embed","input":7}"#);
        assert_eq!((model.as_deref(), kind.as_deref()), (Some("m"), Some("embed")));
        assert_eq!(model_kind(&format!(r#"{{"id":"a","model":"{}","kind":7,"input":{{}}}}"#, "m".repeat(70_000))), (None, None));
    }
}
