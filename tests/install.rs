//! The install layout (`make install PREFIX=…`, scripts/install.sh) runs on a host without the
//! build tree: the installed binary's loader path is only `$ORIGIN/../lib/jetbatch`, every
//! non-system library resolves inside the installed tree (moved elsewhere after installing, with a
//! clean environment), and it loads models there. The test installs the binary `cargo test`
//! built; `make install` installs the release one the same way, and `make install-check` runs
//! this test on it.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `program` with an empty environment but for a system `PATH`: no `LD_LIBRARY_PATH`, no
/// venv, as on a bare host.
fn bare(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).env_clear().env("PATH", "/usr/bin:/bin").output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn an_installed_worker_loads_libtorch_and_models_from_its_own_tree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let staged = tmp.path().join("staged");
    // `make install-check` sets JETBATCH_INSTALL_BIN to the release binary.
    let built = std::env::var("JETBATCH_INSTALL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_jetbatch").to_string());
    let install = Command::new("bash").arg(root.join("scripts/install.sh")).arg(&staged).arg(&built).current_dir(root).output().unwrap();
    assert!(install.status.success(), "{}{}", text(&install.stdout), text(&install.stderr));
    // Relocatable: the tree works wherever it is moved.
    let prefix = tmp.path().join("elsewhere");
    std::fs::rename(&staged, &prefix).unwrap();
    let bin = prefix.join("bin/jetbatch");

    let dynamic = text(&Command::new("readelf").arg("-d").arg(&bin).output().unwrap().stdout);
    let runpath: Vec<&str> = dynamic.lines().filter(|l| l.contains("RUNPATH") || l.contains("RPATH")).collect();
    assert_eq!(runpath.len(), 1, "{dynamic}");
    assert!(runpath[0].ends_with("Library runpath: [$ORIGIN/../lib/jetbatch]"), "{}", runpath[0]);

    let ldd = bare(Path::new("/usr/bin/ldd"), &[bin.to_str().unwrap()]);
    let ldd = text(&ldd.stdout);
    let lib = std::fs::canonicalize(prefix.join("lib/jetbatch")).unwrap();
    let mut inside = Vec::new();
    for line in ldd.lines().filter(|l| l.contains("=>")) {
        assert!(!line.contains("not found"), "{ldd}");
        let path = line.split("=>").nth(1).unwrap().split(" (").next().unwrap().trim();
        if let Some(name) = std::fs::canonicalize(path).ok().and_then(|p| p.strip_prefix(&lib).ok().map(|n| n.display().to_string())) {
            inside.push(name);
        } else {
            let system = ["/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/"].iter().any(|d| path.starts_with(d));
            assert!(system, "{path} is neither the system's nor the installed tree's:\n{ldd}");
        }
    }
    for needed in ["libtorch_cpu.so", "libc10.so", "libgomp.so.1"] {
        assert!(inside.iter().any(|l| l == needed), "{needed} not loaded from {}:\n{ldd}", lib.display());
    }
    assert!(!ldd.contains(root.to_str().unwrap()) && !ldd.contains(".venv"), "{ldd}");

    let version = bare(&bin, &["--version"]);
    assert_eq!(text(&version.stdout).trim(), format!("jetbatch {}", env!("CARGO_PKG_VERSION")), "{}", text(&version.stderr));

    let models = tmp.path().join("models");
    jetbatch_testkit::write_fixture_models(&models).unwrap();
    let loaded = bare(&bin, &["models", "--load", "--models", models.to_str().unwrap()]);
    let out = text(&loaded.stdout) + &text(&loaded.stderr);
    assert!(loaded.status.success(), "{out}");
    for model in ["mlp", "seqproj", "tiny-lm"] {
        assert!(out.contains(model), "{model} missing:\n{out}");
    }
}
