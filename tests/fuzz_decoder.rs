//! Property tests over the job decoder and validator, MessagePack and JSON: arbitrary bytes and
//! arbitrary job-shaped documents never panic, and a job decodes to the same thing in both
//! encodings. Bounded in CI; `PROPTEST_CASES=200000 cargo test --test fuzz_decoder` for long runs.

use std::sync::OnceLock;

use jetbatch::job::{decode, Encoding, Limits};
use jetbatch::repository::ModelSpec;
use proptest::prelude::*;
use rmpv::Value;

const LIMITS: Limits = Limits { max_payload_bytes: 1 << 16, max_tensor_elements: 1 << 12 };

/// The demo models' specs (fixed and variable shapes), loaded once.
fn specs() -> &'static (ModelSpec, ModelSpec, tempfile::TempDir) {
    static SPECS: OnceLock<(ModelSpec, ModelSpec, tempfile::TempDir)> = OnceLock::new();
    SPECS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        jetbatch::demo::write_demo_models(dir.path()).unwrap();
        let mlp = ModelSpec::load(&dir.path().join("mlp")).unwrap();
        let seq = ModelSpec::load(&dir.path().join("seqproj")).unwrap();
        (mlp, seq, dir)
    })
}

/// Decode, then validate against both models: must return, never panic.
fn parse_everything(payload: &[u8], json_header: bool) {
    let ct = json_header.then_some("application/json");
    for (name, spec) in [("mlp", &specs().0), ("seqproj", &specs().1)] {
        if let Ok(env) = decode(payload, ct, name, &LIMITS) {
            let _ = spec.validate(env, LIMITS.max_tensor_elements);
        }
    }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Boolean),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z0-9_.>*-]{0,12}".prop_map(Value::from),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Value::Binary),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec(("[a-z_]{1,8}".prop_map(Value::from), inner), 0..6).prop_map(Value::Map),
        ]
    })
}

/// A tensor-ish map: plausible dtypes and shapes, data of the right or wrong size.
fn tensor() -> impl Strategy<Value = Value> {
    let dtype = prop_oneof![Just("f32"), Just("f64"), Just("f16"), Just("bf16"), Just("i64"), Just("i32"), Just("u8"), Just("bool"), Just("f8")];
    let shape = proptest::collection::vec(0u64..20, 0..4);
    (dtype, shape, any::<bool>(), proptest::collection::vec(-3.0f64..3.0, 0..200)).prop_map(|(dtype, shape, binary, numbers)| {
        let data = if binary {
            Value::Binary(numbers.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect())
        } else {
            Value::Array(numbers.into_iter().map(Value::from).collect())
        };
        Value::Map(vec![
            ("dtype".into(), dtype.into()),
            ("shape".into(), Value::Array(shape.into_iter().map(Value::from).collect())),
            ("data".into(), data),
        ])
    })
}

/// A job-shaped document with each field sometimes missing or of the wrong type.
fn job() -> impl Strategy<Value = Value> {
    let id = prop_oneof!["[A-Za-z0-9_:.-]{1,20}".prop_map(Value::from), value()];
    let model = prop_oneof![Just(Value::from("mlp")), Just(Value::from("seqproj")), value()];
    let kind = prop_oneof![Just(Value::from("tensor")), Just(Value::from("generate")), value()];
    let input = prop_oneof![
        proptest::collection::vec(tensor(), 0..3).prop_map(|ts| Value::Map(vec![("inputs".into(), Value::Array(ts))])),
        value(),
    ];
    (id, model, kind, input, proptest::option::of(value()), proptest::collection::vec(any::<bool>(), 4)).prop_map(
        |(id, model, kind, input, extra, keep)| {
            let mut fields: Vec<(Value, Value)> = vec![];
            for (k, (name, v)) in keep.iter().zip([("id", id), ("model", model), ("kind", kind), ("input", input)]) {
                if *k || name == "input" {
                    fields.push((name.into(), v));
                }
            }
            if let Some(extra) = extra {
                fields.push(("params".into(), extra));
            }
            Value::Map(fields)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), json in any::<bool>()) {
        parse_everything(&bytes, json);
        // Also as the tail of a JSON object, to get past the first-byte check.
        let mut obj = b"{".to_vec();
        obj.extend_from_slice(&bytes);
        parse_everything(&obj, json);
    }

    #[test]
    fn job_shaped_documents_never_panic_and_both_encodings_agree(doc in job()) {
        let msgpack = rmp_serde::to_vec_named(&doc).unwrap();
        parse_everything(&msgpack, false);
        let Ok(json) = serde_json::to_vec(&doc) else { return Ok(()) };
        parse_everything(&json, true);
        // Where both decode and validate, they mean the same job (the cache key says so). JSON
        // has no binary type, so only documents without binary data are comparable.
        if !format!("{doc:?}").contains("Binary") {
            for (name, spec) in [("mlp", &specs().0), ("seqproj", &specs().1)] {
                let a = decode(&msgpack, None, name, &LIMITS).ok().and_then(|e| spec.validate(e, LIMITS.max_tensor_elements).ok());
                let b = decode(&json, Some("application/json"), name, &LIMITS).ok().and_then(|e| spec.validate(e, LIMITS.max_tensor_elements).ok());
                if let (Some(a), Some(b)) = (a, b) {
                    prop_assert_eq!(a.cache_key(), b.cache_key());
                    prop_assert_eq!((a.encoding, b.encoding), (Encoding::MsgPack, Encoding::Json));
                }
            }
        }
    }
}

#[test]
fn a_generated_valid_job_is_accepted() {
    // Guards the generators: a well-formed job passes decode and validation.
    let data: Vec<Value> = (0..16).map(|i| Value::from(i as f64 / 8.0)).collect();
    let doc = Value::Map(vec![
        ("id".into(), "ok-1".into()),
        ("model".into(), "mlp".into()),
        ("kind".into(), "tensor".into()),
        (
            "input".into(),
            Value::Map(vec![(
                "inputs".into(),
                Value::Array(vec![Value::Map(vec![
                    ("dtype".into(), "f32".into()),
                    ("shape".into(), Value::Array(vec![16.into()])),
                    ("data".into(), Value::Array(data)),
                ])]),
            )]),
        ),
    ]);
    let bytes = rmp_serde::to_vec_named(&doc).unwrap();
    let job = specs().0.validate(decode(&bytes, None, "mlp", &LIMITS).unwrap(), LIMITS.max_tensor_elements).unwrap();
    assert_eq!(job.cost, 16);
}
