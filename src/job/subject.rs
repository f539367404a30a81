//! The NATS subject grammar at the edge: the names that become subject tokens (model names and
//! job ids) and the `reply_to` policy — a plain subject under an allowed prefix, never a server
//! subject (`$JS.`, `$SYS.`, …) nor one of the worker's own areas
//! (`<prefix>.jobs|results|dead|metrics|stream`).

use std::borrow::Cow;

use crate::error::excerpt;

/// Where results may be core-published at a producer's request (`reply_to`) by default.
pub const DEFAULT_REPLY_PREFIXES: &[&str] = &["_INBOX.>", "jetbatch.reply.>"];

/// The areas of our subject prefix that only the worker and the streams use.
const RESERVED_AREAS: [&str; 5] = ["jobs", "results", "dead", "metrics", "stream"];

/// Longest `reply_to` accepted, in bytes.
pub const MAX_REPLY_TO_BYTES: usize = 256;

/// The model names accepted, as error messages quote them.
pub const MODEL_NAME_RULE: &str = "1-64 of [A-Za-z0-9_.-], not starting with '.'";

/// Names: `[A-Za-z0-9_.-]{1,64}`, not starting with a dot — the names Hugging Face models have
/// (`Qwen2.5-0.5B-Instruct`). They become folder names, so no path separators and no `.`/`..`;
/// in subjects a dot is written `%2E` ([`model_token`]).
pub fn valid_model_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// A dot in a model name as a subject token writes it (dots separate subject tokens).
const DOT_IN_TOKEN: &str = "%2E";

/// The subject token of a model name: each dot written `%2E`. `%` is in no model name, so a token
/// stands for one name only, and a name without dots is its own token (as before dots were allowed).
pub fn model_token(name: &str) -> Cow<'_, str> {
    if name.contains('.') { Cow::Owned(name.replace('.', DOT_IN_TOKEN)) } else { Cow::Borrowed(name) }
}

/// The model name a subject token stands for ([`model_token`] undone).
pub fn token_model(token: &str) -> Cow<'_, str> {
    if token.contains(DOT_IN_TOKEN) { Cow::Owned(token.replace(DOT_IN_TOKEN, ".")) } else { Cow::Borrowed(token) }
}

/// Job ids become the last tokens of result subjects: `[A-Za-z0-9_:.-]{1,256}` without empty tokens.
pub fn valid_job_id(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_:-.".contains(&b))
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
}

/// Checks the syntax shared by subjects and reply patterns: 1-256 printable ASCII bytes without
/// spaces, dot-separated non-empty tokens. Returns the tokens.
fn subject_tokens(s: &str) -> Result<Vec<&str>, String> {
    if s.is_empty() || s.len() > MAX_REPLY_TO_BYTES {
        return Err(format!("must be 1-{MAX_REPLY_TO_BYTES} bytes, not {}", s.len()));
    }
    if let Some((i, b)) = s.bytes().enumerate().find(|(_, b)| !(0x21..=0x7e).contains(b)) {
        return Err(format!("byte 0x{b:02x} at {i}: only printable ASCII without spaces is allowed"));
    }
    let tokens: Vec<&str> = s.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err("has an empty dot-separated token".into());
    }
    Ok(tokens)
}

/// Whether some subject is both matched by `tokens` (a pattern, maybe ending in `>`) and inside
/// `<prefix>.<area>` (that subject or below it).
fn overlaps_area(tokens: &[&str], prefix: &str, area: &str) -> bool {
    let reserved: Vec<&str> = prefix.split('.').chain([area]).collect();
    for (i, r) in reserved.iter().enumerate() {
        match tokens.get(i) {
            Some(&">") => return true,
            Some(t) if t == r => {}
            _ => return false,
        }
    }
    true
}

fn reserved_area<'a>(tokens: &[&str], prefix: &str) -> Option<&'a str> {
    RESERVED_AREAS.into_iter().find(|area| overlaps_area(tokens, prefix, area))
}

/// Refuses a configured reply prefix that is malformed, a system subject (`$JS.`, `$SYS.`, `$KV.`,
/// `$SRV.`, …) or overlaps one of our own areas `<prefix>.jobs|results|dead|metrics|stream`. A
/// pattern is an exact subject, or ends in `.>` to allow everything below it.
pub fn check_reply_prefix(pattern: &str, prefix: &str) -> Result<(), String> {
    let tokens = subject_tokens(pattern).map_err(|e| format!("reply prefix '{}': {e}", excerpt(pattern)))?;
    let body = if tokens.last() == Some(&">") { &tokens[..tokens.len() - 1] } else { &tokens[..] };
    if body.is_empty() {
        return Err(format!("reply prefix '{pattern}': matches every subject"));
    }
    if body.iter().any(|t| t.contains(['*', '>'])) {
        return Err(format!("reply prefix '{pattern}': wildcards are only allowed as a final '.>'"));
    }
    if pattern.starts_with('$') {
        return Err(format!("reply prefix '{pattern}': subjects starting with '$' belong to the server"));
    }
    if let Some(area) = reserved_area(&tokens, prefix) {
        return Err(format!("reply prefix '{pattern}': overlaps {prefix}.{area}, which is the worker's own"));
    }
    Ok(())
}

fn pattern_matches(pattern: &str, subject: &[&str]) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    match pattern.split_last() {
        Some((&">", head)) => subject.len() > head.len() && head.iter().zip(subject).all(|(p, s)| p == s),
        _ => pattern == subject,
    }
}

/// The `reply_to` policy: a plain subject (no wildcards, printable ASCII, no empty token), not a
/// system subject, not in one of our own areas under `prefix`, and under one of `allowed` (each
/// checked by [`check_reply_prefix`] when it was configured).
pub(super) fn check_reply_to(reply_to: &str, allowed: &[String], prefix: &str) -> Result<(), String> {
    let tokens = subject_tokens(reply_to)?;
    if reply_to.contains(['*', '>']) {
        return Err("wildcards ('*', '>') are not allowed".into());
    }
    if reply_to.starts_with('$') {
        return Err("subjects starting with '$' belong to the server (JetStream and system API)".into());
    }
    if let Some(area) = reserved_area(&tokens, prefix) {
        return Err(format!("{prefix}.{area} is the worker's own"));
    }
    if !allowed.iter().any(|p| pattern_matches(p, &tokens)) {
        return Err(format!("'{}' is not under an allowed prefix ({})", excerpt(reply_to), allowed.join(", ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids() {
        for ok in ["demo-mlp_2", "Qwen2.5-0.5B-Instruct", "phi-1_5", "a.b"] {
            assert!(valid_model_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "../x", "a/b", "a*", "a>", "a%2Eb", "a b", &"x".repeat(65)] {
            assert!(!valid_model_name(bad), "{bad}");
        }
        assert!(valid_job_id("run-1:task.7"));
        for bad in ["", ".a", "a.", "a..b", "a*", "a b"] {
            assert!(!valid_job_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_dotted_name_is_one_subject_token_that_decodes_back() {
        assert_eq!(model_token("Qwen2.5-0.5B-Instruct"), "Qwen2%2E5-0%2E5B-Instruct");
        assert_eq!(token_model("Qwen2%2E5-0%2E5B-Instruct"), "Qwen2.5-0.5B-Instruct");
        // Names without dots keep their subjects.
        assert!(matches!(model_token("tiny-llama"), Cow::Borrowed("tiny-llama")));
        assert!(matches!(token_model("tiny-llama"), Cow::Borrowed("tiny-llama")));
        // A name ending like a level stays one token, apart from that level's subject.
        assert_eq!(model_token("m.high"), "m%2Ehigh");
        // Other spellings decode to no valid name.
        assert!(!valid_model_name(&token_model("a%2eb")));
    }

    #[test]
    fn configured_reply_prefixes_are_checked() {
        for ok in DEFAULT_REPLY_PREFIXES.iter().copied().chain(["jetbatch.other.>", "svc.answer", "jetbatch"]) {
            assert_eq!(check_reply_prefix(ok, "jetbatch"), Ok(()), "{ok}");
        }
        for bad in [
            ">", "$JS.>", "$SYS.x", "$KV.b.>", "$SRV.>", "jetbatch.>", "jetbatch.jobs.>", "jetbatch.jobs", "jetbatch.results.x",
            "jetbatch.dead.>", "jetbatch.metrics.>", "jetbatch.stream.>", "a.*", "a.*.>", "a.>.b", "a b.>", "", "a..b",
        ] {
            assert!(check_reply_prefix(bad, "jetbatch").is_err(), "{bad}");
        }
        assert!(check_reply_prefix("acme.jobs.>", "jetbatch").is_ok());
        assert!(check_reply_prefix("acme.>", "acme").is_err());
    }
}
