//! Strict reading of a job's maps: the top level, `input` and `params`. Keys must be strings and
//! appear once; a key the kind does not take is refused, naming it and, where we can tell what
//! was meant, our name for it (`params.until: unknown; did you mean stop?`).

use std::collections::BTreeMap;

use rmpv::Value;

use super::validation::ValidationError;
use super::JobKind;
use crate::error::excerpt;

/// The keys of a job's top level.
pub const TOP_LEVEL: &[&str] = &["id", "model", "kind", "input", "params", "reply_to", "cache", "timeout_ms", "priority", "deadline"];

/// Which map of the job a key is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Top,
    Input,
    Params,
}

impl Place {
    fn path(self, key: &str) -> String {
        match self {
            Place::Top => excerpt(key),
            Place::Input => format!("input.{}", excerpt(key)),
            Place::Params => format!("params.{}", excerpt(key)),
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Place::Top => "keys",
            Place::Input => "input keys",
            Place::Params => "params",
        }
    }
}

/// Names other APIs use (lm-evaluation-harness, OpenAI, TGI, transformers) for what we call the
/// second name.
const ALIASES: &[(Place, &str, &str)] = &[
    (Place::Top, "timeout", "timeout_ms"),
    (Place::Top, "use_cache", "cache"),
    (Place::Top, "parameters", "params"),
    (Place::Top, "inputs", "input"),
    (Place::Top, "reply", "reply_to"),
    (Place::Top, "replyTo", "reply_to"),
    (Place::Params, "until", "stop"),
    (Place::Params, "stop_sequences", "stop"),
    (Place::Params, "stop_strings", "stop"),
    (Place::Params, "max_gen_toks", "max_new_tokens"),
    (Place::Params, "max_tokens", "max_new_tokens"),
    (Place::Params, "max_completion_tokens", "max_new_tokens"),
    (Place::Params, "max_length", "max_new_tokens"),
    (Place::Params, "random_seed", "seed"),
    (Place::Params, "eos_token_id", "stop_token_ids"),
    (Place::Params, "normalise", "normalize"),
    (Place::Params, "normalize_embeddings", "normalize"),
    (Place::Params, "streaming", "stream"),
    (Place::Params, "logprobs", "top_logprobs"),
    (Place::Input, "text", "prompt"),
    (Place::Input, "tokens", "prompt_tokens"),
    (Place::Input, "input_ids", "prompt_tokens"),
    (Place::Input, "prompt", "text"),
    (Place::Input, "inputs", "text"),
    (Place::Input, "input", "text"),
    (Place::Input, "text_b", "text_pair"),
    (Place::Input, "pair", "text_pair"),
];

/// Parameters of other APIs that we do not have, with what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("logprobs", "not supported; top_logprobs on generate and loglikelihood jobs"),
    ("echo", "not supported; score text with a loglikelihood job"),
    ("do_sample", "not supported; temperature 0 is greedy and above 0 samples"),
    ("n", "not supported; send one job per sample (with different seeds)"),
    ("best_of", "not supported; send one job per sample (with different seeds)"),
    ("num_return_sequences", "not supported; send one job per sample (with different seeds)"),
    ("repetition_penalty", "not supported"),
    ("frequency_penalty", "not supported"),
    ("presence_penalty", "not supported"),
    ("logit_bias", "not supported"),
    ("min_p", "not supported"),
    ("typical_p", "not supported"),
];

/// The error for `key`, which `allowed` (the keys of `kind` at `place`) does not have.
pub fn unknown_key(place: Place, key: &str, allowed: &[&str], kind: Option<JobKind>) -> ValidationError {
    let field = place.path(key);
    let of_kind = kind.map(|k| format!(" of {} jobs", k.as_str())).unwrap_or_default();
    let alias = ALIASES.iter().find(|(p, from, to)| *p == place && *from == key && allowed.contains(to));
    let hint = if let Some((_, _, to)) = alias {
        format!("did you mean {to}?")
    } else if let Some(near) = nearest(key, allowed) {
        format!("did you mean {near}?")
    } else if let Some((_, what)) = UNSUPPORTED.iter().find(|(k, _)| place == Place::Params && *k == key) {
        what.to_string()
    } else if let Some(other) = kind.and_then(|k| JobKind::ALL.into_iter().find(|o| *o != k && o.keys(place).contains(&key))) {
        format!("not one of the {}{of_kind} (it is one of {} jobs)", place.noun(), other.as_str())
    } else if allowed.is_empty() {
        format!("{} jobs take no {}", kind.map(|k| k.as_str()).unwrap_or("these"), place.noun())
    } else {
        format!("the {}{of_kind} are {}", place.noun(), allowed.join(", "))
    };
    ValidationError::UnknownKey { field, hint }
}

/// The allowed key within edit distance 2 of `key` (and closer than half its length), if one is.
fn nearest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    if key.len() > 64 {
        return None;
    }
    allowed
        .iter()
        .map(|a| (edit_distance(key, a), *a))
        .filter(|&(d, a)| d <= 2 && d * 2 < a.len().max(key.len()))
        .min()
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut diag = row[0];
        row[0] = i;
        for j in 1..=b.len() {
            let next = (diag + (a[i - 1] != b[j - 1]) as usize).min(row[j] + 1).min(row[j - 1] + 1);
            diag = row[j];
            row[j] = next;
        }
    }
    row[b.len()]
}

/// A job's `input` map, read strictly: string keys, each once, only the kind's own.
#[derive(Debug)]
pub struct Input<'a> {
    entries: BTreeMap<&'a str, &'a Value>,
}

impl<'a> Input<'a> {
    /// Checks `input` (a map, as [`crate::job::decode`] ensures) against `allowed`.
    pub fn read(input: &'a Value, allowed: &[&str], kind: JobKind) -> Result<Input<'a>, ValidationError> {
        let pairs = input.as_map().ok_or(ValidationError::Expected { field: "input".into(), expected: "a map" })?;
        let mut entries = BTreeMap::new();
        for (k, v) in pairs {
            let k = k.as_str().ok_or(ValidationError::KeyNotString { field: "input".into() })?;
            if entries.insert(k, v).is_some() {
                return Err(ValidationError::Duplicate { field: Place::Input.path(k) });
            }
        }
        if let Some(k) = entries.keys().find(|k| !allowed.contains(k)) {
            return Err(unknown_key(Place::Input, k, allowed, Some(kind)));
        }
        Ok(Input { entries })
    }

    /// The value of `name`; an explicit nil counts as absent.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.entries.get(name).copied().filter(|v| !v.is_nil())
    }

    /// A string field.
    pub fn text(&self, name: &'static str) -> Result<Option<&'a str>, ValidationError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or(ValidationError::Expected { field: format!("input.{name}"), expected: "a string" }),
        }
    }

    /// A list of token ids, each below `vocab`.
    pub fn tokens(&self, name: &'static str, vocab: usize) -> Result<Option<Vec<u32>>, ValidationError> {
        self.get(name).map(|v| token_ids(v, format!("input.{name}"), vocab)).transpose()
    }

    /// A list of 1..=`max` items (`what` names them in the error).
    pub fn list(&self, name: &'static str, max: usize, what: &str) -> Result<Option<&'a [Value]>, ValidationError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) if (1..=max).contains(&items.len()) => Ok(Some(items)),
            Some(Value::Array(_)) => Err(ValidationError::OutOfRange { field: format!("input.{name}"), range: format!("a list of 1 to {max} {what}") }),
            Some(_) => Err(ValidationError::Expected { field: format!("input.{name}"), expected: "a list" }),
        }
    }
}

/// `value` (the field at `field`) as a list of token ids, each below `vocab`.
pub fn token_ids(value: &Value, field: String, vocab: usize) -> Result<Vec<u32>, ValidationError> {
    let Value::Array(items) = value else { return Err(ValidationError::Expected { field, expected: "a list of token ids" }) };
    items
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).filter(|&t| (t as usize) < vocab))
        .collect::<Option<Vec<u32>>>()
        .ok_or(ValidationError::TokenIds { field, vocab })
}

/// A job's `params`, read strictly: only the kind's own.
#[derive(Debug)]
pub struct Params<'a> {
    map: &'a BTreeMap<String, Value>,
}

impl<'a> Params<'a> {
    pub fn read(map: &'a BTreeMap<String, Value>, allowed: &[&str], kind: JobKind) -> Result<Params<'a>, ValidationError> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(unknown_key(Place::Params, k, allowed, Some(kind)));
        }
        Ok(Params { map })
    }

    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name)
    }

    fn expected(name: &str, expected: &'static str) -> ValidationError {
        ValidationError::Expected { field: format!("params.{name}"), expected }
    }

    pub fn uint(&self, name: &str) -> Result<Option<u64>, ValidationError> {
        self.get(name).map(|v| v.as_u64().ok_or_else(|| Self::expected(name, "a non-negative integer"))).transpose()
    }

    pub fn float(&self, name: &str) -> Result<Option<f64>, ValidationError> {
        self.get(name)
            .map(|v| v.as_f64().or_else(|| v.as_i64().map(|i| i as f64)).ok_or_else(|| Self::expected(name, "a number")))
            .transpose()
    }

    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ValidationError> {
        self.get(name).map(|v| v.as_bool().ok_or_else(|| Self::expected(name, "true or false"))).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_get_our_name_where_one_is_meant() {
        let gen = JobKind::Generate.keys(Place::Params);
        let msg = |place, key, allowed, kind| unknown_key(place, key, allowed, Some(kind)).to_string();
        assert_eq!(msg(Place::Params, "until", gen, JobKind::Generate), "params.until: unknown; did you mean stop?");
        assert_eq!(msg(Place::Params, "max_gen_toks", gen, JobKind::Generate), "params.max_gen_toks: unknown; did you mean max_new_tokens?");
        assert_eq!(msg(Place::Params, "max_tokens", gen, JobKind::Generate), "params.max_tokens: unknown; did you mean max_new_tokens?");
        assert_eq!(msg(Place::Params, "temprature", gen, JobKind::Generate), "params.temprature: unknown; did you mean temperature?");
        assert_eq!(msg(Place::Params, "logprobs", gen, JobKind::Generate), "params.logprobs: unknown; did you mean top_logprobs?");
        let ll = JobKind::Loglikelihood.keys(Place::Params);
        assert_eq!(
            msg(Place::Params, "max_new_tokens", ll, JobKind::Loglikelihood),
            "params.max_new_tokens: unknown; not one of the params of loglikelihood jobs (it is one of generate jobs)"
        );
        assert_eq!(msg(Place::Params, "until", ll, JobKind::Loglikelihood), "params.until: unknown; the params of loglikelihood jobs are top_logprobs");
        let rolling = JobKind::LoglikelihoodRolling.keys(Place::Params);
        assert_eq!(msg(Place::Params, "until", rolling, JobKind::LoglikelihoodRolling), "params.until: unknown; loglikelihood_rolling jobs take no params");
        assert_eq!(msg(Place::Params, "x", &[], JobKind::Tensor), "params.x: unknown; tensor jobs take no params");
        let input = JobKind::Generate.keys(Place::Input);
        assert_eq!(msg(Place::Input, "text", input, JobKind::Generate), "input.text: unknown; did you mean prompt?");
        assert_eq!(msg(Place::Input, "prompt", JobKind::Embed.keys(Place::Input), JobKind::Embed), "input.prompt: unknown; did you mean text?");
        assert_eq!(
            msg(Place::Input, "zzz", JobKind::Loglikelihood.keys(Place::Input), JobKind::Loglikelihood),
            "input.zzz: unknown; the input keys of loglikelihood jobs are context, messages, continuation, continuations, context_tokens, continuation_tokens, continuations_tokens"
        );
        assert_eq!(unknown_key(Place::Top, "timeout", TOP_LEVEL, None).to_string(), "timeout: unknown; did you mean timeout_ms?");
        assert_eq!(unknown_key(Place::Top, "cahce", TOP_LEVEL, None).to_string(), "cahce: unknown; did you mean cache?");
        assert!(unknown_key(Place::Top, "extra", TOP_LEVEL, None).to_string().starts_with("extra: unknown; the keys are id, model"));
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("top_p", "top_k"), 1);
        assert_eq!(nearest("seed", &["stop", "seed"]), Some("seed"));
        assert_eq!(nearest("n", &["top_k"]), None);
    }
}
