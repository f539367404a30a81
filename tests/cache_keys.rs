//! The result cache lives on disk across upgrades: a job's cache key must not change when the code
//! that parses it is reorganised. These keys were computed before the job kinds got their own
//! modules (issue #10) and are hard-coded here; a change to them is a cache-format change.

use std::collections::BTreeMap;
use std::sync::Arc;

use jetbatch::job::{decode, Encoding, JobInput, JobKind, Limits, ValidJob};
use jetbatch::plan::ModelPlan;
use jetbatch::tensor::TensorData;
use serde_json::json;

fn key_of(kind: JobKind, input: JobInput) -> String {
    let job = ValidJob {
        id: "k".into(),
        model: Arc::from("m"),
        kind,
        input,
        params: BTreeMap::new(),
        fingerprint: Arc::from("fp-0123456789abc"),
        cost: 1,
        reply_to: None,
        use_cache: true,
        stream: false,
        timeout: None,
        deadline: None,
        encoding: Encoding::MsgPack,
        // Not the default level: a job's priority does not change its result, nor its key.
        priority: jetbatch::priority::Priority::Low,
        chat: None,
    };
    hex(&job.cache_key())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Typed inputs written out: the key covers their canonical (MessagePack) form.
#[test]
fn cache_keys_of_typed_inputs_are_unchanged() {
    let tensor = JobInput::Tensor(vec![TensorData::from((&[1.0f32, -2.0, 0.5][..], vec![3]))]);
    let score = serde_json::from_value::<JobInput>(json!({"Score": [{"context": [0, 5], "continuation": [6, 7]}]})).unwrap();
    let generate = serde_json::from_value::<JobInput>(json!({"Generate": {
        "prompt": [0, 104, 105], "max_new_tokens": 8,
        "sampling": {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3},
        "stop": ["\n"], "stop_token_ids": [1]
    }}))
    .unwrap();
    let encode = JobInput::Encode { ids: vec![101, 7592, 102], type_ids: vec![0, 0, 0], normalize: true };
    let got = [
        key_of(JobKind::Tensor, tensor),
        key_of(JobKind::Loglikelihood, score.clone()),
        key_of(JobKind::LoglikelihoodRolling, score),
        key_of(JobKind::Generate, generate),
        key_of(JobKind::Embed, encode.clone()),
        key_of(JobKind::Classify, encode),
    ];
    assert_eq!(got, TYPED, "cache keys changed: {got:#?}");
}

const TYPED: [&str; 6] = [
    "aae5ccb0b6348851e42a3d7b06017dbb9c134a1ab1774e9a3aa60017e346aabe",
    "bb9a19eba47c57a63c02e530c5eb4a43a14e9d8405d7d304b52a530fea6e48a8",
    "db2b5c1b5f22cf30e54df7ae22a46aa15878d9c98172060977db34513080dab1",
    "cfb39fd12f41575aa92df7025ab7d7d7f4ec17b886a5c704ab5ecb9b14427191",
    "b5b5736216590ab7f4b354acd4e68b81400c13f890ff9351c05380699b0b64d7",
    "5b481d261ca10f006f3c76792ec8e8cb462e5c75035438a225257545370ae320",
];

/// Jobs as producers send them, parsed by the demo models: parsing must yield the same typed input.
#[test]
fn cache_keys_of_parsed_jobs_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    jetbatch_testkit::write_fixture_models(dir.path()).unwrap();
    let limits = Limits::new(1 << 20, 1 << 20);
    let key = |model: &str, doc: serde_json::Value| {
        let spec = ModelPlan::load(&dir.path().join(model)).unwrap();
        let env = decode(doc.to_string().as_bytes(), None, model, &limits).unwrap();
        let mut job = spec.validate(env, 1 << 20).unwrap();
        job.fingerprint = Arc::from("fp-0123456789abc");
        hex(&job.cache_key())
    };
    let x: Vec<f32> = (0..16).map(|i| i as f32 / 10.0).collect();
    let got = [
        key("mlp", json!({"id": "a", "model": "mlp", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": x}]}})),
        key("tiny-lm", json!({"id": "b", "model": "tiny-lm", "kind": "generate", "input": {"prompt": "jetbatch says"}, "params": {"max_new_tokens": 12}})),
        key("tiny-lm", json!({"id": "c", "model": "tiny-lm", "kind": "generate", "input": {"prompt_tokens": [5, 6, 7]},
            "params": {"max_new_tokens": 4, "temperature": 0.5, "top_k": 3, "top_p": 0.5, "seed": 9, "stop": ["x"], "stop_token_ids": [2], "stream": true}})),
        key("tiny-lm", json!({"id": "d", "model": "tiny-lm", "kind": "generate", "input": {"prompt": "hi"}, "params": {"top_k": 3, "seed": 9}})),
        key("tiny-lm", json!({"id": "e", "model": "tiny-lm", "kind": "loglikelihood", "input": {"context": "the quick brown ", "continuation": "fox"}})),
        key("tiny-lm", json!({"id": "f", "model": "tiny-lm", "kind": "loglikelihood", "input": {"context_tokens": [], "continuation_tokens": [5, 6]}})),
        key("tiny-lm", json!({"id": "g", "model": "tiny-lm", "kind": "loglikelihood_rolling", "input": {"text": "the quick brown fox ".repeat(30)}})),
    ];
    assert_eq!(got, PARSED, "cache keys changed: {got:#?}");
}

const PARSED: [&str; 7] = [
    "942e592aea0b95a1761f8d142d74794bfa560c168661ce572a5882075144a181",
    "ceee934012507784393d75f90078b972cc106fb4d1ccc7a7206d36e878b5565f",
    "a45429aee4c2d6d5f1c312f5cc149dd0656ab26b6913d2d10c59783be6819709",
    "f1633caac20cbd3a706917b8a191890dedc89b55172e77b059c327b9db6f3d3f",
    "affbbb3f58f75108ca6c91a97d905e5e8b931227eb88ddef7c8b554bcaaede98",
    "8ac192cb32292cb2459644014f20e814c767f5165dad25397f6f997950a38648",
    "7590e2fec62fa6bd7174492b3c5c81e86555f752534af5c29dc42146cc191d2f",
];
