//! `jetbatch submit` and `cancel` as a producer meets them: every bad line named in one pass,
//! results on standard output, `NATS_URL`, retrying errors under new ids, a changed line on resume,
//! Ctrl-C, dropping a run's queued jobs, and ids that JetStream drops as duplicates.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn job(id: &str, model: &str, seed: u64) -> String {
    serde_json::json!({"id": id, "model": model, "kind": "tensor", "input": {"inputs": [{"dtype": "f32", "shape": [16], "data": values(seed, 16)}]}}).to_string()
}

fn jetbatch(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jetbatch")).args(args).env_remove("NATS_URL").envs(env.iter().copied()).output().unwrap()
}

fn submit(h: &Harness, input: &Path, output: &str, extra: &[&str]) -> Output {
    let url = h.url();
    let mut args = vec!["submit", "--quiet", "--nats-url", &url, "--idle-timeout-secs", "60", "-i", input.to_str().unwrap(), "-o", output];
    args.extend(extra);
    jetbatch(&args, &[])
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn bad_lines_are_all_named_and_nothing_is_published() {
    let h = Harness::new().await;
    jetbatch::bus::setup(&h.js, &h.topology).await.unwrap();
    let input = h.dir.path().join("jobs.jsonl");
    let huge = job("huge", "mlp", 1).replace("\"kind\"", &format!("\"pad\": \"{}\", \"kind\"", "x".repeat(2 << 20)));
    let lines = [job("a", "mlp", 1), "{not json".into(), job("b", "mlp", 2), r#"{"model": "mlp"}"#.into(), job("a", "mlp", 3), huge];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = submit(&h, &input, h.dir.path().join("out").to_str().unwrap(), &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    for expect in ["line 2:", "line 4: id: missing or invalid", "line 5: id 'a' repeats line 1", "line 6: 2097", "over the server's max_payload", "4 bad line(s)", "nothing was submitted"] {
        assert!(err.contains(expect), "stderr lacks {expect:?}:\n{err}");
    }
    assert_eq!(err.matches("max_payload is 1048576 bytes, below the 8388608 bytes").count(), 1, "the server's smaller limit is said once, as a line is over it:\n{err}");
    assert_eq!(h.stream_messages(&h.topology.jobs_stream).await, 0, "nothing published");
}

#[tokio::test]
async fn results_on_stdout_with_nats_url_and_a_producer_sized_help() {
    let h = Harness::new().await;
    let _w = h.worker("w1", &[]);
    let input = h.dir.path().join("jobs.jsonl");
    std::fs::write(&input, [job("o-1", "mlp", 1), job("o-2", "mlp", 2)].join("\n")).unwrap();
    let out = jetbatch(&["submit", "--quiet", "-i", input.to_str().unwrap(), "-o", "-"], &[("NATS_URL", &h.url())]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ids: Vec<String> = text(&out.stdout).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 2, "one result a line on stdout");
    assert!(!Path::new("-").exists(), "no file named -");
    let help = text(&jetbatch(&["submit", "--help"], &[]).stdout);
    assert!(help.contains("--retry-errors") && help.contains("--consumer") && help.contains("NATS_URL"), "{help}");
    for pool in ["--ack-wait-secs", "--replicas", "--max-deliver", "--duplicate-window-secs", "--serve-models"] {
        assert!(!help.contains(pool), "submit --help lists the pool setting {pool}");
    }
}

#[tokio::test]
async fn off_a_terminal_progress_is_plain_lines_the_summary_is_said_once_and_nothing_of_the_connection() {
    let h = Harness::new().await;
    let _w = h.worker("w1", &[]);
    let input = h.dir.path().join("jobs.jsonl");
    std::fs::write(&input, [job("p-1", "mlp", 1), job("p-2", "mlp", 2), job("p-3", "absent", 3)].join("\n")).unwrap();
    let url = h.url();
    // Standard error is a pipe here, as in CI.
    let out = jetbatch(&["submit", "--nats-url", &url, "--idle-timeout-secs", "60", "-i", input.to_str().unwrap(), "-o", "-"], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("submitting 3 job(s) from") && err.contains("3/3 results (100%)"), "{err}");
    assert_eq!(err.matches("3 answered: 2 ok").count(), 1, "the summary once:\n{err}");
    assert!(err.contains("error: 1 job(s) answered with an error; pass --allow-errors"), "{err}");
    for quiet in ["nats connection event", "connected", "max_payload", "INFO"] {
        assert!(!err.contains(quiet), "{quiet:?} in:\n{err}");
    }
}

#[tokio::test]
async fn errors_are_retried_under_new_ids_and_a_changed_line_is_named() {
    let h = Harness::new().await;
    let input = h.dir.path().join("jobs.jsonl");
    let output = h.dir.path().join("results.jsonl");
    let out_path = output.to_str().unwrap();
    std::fs::write(&input, [job("r-1", "mlp", 1), job("r-2", "late", 2)].join("\n")).unwrap();
    let w = h.worker("w1", &[]);
    let first = submit(&h, &input, out_path, &[]);
    assert!(!first.status.success() && text(&first.stderr).contains("unknown_model 1"), "{}", text(&first.stderr));
    drop(w);
    // The fix: the model appears (a worker that serves it); the same run with --retry-errors.
    jetbatch_testkit::write_model(&h.models.join("late"), &jetbatch_testkit::mlp_module(5).unwrap(), jetbatch_testkit::MLP_TOML).unwrap();
    let _w = h.worker("w2", &[]);
    let again = submit(&h, &input, out_path, &["--retry-errors"]);
    let err = text(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("2 job(s) already answered") && err.contains("(1 errored, submitted again)") && err.contains("1 answered: 1 ok"), "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let last = lines.last().unwrap();
    assert_eq!((last["id"].as_str(), last["status"].as_str()), (Some("r-2:retry-1"), Some("ok")), "{lines:?}");
    // Nothing left to do; a line changed under an answered id is named.
    std::fs::write(&input, [job("r-1", "mlp", 9), job("r-2", "late", 2)].join("\n")).unwrap();
    let third = submit(&h, &input, out_path, &["--retry-errors"]);
    let err = text(&third.stderr);
    assert!(third.status.success(), "{err}");
    assert!(err.contains("line 1: id 'r-1' was answered for a different job"), "{err}");
    assert!(err.contains("0 answered"), "{err}");
}

#[tokio::test]
async fn ctrl_c_says_what_stays_queued_and_cancel_drops_it() {
    let h = Harness::new().await;
    jetbatch::bus::setup(&h.js, &h.topology).await.unwrap();
    let input = h.dir.path().join("jobs.jsonl");
    let other = h.dir.path().join("other.jsonl");
    // The run goes out at low priority, but for a line that says high: cancel finds both levels.
    let lines: Vec<String> = (0..5).map(|i| job(&format!("c-{i}"), "mlp", i)).collect();
    let high = lines[1].replacen('{', r#"{"priority": "high", "#, 1);
    std::fs::write(&input, [&lines[..1], &[high], &lines[2..]].concat().join("\n")).unwrap();
    std::fs::write(&other, job("keep-1", "mlp", 7)).unwrap();
    // No worker: the jobs stay queued.
    let url = h.url();
    let queued = jetbatch(&["submit", "--quiet", "--nats-url", &url, "--idle-timeout-secs", "1", "-i", other.to_str().unwrap(), "-o", "-"], &[]);
    assert!(text(&queued.stderr).contains("no result for 1 job(s)"), "{}", text(&queued.stderr));
    let child = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
        .args(["submit", "--quiet", "--priority", "low", "--nats-url", &h.url(), "-i", input.to_str().unwrap(), "-o", h.dir.path().join("out").to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "Ctrl-C exits 130:\n{err}");
    assert!(err.contains("interrupted: 0 result(s) written; 5 job(s) stay queued") && err.contains("jetbatch cancel"), "{err}");
    assert_eq!(h.stream_messages(&h.topology.jobs_stream).await, 6);
    let stream = h.js.get_stream(&h.topology.jobs_stream).await.unwrap();
    let mut subjects = Vec::new();
    for seq in 1..=6 {
        subjects.push(stream.get_raw_message(seq).await.unwrap().subject.to_string());
    }
    subjects.sort();
    assert_eq!(subjects, ["jetbatch.jobs.mlp", "jetbatch.jobs.mlp.high", "jetbatch.jobs.mlp.low", "jetbatch.jobs.mlp.low", "jetbatch.jobs.mlp.low", "jetbatch.jobs.mlp.low"]);
    let cancel = jetbatch(&["cancel", "--nats-url", &h.url(), "-i", input.to_str().unwrap()], &[]);
    assert!(cancel.status.success() && text(&cancel.stderr).contains("cancelled 5 queued job(s) of 5"), "{}", text(&cancel.stderr));
    assert_eq!(h.stream_messages(&h.topology.jobs_stream).await, 1, "another run's job stays");
    // A run's jobs by their run id, as the Python client and the lm-eval backend name them.
    let run = h.dir.path().join("run.jsonl");
    std::fs::write(&run, [job("run-7.a", "mlp", 1), job("run-7.b", "mlp", 2), job("run-70.c", "mlp", 3)].join("\n")).unwrap();
    let queued = jetbatch(&["submit", "--quiet", "--nats-url", &url, "--idle-timeout-secs", "1", "-i", run.to_str().unwrap(), "-o", "-"], &[]);
    assert!(text(&queued.stderr).contains("no result for 3 job(s)"), "{}", text(&queued.stderr));
    let cancel = jetbatch(&["cancel", "--nats-url", &h.url(), "--run-id", "run-7"], &[]);
    assert!(cancel.status.success() && text(&cancel.stderr).contains("cancelled 2 queued job(s) of run run-7"), "{}", text(&cancel.stderr));
    assert_eq!(h.stream_messages(&h.topology.jobs_stream).await, 2, "run-70's job and the other run's stay");
    let neither = jetbatch(&["cancel", "--nats-url", &h.url()], &[]);
    assert!(!neither.status.success() && text(&neither.stderr).contains("--input"), "{}", text(&neither.stderr));
}

/// A `submit` run in the background whose standard error is read as it comes.
struct Running {
    child: std::process::Child,
    stderr: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Running {
    fn start(h: &Harness, input: &Path, output: &Path) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_jetbatch"))
            .args(["submit", "--quiet", "--nats-url", &h.url(), "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Running { child, stderr, reader }
    }

    /// Waits (at most 15 s) until standard error holds `needle`.
    async fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.stderr.lock().unwrap().contains(needle) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ctrl-C, then everything it wrote to standard error.
    fn interrupt(mut self) -> String {
        Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap();
        assert!(!self.child.wait().unwrap().success());
        self.reader.join().unwrap();
        let err = self.stderr.lock().unwrap().clone();
        err
    }
}

#[tokio::test]
async fn duplicate_ids_are_sorted_out_at_once_and_never_counted_as_queued() {
    let h = Harness::new().await;
    jetbatch::bus::setup(&h.js, &h.topology).await.unwrap();
    // Earlier jobs under the ids (no worker: they stay queued): another job under q-1, this very
    // job under q-4, and q-3, cancelled since.
    for line in [job("q-1", "mlp", 1), job("q-3", "mlp", 3), job("q-4", "mlp", 4)] {
        let id = serde_json::from_str::<serde_json::Value>(&line).unwrap()["id"].as_str().unwrap().to_string();
        h.publish_raw("mlp", Some(&id), line.into_bytes(), true).await;
    }
    assert!(h.js.get_stream(&h.topology.jobs_stream).await.unwrap().delete_message(2).await.unwrap());
    let input = h.dir.path().join("jobs.jsonl");
    std::fs::write(&input, [job("q-1", "mlp", 11), job("q-2", "mlp", 2), job("q-3", "mlp", 3), job("q-4", "mlp", 4)].join("\n")).unwrap();
    let run = Running::start(&h, &input, &h.dir.path().join("out"));
    run.wait_for("id 'q-4'").await;
    let err = run.interrupt();
    for expect in [
        "id 'q-1': not queued, dropped as a duplicate: a different job under this id is queued; give this job a new id",
        "id 'q-3': not queued, dropped as a duplicate: the earlier job under this id is neither queued nor answered",
        "id 'q-4': this very job is queued already (published before); waiting for its answer",
        // q-2 (published now) and q-4 are queued; q-1 and q-3 are not.
        "interrupted: 0 result(s) written; 2 job(s) stay queued",
    ] {
        assert!(err.contains(expect), "stderr lacks {expect:?}:\n{err}");
    }
    assert!(!err.contains("id 'q-2'"), "{err}");
}

#[tokio::test]
async fn a_duplicate_of_an_answered_job_is_collected_or_named_without_waiting() {
    let h = Harness::new().await;
    let _w = h.worker("w1", &[]);
    let dir = h.dir.path();
    std::fs::write(dir.join("first.jsonl"), job("d-1", "mlp", 1)).unwrap();
    let first = submit(&h, &dir.join("first.jsonl"), dir.join("first.out").to_str().unwrap(), &[]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let answer = std::fs::read_to_string(dir.join("first.out")).unwrap();

    // The same job again into a fresh output (no resume): its stored answer is collected.
    std::fs::write(dir.join("again.jsonl"), [job("d-1", "mlp", 1), job("d-2", "mlp", 2)].join("\n")).unwrap();
    let again = submit(&h, &dir.join("again.jsonl"), dir.join("again.out").to_str().unwrap(), &[]);
    let err = text(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("id 'd-1': published before and answered; its stored answer is collected") && err.contains("2 answered: 2 ok"), "{err}");
    let out = std::fs::read_to_string(dir.join("again.out")).unwrap();
    assert!(out.lines().any(|l| l == answer.trim()), "the stored answer is written as it was:\n{out}");

    // A different job under the answered id: named at once, not waited for (idle timeout 60 s).
    std::fs::write(dir.join("other.jsonl"), job("d-1", "mlp", 9)).unwrap();
    let started = Instant::now();
    let other = submit(&h, &dir.join("other.jsonl"), dir.join("other.out").to_str().unwrap(), &[]);
    let err = text(&other.stderr);
    assert!(!other.status.success(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}: {err}", started.elapsed());
    for expect in [
        "id 'd-1': not queued, dropped as a duplicate: a different job under this id is answered already; give this job a new id",
        "1 job(s) not queued and not answered: their ids were used by other jobs within the jobs stream's duplicate window (d-1); give them new ids",
    ] {
        assert!(err.contains(expect), "stderr lacks {expect:?}:\n{err}");
    }
    assert!(!err.contains("no result for"), "no stall report: {err}");
    assert_eq!(std::fs::read_to_string(dir.join("other.out")).unwrap_or_default(), "", "another job's answer is not ours");
}
