//! `input.messages`: a conversation that the worker renders with the model's chat template, as
//! the prompt of `generate` and the context of `loglikelihood`.

use rmpv::Value;

use super::fields::Input;
use super::validation::ValidationError;
use super::ChatPrompt;
use crate::chat::{ChatError, Message};
use crate::lm::LmSpec;

/// `input.messages` rendered with the model's chat template (as transformers'
/// `apply_chat_template(tokenize=False, add_generation_prompt=...)`).
pub fn render(lm: &LmSpec, input: &Input, add_generation_prompt: bool) -> Result<ChatPrompt, ValidationError> {
    let messages = read_messages(input)?;
    let chat_error = |error: ChatError| ValidationError::Chat { field: "input.messages".into(), error };
    let chat = lm.chat.as_ref().map_err(|e| chat_error(e.clone()))?;
    let prompt = chat.render(&messages, add_generation_prompt).map_err(chat_error)?;
    Ok(ChatPrompt { template_hash: chat.hash().to_string(), prompt })
}

/// `input.messages`: a list of `{role, content}` maps, strings both.
fn read_messages(input: &Input) -> Result<Vec<Message>, ValidationError> {
    const EXPECTED: &str = "a non-empty list of {role, content} maps with string values";
    let expected = |field: String| ValidationError::Expected { field, expected: EXPECTED };
    let items = match input.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => return Err(expected("input.messages".into())),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |key: &str| format!("input.messages[{i}].{key}");
            let pairs = m.as_map().ok_or_else(|| expected(format!("input.messages[{i}]")))?;
            let (mut role, mut content) = (None, None);
            for (k, v) in pairs {
                let slot = match k.as_str() {
                    Some("role") => &mut role,
                    Some("content") => &mut content,
                    Some(other) => return Err(ValidationError::UnknownKey { field: at(other), hint: "a message has role and content".into() }),
                    None => return Err(ValidationError::KeyNotString { field: format!("input.messages[{i}]") }),
                };
                *slot = Some(v.as_str().map(String::from).ok_or_else(|| ValidationError::Expected { field: at(k.as_str().unwrap_or_default()), expected: "a string" })?);
            }
            let role = role.ok_or_else(|| ValidationError::Missing { field: at("role"), or: None })?;
            // Templates write the role into the prompt as is (`<|im_start|>{{ role }}`): free text
            // there could forge a turn or a special token.
            if !valid_role(&role) {
                return Err(ValidationError::Expected { field: at("role"), expected: ROLE });
            }
            Ok(Message {
                role,
                content: content.ok_or_else(|| ValidationError::Missing { field: at("content"), or: None })?,
            })
        })
        .collect()
}

const ROLE: &str = "a role of 1 to 32 ASCII letters, digits, '_' or '-' (system, user, assistant, tool, …)";

fn valid_role(role: &str) -> bool {
    (1..=32).contains(&role.len()) && role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
