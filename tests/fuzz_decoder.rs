//! Property tests over the job decoder and validator, MessagePack and JSON: arbitrary bytes and
//! arbitrary job-shaped documents never panic, a job decodes to the same thing in both encodings,
//! a document with one valid top-level id is answered under that id whatever else is wrong with
//! it, and error messages stay short and free of control characters. Bounded in CI;
//! `PROPTEST_CASES=200000 cargo test --test fuzz_decoder` for long runs.

use std::sync::OnceLock;

use jetbatch::job::{decode, Encoding, JobError, Limits};
use jetbatch::plan::ModelPlan;
use proptest::prelude::*;
use rmpv::Value;

static LIMITS: std::sync::LazyLock<Limits> = std::sync::LazyLock::new(|| Limits::new(1 << 16, 1 << 12));

/// Property (c): what goes back to a producer is short and safe in a header.
fn assert_bounded(error: &JobError) {
    assert!(error.message.len() <= 400, "{} bytes: {}", error.message.len(), error.message);
    assert!(!error.message.chars().any(char::is_control), "{:?}", error.message);
}

/// The demo models' specs (fixed and variable shapes), loaded once.
fn specs() -> &'static (ModelPlan, ModelPlan, tempfile::TempDir) {
    static SPECS: OnceLock<(ModelPlan, ModelPlan, tempfile::TempDir)> = OnceLock::new();
    SPECS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        jetbatch_testkit::write_fixture_models(dir.path()).unwrap();
        let mlp = ModelPlan::load(&dir.path().join("mlp")).unwrap();
        let seq = ModelPlan::load(&dir.path().join("seqproj")).unwrap();
        (mlp, seq, dir)
    })
}

/// Decode, then validate against both models: must return, never panic.
fn parse_everything(payload: &[u8], json_header: bool) {
    let ct = json_header.then_some("application/json");
    for (name, spec) in [("mlp", &specs().0), ("seqproj", &specs().1)] {
        match decode(payload, ct, name, &LIMITS) {
            Ok(env) => {
                if let Err(e) = spec.validate(env, LIMITS.max_tensor_elements) {
                    assert_bounded(&e);
                }
            }
            Err(r) => assert_bounded(&r.error),
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

/// A document written byte by byte, so it can hold what serde cannot: invalid UTF-8 strings,
/// duplicate keys, nesting deeper than any recursive encoder allows.
#[derive(Debug, Clone)]
enum Doc {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Vec<u8>),
    Bin(Vec<u8>),
    Arr(Vec<Doc>),
    Map(Vec<(Vec<u8>, Doc)>),
    /// `levels` nested arrays (or maps under key "a") around nil.
    Deep { levels: usize, maps: bool },
}

fn mp_len(out: &mut Vec<u8>, len: usize, fix: u8, fix_max: usize, m16: u8, m32: u8) {
    if len <= fix_max {
        out.push(fix | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(m16);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m32);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

fn mp_str(out: &mut Vec<u8>, s: &[u8]) {
    if s.len() <= 31 {
        out.push(0xa0 | s.len() as u8);
    } else {
        mp_len(out, s.len(), 0, 0, 0xda, 0xdb);
    }
    out.extend_from_slice(s);
}

impl Doc {
    fn msgpack(&self, out: &mut Vec<u8>) {
        match self {
            Doc::Nil => out.push(0xc0),
            Doc::Bool(b) => out.push(0xc2 | *b as u8),
            Doc::Int(i) => {
                out.push(0xd3);
                out.extend_from_slice(&i.to_be_bytes());
            }
            Doc::Float(f) => {
                out.push(0xcb);
                out.extend_from_slice(&f.to_be_bytes());
            }
            Doc::Str(s) => mp_str(out, s),
            Doc::Bin(b) => {
                mp_len(out, b.len(), 0, 0, 0xc5, 0xc6);
                out.extend_from_slice(b);
            }
            Doc::Arr(items) => {
                mp_len(out, items.len(), 0x90, 15, 0xdc, 0xdd);
                items.iter().for_each(|d| d.msgpack(out));
            }
            Doc::Map(pairs) => {
                mp_len(out, pairs.len(), 0x80, 15, 0xde, 0xdf);
                for (k, v) in pairs {
                    mp_str(out, k);
                    v.msgpack(out);
                }
            }
            Doc::Deep { levels, maps } => {
                for _ in 0..*levels {
                    out.extend_from_slice(if *maps { &[0x81, 0xa1, b'a'][..] } else { &[0x91][..] });
                }
                out.push(0xc0);
            }
        }
    }

    fn json_str(out: &mut Vec<u8>, s: &[u8]) {
        out.push(b'"');
        for &b in s {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                // Other bytes as they are, invalid UTF-8 included.
                _ => out.push(b),
            }
        }
        out.push(b'"');
    }

    fn json(&self, out: &mut Vec<u8>) {
        match self {
            Doc::Nil => out.extend_from_slice(b"null"),
            Doc::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Doc::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Doc::Float(f) if f.is_finite() => out.extend_from_slice(format!("{f:?}").as_bytes()),
            Doc::Float(_) => out.extend_from_slice(b"1e999"),
            Doc::Str(s) => Doc::json_str(out, s),
            Doc::Bin(b) => Doc::Arr(b.iter().map(|&x| Doc::Int(x as i64)).collect()).json(out),
            Doc::Arr(items) => {
                out.push(b'[');
                for (i, d) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    d.json(out);
                }
                out.push(b']');
            }
            Doc::Map(pairs) => {
                out.push(b'{');
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    Doc::json_str(out, k);
                    out.push(b':');
                    v.json(out);
                }
                out.push(b'}');
            }
            Doc::Deep { levels, maps } => {
                for _ in 0..*levels {
                    out.extend_from_slice(if *maps { b"{\"a\":" } else { b"[" });
                }
                out.extend_from_slice(b"null");
                for _ in 0..*levels {
                    out.push(if *maps { b'}' } else { b']' });
                }
            }
        }
    }
}

/// Strings, half of them with bytes that are not UTF-8 or are control characters.
fn raw_string() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z0-9_.>*-]{0,12}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..24),
        Just(b"mlp".to_vec()),
        Just(b"tensor".to_vec()),
    ]
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop_oneof![Just("model"), Just("kind"), Just("input"), Just("params"), Just("reply_to"), Just("cache"), Just("timeout_ms")]
            .prop_map(|k| k.as_bytes().to_vec()),
        raw_string(),
    ]
    .prop_filter("not the id key", |k| k != b"id")
}

fn doc() -> impl Strategy<Value = Doc> {
    let leaf = prop_oneof![
        Just(Doc::Nil),
        any::<bool>().prop_map(Doc::Bool),
        any::<i64>().prop_map(Doc::Int),
        any::<f64>().prop_map(Doc::Float),
        raw_string().prop_map(Doc::Str),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(Doc::Bin),
        (0usize..3000, any::<bool>()).prop_map(|(levels, maps)| Doc::Deep { levels, maps }),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Doc::Arr),
            // Nested maps may have their own "id": only the top level's counts.
            proptest::collection::vec((prop_oneof![Just(b"id".to_vec()), key()], inner), 0..5).prop_map(Doc::Map),
        ]
    })
}

/// A top-level map with exactly one `id`, a valid job id, among arbitrary other entries (keys
/// may repeat), plus maybe trailing bytes and (for JSON) a byte-order mark.
fn one_id_document() -> impl Strategy<Value = (String, Vec<(Vec<u8>, Doc)>, Vec<u8>, bool)> {
    let id = "[A-Za-z0-9_:-]{1,12}(\\.[A-Za-z0-9_:-]{1,12}){0,3}";
    (id, proptest::collection::vec((key(), doc()), 0..8), any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 0..4), any::<bool>())
        .prop_map(|(id, mut fields, at, trailing, bom)| {
            fields.insert(at.index(fields.len() + 1), (b"id".to_vec(), Doc::Str(id.clone().into_bytes())));
            (id, fields, trailing, bom)
        })
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

    #[test]
    fn one_valid_id_is_always_answered_under_that_id((id, fields, trailing, bom) in one_id_document()) {
        let top = Doc::Map(fields);
        let (mut msgpack, mut json) = (vec![], if bom { b"\xEF\xBB\xBF".to_vec() } else { vec![] });
        top.msgpack(&mut msgpack);
        top.json(&mut json);
        msgpack.extend_from_slice(&trailing);
        json.extend_from_slice(&trailing);
        for (payload, ct) in [(&msgpack, None), (&json, Some("application/json")), (&json, None)] {
            for model in ["mlp", "seqproj"] {
                match decode(payload, ct, model, &LIMITS) {
                    Ok(env) => prop_assert_eq!(&env.id, &id),
                    Err(r) => {
                        prop_assert_eq!(r.id.as_deref(), Some(id.as_str()), "{}", r.error.message);
                        assert_bounded(&r.error);
                    }
                }
            }
            parse_everything(payload, ct.is_some());
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
