//! `POST /v1/completions`: each prompt (a string, a token list, or a list of either) is a
//! `generate` job; `stream: true` (one prompt, no echo) streams its chunks, with their tokens'
//! `logprobs` when asked.
//!
//! `echo: true` with `logprobs` returns the prompt's tokens with their log-probs, which is how
//! lm-eval's `local-completions` scores a loglikelihood (it sends context + continuation as token
//! ids and sums the continuation's). No job kind reports per-token log-probs of a whole prompt
//! (a `loglikelihood` output is the sum over its continuation), so the exact mapping is one
//! `loglikelihood` job per prompt position j ≥ 1: `context_tokens` = the tokens before it,
//! `continuation_tokens` = [its token]. Each value is the native path's value for that token, and
//! their sum over a continuation is the native `loglikelihood` of it (to rounding). It costs one
//! job per token, each reading its prefix (quadratic in the prompt; hence [`MAX_ECHO_TOKENS`]),
//! and needs token ids: the gateway holds no tokenizer, so a text prompt with echo and logprobs is
//! refused naming `prompt`. A prompt token's text is known where it is among the 20 most likely at
//! its position (else `token_id:<id>`); the first token has no log-prob, as in OpenAI's answers.

use std::sync::Arc;

use axum::response::Response;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::jobs::{float, Bus, JobOptions, JobSpec};
use super::openai::{self, TokenLogprob, TOP_ASKED};
use super::sse::{self, Piece};
use super::App;

/// The longest prompt echoed with log-probs (one job per token).
pub const MAX_ECHO_TOKENS: usize = 2048;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: u64 = 16;

enum Prompt {
    Text(String),
    Tokens(Vec<u64>),
}

impl Prompt {
    fn input(&self) -> Value {
        match self {
            Prompt::Text(s) => json!({"prompt": s}),
            Prompt::Tokens(t) => json!({"prompt_tokens": t}),
        }
    }
}

/// `prompt`: a string, a list of token ids, or a list of either.
fn prompts(v: Option<Value>) -> Result<Vec<Prompt>, ApiError> {
    let tokens = |items: &[Value]| items.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>();
    let bad = || ApiError::bad("prompt", "expected a string, a list of token ids, or a list of strings or of token-id lists");
    match v {
        Some(Value::String(s)) => Ok(vec![Prompt::Text(s)]),
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => Ok(vec![Prompt::Tokens(tokens(&items).ok_or_else(bad)?)]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .into_iter()
            .map(|p| match p {
                Value::String(s) => Ok(Prompt::Text(s)),
                Value::Array(t) => Ok(Prompt::Tokens(tokens(&t).ok_or_else(bad)?)),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

fn take_bool(body: &mut Map<String, Value>, field: &str) -> Result<bool, ApiError> {
    match body.remove(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(_) => Err(ApiError::bad(field, "expected true or false")),
    }
}

pub async fn handle(app: Arc<App>, mut body: Map<String, Value>, options: JobOptions) -> Result<Response, ApiError> {
    let model = openai::model(&body)?;
    app.models.require(&model).await?;
    body.remove("model");
    openai::check_n(&mut body)?;
    let prompts = prompts(body.remove("prompt"))?;
    let echo = take_bool(&mut body, "echo")?;
    let stream = take_bool(&mut body, "stream")?;
    let logprobs = match body.remove("logprobs") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|k| *k <= TOP_ASKED).ok_or_else(|| ApiError::bad("logprobs", format!("expected an integer from 0 to {TOP_ASKED}")))? as usize),
    };
    let mut params = openai::generation_params(body, Some(DEFAULT_MAX_TOKENS));
    if logprobs.is_some() {
        params.insert("top_logprobs".into(), TOP_ASKED.into());
    }
    if stream {
        if prompts.len() != 1 || echo {
            return Err(ApiError::bad("stream", "streams one prompt without echo"));
        }
        let spec = JobSpec { model: &model, kind: "generate", input: prompts[0].input(), params, options: &options };
        let (id, created) = (app.bus.next_id(), openai::created());
        let name = model.clone();
        let render = Box::new(move |piece: Piece| {
            let (text, logprobs, finish) = match piece {
                Piece::Text { text, at, logprobs } => (text, logprobs.map(|l| completion_logprobs(l, at)), Value::Null),
                Piece::Finish(output) => ("", None, openai::finish_reason(output).into()),
            };
            json!({"id": format!("cmpl-{id}"), "object": "text_completion", "created": created, "model": name,
                   "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})
        });
        return sse::respond(&app.bus, spec, app.stream_idle, logprobs, render).await;
    }
    let asked = Asked { model: &model, echo, logprobs, params, options: &options };
    let answers = futures::future::try_join_all(prompts.iter().enumerate().map(|(i, p)| choice(&app.bus, &asked, i, p))).await?;
    let (prompt_tokens, completion_tokens) = answers.iter().fold((0, 0), |(p, c), a| (p + a.prompt_tokens, c + a.completion_tokens));
    let choices: Vec<Value> = answers.into_iter().map(|a| a.choice).collect();
    Ok(openai::json_response(json!({
        "id": format!("cmpl-{}", app.bus.next_id()), "object": "text_completion", "created": openai::created(), "model": model,
        "choices": choices, "usage": openai::usage(prompt_tokens, completion_tokens),
    })))
}

struct Answer {
    choice: Value,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// What a request asks of each of its prompts.
struct Asked<'a> {
    model: &'a str,
    echo: bool,
    logprobs: Option<usize>,
    /// The `generate` jobs' params.
    params: Map<String, Value>,
    options: &'a JobOptions,
}

/// One prompt's choice: its generation (unless `max_tokens` is 0) and, with echo and logprobs,
/// its scored prompt tokens.
async fn choice(bus: &Arc<Bus>, asked: &Asked<'_>, index: usize, prompt: &Prompt) -> Result<Answer, ApiError> {
    let Asked { model, echo, logprobs, ref params, options } = *asked;
    let generated = async {
        if params.get("max_new_tokens").and_then(Value::as_u64) == Some(0) {
            return Ok(None);
        }
        bus.run(JobSpec { model, kind: "generate", input: prompt.input(), params: params.clone(), options }).await.map(Some)
    };
    let scored = async {
        match (echo, logprobs, prompt) {
            (true, Some(k), Prompt::Tokens(tokens)) => score_prompt(bus, model, tokens, k, options).await.map(Some),
            (true, Some(_), Prompt::Text(_)) => Err(ApiError::bad("prompt", "echo with logprobs scores the prompt's tokens and needs them as token ids (the gateway holds no tokenizer)")),
            _ => Ok(None),
        }
    };
    let (generated, scored) = futures::try_join!(generated, scored)?;
    let empty = json!({"text": "", "tokens": [], "finish_reason": "length"});
    let output = generated.as_ref().unwrap_or(&empty);
    let mut text = output["text"].as_str().unwrap_or_default().to_string();
    let completion_tokens = output["tokens"].as_array().map_or(0, |t| t.len() as u64);
    let mut prompt_tokens = output["prompt_tokens"].as_u64().unwrap_or(0);
    let mut tokens: Vec<TokenLogprob> = Vec::new();
    if echo {
        let prompt_text = match (prompt, &scored) {
            (Prompt::Text(s), _) => s.clone(),
            (Prompt::Tokens(_), Some(scored)) => scored.iter().map(|t| t.text.as_str()).collect(),
            (Prompt::Tokens(_), None) => String::new(),
        };
        text.insert_str(0, &prompt_text);
    }
    if let Prompt::Tokens(t) = prompt {
        prompt_tokens = t.len() as u64;
    }
    if let Some(scored) = scored {
        tokens.extend(scored);
    }
    let logprobs = logprobs.map(|k| {
        tokens.extend(openai::generated_logprobs(output, k));
        completion_logprobs(&tokens, 0)
    });
    Ok(Answer {
        choice: json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": openai::finish_reason(output)}),
        prompt_tokens,
        completion_tokens,
    })
}

/// Each prompt token after the first scored as its own `loglikelihood` job.
async fn score_prompt(bus: &Arc<Bus>, model: &str, tokens: &[u64], k: usize, options: &JobOptions) -> Result<Vec<TokenLogprob>, ApiError> {
    if tokens.len() > MAX_ECHO_TOKENS {
        return Err(ApiError::bad("prompt", format!("{} tokens: echo with logprobs scores each token as a job, at most {MAX_ECHO_TOKENS}", tokens.len())));
    }
    let jobs = (1..tokens.len()).map(|j| {
        let input = json!({"context_tokens": &tokens[..j], "continuation_tokens": [tokens[j]]});
        let params = Map::from_iter([("top_logprobs".to_string(), Value::from(TOP_ASKED))]);
        bus.run(JobSpec { model, kind: "loglikelihood", input, params, options })
    });
    let outputs = futures::future::try_join_all(jobs).await?;
    let first = tokens.first().map(|t| TokenLogprob { text: format!("token_id:{t}"), logprob: None, top: Vec::new() });
    let rest = outputs.iter().zip(tokens.get(1..).unwrap_or_default()).map(|(out, &t)| TokenLogprob {
        logprob: float(&out["logprob"]),
        ..openai::token_logprob(t, &out["top_logprobs"][0], k)
    });
    Ok(first.into_iter().chain(rest).collect())
}

/// The completions `logprobs` object of `tokens`, whose text starts `at` characters into the
/// choice's (`text_offset` counts characters from the start of the choice's text).
fn completion_logprobs(tokens: &[TokenLogprob], at: usize) -> Value {
    let mut offset = at;
    let offsets: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let at = offset;
            offset += t.text.chars().count();
            at
        })
        .collect();
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| if t.logprob.is_none() && t.top.is_empty() { Value::Null } else { Value::Object(t.top.iter().map(|(s, l)| (s.clone(), json!(l))).collect()) })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}
