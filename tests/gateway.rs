//! `jetbatch gateway` against a real nats-server and worker: OpenAI requests over HTTP answered
//! with the values the native path (the same jobs published on the bus) gives — completions with
//! echo + logprobs summing to the native `loglikelihood`, generations, chat (streamed and not),
//! embeddings —, errors in OpenAI's shape with their statuses, API keys, metrics, and a stream
//! whose worker dies mid-generation ending with an error event instead of hanging.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use jetbatch::job::{Encoding, JobResult, Status};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "sk-test-1";

/// A running gateway process; killed on drop.
struct Gateway {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer: status, headers (lower-case names) and body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl Gateway {
    async fn start(h: &Harness, extra: &[&str]) -> Gateway {
        Gateway::start_on(&h.url(), h.dir.path(), extra).await
    }

    async fn start_on(url: &str, dir: &std::path::Path, extra: &[&str]) -> Gateway {
        let port = free_port();
        let log = dir.join(format!("gateway-{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
            .args(["gateway", "--nats-url", url, "--addr", &format!("127.0.0.1:{port}"), "--api-keys", KEY, "--models-ttl-secs", "1"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let g = Gateway { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while g.raw("GET", "/healthz", None, &[]).await.map(|a| a.status) != Some(200) {
            assert!(Instant::now() < deadline, "gateway not up: {}", std::fs::read_to_string(&g.log).unwrap_or_default());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        g
    }

    /// One HTTP/1.0 exchange (the body runs to the end of the connection).
    async fn raw(&self, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Option<Answer> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        Some(parse(&String::from_utf8_lossy(&out)))
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.raw("POST", path, Some(&body), &[("Authorization", &format!("Bearer {KEY}"))]).await.expect("gateway answers")
    }

    /// Waits until `/v1/models` lists `model` (the worker has registered).
    async fn wait_for_model(&self, model: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let a = self.raw("GET", "/v1/models", None, &[("Authorization", &format!("Bearer {KEY}"))]).await.unwrap();
            if a.status == 200 && a.json()["data"].as_array().unwrap().iter().any(|m| m["id"] == model) {
                return;
            }
            assert!(Instant::now() < deadline, "model {model} never listed: {} {}", a.status, a.body);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A persistent HTTP/1.1 connection to a gateway, as the OpenAI SDKs' pools hold them: one
/// exchange at a time, each answer read to its `Content-Length` (the gateway's JSON answers have
/// one), and the connection used again.
struct KeepAlive {
    conn: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl KeepAlive {
    async fn connect(g: &Gateway) -> KeepAlive {
        KeepAlive { conn: tokio::io::BufReader::new(tokio::net::TcpStream::connect(("127.0.0.1", g.port)).await.unwrap()) }
    }

    async fn post(&mut self, path: &str, body: &Value) -> Answer {
        use tokio::io::AsyncBufReadExt;
        let body = body.to_string();
        let req = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        self.conn.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            assert!(self.conn.read_line(&mut head).await.unwrap() > 0, "the gateway closed a kept-alive connection after: {head:?}");
        }
        let mut answer = parse(&head);
        let len: usize = answer.header("content-length").and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("no content-length: {head}"));
        assert_ne!(answer.header("connection"), Some("close"), "{head}");
        let mut body = vec![0; len];
        self.conn.read_exact(&mut body).await.unwrap();
        answer.body = String::from_utf8(body).unwrap();
        answer
    }
}

fn parse(text: &str) -> Answer {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines.filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect();
    Answer { status, headers, body: body.to_string() }
}

/// The `data:` payloads of a server-sent-events body.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

/// The `choices[0]` of a 200 stream's events, up to `[DONE]`.
fn streamed_choices(a: &Answer) -> Vec<Value> {
    assert_eq!((a.status, a.header("content-type")), (200, Some("text/event-stream")), "{}", a.body);
    let events = events(&a.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", a.body);
    events[..events.len() - 1].iter().map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0].clone()).collect()
}

/// A job published natively (JSON) and its result.
async fn native(h: &Harness, id: &str, model: &str, kind: &str, input: Value, params: Value) -> JobResult {
    let mut sub = h.client.subscribe(format!("jetbatch.results.{id}")).await.unwrap();
    h.client.flush().await.unwrap();
    h.publish(&rmpv::ext::to_value(json!({"id": id, "model": model, "kind": kind, "input": input, "params": params})).unwrap(), Encoding::Json).await;
    let msg = tokio::time::timeout(Duration::from_secs(60), sub.next()).await.expect("native result").unwrap();
    JobResult::decode(&msg.payload).unwrap()
}

fn output(r: &JobResult) -> Value {
    assert_eq!(r.status, Status::Ok, "{r:?}");
    serde_json::to_value(r.output.as_ref().unwrap()).unwrap()
}

/// The fixture's tiny decoder, and beside it the same files with a chat template (`chat-lm`) and
/// the demo embedder (`minilm`).
async fn harness() -> Harness {
    let h = Harness::new().await;
    let chat = h.models.join("chat-lm");
    std::fs::create_dir_all(&chat).unwrap();
    for file in ["config.json", "tokenizer.json", "model.safetensors", "jetbatch.toml"] {
        std::os::unix::fs::symlink(h.models.join("tiny-lm").join(file), chat.join(file)).unwrap();
    }
    let template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";
    std::fs::write(chat.join("tokenizer_config.json"), json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}).to_string()).unwrap();
    jetbatch::demo::write_demo_models(&h.models).unwrap();
    h
}

/// `text` as the fixture decoder's tokenizer encodes it (no special tokens).
fn tokens(h: &Harness, text: &str) -> Vec<u64> {
    let tok = tokenizers::Tokenizer::from_file(h.models.join("tiny-lm/tokenizer.json")).unwrap();
    tok.encode(text, false).unwrap().get_ids().iter().map(|&t| t as u64).collect()
}

#[tokio::test]
async fn completions_chat_and_embeddings_equal_the_native_path() {
    let h = harness().await;
    let _w = h.worker("w1", &[]);
    let g = Gateway::start(&h, &[]).await;
    g.wait_for_model("tiny-lm").await;

    // lm-eval's local-completions loglikelihood: context + continuation as token ids, echo,
    // max_tokens 1, logprobs 1; it sums token_logprobs[ctxlen:-1].
    let (context, continuation) = (tokens(&h, "The quick brown"), tokens(&h, " fox jumps"));
    let prompt: Vec<u64> = context.iter().chain(&continuation).copied().collect();
    let a = g.post("/v1/completions", json!({"model": "tiny-lm", "prompt": [prompt], "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0, "seed": 1234})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let choice = &a.json()["choices"][0];
    let lp = choice["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), prompt.len() + 1, "every prompt token and the generated one: {choice}");
    assert!(lp[0].is_null(), "the first token has no log-prob");
    let summed: f64 = lp[context.len()..lp.len() - 1].iter().map(|v| v.as_f64().unwrap()).sum();
    let top = &choice["logprobs"]["top_logprobs"].as_array().unwrap()[context.len()..lp.len() - 1];
    let greedy = lp[context.len()..lp.len() - 1].iter().zip(top).all(|(l, t)| {
        let best = t.as_object().unwrap().values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        l.as_f64().unwrap() == best
    });
    let want = output(&native(&h, "n-ll", "tiny-lm", "loglikelihood", json!({"context_tokens": context, "continuation_tokens": continuation}), json!({})).await);
    let native_lp = want["logprob"].as_f64().unwrap();
    eprintln!("FIGURES echo loglikelihood: gateway {summed} native {native_lp} diff {:e}", (summed - native_lp).abs());
    assert!((summed - native_lp).abs() <= 1e-4 * native_lp.abs().max(1.0), "gateway {summed} vs native {native_lp}");
    assert_eq!(greedy, want["is_greedy"].as_bool().unwrap());
    // max_tokens 0 with echo: only the prompt's tokens.
    let a = g.post("/v1/completions", json!({"model": "tiny-lm", "prompt": prompt, "echo": true, "max_tokens": 0, "logprobs": 2})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let body = a.json();
    assert_eq!(body["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().len(), prompt.len());
    assert_eq!(body["choices"][0]["logprobs"]["top_logprobs"][3].as_object().unwrap().len(), 2, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], prompt.len());

    // A generation: the same text and tokens as the native generate job.
    let a = g.post("/v1/completions", json!({"model": "tiny-lm", "prompt": ["Once upon", "a time"], "max_tokens": 8, "temperature": 0})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let body = a.json();
    let mut generated = 0;
    for (i, prompt) in ["Once upon", "a time"].iter().enumerate() {
        let want = output(&native(&h, &format!("n-gen-{i}"), "tiny-lm", "generate", json!({"prompt": prompt}), json!({"max_new_tokens": 8, "temperature": 0})).await);
        assert_eq!(body["choices"][i]["text"], want["text"], "{body}");
        assert_eq!(body["choices"][i]["index"], i);
        generated += want["tokens"].as_array().unwrap().len();
    }
    assert_eq!(body["usage"]["completion_tokens"], generated, "{body}");

    // Chat: rendered by the worker's template; streamed text equals the whole answer.
    let messages = json!([{"role": "user", "content": "hello"}]);
    let want = output(&native(&h, "n-chat", "chat-lm", "generate", json!({"messages": messages}), json!({"max_new_tokens": 12})).await);
    let a = g.post("/v1/chat/completions", json!({"model": "chat-lm", "messages": messages, "max_tokens": 12, "logprobs": true, "top_logprobs": 2})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let body = a.json();
    assert_eq!(body["choices"][0]["message"]["content"], want["text"]);
    assert_eq!(body["usage"]["prompt_tokens"], want["prompt_tokens"]);
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), want["tokens"].as_array().unwrap().len());
    assert!(content.iter().all(|t| t["logprob"].is_number() && t["top_logprobs"].as_array().unwrap().len() == 2), "greedy tokens are their position's top: {body}");
    let a = g.post("/v1/chat/completions", json!({"model": "chat-lm", "messages": messages, "max_tokens": 12, "stream": true})).await;
    assert_eq!((a.status, a.header("content-type")), (200, Some("text/event-stream")), "{}", a.body);
    let events = events(&a.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", a.body);
    let streamed: String = events.iter().filter_map(|e| serde_json::from_str::<Value>(e).ok()).filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(streamed, want["text"].as_str().unwrap());
    assert!(events.len() >= 3, "text arrives in pieces: {events:?}");
    // Streamed with logprobs (computed again, not the cache's): each event has its tokens', and
    // together they are the unstreamed answer's.
    let content = content.clone();
    let a = g.post("/v1/chat/completions", json!({"model": "chat-lm", "messages": messages, "max_tokens": 12, "logprobs": true, "top_logprobs": 2, "stream": true, "cache": false})).await;
    let chunks = streamed_choices(&a);
    let pieces: Vec<&Vec<Value>> = chunks.iter().filter_map(|c| c["logprobs"]["content"].as_array()).collect();
    assert!(pieces.len() >= 3, "in pieces: {}", a.body);
    assert_eq!(pieces.into_iter().flatten().cloned().collect::<Vec<Value>>(), content, "{}", a.body);
    // The same for a streamed completion: tokens, log-probs, top log-probs and text offsets.
    let body = json!({"model": "tiny-lm", "prompt": "Once upon", "max_tokens": 8, "temperature": 0, "logprobs": 2});
    let a = g.post("/v1/completions", body.clone()).await;
    let want = a.json()["choices"][0]["logprobs"].clone();
    let mut streamed = body;
    streamed["stream"] = true.into();
    streamed["cache"] = false.into();
    let chunks = streamed_choices(&g.post("/v1/completions", streamed).await);
    for field in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        let got: Vec<Value> = chunks.iter().filter_map(|c| c["logprobs"][field].as_array()).flatten().cloned().collect();
        assert_eq!(Value::from(got), want[field], "{field}: {chunks:?}");
    }

    // Embeddings: the native embed's vectors, as floats and as base64.
    let a = g.post("/v1/embeddings", json!({"model": "minilm", "input": ["a cat", "a dog"]})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let body = a.json();
    let want = output(&native(&h, "n-emb", "minilm", "embed", json!({"text": "a dog"}), json!({})).await);
    // Batched with another text (padded) or alone: equal within float noise.
    let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<f64>>();
    assert_close(&floats(&body["data"][1]["embedding"]), &floats(&want["embedding"]), 1e-5, "embedding");
    assert_eq!(body["data"][1]["index"], 1);
    // usage: the tokens the model read, [CLS] and [SEP] included, as its tokenizer counts them.
    // (The file pads every encoding to 128; the worker reads the text's tokens only.)
    let mut tok = tokenizers::Tokenizer::from_file(h.models.join("minilm/tokenizer.json")).unwrap();
    tok.with_padding(None);
    let read = |text: &str| tok.encode(text, true).unwrap().len() as u64;
    let usage = (body["usage"]["prompt_tokens"].as_u64(), body["usage"]["total_tokens"].as_u64());
    assert_eq!(usage, (Some(read("a cat") + read("a dog")), Some(read("a cat") + read("a dog"))), "{}", body["usage"]);
    assert_eq!((want["tokens"].as_u64(), read("a dog")), (Some(4), 4), "[CLS] a dog [SEP]");
    let a = g.post("/v1/embeddings", json!({"model": "minilm", "input": "a dog", "encoding_format": "base64"})).await;
    let encoded = a.json()["data"][0]["embedding"].as_str().unwrap().to_string();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
    let decoded: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let decoded: Vec<f64> = decoded.into_iter().map(f64::from).collect();
    assert_close(&decoded, &floats(&want["embedding"]), 1e-5, "base64 embedding");

    // The metrics counted them by route and status.
    let m = g.raw("GET", "/metrics", None, &[]).await.unwrap().body;
    assert!(m.contains("jetbatch_gateway_requests_total{route=\"chat\",status=\"200\"} 3"), "{m}");
    assert!(m.contains("jetbatch_gateway_in_flight{route=\"completions\"} 0"), "{m}");
}

#[tokio::test]
async fn bad_requests_get_openai_errors_naming_the_field() {
    let h = harness().await;
    let _w = h.worker("w1", &[]);
    let g = Gateway::start(&h, &["--max-body-bytes", "4096"]).await;
    g.wait_for_model("tiny-lm").await;
    let error = |a: &Answer| a.json()["error"].clone();
    // Refused by the worker, named by the request's field; all on one kept-alive connection.
    let mut conn = KeepAlive::connect(&g).await;
    for (body, param) in [
        (json!({"model": "tiny-lm", "prompt": "x", "frequency_penalty": 0.5}), "frequency_penalty"),
        (json!({"model": "tiny-lm", "prompt": "x", "max_tokens": "many"}), "max_tokens"),
        (json!({"model": "tiny-lm", "prompt": "x", "temperature": -1}), "temperature"),
        (json!({"model": "tiny-lm", "prompt": "x", "n": 2}), "n"),
        (json!({"model": "tiny-lm", "prompt": {"text": "x"}}), "prompt"),
        (json!({"model": "tiny-lm", "prompt": "x", "echo": true, "logprobs": 1}), "prompt"),
        (json!({"model": "tiny-lm", "prompt": "x", "priority": "urgent"}), "priority"),
    ] {
        let a = conn.post("/v1/completions", &body).await;
        assert_eq!((a.status, error(&a)["param"].as_str()), (400, Some(param)), "{body}: {}", a.body);
        assert_eq!(error(&a)["type"], "invalid_request_error");
        assert!(error(&a)["message"].as_str().unwrap().starts_with(&format!("{param}: ")), "{}", a.body);
    }
    let a = g.post("/v1/chat/completions", json!({"model": "tiny-lm", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(a.status, 400, "a model without a chat template: {}", a.body);
    assert_eq!(error(&a)["param"], "messages", "{}", a.body);
    let a = g.post("/v1/embeddings", json!({"model": "tiny-lm", "input": "x"})).await;
    assert_eq!((a.status, error(&a)["code"].as_str()), (400, Some("unsupported_kind")), "{}", a.body);
    // Unknown model: 404 before anything is published. Counted by the stream's last sequence:
    // its message count drops when the worker acks the jobs above, which it does after their
    // results (the gateway's answers) are out, so it may still fall between the two reads.
    let published = || async { h.stream_state(&h.topology.jobs_stream).await.last_sequence };
    let before = published().await;
    let a = g.post("/v1/completions", json!({"model": "no-such-model", "prompt": "x"})).await;
    assert_eq!((a.status, error(&a)["code"].as_str(), error(&a)["param"].as_str()), (404, Some("model_not_found"), Some("model")), "{}", a.body);
    assert_eq!(published().await, before, "nothing published");
    // The door: key, body size, JSON, route.
    let a = g.raw("POST", "/v1/completions", Some(&json!({"model": "tiny-lm", "prompt": "x"})), &[("Authorization", "Bearer wrong")]).await.unwrap();
    assert_eq!((a.status, error(&a)["type"].as_str()), (401, Some("authentication_error")));
    let a = g.post("/v1/completions", json!({"model": "tiny-lm", "prompt": "x".repeat(5000)})).await;
    assert_eq!(a.status, 413, "{}", a.body);
    let a = g.raw("POST", "/v1/completions", None, &[("Authorization", &format!("Bearer {KEY}"))]).await.unwrap();
    assert_eq!((a.status, error(&a)["param"].as_str()), (400, Some("body")), "{}", a.body);
    let a = g.post("/v1/nothing", json!({})).await;
    assert_eq!(a.status, 404);
    // A deadline already past: the worker answers `timeout` unstarted, a 504 with Retry-After.
    let a = g.post("/v1/completions", json!({"model": "tiny-lm", "prompt": "x", "deadline": "2020-01-01T00:00:00Z"})).await;
    assert_eq!((a.status, a.header("retry-after")), (504, Some("5")), "{}", a.body);
}

#[tokio::test]
async fn no_worker_is_a_503_with_retry_after() {
    let h = harness().await;
    let g = Gateway::start(&h, &[]).await;
    let a = g.post("/v1/completions", json!({"model": "tiny-lm", "prompt": "x"})).await;
    assert_eq!((a.status, a.header("retry-after")), (503, Some("5")), "{}", a.body);
    assert_eq!(a.json()["error"]["code"], "no_worker");
    // Past --max-concurrent requests in flight (none here): 429 with Retry-After.
    let full = Gateway::start(&h, &["--max-concurrent", "0"]).await;
    let a = full.post("/v1/completions", json!({"model": "tiny-lm", "prompt": "x"})).await;
    assert_eq!((a.status, a.header("retry-after")), (429, Some("1")), "{}", a.body);
    assert_eq!(a.json()["error"]["type"], "rate_limit_error");
}

/// A worker killed mid-stream: the client gets what was generated, then an error event within
/// `--stream-idle-secs`, not a hang.
#[tokio::test]
async fn a_worker_killed_mid_stream_ends_the_stream_with_an_error_event() {
    let h = harness().await;
    // A bigger decoder, so a long generation takes a while.
    testkit_lm(&h.models.join("slow-lm"));
    let w = h.worker("w1", &[]);
    let g = Gateway::start(&h, &["--stream-idle-secs", "2"]).await;
    g.wait_for_model("slow-lm").await;
    let body = json!({"model": "slow-lm", "prompt": "Once", "max_tokens": 128, "temperature": 0, "stream": true});
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
    let text = body.to_string();
    let req = format!("POST /v1/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}", text.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Read up to the first event, then kill the worker.
    while !String::from_utf8_lossy(&got).contains("data: ") {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await.expect("first event").unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    w.signal("KILL");
    let killed = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got)).await.expect("the stream ends, no hang").unwrap();
    let took = killed.elapsed();
    let answer = parse(&String::from_utf8_lossy(&got));
    let events = events(&answer.body);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap_or_else(|_| panic!("the generation finished before the kill: {events:?}"));
    assert!(last["error"]["message"].as_str().unwrap().contains("the stream stopped"), "{last}");
    assert!(events.len() >= 2 && !events.contains(&"[DONE]".to_string()), "{events:?}");
    eprintln!("FIGURES killed mid-stream: {} events, error event {:.1} s after the kill", events.len(), took.as_secs_f64());
    assert!(took < Duration::from_secs(10), "{took:?}");
}

fn testkit_lm(dir: &std::path::Path) {
    jetbatch_testkit::write_tiny_lm(dir, 7, 512, 8).unwrap();
}

/// The shipped accounts (deploy/nats): the gateway runs as the `producer` user — it publishes
/// jobs, gets results and chunks back, and lists the pool's models through discovery.
#[tokio::test]
async fn the_shipped_accounts_let_the_gateway_run_as_the_producer() {
    let dir = tempfile::tempdir().unwrap();
    let node = shipped_accounts_server(dir.path());
    let models = dir.path().join("models");
    jetbatch_testkit::write_tiny_lm(&models.join("tiny-lm"), jetbatch_testkit::SEED, 64, 2).unwrap();
    let worker = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
        .args(["serve", "--nats-url", &node.url(), "--nats-user", "worker", "--nats-password", "work-pw", "--worker-id", "w1", "--metrics-addr", "127.0.0.1:0", "--models"])
        .arg(&models)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    let _worker = Gateway { child: worker, port: 0, log: dir.path().join("worker.log") };
    let g = Gateway::start_on(&node.url(), dir.path(), &["--nats-user", "producer", "--nats-password", "prod-pw"]).await;
    g.wait_for_model("tiny-lm").await;
    let a = g.post("/v1/completions", json!({"model": "tiny-lm", "prompt": "the", "max_tokens": 3})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = g.post("/v1/completions", json!({"model": "tiny-lm", "prompt": "the", "max_tokens": 3, "stream": true})).await;
    assert_eq!(events(&a.body).last().map(String::as_str), Some("[DONE]"), "{}", a.body);
}

/// The same `generate` jobs through the gateway (HTTP/1.1, a kept-alive connection per
/// concurrent request, as SDK clients' pools hold them) and published natively (the gateway's own
/// producer path in process: publish with `reply_to`, wait for the result), closed loop at the
/// same concurrency, alternating sides: requests/s and p50/p99.
/// Numbers are in loadtest/README.md; run with
/// `cargo test --release --test gateway -- --ignored --nocapture gateway_overhead`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark (about a minute); see loadtest/README.md"]
async fn gateway_overhead() {
    use jetbatch::gateway::jobs::{Bus, JobOptions, JobSpec};
    let h = harness().await;
    let _w = h.worker("w1", &[]);
    let g = Gateway::start(&h, &["--max-concurrent", "4096"]).await;
    g.wait_for_model("tiny-lm").await;
    let bus = Bus::start(h.client.clone(), h.js.clone(), h.topology.clone()).await.unwrap();
    let (n, concurrency, rounds) = (1500usize, 64usize, 3usize);
    // Tokens generated per request (GATEWAY_BENCH_MAX_TOKENS, default 4): more is more compute
    // per request against the same bus and HTTP cost.
    let max_tokens: u64 = std::env::var("GATEWAY_BENCH_MAX_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let options = JobOptions { priority: Default::default(), deadline_ms: u64::MAX / 2, cache: Some(false) };
    let prompt = |round: usize, i: usize| -> Vec<u64> { vec![3 + (round * 7 + i % 200) as u64 % 250, 3 + (i / 200) as u64, 40, 41] };
    let summarize = |side: &str, round: usize, took: Duration, mut lat: Vec<Duration>| {
        lat.sort();
        let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1000.0;
        let rps = lat.len() as f64 / took.as_secs_f64();
        eprintln!("FIGURES gateway-bench round {round} {side}: {} requests of {max_tokens} tokens, concurrency {concurrency}: {rps:.0} req/s, p50 {:.1} ms, p99 {:.1} ms", lat.len(), q(0.5), q(0.99));
        rps
    };
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(KeepAlive::connect(&g).await);
    }
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let start = Instant::now();
        let native: Vec<Duration> = futures::stream::iter(0..n)
            .map(|i| {
                let (bus, options) = (&bus, &options);
                async move {
                    let t = Instant::now();
                    let params = json!({"max_new_tokens": max_tokens, "temperature": 0}).as_object().unwrap().clone();
                    bus.run(JobSpec { model: "tiny-lm", kind: "generate", input: json!({"prompt_tokens": prompt(2 * round, i)}), params, options }).await.unwrap();
                    t.elapsed()
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let native_rps = summarize("native", round, start.elapsed(), native);
        // Slot k sends requests k, k + concurrency, … on its connection.
        let start = Instant::now();
        let slots = conns.iter_mut().enumerate().map(|(slot, conn)| async move {
            let mut lat = Vec::new();
            for i in (slot..n).step_by(concurrency) {
                let t = Instant::now();
                let a = conn.post("/v1/completions", &json!({"model": "tiny-lm", "prompt": prompt(2 * round + 1, i), "max_tokens": max_tokens, "temperature": 0, "cache": false})).await;
                assert_eq!(a.status, 200, "{}", a.body);
                lat.push(t.elapsed());
            }
            lat
        });
        let gateway: Vec<Duration> = futures::future::join_all(slots).await.into_iter().flatten().collect();
        let gateway_rps = summarize("gateway", round, start.elapsed(), gateway);
        ratios.push(gateway_rps / native_rps);
    }
    ratios.sort_by(f64::total_cmp);
    eprintln!("FIGURES gateway-bench: gateway/native requests/s per round {ratios:?}, median {:.3}", ratios[ratios.len() / 2]);
}

/// `--tls-cert`/`--tls-key`: HTTPS with that certificate (curl checks it), no plain HTTP on the
/// port, and a key file that holds no key stops the gateway at
/// start with an error naming the flag.
#[tokio::test]
async fn https_with_a_certificate_and_key() {
    let h = harness().await;
    let dir = h.dir.path();
    // A self-signed certificate for 127.0.0.1: curl trusts it as its own CA.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.self_signed(&key).unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (cert_pem, key_pem) = (write("gw.pem", cert.pem()), write("gw-key.pem", key.serialize_pem()));
    let ca_pem = cert_pem.clone();
    let port = free_port();
    let log = dir.join("gateway-tls.log");
    let child = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
        .args(["gateway", "--nats-url", &h.url(), "--addr", &format!("127.0.0.1:{port}"), "--api-keys", KEY, "--tls-cert", &cert_pem, "--tls-key", &key_pem])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _g = Gateway { child, port, log: log.clone() };
    // (body, status) of a GET through curl.
    let curl = |url: String| {
        let out = Command::new("curl").args(["-sS", "--max-time", "10", "--cacert", &ca_pem, "-H", &format!("Authorization: Bearer {KEY}"), "-w", "\n%{http_code}", &url]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (body.to_string(), status.to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while curl(format!("https://127.0.0.1:{port}/healthz")) != ("ok".to_string(), "200".to_string()) {
        assert!(Instant::now() < deadline, "no HTTPS: {:?}; {}", curl(format!("https://127.0.0.1:{port}/healthz")), std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (body, status) = curl(format!("https://127.0.0.1:{port}/v1/models"));
    assert_eq!(status, "200", "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["object"], "list");
    assert_eq!(curl(format!("http://127.0.0.1:{port}/healthz")).1, "000", "no plain HTTP on a TLS port");
    // A key file without a key: refused at start, naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
        .args(["gateway", "--nats-url", &h.url(), "--addr", "127.0.0.1:0", "--tls-cert", &cert_pem, "--tls-key", &ca_pem])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--tls-key"), "{stderr}");
}
