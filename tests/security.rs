//! NATS auth and TLS against servers configured that way (credentials generated here), a clear
//! error on wrong credentials, and the input limits.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use jetbatch::job::{ErrorCode, JobResult, Status};
use nkeys::KeyPair;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_jetbatch");

/// A nats-server started from `conf` (which gets `listen` and a JetStream store appended).
fn server(dir: &Path, conf: &str) -> Node {
    let port = free_port();
    let path = dir.join("server.conf");
    let store = dir.join("store");
    std::fs::write(&path, format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n{conf}", store.display())).unwrap();
    Node::spawn_conf(&path, port)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// `setup`, then a worker and `submit` of one job, all with `auth` flags: the job's result is ok.
async fn round_trip(dir: &Path, url: &str, auth: &[&str]) {
    round_trip_as(dir, url, auth, auth).await
}

/// The same with the worker (`setup`, `serve`) and the producer (`submit`) as different users.
async fn round_trip_as(dir: &Path, url: &str, auth: &[&str], producer: &[&str]) {
    let out = run(&[&["setup", "--nats-url", url][..], auth].concat());
    assert!(out.status.success(), "setup: {}", String::from_utf8_lossy(&out.stderr));
    let models = dir.join("models");
    jetbatch_testkit::write_fixture_models(&models).unwrap();
    let log = std::fs::File::create(dir.join("worker.log")).unwrap();
    let mut worker = Command::new(BIN)
        .args([&["serve", "--nats-url", url, "--models", models.to_str().unwrap()][..], auth].concat())
        .stderr(log)
        .spawn()
        .unwrap();
    let jobs = dir.join("jobs.jsonl");
    let job = json!({"id": "auth-1", "model": "mlp", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": values(1, 16)}]}});
    std::fs::write(&jobs, job.to_string()).unwrap();
    let results = dir.join("results.jsonl");
    let out = run(&[
        &["submit", "--quiet", "--nats-url", url, "--idle-timeout-secs", "30", "-i", jobs.to_str().unwrap(), "-o", results.to_str().unwrap()][..],
        producer,
    ]
    .concat());
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(out.status.success(), "submit: {}\nworker: {}", String::from_utf8_lossy(&out.stderr), std::fs::read_to_string(dir.join("worker.log")).unwrap());
    let r = JobResult::decode(std::fs::read_to_string(&results).unwrap().trim().as_bytes()).unwrap();
    assert_eq!((r.id.as_str(), r.status), ("auth-1", Status::Ok));
}

/// Connecting with `auth` fails, exits non-zero and says why.
fn refused(url: &str, auth: &[&str], needle: &str) {
    let out = run(&[&["setup", "--nats-url", url][..], auth].concat());
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(!out.status.success(), "wrong credentials must fail");
    assert!(stderr.contains("cannot connect to nats") && stderr.contains(needle), "{stderr}");
}

#[tokio::test]
async fn token_auth() {
    let dir = tempfile::tempdir().unwrap();
    let node = server(dir.path(), "authorization { token: \"s3cret-token\" }\n");
    round_trip(dir.path(), &node.url(), &["--nats-token", "s3cret-token"]).await;
    refused(&node.url(), &["--nats-token", "wrong"], "authorization");
}

#[tokio::test]
async fn user_and_password_auth() {
    let dir = tempfile::tempdir().unwrap();
    let node = server(dir.path(), "authorization { users: [ { user: \"worker\", password: \"pw-1\" } ] }\n");
    round_trip(dir.path(), &node.url(), &["--nats-user", "worker", "--nats-password", "pw-1"]).await;
    refused(&node.url(), &["--nats-user", "worker", "--nats-password", "nope"], "authorization");
}

#[tokio::test]
async fn nkey_auth() {
    let dir = tempfile::tempdir().unwrap();
    let user = KeyPair::new_user();
    let node = server(dir.path(), &format!("authorization {{ users: [ {{ nkey: \"{}\" }} ] }}\n", user.public_key()));
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    round_trip(dir.path(), &node.url(), &["--nats-nkey", seed.to_str().unwrap()]).await;
    let stranger = dir.path().join("stranger.nk");
    std::fs::write(&stranger, KeyPair::new_user().seed().unwrap()).unwrap();
    refused(&node.url(), &["--nats-nkey", stranger.to_str().unwrap()], "authorization");
}

/// A NATS JWT: header and claims signed by `issuer` (ed25519-nkey).
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({"jti": format!("{name}-{subject}"), "iat": 1_700_000_000, "iss": issuer.public_key(), "name": name, "sub": subject, "nats": nats});
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = issuer.sign(format!("{header}.{body}").as_bytes()).unwrap();
    format!("{header}.{body}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An account JWT; JetStream limits only where asked (the system account may not have them).
fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, jetstream: bool) -> String {
    let js = if jetstream { -1 } else { 0 };
    let limits = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
                        "mem_storage": js, "disk_storage": js, "streams": js, "consumer": js});
    jwt(operator, &account.public_key(), name, json!({"limits": limits, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}))
}

/// A `.creds` file: the user JWT and its seed, in the format `nsc` writes.
fn creds(account: &KeyPair, dir: &Path, name: &str) -> PathBuf {
    let user = KeyPair::new_user();
    let user_jwt = jwt(account, &user.public_key(), name, json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}));
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(
        &path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn creds_file_auth_in_operator_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (operator, account, system) = (KeyPair::new_operator(), KeyPair::new_account(), KeyPair::new_account());
    let operator_jwt = jwt(&operator, &operator.public_key(), "test-operator", json!({"type": "operator", "version": 2}));
    let conf = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {acc}: \"{acc_jwt}\"\n  {sys}: \"{sys_jwt}\"\n}}\n",
        sys = system.public_key(),
        acc = account.public_key(),
        acc_jwt = account_jwt(&operator, &account, "jobs", true),
        sys_jwt = account_jwt(&operator, &system, "SYS", false),
    );
    let node = server(dir.path(), &conf);
    let good = creds(&account, dir.path(), "worker");
    round_trip(dir.path(), &node.url(), &["--nats-creds", good.to_str().unwrap()]).await;
    // Signed by an account the server does not know.
    let bad = creds(&KeyPair::new_account(), dir.path(), "intruder");
    refused(&node.url(), &["--nats-creds", bad.to_str().unwrap()], "authorization");
}

#[tokio::test]
async fn tls_with_a_generated_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "jetbatch test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let (ca_pem, cert_pem, key_pem) = (write("ca.pem", ca.pem()), write("server.pem", cert.pem()), write("server-key.pem", key.serialize_pem()));
    let node = server(
        dir.path(),
        &format!("tls {{ cert_file: \"{}\", key_file: \"{}\", timeout: 5 }}\n", cert_pem.display(), key_pem.display()),
    );
    round_trip(dir.path(), &node.url(), &["--nats-tls-ca", ca_pem.to_str().unwrap()]).await;
    // A CA that did not sign the server's certificate.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_pem = write("other-ca.pem", other.self_signed(&other_key).unwrap().pem());
    refused(&node.url(), &["--nats-tls-ca", other_pem.to_str().unwrap()], "certificate");
}

#[tokio::test]
async fn limits_on_names_sizes_and_elements() {
    let h = Harness::new().await;
    let _w = h.worker("w1", &["--max-tensor-elements", "8", "--max-payload-bytes", "2048"]);
    let mut sub = h.subscribe_results().await;
    let cases = [
        ("lim-traversal", "mlp", json!({"id": "lim-traversal", "model": "../../etc/passwd", "kind": "tensor", "input": {}}), "is not a model name"),
        ("lim-wildcard", "mlp", json!({"id": "lim-wildcard", "model": "mlp.>", "kind": "tensor", "input": {}}), "is not a model name"),
        ("lim-reply", "mlp", json!({"id": "lim-reply", "model": "mlp", "kind": "tensor", "input": {}, "reply_to": "jetbatch.results.*"}), "reply_to"),
        (
            "lim-elements",
            "mlp",
            json!({"id": "lim-elements", "model": "mlp", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": values(1, 16)}]}}),
            "more than 8 elements",
        ),
        (
            "lim-size",
            "mlp",
            json!({"id": "lim-size", "model": "mlp", "kind": "tensor", "input": {"inputs": [], "pad": "x".repeat(3000)}}),
            "over the limit of 2048 bytes",
        ),
    ];
    for (id, model, job, _) in &cases {
        h.publish_raw(model, Some(id), job.to_string().into_bytes(), true).await;
    }
    let got = collect(&mut sub, cases.len(), Duration::from_secs(60)).await;
    for (id, _, _, needle) in cases {
        let r = &got.get(id).unwrap_or_else(|| panic!("no result for {id}"))[0];
        let err = r.error.as_ref().expect("error");
        assert_eq!(err.code, ErrorCode::BadRequest, "{id}");
        assert!(err.message.contains(needle), "{id}: {}", err.message);
    }
}

#[tokio::test]
async fn the_shipped_accounts_separate_producers_from_workers() {
    let dir = tempfile::tempdir().unwrap();
    let node = shipped_accounts_server(dir.path());
    let worker = ["--nats-user", "worker", "--nats-password", "work-pw"];
    let producer = ["--nats-user", "producer", "--nats-password", "prod-pw"];
    round_trip_as(dir.path(), &node.url(), &worker, &producer).await;

    // A producer may not consume jobs or forge results.
    let client = async_nats::ConnectOptions::with_user_and_password("producer".into(), "prod-pw".into()).connect(node.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let forged = js.publish("jetbatch.results.auth-1", "forged".into()).await;
    let denied = match forged {
        Err(_) => true,
        Ok(ack) => ack.await.is_err(),
    };
    assert!(denied, "a producer cannot publish results");
    let stream = js.get_stream("JETBATCH_JOBS").await.unwrap();
    let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> = stream.get_consumer("jetbatch-workers").await;
    let pulled = match consumer {
        Err(_) => false,
        Ok(c) => match c.fetch().max_messages(1).expires(Duration::from_millis(500)).messages().await {
            Err(_) => false,
            Ok(mut m) => matches!(futures::StreamExt::next(&mut m).await, Some(Ok(_))),
        },
    };
    assert!(!pulled, "a producer cannot pull jobs");
}

/// Where a tenant reaches the pool's JetStream API under `accounts-tenants.conf`.
const TENANT_API: &str = "JS.jetbatch.API";

/// A nats-server from the shipped `deploy/nats` files with `accounts-tenants.conf` included instead
/// of `accounts.conf`; users `worker` / `work-pw`, `team-a` / `a-pw`, `team-b` / `b-pw`.
fn tenants_server(dir: &Path) -> Node {
    let (port, monitor) = (free_port(), free_port());
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/nats");
    let conf = dir.join("nats-server.conf");
    let text = std::fs::read_to_string(shipped.join("nats-server.conf")).unwrap();
    assert!(text.contains("include ./accounts.conf"));
    let text = text.replace("/data/jetstream", dir.join("store").to_str().unwrap()).replace("include ./accounts.conf", "include ./accounts-tenants.conf");
    std::fs::write(&conf, text).unwrap();
    std::fs::copy(shipped.join("accounts-tenants.conf"), dir.join("accounts-tenants.conf")).unwrap();
    let args = ["-c", conf.to_str().unwrap(), "-p", &port.to_string(), "-m", &monitor.to_string()];
    let env = [("WORKER_PASSWORD", "work-pw"), ("TEAM_A_PASSWORD", "a-pw"), ("TEAM_B_PASSWORD", "b-pw")];
    Node::spawn_env(args.map(String::from).to_vec(), port, env.map(|(k, v)| (k.to_string(), v.to_string())).to_vec())
}

/// `jetbatch submit` of one `mlp` job `id` as `user`; the output (results on standard output).
fn submit_as(dir: &Path, url: &str, user: &str, password: &str, id: &str) -> Output {
    let jobs = dir.join(format!("{id}.jsonl"));
    let job = json!({"id": id, "model": "mlp", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": values(3, 16)}]}});
    std::fs::write(&jobs, job.to_string()).unwrap();
    run(&["submit", "--quiet", "--nats-url", url, "--nats-user", user, "--nats-password", password, "--js-api-prefix", TENANT_API, "--idle-timeout-secs", "30", "-i", jobs.to_str().unwrap(), "-o", "-"])
}

/// Whether a JetStream API request as `client` gets an answer that is not an error.
async fn api_answers(client: &async_nats::Client, subject: &str, body: &str) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), client.request(subject.to_string(), body.to_string().into())).await {
        Ok(Ok(reply)) => !String::from_utf8_lossy(&reply.payload).contains("\"error\""),
        _ => false,
    }
}

#[tokio::test]
async fn the_tenant_accounts_share_the_pool_but_not_results_or_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let node = tenants_server(dir.path());
    let url = node.url();
    let worker = ["--nats-user", "worker", "--nats-password", "work-pw"];
    let out = run(&[&["setup", "--nats-url", &url][..], &worker].concat());
    assert!(out.status.success(), "setup: {}", String::from_utf8_lossy(&out.stderr));
    let models = dir.path().join("models");
    jetbatch_testkit::write_fixture_models(&models).unwrap();
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let serve = Command::new(BIN).args([&["serve", "--nats-url", &url, "--models", models.to_str().unwrap()][..], &worker].concat()).stderr(log).spawn().unwrap();
    // Killed when it goes out of scope, a failed assertion included.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let serve = Killed(serve);

    // team-a's gateway lists the pool's models through discovery; team-a reads each worker's
    // `info` endpoint and none of its others.
    let port = free_port();
    let gateway_log = dir.path().join("gateway.log");
    let gateway = Command::new(BIN)
        .args(["gateway", "--nats-url", &url, "--nats-user", "team-a", "--nats-password", "a-pw", "--js-api-prefix", TENANT_API, "--models-ttl-secs", "1"])
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .stderr(std::fs::File::create(&gateway_log).unwrap())
        .spawn()
        .unwrap();
    let _gateway = Killed(gateway);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("curl").args(["-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}/v1/models")]).output().unwrap();
        let models = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().and_then(|v| v["data"].as_array().map(|d| d.iter().map(|m| m["id"].clone()).collect::<Vec<_>>()));
        if models.as_ref().is_some_and(|m| m.contains(&json!("mlp"))) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "team-a's gateway lists {models:?}: {}", std::fs::read_to_string(&gateway_log).unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = async_nats::ConnectOptions::with_user_and_password("team-a".into(), "a-pw".into()).connect(&url).await.unwrap();
    let workers = jetbatch::pool::discover(&a, "jetbatch", None, jetbatch::pool::DISCOVERY_WINDOW).await.unwrap();
    assert_eq!(workers.len(), 1, "{workers:?}");
    for verb in jetbatch::pool::verb::ALL {
        let answer = jetbatch::pool::call::<serde_json::Value>(&a, workers[0].subject(verb), &json!({}), Duration::from_secs(2)).await;
        assert_eq!(answer.is_ok(), verb == jetbatch::pool::verb::INFO, "team-a calls {verb}: {answer:?}");
    }

    // team-b listens to every result it may see while team-a's job is answered.
    let b = async_nats::ConnectOptions::with_user_and_password("team-b".into(), "b-pw".into()).connect(&url).await.unwrap();
    let mut b_results = b.subscribe("jetbatch.results.>").await.unwrap();
    b.flush().await.unwrap();
    // Both tenants get their answers from the one pool.
    for (user, password, id) in [("team-a", "a-pw", "team-a.job-1"), ("team-b", "b-pw", "team-b.job-1")] {
        let out = submit_as(dir.path(), &url, user, password, id);
        let worker_log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
        assert!(out.status.success(), "{user}: {}\nworker: {worker_log}", String::from_utf8_lossy(&out.stderr));
        let r = JobResult::decode(String::from_utf8_lossy(&out.stdout).trim().as_bytes()).unwrap();
        assert_eq!((r.id.as_str(), r.status), (id, Status::Ok));
    }
    drop(serve);
    let mut seen = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut b_results)).await {
        seen.push(m.subject.to_string());
    }
    assert_eq!(seen, ["jetbatch.results.team-b.job-1"], "team-b hears only its own results");

    // team-b cannot look team-a's result up, nor read results by sequence.
    let results = async_nats::jetstream::with_prefix(b.clone(), TENANT_API).get_stream_no_info("JETBATCH_RESULTS").await.unwrap();
    assert!(results.direct_get_last_for_subject("jetbatch.results.team-b.job-1").await.is_ok(), "its own result is looked up");
    assert!(results.direct_get_last_for_subject("jetbatch.results.team-a.job-1").await.is_err(), "team-a's result is not");
    for api in ["$JS.API", TENANT_API] {
        assert!(!api_answers(&b, &format!("{api}.STREAM.MSG.GET.JETBATCH_RESULTS"), r#"{"seq": 1}"#).await, "no reading of results by sequence");
    }

    // With no worker, team-a's next job stays queued: team-b can neither read nor delete it.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "team-a.queued");
    let job = json!({"id": "team-a.queued", "model": "mlp", "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": values(4, 16)}]}});
    let ack = async_nats::jetstream::with_prefix(a.clone(), TENANT_API).publish_with_headers("jetbatch.jobs.mlp", headers, job.to_string().into()).await.unwrap().await.unwrap();
    for api in ["$JS.API", TENANT_API] {
        for (what, body) in [
            ("STREAM.MSG.GET.JETBATCH_JOBS", format!(r#"{{"seq": {}}}"#, ack.sequence)),
            ("STREAM.MSG.DELETE.JETBATCH_JOBS", format!(r#"{{"seq": {}}}"#, ack.sequence)),
            ("STREAM.PURGE.JETBATCH_JOBS", "{}".to_string()),
            ("CONSUMER.MSG.NEXT.JETBATCH_JOBS.jetbatch-workers", r#"{"batch": 1, "expires": 500000000}"#.to_string()),
        ] {
            assert!(!api_answers(&b, &format!("{api}.{what}"), &body).await, "team-b: {api}.{what}");
        }
    }
    let input = dir.path().join("cancel.jsonl");
    std::fs::write(&input, job.to_string()).unwrap();
    let cancel = run(&["cancel", "--nats-url", &url, "--nats-user", "team-b", "--nats-password", "b-pw", "--js-api-prefix", TENANT_API, "-i", input.to_str().unwrap()]);
    assert!(!cancel.status.success(), "{}", String::from_utf8_lossy(&cancel.stderr));
    let w = async_nats::ConnectOptions::with_user_and_password("worker".into(), "work-pw".into()).connect(&url).await.unwrap();
    let mut jobs = async_nats::jetstream::new(w).get_stream("JETBATCH_JOBS").await.unwrap();
    assert_eq!(jobs.info().await.unwrap().state.messages, 1, "team-a's job stays queued");
}
