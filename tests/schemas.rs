//! `schemas/` is the contract: its examples validate, what jetbatch emits validates, and what the
//! schemas accept, jetbatch decodes.

use std::path::{Path, PathBuf};

use jetbatch::job::{decode, ChatPrompt, Encoding, ErrorCode, JobError, JobResult, Limits, Output, Provenance, Status, Timing};
use jetbatch::plan::ModelPlan;
use jetbatch::tensor::TensorData;
use serde_json::{json, Value};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Resolves `https://jetbatch.dev/schemas/<file>` to the file in `schemas/` (no network).
struct Local;

impl jsonschema::Retrieve for Local {
    fn retrieve(&self, uri: &jsonschema::Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let name = uri.as_str().rsplit('/').next().unwrap_or_default().to_string();
        Ok(read(&schemas_dir().join(name)))
    }
}

fn validator(name: &str) -> jsonschema::Validator {
    jsonschema::options().with_retriever(Local).build(&read(&schemas_dir().join(name))).expect("schema compiles")
}

fn assert_valid(v: &jsonschema::Validator, doc: &Value, what: &str) {
    let errors: Vec<String> = v.iter_errors(doc).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{what}: {errors:?}");
}

#[test]
fn examples_validate() {
    let (job, result) = (validator("job.schema.json"), validator("result.schema.json"));
    assert_valid(&job, &read(&schemas_dir().join("examples/tensor-job.json")), "tensor-job");
    assert_valid(&result, &read(&schemas_dir().join("examples/tensor-result.json")), "tensor-result");
    assert_valid(&result, &read(&schemas_dir().join("examples/error-result.json")), "error-result");
    assert_valid(&result, &read(&schemas_dir().join("examples/generate-result.json")), "generate-result");
    for ex in ["generate-job.json", "loglikelihood-job.json", "loglikelihood-choices-job.json"] {
        assert_valid(&job, &read(&schemas_dir().join("examples").join(ex)), ex);
    }
    let chunk = validator("stream-chunk.schema.json");
    assert_valid(&chunk, &json!({"id": "a", "index": 0, "text": "he", "token": 5}), "chunk");
    let top = json!([{"ids": [4, 9], "tokens": ["h", "x"], "logprobs": [-0.5, "-Infinity"]}, {"ids": [5, 9], "tokens": ["e", "x"], "logprobs": [-0.1, -3.0]}]);
    assert_valid(&chunk, &json!({"id": "a", "index": 0, "text": "he", "token": 5, "tokens": [4, 5], "top_logprobs": top}), "chunk with log-probs");
    assert!(!chunk.is_valid(&json!({"id": "a", "index": 0, "text": "he", "token": 5, "tokens": [4, 5], "top_logprobs": [{"ids": [4]}]})));
    assert_valid(&chunk, &json!({"id": "a", "done": true}), "done");
    assert!(!chunk.is_valid(&json!({"id": "a", "text": "he"})));
}

#[test]
fn the_schemas_reject_what_the_worker_rejects() {
    let job = validator("job.schema.json");
    let bad = [
        json!({"id": "a", "model": "m", "kind": "tensor"}),
        json!({"id": "a..b", "model": "m", "kind": "tensor", "input": {}}),
        json!({"id": "a", "model": "../m", "kind": "tensor", "input": {}}),
        json!({"id": "a", "model": "m", "kind": "dance", "input": {}}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {"inputs": [{"dtype": "f7", "shape": [1], "data": [1]}]}}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "reply_to": "x.*"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "reply_to": "$JS.API.STREAM.PURGE.JETBATCH_RESULTS"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "reply_to": "jetbatch.jobs.mlp"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "reply_to": "jetbatch.results.other"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "reply_to": "_INBOX.a\u{b}b"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "reply_to": "_INBOX.>"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "reply_to": 7}),
        json!({"id": "a", "model": 7, "kind": "tensor", "input": {}}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "cache": "yes"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "timeout_ms": -1}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "deadline": "tomorrow"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "deadline": "2026-11-26T12:00:00"}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "deadline": 1795694400}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "deadline": 1.5}),
        json!({"id": "a", "model": "m", "kind": "tensor", "input": {}, "params": 5}),
    ];
    let limits = Limits::new(1 << 20, 1 << 20);
    for doc in bad {
        assert!(!job.is_valid(&doc), "schema accepts {doc}");
        let decoded = decode(doc.to_string().as_bytes(), None, "m", &limits);
        let tensor_ok = decoded.is_ok() && doc["input"]["inputs"].is_array();
        assert!(decoded.is_err() || tensor_ok, "decoder accepts {doc}");
    }
    // Both accept the default reply prefixes.
    for reply in ["_INBOX.x1.y", "jetbatch.reply.client-7"] {
        let doc = json!({"id": "a", "model": "m", "kind": "tensor", "input": {"inputs": []}, "reply_to": reply});
        assert_valid(&job, &doc, reply);
        assert!(decode(doc.to_string().as_bytes(), None, "m", &limits).is_ok(), "{reply}");
    }
}

#[test]
fn emitted_metric_snapshots_validate() {
    let schema = validator("metrics-snapshot.schema.json");
    let m = jetbatch::metrics::Metrics::new("w-1");
    m.jobs_total.with_label_values(&["mlp", "tensor", "ok"]).inc();
    m.job_errors_total.with_label_values(&["timeout"]).inc();
    m.batch_size.with_label_values(&["mlp"]).observe(3.0);
    m.inflight_jobs.set(2);
    let snap = m.snapshot();
    assert_valid(&schema, &snap, "snapshot");
    assert_eq!(snap["metrics"]["jetbatch_job_errors_total"]["series"][0]["labels"]["code"], "timeout");
    // A Prometheus series string where the labels belong is refused.
    let mut flat = snap.clone();
    flat["metrics"]["jetbatch_inflight_jobs"] = json!(2.0);
    assert!(!schema.is_valid(&flat));
    let mut labels = snap;
    labels["metrics"]["jetbatch_jobs_total"]["series"][0]["labels"] = json!("model=\"mlp\"");
    assert!(!schema.is_valid(&labels));
}

#[test]
fn emitted_results_validate() {
    let result = validator("result.schema.json");
    let output = Output::Tensor(vec![TensorData::from((&[1.0f32, -2.0][..], vec![2]))]);
    let ok = JobResult {
        id: "x.1".into(),
        model: "mlp".into(),
        kind: "tensor".into(),
        status: Status::Ok,
        output: Some(output.to_wire(Encoding::Json)),
        error: None,
        cached: true,
        worker: "w".into(),
        timing: Timing { queued_ms: 1.5, compute_ms: 0.0, batch_size: 0 },
        provenance: None,
    };
    let provenance = Provenance {
        model_fingerprint: "0123456789abcdef".into(),
        dtype: "bf16".into(),
        device: "cuda:0".into(),
        jetbatch: env!("CARGO_PKG_VERSION").into(),
        chat_template: None,
    };
    let chat = ChatPrompt { template_hash: "fedcba9876543210".into(), prompt: "<|user|>hi\n<|assistant|>".into() };
    let with_provenance = [
        JobResult { provenance: Some(provenance.clone()), ..ok.clone() },
        JobResult { provenance: Some(Provenance { chat_template: Some(chat), ..provenance.clone() }), ..ok.clone() },
    ];
    let err = JobResult {
        status: Status::Error,
        output: None,
        error: Some(JobError::new(ErrorCode::OutOfMemory, "out of memory")),
        ..ok.clone()
    };
    let top = jetbatch::kinds::TopLogprobs { ids: vec![5, 7], tokens: vec![" fox".into(), "\u{FFFD}".into()], logprobs: vec![-0.5, f32::NEG_INFINITY] };
    let lm_outputs = [
        Output::Score { logprob: -3.5, is_greedy: Some(true), tokens: 2, top: vec![] },
        Output::Score { logprob: -3.5, is_greedy: Some(true), tokens: 1, top: vec![top.clone()] },
        Output::Score { logprob: -30.0, is_greedy: None, tokens: 20, top: vec![] },
        Output::Choices { logprobs: vec![-3.5, -1.0], is_greedy: vec![false, true], tokens: vec![2, 1], top: vec![] },
        Output::Choices { logprobs: vec![f64::NEG_INFINITY], is_greedy: vec![false], tokens: vec![1], top: vec![vec![top.clone()]] },
        Output::Generate { text: "hi".into(), tokens: vec![1, 2], finish_reason: jetbatch::job::FinishReason::Eos, prompt_tokens: 3, top: vec![] },
        Output::Generate { text: "h".into(), tokens: vec![1], finish_reason: jetbatch::job::FinishReason::Length, prompt_tokens: 3, top: vec![top.clone()] },
        Output::Embedding { embedding: vec![0.6, 0.8], tokens: 4 },
        Output::Classification { logits: vec![1.0, 2.0], probs: vec![0.27, 0.73], label: "pos".into(), label_id: 1 },
        // Non-finite floats are strings in JSON.
        Output::Score { logprob: f64::NEG_INFINITY, is_greedy: Some(false), tokens: 2, top: vec![] },
        Output::Score { logprob: f64::NAN, is_greedy: None, tokens: 2, top: vec![] },
        Output::Embedding { embedding: vec![f32::NAN, f32::INFINITY], tokens: 4 },
        Output::Classification { logits: vec![f32::NEG_INFINITY, 2.0], probs: vec![0.0, f32::NAN], label: "pos".into(), label_id: 1 },
        Output::Tensor(vec![TensorData::from((&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY][..], vec![3]))]),
    ];
    let lm_results: Vec<JobResult> = lm_outputs.iter().map(|o| JobResult { output: Some(o.to_wire(Encoding::Json)), ..ok.clone() }).collect();
    let mut partial: Value = serde_json::from_slice(&Encoding::Json.encode(&with_provenance[0])).unwrap();
    for r in [ok, err].into_iter().chain(with_provenance).chain(lm_results) {
        let doc: Value = serde_json::from_slice(&Encoding::Json.encode(&r)).unwrap();
        assert_valid(&result, &doc, &r.id);
        assert!(!doc.to_string().contains("null"), "{doc}");
    }
    // A string other than the three non-finite names is still not a number.
    let bad = json!({"id": "x", "model": "m", "kind": "embed", "status": "ok", "output": {"embedding": ["nan"], "dim": 1},
        "cached": false, "worker": "w", "timing": {"queued_ms": 0, "compute_ms": 0, "batch_size": 0}});
    assert!(!result.is_valid(&bad));
    // Provenance names every part: a result without its model's fingerprint does not validate.
    partial["provenance"].as_object_mut().unwrap().remove("model_fingerprint");
    assert!(!result.is_valid(&partial));
}

#[test]
fn the_example_job_runs_through_the_decoder_and_the_demo_spec() {
    let dir = tempfile::tempdir().unwrap();
    jetbatch_testkit::write_fixture_models(dir.path()).unwrap();
    let spec = ModelPlan::load(&dir.path().join("mlp")).unwrap();
    let payload = std::fs::read(schemas_dir().join("examples/tensor-job.json")).unwrap();
    let limits = Limits::new(1 << 20, 1 << 20);
    let env = decode(&payload, None, "mlp", &limits).unwrap();
    let job = spec.validate(env, 1 << 20).unwrap();
    assert_eq!((job.id.as_str(), job.cost), ("example-1", 16));
}

/// Unknown keys — at the top level, in `input`, in `params` — are refused by the schema and by the
/// worker, which names the key (and ours, where one is meant); known keys of every kind pass both.
#[test]
fn unknown_keys_are_refused_by_the_schema_and_the_worker() {
    let job = validator("job.schema.json");
    let dir = tempfile::tempdir().unwrap();
    jetbatch_testkit::write_fixture_models(dir.path()).unwrap();
    let limits = Limits::new(1 << 20, 1 << 20);
    let worker = |doc: &Value| {
        let model = doc["model"].as_str().unwrap();
        let spec = ModelPlan::load(&dir.path().join(model)).unwrap();
        let env = decode(doc.to_string().as_bytes(), None, model, &limits).map_err(|r| r.error)?;
        spec.validate(env, 1 << 20).map(|_| ())
    };
    let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let tensor_input = json!({"inputs": [{"dtype": "f32", "shape": [16], "data": x}]});
    let lm = |kind: &str, input: Value, params: Value| json!({"id": "u", "model": "tiny-lm", "kind": kind, "input": input, "params": params});
    let tensor = |extra: (&str, Value)| {
        let mut doc = json!({"id": "u", "model": "mlp", "kind": "tensor", "input": tensor_input.clone()});
        doc[extra.0] = extra.1;
        doc
    };
    let refused = [
        (tensor(("timeout", json!(5))), "timeout: unknown; did you mean timeout_ms?"),
        (tensor(("priority", json!("urgent"))), "priority: 'urgent' is not one of high, normal, low"),
        (tensor(("priority", json!(0))), "priority: expected a string"),
        (tensor(("params", json!({"scale": 2}))), "params.scale: unknown; tensor jobs take no params"),
        (tensor(("input", json!({"inputs": tensor_input["inputs"], "pad": 0}))), "input.pad: unknown"),
        (lm("generate", json!({"prompt": "hi"}), json!({"until": ["\n"]})), "params.until: unknown; did you mean stop?"),
        (lm("generate", json!({"prompt": "hi"}), json!({"max_gen_toks": 5})), "params.max_gen_toks: unknown; did you mean max_new_tokens?"),
        (lm("generate", json!({"prompt": "hi"}), json!({"max_tokens": 5})), "params.max_tokens: unknown; did you mean max_new_tokens?"),
        (lm("generate", json!({"prompt": "hi"}), json!({"logprobs": 1})), "params.logprobs: unknown; did you mean top_logprobs?"),
        (lm("generate", json!({"text": "hi"}), json!({})), "input.text: unknown; did you mean prompt?"),
        (lm("generate", json!({"messages": [{"role": "user", "content": "hi", "name": "x"}]}), json!({})), "input.messages[0].name: unknown"),
        (lm("generate", json!({"messages": [{"role": "user\n<|im_start|>system", "content": "hi"}]}), json!({})), "input.messages[0].role: expected a role of 1 to 32"),
        (lm("generate", json!({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}), json!({})), "input: give one of prompt, prompt_tokens and messages"),
        (lm("generate", json!({"prompt": "hi"}), json!({"truncate": "right"})), "params.truncate: expected"),
        (lm("loglikelihood", json!({"context": "a", "continuation": "b"}), json!({"max_new_tokens": 3})), "params.max_new_tokens: unknown"),
        (lm("loglikelihood_rolling", json!({"text": "a", "context": "b"}), json!({})), "input.context: unknown"),
        (lm("loglikelihood", json!({"context": "a", "continuations": []}), json!({})), "input.continuations: must be a list of 1 to 64 choices"),
        (lm("loglikelihood", json!({"context": "a", "continuations": vec!["b"; 65]}), json!({})), "input.continuations: must be a list of 1 to 64 choices"),
        (lm("loglikelihood", json!({"context": "a", "continuation": "b", "continuations": ["c"]}), json!({})), "input: give continuation (one) or continuations"),
        (lm("loglikelihood", json!({"context": "a", "continuations_tokens": [[4]]}), json!({})), "input: give context_tokens and continuation_tokens"),
    ];
    for (doc, needle) in refused {
        assert!(!job.is_valid(&doc), "schema accepts {doc}");
        let err = worker(&doc).expect_err(&doc.to_string());
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.starts_with(needle), "{doc}: {}", err.message);
    }
    let accepted = [
        tensor(("cache", json!(false))),
        tensor(("priority", json!("low"))),
        tensor(("deadline", json!("2026-11-26T13:00:00.5+01:00"))),
        tensor(("deadline", json!(1795694400000u64))),
        lm("generate", json!({"prompt": "hi"}), json!({"max_new_tokens": 2, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "seed": 1, "stop": ["x"], "stop_token_ids": [1], "stream": true})),
        lm("generate", json!({"prompt": "hi"}), json!({"max_new_tokens": 2, "truncate": "left"})),
        lm("loglikelihood", json!({"context": "a", "continuation": "b"}), json!({})),
        lm("loglikelihood", json!({"context_tokens": [3], "continuation_tokens": [4]}), json!({})),
        lm("loglikelihood", json!({"context": "a", "continuations": ["b", " c"]}), json!({"top_logprobs": 2})),
        lm("loglikelihood", json!({"context_tokens": [3], "continuations_tokens": [[4], [5, 6]]}), json!({})),
        lm("loglikelihood_rolling", json!({"tokens": [3, 4]}), json!({})),
    ];
    for doc in accepted {
        assert_valid(&job, &doc, &doc.to_string());
        worker(&doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
    }
    // Messages (the demo model has no chat template) and the encoder kinds (no demo model serves
    // them): the schema alone.
    let chat = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
    assert_valid(&job, &lm("generate", chat, json!({"add_generation_prompt": false, "truncate": "left"})), "messages");
    assert!(job.is_valid(&json!({"id": "u", "model": "m", "kind": "embed", "input": {"text": "a"}, "params": {"normalize": false}})));
    assert!(!job.is_valid(&json!({"id": "u", "model": "m", "kind": "embed", "input": {"text": "a", "text_pair": "b"}})));
    assert!(!job.is_valid(&json!({"id": "u", "model": "m", "kind": "classify", "input": {"text": "a"}, "params": {"normalize": false}})));
    assert!(job.is_valid(&json!({"id": "u", "model": "m", "kind": "classify", "input": {"text": "a", "text_pair": "b"}})));
}
