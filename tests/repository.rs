//! What a worker makes of its model folders: a plain Hugging Face folder (no `jetbatch.toml`) is
//! served with the defaults, and a folder it cannot serve answers its jobs with the reason —
//! not `unknown_model`, as if it did not exist.

mod common;

use std::time::Duration;

use common::*;
use jetbatch::job::{Encoding, ErrorCode, Status};
use serde_json::json;

#[tokio::test]
async fn plain_hf_folders_are_served_and_unservable_ones_say_why() {
    let h = Harness::new().await;
    let plain = h.models.join("plain-lm");
    jetbatch_testkit::write_tiny_lm(&plain, 3, 32, 1).unwrap();
    std::fs::remove_file(plain.join("jetbatch.toml")).unwrap();
    let falcon = h.models.join("falcon");
    std::fs::create_dir_all(&falcon).unwrap();
    std::fs::write(
        falcon.join("config.json"),
        r#"{"architectures": ["FalconForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 8, "max_position_embeddings": 8}"#,
    )
    .unwrap();
    let w = h.worker("w1", &[]);
    w.ready().await;
    let mut sub = h.subscribe_results().await;
    let job = |id: &str, model: &str| {
        let v = json!({"id": id, "model": model, "kind": "generate", "input": {"prompt": "hello"}, "params": {"max_new_tokens": 3}});
        rmpv::ext::to_value(v).unwrap()
    };
    h.publish(&job("plain-1", "plain-lm"), Encoding::Json).await;
    h.publish(&job("falcon-1", "falcon"), Encoding::Json).await;
    h.publish(&job("nowhere-1", "nowhere"), Encoding::Json).await;
    let got = collect(&mut sub, 3, Duration::from_secs(60)).await;
    assert_eq!(got["plain-1"][0].status, Status::Ok);
    let falcon = got["falcon-1"][0].error.as_ref().expect("an error result");
    assert_eq!(falcon.code, ErrorCode::ModelError);
    assert!(falcon.message.contains("cannot be served") && falcon.message.contains("FalconForCausalLM"), "{}", falcon.message);
    assert_eq!(got["nowhere-1"][0].error.as_ref().unwrap().code, ErrorCode::UnknownModel);
    let log = w.log_text();
    assert!(log.contains("model cannot be served") && log.contains("falcon"), "the worker says what it could not serve:\n{log}");
}

/// The issue's case: `a -> .` in a model folder hung the fingerprint walk, and start-up with it.
/// Links to folders are not followed, so the model is served from the files beside them.
#[tokio::test]
async fn a_symlink_loop_in_a_model_folder_starts_in_seconds_and_the_model_is_served() {
    let h = Harness::new().await;
    std::os::unix::fs::symlink(".", h.models.join("mlp/a")).unwrap();
    let started = std::time::Instant::now();
    let w = h.worker("w1", &[]);
    w.ready().await;
    assert!(started.elapsed() < Duration::from_secs(20), "started in {:?}", started.elapsed());
    let mut sub = h.subscribe_results().await;
    h.publish(&tensor_job("looped", "mlp", &[mlp_input(1)], Encoding::MsgPack), Encoding::MsgPack).await;
    let r = &collect(&mut sub, 1, Duration::from_secs(60)).await["looped"][0];
    assert_eq!(r.status, Status::Ok, "{:?}", r.error);
}
