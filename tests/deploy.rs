//! deploy/ validates: Kubernetes manifests (kubernetes-validate, offline schemas), the KEDA and
//! ServiceMonitor resources (CRD schemas), docker-compose (compose-spec), nats-server configs
//! (`nats-server -t`), and the dashboard only queries metrics the worker exports.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn validate(deploy: &Path) -> Output {
    Command::new(root().join(".venv/bin/python")).arg(deploy.join("validate.py")).output().expect("venv python (make test bootstraps it)")
}

#[test]
fn deploy_files_validate_and_the_dashboard_queries_real_metrics() {
    let out = validate(&root().join("deploy"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for what in [
        "deployment.yaml Deployment",
        "keda-scaledobject.yaml ScaledObject",
        "servicemonitor.yaml ServiceMonitor",
        "docker-compose.yml",
        "model-download-job.yaml Job",
        "models-pvc.yaml PersistentVolumeClaim",
        "nats/helm-values.yaml",
    ] {
        assert!(stdout.contains(&format!("ok {what}")), "{what} checked:\n{stdout}");
    }
    // The model configs the ConfigMap carries are read as the worker reads jetbatch.toml.
    let configs: Vec<(&str, String)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("model-config "))
        .map(|l| l.split_once(' ').map(|(key, text)| (key, serde_json::from_str::<String>(text).unwrap())).unwrap())
        .collect();
    assert_eq!(configs.iter().map(|(k, _)| *k).collect::<Vec<_>>(), ["mlp.jetbatch.toml", "qwen.jetbatch.toml"]);
    for (key, text) in &configs {
        let config: jetbatch::plan::ModelConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(config.preload, "{key}");
    }
    let exported = jetbatch::metrics::Metrics::new("t");
    let queried: Vec<&str> = stdout.split("metrics:\n").nth(1).expect("metric list").lines().collect();
    assert!(queried.len() >= 8, "{queried:?}");
    for name in queried {
        assert!(exported.names().iter().any(|n| n == name), "dashboard queries {name}, which the worker does not export");
    }
}

#[test]
fn validation_fails_on_a_broken_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("deploy");
    let status = Command::new("cp").arg("-r").arg(root().join("deploy")).arg(&copy).status().unwrap();
    assert!(status.success());
    let deployment = copy.join("k8s/deployment.yaml");
    let text = std::fs::read_to_string(&deployment).unwrap();
    std::fs::write(&deployment, text.replace("terminationGracePeriodSeconds", "terminationGracePeriod")).unwrap();
    let keda = copy.join("k8s/keda-scaledobject.yaml");
    let text = std::fs::read_to_string(&keda).unwrap();
    std::fs::write(&keda, text.replace("consumer:", "durable:")).unwrap();
    let values = copy.join("nats/helm-values.yaml");
    let text = std::fs::read_to_string(&values).unwrap();
    std::fs::write(&values, text.replace("fileStore:", "filestore:")).unwrap();
    let out = validate(&copy);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("deployment.yaml") && stderr.contains("keda-scaledobject.yaml") && stderr.contains("helm-values.yaml"), "{stderr}");
}

#[test]
fn nats_configs_are_valid() {
    let bin = jetbatch_testkit::NatsServer::find_binary();
    for (conf, node) in [("nats-server.conf", None), ("cluster.conf", Some("nats-1"))] {
        let mut cmd = Command::new(&bin);
        cmd.args(["-t", "-c"]).arg(root().join("deploy/nats").join(conf)).env("PRODUCER_PASSWORD", "p").env("WORKER_PASSWORD", "w");
        if let Some(node) = node {
            cmd.env("NODE", node);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{conf}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
