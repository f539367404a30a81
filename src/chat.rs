//! Chat templates: a model's `chat_template` (Jinja, as transformers' `apply_chat_template` runs
//! it) rendered in Rust with minijinja, for `generate` jobs that send `messages`.
//!
//! The environment is transformers' (`_compile_jinja_template`): `trim_blocks` and
//! `lstrip_blocks`, Python's string methods (`.strip()`, `.startswith()`, `.split()`, … through
//! minijinja-contrib's pycompat), `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` that
//! writes what Python's `json.dumps(ensure_ascii=False)` writes, and the tokenizer's special
//! tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`) as variables where it has them.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Why a conversation could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The template called `raise_exception` (it refuses the conversation, e.g. a system message
    /// or roles that do not alternate).
    #[error("the model's chat template refuses them: {0}")]
    Refused(String),
    #[error("the model's chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template with the variables transformers gives it.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: BTreeMap<&'static str, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("special_tokens", &self.special_tokens).finish()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `special_tokens` are the tokenizer's (`bos_token`, … → their text).
    pub fn new(source: String, special_tokens: BTreeMap<&'static str, String>) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        // As transformers compiles chat templates.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source).map_err(|e| format!("chat template: {e:#}"))?;
        Ok(ChatTemplate { env, special_tokens })
    }

    /// The template of a model folder, as transformers loads it: `chat_template.jinja`, else
    /// `chat_template` in `tokenizer_config.json` (a string, or a list of named templates of which
    /// the one named `default` is used). `Ok(None)`: the folder has none.
    pub fn source(dir: &Path, tokenizer_config: Option<&serde_json::Value>) -> Result<Option<String>, String> {
        let file = dir.join("chat_template.jinja");
        if file.is_file() {
            return std::fs::read_to_string(&file).map(Some).map_err(|e| format!("chat_template.jinja: {e}"));
        }
        let bad = || "tokenizer_config.json: chat_template is neither a string nor a list of {name, template}".to_string();
        match tokenizer_config.and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(serde_json::Value::Array(named)) => {
                let mut default = None;
                for t in named {
                    let (Some(name), Some(template)) = (t.get("name").and_then(|n| n.as_str()), t.get("template").and_then(|t| t.as_str())) else {
                        return Err(bad());
                    };
                    if name == "default" {
                        default = Some(template.to_string());
                    }
                }
                default.map(Some).ok_or_else(|| "tokenizer_config.json: the chat templates have none named 'default'".to_string())
            }
            Some(_) => Err(bad()),
        }
    }

    /// The conversation as text, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` renders it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let mut ctx: BTreeMap<&str, Value> = self.special_tokens.iter().map(|(k, v)| (*k, Value::from(v.as_str()))).collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let template = self.env.get_template(NAME).map_err(|e| ChatError::Render(e.to_string()))?;
        template.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation if e.detail().is_some_and(|d| d.starts_with(RAISED)) => {
                ChatError::Refused(e.detail().unwrap_or_default()[RAISED.len()..].to_string())
            }
            _ => ChatError::Render(format!("{e:#}")),
        })
    }
}

/// Marks the errors `raise_exception` raises, to tell them from the template's own failures.
const RAISED: &str = "raise_exception: ";

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`, Python's
/// separators included (`", "` and `": "`; `","` at line ends when indented).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    python_json(&json, indent, 0, &mut out);
    Ok(Value::from(out))
}

fn python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let items: Vec<(Option<&String>, &J)> = match v {
        J::Array(a) if !a.is_empty() => a.iter().map(|x| (None, x)).collect(),
        J::Object(m) if !m.is_empty() => m.iter().map(|(k, x)| (Some(k), x)).collect(),
        J::Array(_) => return out.push_str("[]"),
        J::Object(_) => return out.push_str("{}"),
        scalar => return out.push_str(&scalar.to_string()),
    };
    let (open, close) = if v.is_array() { ('[', ']') } else { ('{', '}') };
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    out.push(open);
    for (i, (key, x)) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(if indent.is_some() { "," } else { ", " });
        }
        newline(out, depth + 1);
        if let Some(k) = key {
            out.push_str(&J::String(k.clone()).to_string());
            out.push_str(": ");
        }
        python_json(x, indent, depth + 1, out);
    }
    newline(out, depth);
    out.push(close);
}

/// transformers' `strftime_now`: the current time (UTC here) formatted with `%Y %m %d %e %B %b %A
/// %a %H %M %S %%`, the specifiers chat templates use (Llama 3.2's "%d %b %Y").
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    strftime(secs, &format).map(Value::from)
}

fn strftime(unix_secs: u64, format: &str) -> Result<String, Error> {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = unix_secs / 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    let (h, min, s) = (unix_secs % 86_400 / 3600, unix_secs % 3600 / 60, unix_secs % 60);
    let weekday = DAYS[(days % 7) as usize];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{min:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(ErrorKind::InvalidOperation, format!("strftime_now: %{} is not supported", other.map(String::from).unwrap_or_default())))
            }
        }
    }
    Ok(out)
}

/// Year, month (1-12) and day of the proleptic Gregorian calendar `days` after 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_the_specifiers_templates_use() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime(t, "%d %b %Y").unwrap(), "26 Jul 2024");
        assert_eq!(strftime(t, "%A %a %B %m %e %H:%M:%S %%").unwrap(), "Friday Fri July 07 26 13:05:09 %");
        assert_eq!(strftime(0, "%Y-%m-%d %A").unwrap(), "1970-01-01 Thursday");
        assert_eq!(strftime(951_782_400, "%Y-%m-%d").unwrap(), "2000-02-29");
        assert!(strftime(t, "%Q").unwrap_err().to_string().contains("%Q is not supported"));
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'é\"' | tojson }}".into(), BTreeMap::new()).unwrap();
        let env = &t.env;
        let out = env.get_template(NAME).unwrap().render(minijinja::context! { x => serde_json::json!({"a": [1, 2.5, null, true], "b": {}}) }).unwrap();
        assert_eq!(out, "{\"a\": [1, 2.5, null, true], \"b\": {}}|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": {}\n}|\"é\\\"\"");
    }

    #[test]
    fn templates_are_read_as_transformers_reads_them_and_raise_exception_refuses() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = |v: serde_json::Value| ChatTemplate::source(tmp.path(), Some(&v));
        assert_eq!(cfg(serde_json::json!({})).unwrap(), None);
        assert_eq!(cfg(serde_json::json!({"chat_template": "x"})).unwrap().as_deref(), Some("x"));
        let named = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]});
        assert_eq!(cfg(named).unwrap().as_deref(), Some("d"));
        assert!(cfg(serde_json::json!({"chat_template": [{"name": "rag", "template": "r"}]})).unwrap_err().contains("'default'"));
        assert!(cfg(serde_json::json!({"chat_template": 3})).unwrap_err().contains("neither a string"));
        std::fs::write(tmp.path().join("chat_template.jinja"), "j").unwrap();
        assert_eq!(cfg(serde_json::json!({"chat_template": "x"})).unwrap().as_deref(), Some("j"), "the .jinja file first");

        let t = ChatTemplate::new(
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip() }}".into(),
            BTreeMap::from([("bos_token", "<s>".to_string())]),
        )
        .unwrap();
        let msg = |role: &str| vec![Message { role: role.into(), content: "  hi ".into() }];
        assert_eq!(t.render(&msg("user"), true).unwrap(), "<s>hi");
        assert_eq!(t.render(&msg("system"), true).unwrap_err(), ChatError::Refused("System role not supported".into()));
        assert!(ChatTemplate::new("{% if %}".into(), BTreeMap::new()).unwrap_err().starts_with("chat template: "));
    }
}
