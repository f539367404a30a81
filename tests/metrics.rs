//! Metrics stay bounded and say what went wrong: a flood of jobs naming made-up models adds no
//! series (on `/metrics` nor in the bus snapshots), and error results are counted by their wire
//! error code.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use jetbatch::job::Encoding;
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);

/// The next snapshot on `sub` in which `ready` holds.
async fn snapshot_where(sub: &mut async_nats::Subscriber, ready: impl Fn(&Value) -> bool) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("a snapshot").unwrap();
        let snap: Value = serde_json::from_slice(&msg.payload).unwrap();
        if ready(&snap) {
            return snap;
        }
    }
}

/// Every `(family, sorted labels)` of a snapshot.
fn series(snap: &Value) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for (name, family) in snap["metrics"].as_object().unwrap() {
        for s in family["series"].as_array().unwrap() {
            all.insert(format!("{name}{}", s["labels"]));
        }
    }
    all
}

fn answered(snap: &Value) -> f64 {
    snap["metrics"]["jetbatch_jobs_total"]["series"].as_array().map_or(0.0, |s| s.iter().map(|s| s["value"].as_f64().unwrap()).sum())
}

fn ghost(id: &str, model: &str) -> rmpv::Value {
    tensor_job(id, model, &[mlp_input(1)], Encoding::MsgPack)
}

#[tokio::test]
async fn made_up_model_names_add_no_series_and_errors_are_counted_by_code() {
    let h = Harness::new().await;
    let w = h.worker("w1", &[]);
    let mut snapshots = h.client.subscribe("jetbatch.metrics.w1").await.unwrap();
    let mut sub = h.subscribe_results().await;
    // One of each: an answer, an unknown model, a bad request.
    let bad = |id: &str| {
        let rmpv::Value::Map(mut m) = tensor_job(id, "mlp", &[mlp_input(2)], Encoding::MsgPack) else { unreachable!() };
        m.push(("deadline".into(), "soon".into()));
        rmpv::Value::Map(m)
    };
    burst(&h, &[tensor_job("ok-0", "mlp", &[mlp_input(0)], Encoding::MsgPack), ghost("ghost-0", "ghost-0"), bad("bad-0")]).await;
    collect(&mut sub, 3, MINUTE).await;
    let before = snapshot_where(&mut snapshots, |s| answered(s) == 3.0).await;
    let text_before = w.http_get("/metrics").await;

    // A flood: 100 made-up model names, more bad requests and answers.
    let mut flood: Vec<rmpv::Value> = (1..=100).map(|i| ghost(&format!("ghost-{i}"), &format!("made-up-{i}"))).collect();
    flood.extend((1..=5).map(|i| bad(&format!("bad-{i}"))));
    flood.extend((1..=5).map(|i| tensor_job(&format!("ok-{i}"), "mlp", &[mlp_input(i)], Encoding::MsgPack)));
    burst(&h, &flood).await;
    let results = collect(&mut sub, flood.len(), MINUTE).await;
    assert_eq!(results["ghost-7"][0].error.as_ref().unwrap().code, jetbatch::job::ErrorCode::UnknownModel);
    let after = snapshot_where(&mut snapshots, |s| answered(s) == 113.0).await;

    assert_eq!(series(&after), series(&before), "the same series, only their values grew");
    let models: BTreeSet<&str> = after["metrics"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|f| f["series"].as_array().unwrap())
        .filter_map(|s| s["labels"]["model"].as_str())
        .collect();
    assert_eq!(models, BTreeSet::from(["mlp", "unknown"]), "model labels name served models only");
    let text = w.http_get("/metrics").await;
    assert!(!text.contains("made-up") && !text.contains("ghost"), "{text}");
    assert_eq!(text.lines().count(), text_before.lines().count(), "no new Prometheus lines");

    let by_code = |code: &str| {
        let s = after["metrics"]["jetbatch_job_errors_total"]["series"].as_array().unwrap();
        s.iter().find(|s| s["labels"]["code"] == code).map_or(0.0, |s| s["value"].as_f64().unwrap())
    };
    assert_eq!((by_code("unknown_model"), by_code("bad_request"), by_code("timeout")), (101.0, 6.0, 0.0));
    assert_eq!(w.metric("jetbatch_job_errors_total{code=\"unknown_model\"}").await, 101.0);
    assert_eq!(w.metric("jetbatch_jobs_total{kind=\"tensor\",model=\"unknown\",status=\"error\"}").await, 101.0);
}
