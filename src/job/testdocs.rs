//! Payloads that the job tests build by hand: MessagePack maps that serde cannot write (invalid
//! UTF-8, repeated keys) and documents nested to a chosen depth.

pub(super) fn msgpack(v: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap()
}

/// A MessagePack map of raw (key, encoded value) pairs, for documents serde cannot express.
pub(super) fn raw_map(pairs: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0x80 | pairs.len() as u8];
    for (k, v) in pairs {
        out.push(0xa0 | k.len() as u8);
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(v);
    }
    out
}

pub(super) fn mp_str(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0xd9, s.len() as u8];
    out.extend_from_slice(s);
    out
}

pub(super) fn deep_json(levels: usize) -> String {
    format!(r#"{{"id":"deep","model":"m","kind":"tensor","input":{{"x":{}{}}}}}"#, "[".repeat(levels), "]".repeat(levels))
}

pub(super) fn deep_msgpack(levels: usize) -> Vec<u8> {
    let mut input = vec![0x81, 0xa1, b'x'];
    input.extend(std::iter::repeat(0x91).take(levels));
    input.push(0xc0);
    raw_map(&[("id", mp_str(b"deep")), ("model", mp_str(b"m")), ("kind", mp_str(b"tensor")), ("input", input)])
}
