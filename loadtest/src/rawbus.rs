//! The bus alone: a worker that does what jetbatch does on the bus and nothing else. It pulls jobs
//! from the same kind of durable consumer (batches of `pull_batch`, at most `max_inflight` held),
//! publishes a result of the same size to the results stream with `Nats-Msg-Id`, awaits the
//! server's ack, and only then acks the job. No decoding, no cache, no model: its rate is the
//! ceiling jetbatch's cache-hit path is measured against.

use std::future::IntoFuture;

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use jetbatch::config::Topology;

/// Runs until `stop` fires. Every job is answered with a result shaped like jetbatch's answer
/// to an `mlp` job (four f32s, `cached: true`); the job id comes from the `Nats-Msg-Id` header, as
/// the producer set it.
pub async fn serve(url: String, topology: Topology, max_inflight: usize, pull_batch: usize, stop: tokio::sync::oneshot::Receiver<()>) -> anyhow::Result<()> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let consumer = jetbatch::bus::setup_consumer(&js, &topology).await?.get(jetbatch::priority::Priority::Normal).clone();
    let mut messages = consumer.stream().max_messages_per_batch(pull_batch).messages().await?;
    let tail = bytes::Bytes::from(result_fields());
    let mut inflight = FuturesUnordered::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(done) = inflight.next(), if !inflight.is_empty() => { let _: anyhow::Result<()> = done; done?; }
            msg = messages.next(), if inflight.len() < max_inflight => {
                let Some(msg) = msg else { break };
                let msg = msg.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
                let js = js.clone();
                let tail = tail.clone();
                let subject_prefix = format!("{}.results.", topology.prefix);
                inflight.push(async move {
                    let id = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_string()).unwrap_or_default();
                    let mut headers = HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    headers.insert("Content-Type", "application/msgpack");
                    let body = result_body(&id, &tail);
                    js.publish_with_headers(format!("{subject_prefix}{id}"), headers, body.into()).await?.into_future().await?;
                    msg.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                    Ok(())
                });
            }
        }
    }
    Ok(())
}

/// The result's fields after `id`, encoded once.
fn result_fields() -> Vec<u8> {
    use rmpv::Value;
    let map = |f: Vec<(&str, Value)>| Value::Map(f.into_iter().map(|(k, v)| (k.into(), v)).collect());
    let tensor = map(vec![("dtype", "f32".into()), ("shape", Value::Array(vec![4.into()])), ("data", Value::Binary(vec![0; 16]))]);
    let timing = map(vec![("queued_ms", 0.1.into()), ("compute_ms", 0.0.into()), ("batch_size", 0.into())]);
    let mut out = Vec::new();
    for (k, v) in [
        ("model", "mlp".into()),
        ("kind", "tensor".into()),
        ("status", "ok".into()),
        ("output", map(vec![("outputs", Value::Array(vec![tensor]))])),
        ("cached", true.into()),
        ("worker", "raw-bus".into()),
        ("timing", timing),
    ] {
        rmpv::encode::write_value(&mut out, &Value::from(k)).expect("vec write");
        rmpv::encode::write_value(&mut out, &v).expect("vec write");
    }
    out
}

/// `{id, …fields}` as a MessagePack map.
fn result_body(id: &str, fields: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.len() + id.len() + 8);
    rmp::encode::write_map_len(&mut out, 8).expect("vec write");
    rmp::encode::write_str(&mut out, "id").expect("vec write");
    rmp::encode::write_str(&mut out, id).expect("vec write");
    out.extend_from_slice(fields);
    out
}
