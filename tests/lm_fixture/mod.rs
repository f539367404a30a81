//! The LM fixture: tiny random Hugging Face models and transformers' references for them, built
//! once per script version by tests/fixtures/make_lm_models.py (the Python side takes ~15 s).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;

/// The fixture folder (`models/<name>/`) and `references.json`.
pub fn fixture() -> &'static (PathBuf, Value) {
    static FIXTURE: OnceLock<(PathBuf, Value)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let script = root.join("tests/fixtures/make_lm_models.py");
        let hash = blake3::hash(&std::fs::read(&script).unwrap()).to_hex()[..12].to_string();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("lm-fixture-{hash}"));
        if !dir.join("references.json").is_file() {
            // Test binaries run in parallel: each builds in its own folder and renames it into
            // place (the first rename wins; the fixture is deterministic).
            let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let out = std::process::Command::new(root.join(".venv/bin/python"))
                .arg(&script)
                .arg(&tmp)
                .env("HF_HUB_OFFLINE", "1")
                .output()
                .expect("venv python (make test bootstraps it)");
            assert!(out.status.success(), "fixture: {}", String::from_utf8_lossy(&out.stderr));
            if std::fs::rename(&tmp, &dir).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        let refs = serde_json::from_str(&std::fs::read_to_string(dir.join("references.json")).unwrap()).unwrap();
        (dir, refs)
    })
}

/// The project venv's `python` run on `script` with `args`; its stdout as JSON. For reference
/// values from transformers on the fixture's files.
pub fn python(script: &str, args: &[&str]) -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("venv python (make test bootstraps it)");
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}
