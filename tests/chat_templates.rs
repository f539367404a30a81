//! Chat templates rendered in Rust (minijinja) equal transformers' `apply_chat_template(...,
//! tokenize=False)` on the templates real models ship (tests/fixtures/chat_templates/), for
//! single and multi-turn conversations, with and without a system message and a generation
//! prompt; a template's `raise_exception` is a refusal with transformers' message.

mod lm_fixture;

use std::collections::BTreeMap;
use std::path::PathBuf;

use jetbatch::chat::{ChatError, ChatTemplate, Message};
use lm_fixture::python;
use serde_json::{json, Value};

/// transformers' rendering of each case: `{"text": ...}` or `{"error": <raise_exception's message>}`.
const TRANSFORMERS: &str = "import json, sys
from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
out = []
for case in json.loads(open(sys.argv[1]).read()):
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token=case['bos'], eos_token=case['eos'])
    tok.chat_template = case['template']
    try:
        out.append({'text': tok.apply_chat_template(case['messages'], tokenize=False, add_generation_prompt=case['add_generation_prompt'])})
    except TemplateError as e:
        out.append({'error': str(e)})
print(json.dumps(out))
";

fn conversations() -> Vec<(&'static str, Vec<Message>)> {
    let m = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
    vec![
        ("one user turn", vec![m("user", "Hello, how are you?")]),
        (
            "multi-turn with a system message",
            vec![
                m("system", "You are a terse assistant.\nAnswer in one line. "),
                m("user", "What is the capital of France?"),
                m("assistant", "  Paris.  "),
                m("user", "And of Japan? Ünïcödé, 東京, \"quotes\" and {braces}"),
            ],
        ),
        ("multi-turn", vec![m("user", "Hi"), m("assistant", "Hello! How can I help?"), m("user", "Tell me a joke.\n")]),
        // Qwen 3 splits reasoning out of the last assistant turn (`.split('</think>')`, `.lstrip('\n')`).
        ("an assistant turn with reasoning", vec![m("user", "2+2?"), m("assistant", "<think>\nadd them\n</think>\n\n4"), m("user", "and 3+3?")]),
        ("roles that do not alternate", vec![m("user", "a"), m("user", "b")]),
    ]
}

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates");
    // (template, bos_token, eos_token) as the models' tokenizer_config.json set them.
    let models = [
        ("llama-3.1", Some("<|begin_of_text|>"), "<|eot_id|>"),
        ("qwen2.5", None, "<|im_end|>"),
        ("qwen3", None, "<|im_end|>"),
        ("gemma-2", Some("<bos>"), "<eos>"),
        ("gemma-3", Some("<bos>"), "<eos>"),
        ("mistral-7b-v0.1", Some("<s>"), "</s>"),
    ];
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (name, bos, eos) in models {
        let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
        let mut special = BTreeMap::from([("eos_token", eos.to_string())]);
        if let Some(b) = bos {
            special.insert("bos_token", b.to_string());
        }
        let template = ChatTemplate::new(jetbatch::chat::FROM_FILE, source.clone(), special).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (what, messages) in conversations() {
            for add_generation_prompt in [true, false] {
                cases.push(json!({"template": source, "bos": bos, "eos": eos, "messages": serde_json::to_value(&messages).unwrap(), "add_generation_prompt": add_generation_prompt}));
                ours.push((format!("{name}: {what}, add_generation_prompt={add_generation_prompt}"), template.render(&messages, add_generation_prompt)));
            }
        }
    }
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), serde_json::to_string(&cases).unwrap()).unwrap();
    let want = python(TRANSFORMERS, &[tmp.path().to_str().unwrap()]);
    let (mut rendered, mut refused) = (0, 0);
    for ((what, got), want) in ours.iter().zip(want.as_array().unwrap()) {
        match (got, want.get("text").and_then(Value::as_str), want.get("error").and_then(Value::as_str)) {
            (Ok(text), Some(w), None) => {
                assert_eq!(text, w, "{what}");
                rendered += 1;
            }
            (Err(ChatError::Refused(msg)), None, Some(w)) => {
                assert_eq!(msg, w, "{what}");
                refused += 1;
            }
            (got, _, _) => panic!("{what}: ours {got:?}, transformers {want}"),
        }
    }
    // Every template renders most conversations; those that refuse system messages or
    // non-alternating roles (Gemma, Mistral, …) refuse them as transformers does.
    assert!(rendered >= 40 && refused >= 8, "rendered {rendered}, refused {refused}");
    eprintln!("FIGURES chat templates: {rendered} renderings equal transformers', {refused} refusals equal");
}
