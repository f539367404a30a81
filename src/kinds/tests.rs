//! Parsing of the LM kinds over the demo decoder (byte-level tokenizer).

use super::loglikelihood_rolling::rolling_windows;
use super::*;
use crate::error::{ErrorCode, JobError};
use serde_json::json;

/// The demo decoder's spec (byte-level tokenizer: one token per byte), at `max_length`.
fn tiny(max_length: usize) -> (tempfile::TempDir, LmSpec) {
    let dir = tempfile::tempdir().unwrap();
    jetbatch_testkit::write_tiny_lm(dir.path(), 1, 8, 1).unwrap();
    let spec = LmSpec::load(dir.path(), Some(max_length), 64).unwrap();
    (dir, spec)
}

fn parse(spec: &LmSpec, kind: JobKind, input: serde_json::Value, params: serde_json::Value) -> Result<JobInput, JobError> {
    request(spec, kind, input, params).map(|r| r.input)
}

fn request(spec: &LmSpec, kind: JobKind, input: serde_json::Value, params: serde_json::Value) -> Result<Request, JobError> {
    let params: BTreeMap<String, Value> = rmpv::ext::to_value(params)
        .unwrap()
        .as_map()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect();
    let model = Model::Lm { name: "tiny", lm: spec };
    kind.validate(&model, &rmpv::ext::to_value(input).unwrap(), &params).map_err(JobError::from)
}

fn windows(input: JobInput) -> Vec<Window> {
    match input {
        JobInput::Score(w) => w,
        other => panic!("{other:?}"),
    }
}

fn assert_invariant(w: &Window, max_length: usize) {
    assert!(!w.context.is_empty() && !w.continuation.is_empty(), "{w:?}");
    assert!(w.context.len() + w.continuation.len() - 1 <= max_length, "{w:?} over {max_length}");
}

#[test]
fn continuations_the_model_cannot_score_whole_are_refused_and_empty_contexts_use_the_prefix() {
    let (_d, spec) = tiny(48);
    let ll = JobKind::Loglikelihood;
    // Text: 49 continuation tokens is one too many; 48 is scored whole, with one context token.
    let err = parse(&spec, ll, json!({"context": "Hi", "continuation": "x".repeat(49)}), json!({})).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.starts_with("input.continuation: 49 tokens") && err.message.contains("at most 48 continuation tokens"), "{}", err.message);
    let err = parse(&spec, ll, json!({"context": "Hi", "continuation": " the quick brown fox".repeat(100)}), json!({})).unwrap_err();
    assert!(err.message.starts_with("input.continuation: more than 48 tokens"), "{}", err.message);
    let w = windows(parse(&spec, ll, json!({"context": "Hi", "continuation": "x".repeat(48)}), json!({})).unwrap());
    assert_eq!((w[0].context.len(), w[0].continuation.len()), (1, 48));
    // Tokens alike.
    let err = parse(&spec, ll, json!({"context_tokens": [5], "continuation_tokens": vec![6; 49]}), json!({})).unwrap_err();
    assert!(err.message.starts_with("input.continuation_tokens: 49 tokens") && err.message.contains("at most 48"), "{}", err.message);
    let err = parse(&spec, ll, json!({"context_tokens": [5], "continuation_tokens": []}), json!({})).unwrap_err();
    assert!(err.message.starts_with("input.continuation_tokens"), "{}", err.message);
    // An empty context is the prefix token, as text or as tokens.
    let text = windows(parse(&spec, ll, json!({"context": "", "continuation": "ab"}), json!({})).unwrap());
    assert_eq!(text[0].context, vec![spec.prefix_token]);
    let tokens = windows(parse(&spec, ll, json!({"context_tokens": [], "continuation_tokens": text[0].continuation}), json!({})).unwrap());
    assert_eq!(tokens, text);
}

#[test]
fn every_scored_window_keeps_the_invariant() {
    for max_length in [1, 2, 3, 7, 48] {
        let (_d, spec) = tiny(max_length);
        for c in 0..60 {
            for n in 1..=max_length {
                let input = json!({"context_tokens": vec![7; c], "continuation_tokens": vec![8; n]});
                let w = windows(parse(&spec, JobKind::Loglikelihood, input, json!({})).unwrap());
                assert_invariant(&w[0], max_length);
                assert_eq!(w[0].continuation.len(), n, "the continuation is scored whole");
                assert_eq!(w[0].context.len(), c.clamp(1, max_length + 1 - n), "the context is cut from the left only");
            }
        }
        for len in 1..40 {
            let tokens: Vec<u32> = (0..len).collect();
            let ws = rolling_windows(&tokens, 99, max_length);
            ws.iter().for_each(|w| assert_invariant(w, max_length));
            let predicted: Vec<u32> = ws.iter().flat_map(|w| w.continuation.clone()).collect();
            assert_eq!(predicted, tokens, "every token is predicted once, in order");
        }
    }
}

#[test]
fn stop_token_ids_past_u32_are_refused_not_wrapped() {
    let (_d, spec) = tiny(48);
    for bad in [json!([1u64 << 32]), json!([(1u64 << 32) + 5]), json!([u64::MAX]), json!([259]), json!([-1])] {
        let err = parse(&spec, JobKind::Generate, json!({"prompt": "hi"}), json!({"stop_token_ids": bad})).unwrap_err();
        assert!(err.message.starts_with("params.stop_token_ids"), "{bad}: {}", err.message);
    }
    let JobInput::Generate(g) = parse(&spec, JobKind::Generate, json!({"prompt": "hi"}), json!({"stop_token_ids": [258]})).unwrap() else {
        panic!()
    };
    assert_eq!(g.stop_token_ids, vec![258]);
    let err = parse(&spec, JobKind::Loglikelihood, json!({"context_tokens": [1u64 << 32], "continuation_tokens": [5]}), json!({})).unwrap_err();
    assert!(err.message.starts_with("input.context_tokens"), "{}", err.message);
}

#[test]
fn stop_token_ids_are_capped() {
    let (_d, spec) = tiny(48);
    let ids = |n: usize| json!({"stop_token_ids": vec![258; n]});
    let err = parse(&spec, JobKind::Generate, json!({"prompt": "hi"}), ids(257)).unwrap_err();
    assert_eq!(err.message, "params.stop_token_ids: expected up to 256 token ids (integers below the vocabulary size)");
    assert!(parse(&spec, JobKind::Generate, json!({"prompt": "hi"}), ids(256)).is_ok());
}

#[test]
fn long_texts_are_bounded_before_tokenising_with_the_whole_text_result() {
    let (_d, spec) = tiny(48);
    let words = "the quick brown fox jumps over the lazy dog, Ünïcödé 東京 ";
    // (b) A 1,000,000-character prompt is refused without tokenising it whole.
    let prompt = words.chars().cycle().take(1_000_000).collect::<String>();
    let start = std::time::Instant::now();
    let err = parse(&spec, JobKind::Generate, json!({"prompt": prompt}), json!({})).unwrap_err();
    let refused = start.elapsed();
    assert!(err.message.starts_with("input.prompt: more than 48 tokens"), "{}", err.message);
    // A long context is cut from the left; the window equals that of a context cut by hand.
    let context = words.repeat(4 << 20 >> 6);
    let start = std::time::Instant::now();
    let big = windows(parse(&spec, JobKind::Loglikelihood, json!({"context": context, "continuation": " end"}), json!({})).unwrap());
    let scored = start.elapsed();
    let tail = &context[context.len() - 200..];
    let small = windows(parse(&spec, JobKind::Loglikelihood, json!({"context": tail, "continuation": " end"}), json!({})).unwrap());
    assert_eq!(big, small);
    assert_invariant(&big[0], 48);
    // Texts crossing the window (16 bytes a token): bounded results equal whole-text ones.
    for len in [700, 767, 768, 769, 800, 1600, 5000] {
        let text: String = words.chars().cycle().take(len).collect();
        let whole = text::encode_text(&spec, &text).unwrap();
        match parse(&spec, JobKind::Generate, json!({"prompt": text}), json!({"max_new_tokens": 1})) {
            Ok(JobInput::Generate(g)) => assert_eq!(g.prompt, whole),
            Ok(other) => panic!("{other:?}"),
            Err(e) => assert!(whole.len() >= 48, "{len}: refused {} tokens: {}", whole.len(), e.message),
        }
        let (c, k) = scoring::split_pair(&spec, &text, " !").unwrap();
        let (c, k) = scoring::truncate(spec.max_length, c, k);
        let w = windows(parse(&spec, JobKind::Loglikelihood, json!({"context": text, "continuation": " !"}), json!({})).unwrap());
        assert_eq!(w[0], Window { context: c, continuation: k, top_logprobs: 0 }, "{len}");
        let JobInput::Encode { ids: got, .. } = parse(&spec, JobKind::Embed, json!({"text": text}), json!({})).unwrap() else { panic!() };
        // Encoders keep the first max_length - 1 tokens and the last (their final separator).
        let want: Vec<u32> = if whole.len() > 48 { whole[..47].iter().chain(whole.last()).copied().collect() } else { whole.clone() };
        assert_eq!(got, want, "{len}");
    }
    eprintln!("FIGURES 1M-char prompt refused in {refused:?}; 4 MiB context scored window in {scored:?}");
    assert!(refused < std::time::Duration::from_secs(1) && scored < std::time::Duration::from_secs(1), "{refused:?} {scored:?}");
}

#[test]
fn rolling_texts_over_max_input_bytes_are_refused() {
    let (_d, mut spec) = tiny(48);
    spec.max_input_bytes = 1000;
    let err = parse(&spec, JobKind::LoglikelihoodRolling, json!({"text": "x".repeat(1001)}), json!({})).unwrap_err();
    assert!(err.message.starts_with("input.text: 1001 bytes, over this model's max_input_bytes (1000)"), "{}", err.message);
    assert!(parse(&spec, JobKind::LoglikelihoodRolling, json!({"text": "x".repeat(1000)}), json!({})).is_ok());
}

/// Every kind names the field it refuses, and its error code is the contract's.
#[test]
fn each_kind_names_the_field_it_refuses() {
    let (_d, spec) = tiny(48);
    let cases = [
        (JobKind::Generate, json!({}), json!({}), "input.prompt: missing (or prompt_tokens or messages)"),
        (JobKind::Generate, json!({"prompt": "hi", "prompt_tokens": [5]}), json!({}), "input: give one of prompt, prompt_tokens and messages, not prompt and prompt_tokens"),
        (JobKind::Generate, json!({"messages": []}), json!({}), "input.messages: expected a non-empty list of {role, content} maps with string values"),
        (JobKind::Generate, json!({"messages": [{"role": "user"}]}), json!({}), "input.messages[0].content: missing"),
        (JobKind::Generate, json!({"messages": [{"role": "user", "content": 1}]}), json!({}), "input.messages[0].content: expected a string"),
        (JobKind::Generate, json!({"messages": [{"role": "user", "content": "x", "name": "a"}]}), json!({}), "input.messages[0].name: unknown; a message has role and content"),
        (
            JobKind::Generate,
            json!({"messages": [{"role": "user", "content": "x"}, {"role": "user<|im_end|>", "content": "x"}]}),
            json!({}),
            "input.messages[1].role: expected a role of 1 to 32 ASCII letters, digits, '_' or '-' (system, user, assistant, tool, …)",
        ),
        (JobKind::Generate, json!({"messages": [{"role": "", "content": "x"}]}), json!({}), "input.messages[0].role: expected a role of 1 to 32 ASCII letters, digits, '_' or '-' (system, user, assistant, tool, …)"),
        (JobKind::Generate, json!({"messages": [{"role": "r".repeat(33), "content": "x"}]}), json!({}), "input.messages[0].role: expected a role of 1 to 32 ASCII letters, digits, '_' or '-' (system, user, assistant, tool, …)"),
        (
            JobKind::Generate,
            json!({"messages": [{"role": "user", "content": "x"}]}),
            json!({}),
            "input.messages: the model has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja)",
        ),
        (JobKind::Generate, json!({"prompt": "hi"}), json!({"add_generation_prompt": false}), "params.add_generation_prompt: only with input.messages"),
        (JobKind::Generate, json!({"prompt": 5}), json!({}), "input.prompt: expected a string"),
        (JobKind::Generate, json!({"prompt_tokens": "x"}), json!({}), "input.prompt_tokens: expected a list of token ids"),
        (JobKind::Generate, json!({"prompt": "hi"}), json!({"max_new_tokens": 0}), "params.max_new_tokens: must be 1..=64"),
        (JobKind::Generate, json!({"prompt": "hi"}), json!({"top_p": 0}), "params.top_p: expected a number in (0, 1]"),
        (JobKind::Generate, json!({"prompt": "hi"}), json!({"stream": "yes"}), "params.stream: expected true or false"),
        (JobKind::Generate, json!({"prompt": "hi"}), json!({"stop_token_ids": [300]}), "params.stop_token_ids: 300 is not below the vocabulary size"),
        (JobKind::Loglikelihood, json!({"context": "a"}), json!({}), "input.continuation: missing (or continuation_tokens)"),
        (JobKind::Loglikelihood, json!({"continuation": "a"}), json!({}), "input.context: missing (or context_tokens or messages)"),
        (
            JobKind::Loglikelihood,
            json!({"context": "a", "messages": [{"role": "user", "content": "x"}], "continuation": "b"}),
            json!({}),
            "input: give context or messages, not both",
        ),
        (
            JobKind::Loglikelihood,
            json!({"messages": [{"role": "user", "content": "x"}], "continuations": ["b"]}),
            json!({}),
            "input.messages: the model has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja)",
        ),
        (JobKind::Loglikelihood, json!({"messages": [], "continuation": "b"}), json!({}), "input.messages: expected a non-empty list of {role, content} maps with string values"),
        (JobKind::Loglikelihood, json!({"context_tokens": [1]}), json!({}), "input: give context_tokens and continuation_tokens (or continuations_tokens) together"),
        (JobKind::Loglikelihood, json!({"context_tokens": [1], "continuation_tokens": [999]}), json!({}), "input.continuation_tokens: token ids must be integers below the vocabulary size 259"),
        (JobKind::LoglikelihoodRolling, json!({}), json!({}), "input.text: missing"),
        (JobKind::LoglikelihoodRolling, json!({"tokens": []}), json!({}), "input.text: encodes to no tokens"),
        (JobKind::Embed, json!({"text": "a"}), json!({"normalize": 1}), "params.normalize: expected true or false"),
        (JobKind::Classify, json!({"text": "a", "text_pair": 7}), json!({}), "input.text_pair: expected a string"),
    ];
    let model = Model::Lm { name: "tiny", lm: &spec };
    for (kind, input, params, want) in cases {
        let params: BTreeMap<String, Value> = serde_json::from_value::<BTreeMap<String, serde_json::Value>>(params)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, rmpv::ext::to_value(v).unwrap()))
            .collect();
        let err = kind.validate(&model, &rmpv::ext::to_value(&input).unwrap(), &params).unwrap_err();
        assert_eq!(err.to_string(), want, "{kind:?} {input}");
        assert!(want.starts_with(&format!("{}: ", err.field())), "{want} names {}", err.field());
        assert_eq!(err.code(), ErrorCode::BadRequest);
        assert_eq!(JobError::from(err).message, want);
    }
    // A kind the model does not serve.
    let err = JobKind::Tensor.validate(&model, &rmpv::ext::to_value(json!({"inputs": []})).unwrap(), &BTreeMap::new()).unwrap_err();
    assert_eq!((err.code(), err.to_string().as_str()), (ErrorCode::UnsupportedKind, "kind: model 'tiny' does not serve 'tensor'"));
}

/// Keys other APIs use are refused with our name for them; so are keys of other kinds.
#[test]
fn unknown_keys_in_input_and_params_are_refused_with_a_suggestion() {
    let (_d, spec) = tiny(48);
    let msg = |kind: JobKind, input: serde_json::Value, params: serde_json::Value| parse(&spec, kind, input, params).unwrap_err().message;
    let gen = JobKind::Generate;
    let hi = || json!({"prompt": "hi"});
    assert_eq!(msg(gen, hi(), json!({"until": ["\n"]})), "params.until: unknown; did you mean stop?");
    assert_eq!(msg(gen, hi(), json!({"max_gen_toks": 5})), "params.max_gen_toks: unknown; did you mean max_new_tokens?");
    assert_eq!(msg(gen, hi(), json!({"max_tokens": 5})), "params.max_tokens: unknown; did you mean max_new_tokens?");
    assert_eq!(msg(gen, hi(), json!({"logprobs": 5})), "params.logprobs: unknown; did you mean top_logprobs?");
    assert_eq!(msg(gen, hi(), json!({"top_logprobs": 21})), "params.top_logprobs: must be 1..=20");
    assert_eq!(
        msg(JobKind::LoglikelihoodRolling, json!({"text": "a"}), json!({"top_logprobs": 2})),
        "params.top_logprobs: unknown; not one of the params of loglikelihood_rolling jobs (it is one of generate jobs)"
    );
    assert_eq!(msg(gen, json!({"text": "hi"}), json!({})), "input.text: unknown; did you mean prompt?");
    assert_eq!(msg(JobKind::Embed, json!({"text": "hi", "text_pair": "b"}), json!({})), "input.text_pair: unknown; not one of the input keys of embed jobs (it is one of classify jobs)");
    assert_eq!(msg(JobKind::Classify, json!({"text": "hi"}), json!({"normalize": false})), "params.normalize: unknown; not one of the params of classify jobs (it is one of embed jobs)");
    assert_eq!(msg(JobKind::Loglikelihood, json!({"context": "a", "continuation": "b"}), json!({"stream": true})), "params.stream: unknown; not one of the params of loglikelihood jobs (it is one of generate jobs)");
    // The known keys still parse, and explicit nils count as absent.
    assert!(parse(&spec, gen, json!({"prompt": "hi", "prompt_tokens": null}), json!({"max_new_tokens": 2, "stop": null})).is_ok());
    // Keys must be strings and appear once (MessagePack can say both).
    let model = Model::Lm { name: "tiny", lm: &spec };
    let dup = Value::Map(vec![("prompt".into(), "a".into()), ("prompt".into(), "b".into())]);
    assert_eq!(gen.validate(&model, &dup, &BTreeMap::new()).unwrap_err().to_string(), "input.prompt: appears more than once");
    let int_key = Value::Map(vec![(Value::from(1), "a".into())]);
    assert_eq!(gen.validate(&model, &int_key, &BTreeMap::new()).unwrap_err().to_string(), "input: keys must be strings");
}

fn prompt(input: JobInput) -> Vec<u32> {
    match input {
        JobInput::Generate(g) => g.prompt,
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncate_left_keeps_the_end_of_a_long_prompt_as_the_harness_cuts_it() {
    let (_d, spec) = tiny(48);
    let gen = JobKind::Generate;
    // One token per byte: 100 bytes of prompt, 8 new tokens: the last 40 tokens stay.
    let text: String = (0..100).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let whole = text::encode_text(&spec, &text).unwrap();
    assert_eq!(whole.len(), 100);
    let left = json!({"max_new_tokens": 8, "truncate": "left"});
    assert_eq!(prompt(parse(&spec, gen, json!({"prompt": text}), left.clone()).unwrap()), whole[60..].to_vec());
    let tokens: Vec<u32> = (3..103).collect();
    assert_eq!(prompt(parse(&spec, gen, json!({"prompt_tokens": tokens}), left.clone()).unwrap()), tokens[60..].to_vec());
    // A prompt that fits is kept whole, even where the default would also take it.
    assert_eq!(prompt(parse(&spec, gen, json!({"prompt": "abc"}), left).unwrap()).len(), 3);
    // The default refuses, and says what to do.
    let err = parse(&spec, gen, json!({"prompt": text}), json!({"max_new_tokens": 8})).unwrap_err();
    assert!(err.message.starts_with("input.prompt: 100 tokens leave no room") && err.message.contains("truncate"), "{}", err.message);
    let err = parse(&spec, gen, json!({"prompt": text}), json!({"max_new_tokens": 8, "truncate": "error"})).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    // No room left for any prompt token, or a value we do not have.
    let err = parse(&spec, gen, json!({"prompt": "abc"}), json!({"max_new_tokens": 48, "truncate": "left"})).unwrap_err();
    assert!(err.message.starts_with("params.max_new_tokens: must be 1..48 with truncate"), "{}", err.message);
    let err = parse(&spec, gen, json!({"prompt": "abc"}), json!({"truncate": "right"})).unwrap_err();
    assert_eq!(err.message, "params.truncate: expected \"error\" or \"left\"");
}

/// `top_logprobs` left the cache as it was: jobs that do not ask keep their cache keys (the field
/// is not encoded at 0), and outputs cached before it existed still decode.
#[test]
fn top_logprobs_keeps_cache_keys_and_old_cached_outputs() {
    let window = Window { context: vec![1, 2], continuation: vec![3], top_logprobs: 0 };
    assert_eq!(rmp_serde::to_vec(&window).unwrap(), rmp_serde::to_vec(&(vec![1u32, 2], vec![3u32])).unwrap());
    let asks = Window { top_logprobs: 2, ..window };
    assert_ne!(rmp_serde::to_vec(&asks).unwrap(), rmp_serde::to_vec(&(vec![1u32, 2], vec![3u32])).unwrap());
    // The output enum as it was: same variants in the same order, `Score` and `Generate` without `top`.
    #[derive(Serialize)]
    #[allow(dead_code)]
    enum Before {
        Tensor(Vec<TensorData>),
        Score { logprob: f64, is_greedy: Option<bool>, tokens: usize },
        Generate { text: String, tokens: Vec<u32>, finish_reason: FinishReason, prompt_tokens: usize },
    }
    let decode = |old: &Before| -> Output {
        let mut bytes = Vec::new();
        rmp_serde::encode::write(&mut bytes, old).unwrap();
        rmp_serde::from_slice(&bytes).unwrap()
    };
    assert_eq!(decode(&Before::Score { logprob: -1.5, is_greedy: Some(true), tokens: 2 }), Output::Score { logprob: -1.5, is_greedy: Some(true), tokens: 2, top: vec![] });
    let generated = Before::Generate { text: "hi".into(), tokens: vec![4], finish_reason: FinishReason::Eos, prompt_tokens: 3 };
    assert_eq!(decode(&generated), Output::Generate { text: "hi".into(), tokens: vec![4], finish_reason: FinishReason::Eos, prompt_tokens: 3, top: vec![] });
}

/// A choices job's windows are exactly those of separate jobs with one continuation each (split
/// and truncated per choice), its cost counts a shared context once, and its cache key covers the
/// choices and their order.
#[test]
fn choices_are_the_windows_of_separate_jobs() {
    let (_d, spec) = tiny(16);
    let ll = JobKind::Loglikelihood;
    let choices = [" A", "B", " a longer one", "x"];
    for context in ["Question: 2+2 = ", "Q:", "", "a context far past the model's sixteen positions "] {
        let r = request(&spec, ll, json!({"context": context, "continuations": choices}), json!({"top_logprobs": 2})).unwrap();
        let JobInput::Choices(got) = &r.input else { panic!("{:?}", r.input) };
        let alone: Vec<Window> =
            choices.iter().flat_map(|k| windows(parse(&spec, ll, json!({"context": context, "continuation": k}), json!({"top_logprobs": 2})).unwrap())).collect();
        assert_eq!(got, &alone, "{context:?}");
        got.iter().for_each(|w| assert_invariant(w, 16));
        assert_eq!(r.cost, scoring::cost(&alone));
        // Tokens alike: the same choices as token lists give the same windows.
        let tokens: Vec<&Vec<u32>> = alone.iter().map(|w| &w.continuation).collect();
        let by_tokens = parse(&spec, ll, json!({"context_tokens": alone[1].context, "continuations_tokens": tokens}), json!({"top_logprobs": 2})).unwrap();
        assert_eq!(by_tokens.windows()[1], alone[1]);
    }
    // Byte-level: the context's trailing space joins every continuation, so all four share "Q:".
    let r = request(&spec, ll, json!({"context": "Q: ", "continuations": ["a", "bc"]}), json!({})).unwrap();
    assert_eq!(r.input.windows().iter().map(|w| w.context.len()).collect::<Vec<_>>(), vec![2, 2]);
    assert_eq!(r.cost, 2 + 2 + 3, "the shared context counts once");
    let one = request(&spec, ll, json!({"context": "Q: ", "continuation": "a"}), json!({})).unwrap();
    assert_eq!(one.cost, 2 + 2);
    // The cache key (the input's MessagePack form) covers the choices and their order, and a
    // one-choice job is not a plain one.
    let key = |input: serde_json::Value| rmp_serde::to_vec(&parse(&spec, ll, input, json!({})).unwrap()).unwrap();
    let ab = key(json!({"context": "Q: ", "continuations": ["a", "b"]}));
    assert_ne!(ab, key(json!({"context": "Q: ", "continuations": ["b", "a"]})));
    assert_ne!(ab, key(json!({"context": "Q: ", "continuations": ["a", "c"]})));
    assert_ne!(key(json!({"context": "Q: ", "continuations": ["a"]})), key(json!({"context": "Q: ", "continuation": "a"})));
}

#[test]
fn bad_choices_are_refused_naming_the_choice() {
    let (_d, spec) = tiny(12);
    let cases = [
        (json!({"context": "a", "continuations": []}), "input.continuations: must be a list of 1 to 64 choices"),
        (json!({"context": "a", "continuations": vec!["x"; 65]}), "input.continuations: must be a list of 1 to 64 choices"),
        (json!({"context": "a", "continuations": "x"}), "input.continuations: expected a list"),
        (json!({"context": "a", "continuations": ["x", 7]}), "input.continuations[1]: expected a string"),
        (json!({"context": "a", "continuations": ["x", "y", "z".repeat(13)]}), "input.continuations[2]: 13 tokens; the model scores at most 12 continuation tokens (its max_length)"),
        (json!({"context_tokens": [1], "continuations_tokens": [[2], []]}), "input.continuations_tokens[1]: encodes to no tokens"),
        (json!({"context_tokens": [1], "continuations_tokens": [[2], [999]]}), "input.continuations_tokens[1]: token ids must be integers below the vocabulary size 259"),
        (json!({"context_tokens": [1], "continuations_tokens": [[2], 3]}), "input.continuations_tokens[1]: expected a list of token ids"),
        (json!({"context_tokens": [1], "continuations_tokens": [vec![2; 13]]}), "input.continuations_tokens[0]: 13 tokens; the model scores at most 12 continuation tokens (its max_length)"),
        (json!({"context": "a", "continuation": "x", "continuations": ["y"]}), "input: give continuation (one) or continuations (choices), not both"),
        (json!({"context": "a", "continuations_tokens": [[2]]}), "input: give context_tokens and continuation_tokens (or continuations_tokens) together"),
        (json!({"context_tokens": [1], "continuations": ["y"]}), "input: give context_tokens and continuation_tokens (or continuations_tokens) together"),
    ];
    for (input, want) in cases {
        let err = parse(&spec, JobKind::Loglikelihood, input.clone(), json!({})).unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (ErrorCode::BadRequest, want), "{input}");
    }
    assert!(parse(&spec, JobKind::Loglikelihood, json!({"context": "a", "continuations": vec!["x"; 64]}), json!({})).is_ok());
}

/// The engine's per-window scores become one score per choice (a plain job's are summed), and the
/// wire form lists them in the job's order.
#[test]
fn choices_outputs_keep_one_score_per_choice() {
    let w = |k: usize| Window { context: vec![1], continuation: vec![2; k], top_logprobs: 0 };
    let top = TopLogprobs { ids: vec![3], tokens: vec!["c".into()], logprobs: vec![-0.5] };
    let scores = || vec![(-1.5, true, vec![]), (-2.0, false, vec![])];
    let choices = scoring::output(&JobInput::Choices(vec![w(1), w(2)]), true, scores());
    assert_eq!(choices, Output::Choices { logprobs: vec![-1.5, -2.0], is_greedy: vec![true, false], tokens: vec![1, 2], top: vec![] });
    assert_eq!(scoring::output(&JobInput::Score(vec![w(1), w(2)]), false, scores()), Output::Score { logprob: -3.5, is_greedy: None, tokens: 3, top: vec![] });
    let asked = scoring::output(&JobInput::Choices(vec![w(1), w(1)]), true, vec![(-1.0, true, vec![top.clone()]), (f64::NEG_INFINITY, false, vec![top.clone()])]);
    let wire = serde_json::to_value(asked.to_wire(Encoding::Json)).unwrap();
    let entry = json!({"ids": [3], "tokens": ["c"], "logprobs": [-0.5]});
    assert_eq!(wire, json!({"logprobs": [-1.0, "-Infinity"], "tokens": [1, 1], "is_greedy": [true, false], "top_logprobs": [[entry], [entry]]}));
    let Value::Map(pairs) = choices.to_wire(Encoding::MsgPack) else { panic!() };
    assert_eq!(pairs[0], (Value::from("logprobs"), Value::Array(vec![Value::from(-1.5), Value::from(-2.0)])));
    assert_eq!(pairs.len(), 3, "no top_logprobs unless asked");
}
