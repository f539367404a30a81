//! The job contract at the edge, end to end against a real nats-server: payloads an attacker (or a
//! broken producer) sends still get an error result on `jetbatch.results.<id>` naming the field,
//! with a short, header-safe message; `reply_to` cannot point into the server's API or our own
//! subjects; nothing is left in the jobs stream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use jetbatch::job::{ErrorCode, Status};
use serde_json::json;

/// A MessagePack map of raw (key, encoded value) pairs, for documents serde cannot write.
fn raw_map(pairs: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![0x80 | pairs.len() as u8];
    for (k, v) in pairs {
        out.push(0xa0 | k.len() as u8);
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(v);
    }
    out
}

fn mp_str(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0xda];
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
    out
}

/// A valid `input` for mlp, as JSON and as encoded MessagePack.
fn mlp_json_input() -> serde_json::Value {
    json!({"inputs": [{"dtype": "f32", "shape": [16], "data": values(3, 16)}]})
}

fn mlp_msgpack_input() -> Vec<u8> {
    rmp_serde::to_vec_named(&mlp_json_input()).unwrap()
}

struct Case {
    id: &'static str,
    payload: Vec<u8>,
    json_header: bool,
    code: ErrorCode,
    needle: &'static str,
}

#[tokio::test]
async fn malformed_and_hostile_jobs_are_answered_under_their_id() {
    let h = Harness::new().await;
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;

    let job = |id: &str| json!({"id": id, "model": "mlp", "kind": "tensor", "input": mlp_json_input()});
    let with = |id: &str, key: &str, value: serde_json::Value| {
        let mut j = job(id);
        j[key] = value;
        j.to_string().into_bytes()
    };
    let bad = |id: &'static str, payload: Vec<u8>, json_header: bool, needle: &'static str| Case { id, payload, json_header, code: ErrorCode::BadRequest, needle };
    let deep = |levels: usize| (format!(r#"{{"x":{}{}}}"#, "[".repeat(levels), "]".repeat(levels)), [vec![0x81, 0xa1, b'x'], vec![0x91; levels], vec![0xc0]].concat());
    let (deep_json, deep_msgpack) = deep(2000);
    let good_msgpack = rmp_serde::to_vec_named(&job("c-trailing")).unwrap();
    // Under 1 MB, the test server's max_payload.
    let control: String = ['\u{1}', '\n', '\r', '\u{b}', '\u{7f}'].iter().cycle().take(900_000).collect();

    let mut cases = vec![
        bad("c-model-type", with("c-model-type", "model", json!(7)), true, "model: expected a string"),
        bad(
            "c-dup",
            format!(r#"{{"id":"c-dup","model":"mlp","model":"mlp","kind":"tensor","input":{}}}"#, mlp_json_input()).into_bytes(),
            true,
            "model: appears more than once",
        ),
        bad(
            "c-utf8",
            raw_map(&[("id", mp_str(b"c-utf8")), ("model", mp_str(b"ml\xffp")), ("kind", mp_str(b"tensor")), ("input", mlp_msgpack_input())]),
            false,
            "model: not valid UTF-8",
        ),
        bad(
            "c-deep-msgpack",
            raw_map(&[("id", mp_str(b"c-deep-msgpack")), ("model", mp_str(b"mlp")), ("kind", mp_str(b"tensor")), ("input", deep_msgpack)]),
            false,
            "input: nested deeper than",
        ),
        bad(
            "c-deep-json",
            format!(r#"{{"id":"c-deep-json","model":"mlp","kind":"tensor","input":{deep_json}}}"#).into_bytes(),
            true,
            "input: nested deeper than",
        ),
        bad("c-trailing", [good_msgpack, vec![0xc0, 0xc0]].concat(), false, "payload: 2 trailing bytes after the job"),
        // No Content-Type: the byte-order mark is recognised as JSON, and the id still read.
        bad("c-bom", [b"\xEF\xBB\xBF".to_vec(), job("c-bom").to_string().into_bytes()].concat(), false, "payload: starts with a byte-order mark"),
        bad("c-wide", with("c-wide", "cache", json!("y".repeat(70_000))), true, "cache: expected true or false"),
        bad("c-wide-params", with("c-wide-params", "params", json!("p".repeat(70_000))), true, "params: expected a map"),
        // MessagePack, so the control characters travel unescaped.
        Case {
            id: "c-control",
            payload: rmp_serde::to_vec_named(&{
                let mut j = job("c-control");
                j["kind"] = json!(control);
                j
            })
            .unwrap(),
            json_header: false,
            code: ErrorCode::UnsupportedKind,
            needle: "kind: unknown kind",
        },
        bad("c-reply-purge", with("c-reply-purge", "reply_to", json!("$JS.API.STREAM.PURGE.JETBATCH_RESULTS")), true, "reply_to: "),
        bad("c-reply-jobs", with("c-reply-jobs", "reply_to", json!("jetbatch.jobs.mlp")), true, "reply_to: "),
        bad("c-reply-dead", with("c-reply-dead", "reply_to", json!("jetbatch.dead.x")), true, "reply_to: "),
        bad("c-reply-results", with("c-reply-results", "reply_to", json!("jetbatch.results.other")), true, "reply_to: "),
        bad("c-reply-vt", with("c-reply-vt", "reply_to", json!("_INBOX.a\u{b}b")), true, "reply_to: "),
        // Unknown keys are refused, naming the key and ours where one is meant.
        bad("c-unknown-top", with("c-unknown-top", "timeout", json!(5)), true, "timeout: unknown; did you mean timeout_ms?"),
        bad("c-unknown-params", with("c-unknown-params", "params", json!({"scale": 2})), true, "params.scale: unknown; tensor jobs take no params"),
    ];
    for (i, case) in cases.iter_mut().enumerate() {
        if i == 3 {
            // A good job among the bad ones is answered as usual.
            h.publish_raw("mlp", Some("c-good"), job("c-good").to_string().into_bytes(), true).await;
        }
        h.publish_raw("mlp", Some(case.id), std::mem::take(&mut case.payload), case.json_header).await;
    }
    // A MessagePack array is not a job, not even read positionally: no id, so no answer.
    let array = rmp_serde::to_vec(&json!(["c-array", "mlp", "tensor", mlp_json_input()])).unwrap();
    h.publish_raw("mlp", Some("c-array"), array, false).await;

    let got = collect(&mut sub, cases.len() + 1, Duration::from_secs(60)).await;
    let good = got.get("c-good").expect("the good job is answered");
    assert_eq!(good[0].status, Status::Ok, "{:?}", good[0]);
    assert_eq!(good[0].output_tensors().unwrap()[0].shape, vec![4]);
    for case in &cases {
        let r = &got.get(case.id).unwrap_or_else(|| panic!("no result for {}; got {:?}", case.id, got.keys()))[0];
        assert_eq!(r.status, Status::Error, "{}", case.id);
        let err = r.error.as_ref().expect("error");
        assert_eq!(err.code, case.code, "{}: {}", case.id, err.message);
        assert!(err.message.starts_with(case.needle), "{}: {}", case.id, err.message);
        assert!(err.message.len() <= 400 && !err.message.chars().any(char::is_control), "{}: {:?}", case.id, err.message);
        assert!(r.model.len() <= 64 && r.kind.len() <= 32, "{}: unbounded model or kind in the result", case.id);
    }
    assert!(!got.contains_key("c-array"), "a top-level array was answered: {:?}", got.get("c-array"));

    // Nothing is left in (or re-enqueued into) the jobs stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = h.stream_messages("JETBATCH_JOBS").await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} messages left in JETBATCH_JOBS");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
