//! Priorities over a real nats-server: high jobs overtake a backlog of low ones, and the aging
//! rule keeps a low job from starving under a steady stream of high ones.

mod common;

use std::time::{Duration, Instant};

use async_nats::Subscriber;
use common::*;
use futures::StreamExt;
use jetbatch::job::{JobResult, Status};

/// Answers in the order they arrive, each with its arrival time, until `n` distinct ids came.
async fn answers(sub: &mut Subscriber, n: usize, timeout: Duration) -> Vec<(String, Instant)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen: Vec<(String, Instant)> = Vec::new();
    while seen.len() < n {
        let msg = tokio::time::timeout_at(deadline, sub.next()).await.unwrap_or_else(|_| panic!("{} of {n} answers", seen.len())).unwrap();
        let r = JobResult::decode(&msg.payload).unwrap();
        assert_eq!(r.status, Status::Ok, "{}: {:?}", r.id, r.error);
        if !seen.iter().any(|(id, _)| *id == r.id) {
            seen.push((r.id, Instant::now()));
        }
    }
    seen
}

/// The `q`-quantile (nearest rank) of some durations.
fn quantile(mut d: Vec<Duration>, q: f64) -> Duration {
    d.sort();
    d[((d.len() as f64 * q).ceil() as usize).clamp(1, d.len()) - 1]
}

#[tokio::test]
async fn a_burst_of_high_jobs_overtakes_a_backlog_of_low_ones() {
    let h = Harness::new().await;
    // About tens of milliseconds a batch of two: a backlog takes a second or more to drain.
    write_heavy_model(&h, 60, 1024, 2);
    let w = h.worker("w1", &["--max-inflight", "4", "--pull-batch", "4"]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    burst_at(&h, &heavy_jobs("backlog", 24), ".low").await;
    // Once the worker is busy with the backlog, high and low jobs are published side by side.
    let first = answers(&mut sub, 1, Duration::from_secs(60)).await;
    assert!(first[0].0.starts_with("backlog"));
    let published = Instant::now();
    let (high, low) = (heavy_jobs("high", 8), heavy_jobs("low", 8));
    for (hi, lo) in high.iter().zip(&low) {
        burst_at(&h, std::slice::from_ref(hi), ".high").await;
        burst_at(&h, std::slice::from_ref(lo), ".low").await;
    }
    let order = answers(&mut sub, 23 + 16, Duration::from_secs(120)).await;
    let position = |id: &str| order.iter().position(|(i, _)| i == id).unwrap_or_else(|| panic!("{id} not answered"));
    // Behind the high jobs: at most the low jobs the worker held when they came (its 4 permits).
    let last_high = (0..8).map(|i| position(&format!("high-{i}"))).max().unwrap();
    let low_before = order[..last_high].iter().filter(|(id, _)| !id.starts_with("high")).count();
    assert!(low_before <= 4, "{low_before} low jobs answered before the last high one: {:?}", order.iter().map(|(id, _)| id).collect::<Vec<_>>());
    // The low jobs published beside the high ones wait for the backlog before them.
    let first_low = (0..8).map(|i| position(&format!("low-{i}"))).min().unwrap();
    assert!(first_low > last_high, "a low job published with the high ones overtook one");
    let latency = |prefix: &str| (0..8).map(|i| order[position(&format!("{prefix}-{i}"))].1 - published).collect::<Vec<_>>();
    let (high, low) = (latency("high"), latency("low"));
    let (h50, h90, l50, l90) = (quantile(high.clone(), 0.5), quantile(high, 0.9), quantile(low.clone(), 0.5), quantile(low, 0.9));
    eprintln!("latency from publish: high p50 {h50:?} p90 {h90:?}; low p50 {l50:?} p90 {l90:?}");
    assert!(h90 < l50 && h50 * 2 < l50, "high p50 {h50:?} p90 {h90:?}, low p50 {l50:?} p90 {l90:?}");
    // The worker's own figures, by level.
    let count = |level: &str| format!("jetbatch_priority_latency_seconds_count{{priority=\"{level}\"}}");
    assert_eq!(w.metric(&count("high")).await, 8.0);
    assert_eq!(w.metric(&count("low")).await, 24.0 + 8.0);
    assert_eq!(w.metric(&count("normal")).await, 0.0);
}

#[tokio::test]
async fn a_steady_stream_of_high_jobs_does_not_starve_a_low_job() {
    let h = Harness::new().await;
    write_heavy_model(&h, 100, 1024, 2);
    let w = h.worker("w1", &["--max-inflight", "2", "--pull-batch", "2", "--priority-aging-secs", "0.5"]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    // High jobs come faster than the worker answers them, from before the low job until after.
    let h = std::sync::Arc::new(h);
    let producer = tokio::spawn({
        let h = h.clone();
        async move {
            for round in 0.. {
                burst_at(&h, &heavy_jobs(&format!("high-{round}"), 20), ".high").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    burst_at(&h, &heavy_jobs("low", 1), ".low").await;
    let published = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut highs_before = 0;
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next()).await.expect("the low job starved").unwrap();
        let r = JobResult::decode(&msg.payload).unwrap();
        if r.id == "low-0" {
            break;
        }
        highs_before += 1;
    }
    let waited = published.elapsed();
    let high_consumer = h.js.get_stream("JETBATCH_JOBS").await.unwrap().get_consumer::<async_nats::jetstream::consumer::pull::Config>("jetbatch-workers-high").await;
    let high_pending = high_consumer.unwrap().info().await.unwrap().num_pending;
    producer.abort();
    eprintln!("the low job was answered after {waited:?}, behind {highs_before} high answers; {high_pending} high jobs still queued");
    assert!(high_pending > 0, "the high level ran dry: the test did not hold the low job against a steady stream");
    // One aging period to be asked for, two to count as high in the worker, and a few batches.
    assert!(waited < Duration::from_secs(10), "the low job waited {waited:?}");
}

#[tokio::test]
async fn setup_migrates_a_pool_made_before_levels_and_keeps_its_queued_jobs() {
    use async_nats::jetstream::{consumer, stream};
    let h = Harness::new().await;
    // What setup made before levels: the stream on `jobs.>`, one consumer on all of it.
    let jobs = h.js.get_stream("JETBATCH_JOBS").await.unwrap();
    h.js.delete_stream("JETBATCH_JOBS").await.unwrap();
    let old = stream::Config { subjects: vec!["jetbatch.jobs.>".into()], ..jobs.cached_info().config.clone() };
    let stream = h.js.create_stream(old).await.unwrap();
    let filter = consumer::pull::Config { durable_name: Some("jetbatch-workers".into()), filter_subjects: vec!["jetbatch.jobs.>".into()], ..Default::default() };
    stream.create_consumer(filter).await.unwrap();
    burst(&h, &[tensor_job("queued-1", "mlp", &[mlp_input(1)], jetbatch::job::Encoding::MsgPack)]).await;
    let mut sub = h.subscribe_results().await;
    let _w = h.worker("w1", &[]);
    let got = answers(&mut sub, 1, Duration::from_secs(60)).await;
    assert_eq!(got[0].0, "queued-1");
    let mut subjects = h.js.get_stream("JETBATCH_JOBS").await.unwrap().info().await.unwrap().config.subjects.clone();
    subjects.sort();
    assert_eq!(subjects, ["jetbatch.jobs.*", "jetbatch.jobs.*.high", "jetbatch.jobs.*.low"]);
}
