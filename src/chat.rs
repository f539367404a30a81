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

use crate::error::ErrorCode;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Instructions one render may run (minijinja fuel). A template is code from the model folder,
/// run for every job with `messages`: one that loops for ever would hold its job, and the worker's
/// memory, for good. The templates of tests/fixtures/chat_templates take under 250 for a short
/// conversation and at most 81 per message (Qwen 3), so this renders conversations of over 100k
/// messages; running it out takes about a second in a debug build, a fraction in release.
pub const FUEL: u64 = 10_000_000;

/// How deep a render may recurse (a macro call counts several levels). Chat templates nest a few
/// levels; a fifth of minijinja's default (500) leaves them room and keeps a recursing template
/// far from the end of the 2 MiB stacks of tokio's blocking threads, where renders run.
pub const RECURSION_LIMIT: usize = 100;

/// Bytes a render may write besides its conversation's: the template's own text (default system
/// prompts, tool instructions, dates).
const OUTPUT_BASE: usize = 1 << 20;
/// Bytes of framing a render may write per message (the fixtures write under 60: Llama 3.1's
/// `<|start_header_id|>user<|end_header_id|>\n\n…<|eot_id|>`).
const OUTPUT_PER_MESSAGE: usize = 256;
/// Times a render may write its conversation's text: a template writes each message once, some
/// twice (Qwen 3 splits reasoning out of an assistant turn). The prompt is tokenised after
/// rendering, so the cap bounds that work too; with `truncate: "left"` a prompt longer than the
/// model's `max_length` is legitimate, so the cap follows the conversation, not `max_length`.
const OUTPUT_PER_BYTE: usize = 4;

/// Most bytes a conversation may render to.
pub fn output_cap(messages: &[Message]) -> usize {
    let bytes: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
    OUTPUT_BASE.saturating_add(messages.len().saturating_mul(OUTPUT_PER_MESSAGE)).saturating_add(bytes.saturating_mul(OUTPUT_PER_BYTE))
}

/// A bound a render ran past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// It ran more than [`FUEL`] instructions.
    Fuel,
    /// It wrote more than this many bytes (see [`output_cap`]).
    Output(usize),
    /// It recursed deeper than [`RECURSION_LIMIT`].
    Recursion,
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Fuel => write!(f, "ran more than {FUEL} instructions (does it loop without end?)"),
            Bound::Output(cap) => write!(f, "wrote more than {cap} bytes (1 MiB, 256 a message and 4 times the conversation's text)"),
            Bound::Recursion => write!(f, "recursed deeper than {RECURSION_LIMIT} levels"),
        }
    }
}

/// Why a conversation could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The model has no template to use: none in the folder, or one that cannot be read or compiled.
    #[error("{0}")]
    Unavailable(String),
    /// The template called `raise_exception` (it refuses the conversation, e.g. a system message
    /// or roles that do not alternate).
    #[error("the model's chat template refuses them: {0}")]
    Refused(String),
    #[error("the model's chat template failed: {0}")]
    Render(String),
    /// The template ran past a bound: the model folder is at fault, not the conversation.
    #[error("the model's chat template ({origin}) {bound}")]
    Bound { origin: &'static str, bound: Bound },
}

impl ChatError {
    /// The contract's error code: a template past its bounds is the model's fault (`model_error`);
    /// the rest is about what the job asks of it (`bad_request`).
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::Bound { .. } => ErrorCode::ModelError,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// A compiled chat template with the variables transformers gives it.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, to name it in errors.
    origin: &'static str,
    special_tokens: BTreeMap<&'static str, String>,
    /// BLAKE3 of the template's source (16 hex digits): results name the template they were
    /// rendered with.
    hash: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("special_tokens", &self.special_tokens).finish()
    }
}

const NAME: &str = "chat_template";

/// Where a template is read from (see [`ChatTemplate::source`]).
pub const FROM_FILE: &str = "chat_template.jinja";
pub const FROM_CONFIG: &str = "chat_template in tokenizer_config.json";

impl ChatTemplate {
    /// Compiles `source`, read from `origin`; `special_tokens` are the tokenizer's (`bos_token`, …
    /// → their text).
    pub fn new(origin: &'static str, source: String, special_tokens: BTreeMap<&'static str, String>) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        // As transformers compiles chat templates.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        let hash = blake3::hash(source.as_bytes()).to_hex()[..16].to_string();
        env.add_template_owned(NAME, source).map_err(|e| ChatError::Unavailable(format!("chat template ({origin}): {e:#}")))?;
        Ok(ChatTemplate { env, origin, special_tokens, hash })
    }

    /// The BLAKE3 of the template's source, 16 hex digits.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The template of a model folder, as transformers loads it: `chat_template.jinja`, else
    /// `chat_template` in `tokenizer_config.json` (a string, or a list of named templates of which
    /// the one named `default` is used), with where it was read from. `Ok(None)`: the folder has none.
    pub fn source(dir: &Path, tokenizer_config: Option<&serde_json::Value>) -> Result<Option<(&'static str, String)>, String> {
        let file = dir.join(FROM_FILE);
        if file.is_file() {
            return std::fs::read_to_string(&file).map(|s| Some((FROM_FILE, s))).map_err(|e| format!("{FROM_FILE}: {e}"));
        }
        let bad = || "tokenizer_config.json: chat_template is neither a string nor a list of {name, template}".to_string();
        let template = match tokenizer_config.and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
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
                default.ok_or_else(|| "tokenizer_config.json: the chat templates have none named 'default'".to_string())?
            }
            Some(_) => return Err(bad()),
        };
        Ok(Some((FROM_CONFIG, template)))
    }

    /// The conversation as text, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` renders it, within the bounds ([`FUEL`], [`output_cap`],
    /// [`RECURSION_LIMIT`]).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let mut ctx: BTreeMap<&str, Value> = self.special_tokens.iter().map(|(k, v)| (*k, Value::from(v.as_str()))).collect();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let template = self.env.get_template(NAME).map_err(|e| ChatError::Render(e.to_string()))?;
        let cap = output_cap(messages);
        let mut out = Capped { text: Vec::new(), cap };
        let bound = |bound| ChatError::Bound { origin: self.origin, bound };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.text).map_err(|e| ChatError::Render(e.to_string())),
            Err(e) => Err(match e.kind() {
                ErrorKind::InvalidOperation if e.detail().is_some_and(|d| d.starts_with(RAISED)) => {
                    ChatError::Refused(e.detail().unwrap_or_default()[RAISED.len()..].to_string())
                }
                ErrorKind::OutOfFuel => bound(Bound::Fuel),
                // The only writer that fails is the cap's.
                ErrorKind::WriteFailure => bound(Bound::Output(cap)),
                ErrorKind::InvalidOperation if e.detail() == Some(RECURSION) => bound(Bound::Recursion),
                _ => ChatError::Render(format!("{e:#}")),
            }),
        }
    }

    /// Renders a probe conversation (system, user, assistant, user; without the system message if
    /// the template refuses one), as a model is loaded: a template that runs past its bounds on
    /// it would on every job, and is reported then. Other failures depend on the conversation and
    /// are left to the jobs.
    pub fn probe(&self) -> Result<(), ChatError> {
        let m = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
        let conversation = [m("system", "You are a helpful assistant."), m("user", "Hello!"), m("assistant", "Hi! How can I help?"), m("user", "Tell me a joke.")];
        let rendered = match self.render(&conversation, true) {
            Err(ChatError::Refused(_)) => self.render(&conversation[1..], true),
            other => other,
        };
        match rendered {
            Err(e @ ChatError::Bound { .. }) => Err(e),
            _ => Ok(()),
        }
    }
}

/// minijinja's message when a render recurses past the limit.
const RECURSION: &str = "recursion limit exceeded";

/// The render's output, refused past `cap` bytes.
struct Capped {
    text: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.cap {
            return Err(std::io::Error::other("over the chat template's output cap"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
        let t = ChatTemplate::new(FROM_FILE, "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'é\"' | tojson }}".into(), BTreeMap::new()).unwrap();
        let env = &t.env;
        let out = env.get_template(NAME).unwrap().render(minijinja::context! { x => serde_json::json!({"a": [1, 2.5, null, true], "b": {}}) }).unwrap();
        assert_eq!(out, "{\"a\": [1, 2.5, null, true], \"b\": {}}|{\n  \"a\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"b\": {}\n}|\"é\\\"\"");
    }

    #[test]
    fn templates_are_read_as_transformers_reads_them_and_raise_exception_refuses() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = |v: serde_json::Value| ChatTemplate::source(tmp.path(), Some(&v)).map(|s| s.map(|(origin, text)| format!("{origin}: {text}")));
        assert_eq!(cfg(serde_json::json!({})).unwrap(), None);
        assert_eq!(cfg(serde_json::json!({"chat_template": "x"})).unwrap().as_deref(), Some("chat_template in tokenizer_config.json: x"));
        let named = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]});
        assert_eq!(cfg(named).unwrap().as_deref(), Some("chat_template in tokenizer_config.json: d"));
        assert!(cfg(serde_json::json!({"chat_template": [{"name": "rag", "template": "r"}]})).unwrap_err().contains("'default'"));
        assert!(cfg(serde_json::json!({"chat_template": 3})).unwrap_err().contains("neither a string"));
        std::fs::write(tmp.path().join("chat_template.jinja"), "j").unwrap();
        assert_eq!(cfg(serde_json::json!({"chat_template": "x"})).unwrap().as_deref(), Some("chat_template.jinja: j"), "the .jinja file first");

        let t = ChatTemplate::new(
            FROM_CONFIG,
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip() }}".into(),
            BTreeMap::from([("bos_token", "<s>".to_string())]),
        )
        .unwrap();
        let msg = |role: &str| vec![Message { role: role.into(), content: "  hi ".into() }];
        assert_eq!(t.render(&msg("user"), true).unwrap(), "<s>hi");
        assert_eq!(t.render(&msg("system"), true).unwrap_err(), ChatError::Refused("System role not supported".into()));
        let compile = ChatTemplate::new(FROM_FILE, "{% if %}".into(), BTreeMap::new()).unwrap_err().to_string();
        assert!(compile.starts_with("chat template (chat_template.jinja): syntax error"), "{compile}");
    }

    fn msgs(roles: &[&str]) -> Vec<Message> {
        roles.iter().map(|r| Message { role: r.to_string(), content: "Hello, how are you?".into() }).collect()
    }

    /// A template with `{% if %}`s around `body` so it renders the conversation as well.
    fn template(body: &str) -> ChatTemplate {
        ChatTemplate::new(FROM_FILE, format!("{body}{{% for m in messages %}}<{{{{ m.role }}}}>{{{{ m.content }}}}{{% endfor %}}"), BTreeMap::new()).unwrap()
    }

    const SPIN: &str = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";

    #[test]
    fn real_templates_render_long_conversations_far_within_the_bounds() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
        let special = BTreeMap::from([("bos_token", "<s>".to_string()), ("eos_token", "</s>".to_string())]);
        // 1,000 turns, the assistant's with reasoning (Qwen 3 splits it out).
        let mut conversation = Vec::new();
        for _ in 0..1000 {
            conversation.push(Message { role: "user".into(), content: "Hello, how are you?".into() });
            conversation.push(Message { role: "assistant".into(), content: "<think>\nhmm\n</think>\n\nFine, thanks.".into() });
        }
        conversation.push(Message { role: "user".into(), content: "Bye.".into() });
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "jinja") {
                continue;
            }
            let t = ChatTemplate::new(FROM_FILE, std::fs::read_to_string(&path).unwrap(), special.clone()).unwrap();
            t.probe().unwrap();
            let text = t.render(&conversation, true).unwrap();
            assert!(text.len() * 2 < output_cap(&conversation), "{path:?} writes {} bytes", text.len());
            let ctx = minijinja::context! { messages => Value::from_serialize(&conversation), add_generation_prompt => true, bos_token => "<s>", eos_token => "</s>" };
            let (used, _) = t.env.get_template(NAME).unwrap().render_captured(ctx).unwrap().state().fuel_levels().unwrap();
            assert!(used < FUEL / 50, "{path:?} takes {used} instructions for 2,001 messages");
            names.push(path.file_stem().unwrap().to_string_lossy().to_string());
        }
        names.sort();
        assert_eq!(names, ["gemma-2", "gemma-3", "llama-3.1", "mistral-7b-v0.1", "qwen2.5", "qwen3"]);
    }

    #[test]
    fn a_template_that_loops_flood_or_recurses_is_stopped_at_its_bound() {
        let user = msgs(&["user"]);
        let spin = template(SPIN);
        let err = spin.render(&user, true).unwrap_err();
        assert_eq!(err, ChatError::Bound { origin: FROM_FILE, bound: Bound::Fuel });
        assert_eq!(err.code(), ErrorCode::ModelError);
        assert_eq!(err.to_string(), "the model's chat template (chat_template.jinja) ran more than 10000000 instructions (does it loop without end?)");

        // 100 MB in one write, and 100 MB in many.
        let cap = output_cap(&user);
        assert_eq!(cap, (1 << 20) + 256 + 4 * 23);
        for flood in ["{{ 'x' * 100000000 }}", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"] {
            assert_eq!(template(flood).render(&user, true).unwrap_err(), ChatError::Bound { origin: FROM_FILE, bound: Bound::Output(cap) }, "{flood}");
        }
        // Output up to the cap is fine: 1 MiB of the template's own text.
        assert_eq!(template("{{ 'x' * 1048576 }}").render(&user, true).unwrap().len(), (1 << 20) + "<user>Hello, how are you?".len());

        // On a thread with the stack of tokio's blocking pool (2 MiB), where renders run.
        let recurse = template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
        let err = std::thread::Builder::new().stack_size(2 << 20).spawn(move || recurse.render(&user, true)).unwrap().join().unwrap().unwrap_err();
        assert_eq!(err, ChatError::Bound { origin: FROM_FILE, bound: Bound::Recursion });
    }

    #[test]
    fn the_load_probe_finds_templates_past_their_bounds_and_tolerates_refusals() {
        assert_eq!(template(SPIN).probe(), Err(ChatError::Bound { origin: FROM_FILE, bound: Bound::Fuel }));
        // Refuses a system message: probed again without it, where it loops.
        let no_system = "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}";
        assert_eq!(template(&format!("{no_system}{SPIN}")).probe(), Err(ChatError::Bound { origin: FROM_FILE, bound: Bound::Fuel }));
        assert_eq!(template(no_system).probe(), Ok(()));
        // Loops only on a conversation the probe does not send: found per job.
        let trap = template(&format!("{{% if messages[-1].content == 'spin' %}}{SPIN}{{% endif %}}"));
        assert_eq!(trap.probe(), Ok(()));
        let spin = [Message { role: "user".into(), content: "spin".into() }];
        assert_eq!(trap.render(&spin, true).unwrap_err(), ChatError::Bound { origin: FROM_FILE, bound: Bound::Fuel });
        // Other failures depend on the conversation.
        assert_eq!(template("{{ messages[7].content.upper() }}").probe(), Ok(()));
    }
}
