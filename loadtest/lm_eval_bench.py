"""lm-eval multiple choice: the jetbatch backend (one local worker) vs lm-eval's own HF backend,
same model, same machine, one after the other. Prints a Markdown block for loadtest/README.md.

usage: .venv/bin/python loadtest/lm_eval_bench.py [--questions 300] [--batch-size 32] [--jetbatch-bin PATH]
       .venv/bin/python loadtest/lm_eval_bench.py --fewshot [--questions 120]     # make bench WHICH=fewshot

Zero-shot (default): a random Llama (fixed seed) with a 32,000-token vocabulary, hidden size 256
and 4 layers; a local task of 4 worded choices per question, accuracy.

`--fewshot`: the evaluation workload — a 5-shot multiple-choice task in MMLU's format (a subject
line, five solved examples from the train split, the same for every question as MMLU's `first_n`
sampler gives, then the question with lettered options; the choices " A" … " D") on a model
shaped like a small real one (loadtest/baselines/lm_model.py: vocabulary 32,000 with its own BPE,
hidden 512, 8 layers, GQA). Three runs: lm-eval's HF backend, jetbatch, and jetbatch with its
prefix cache off (`JETBATCH_PREFIX_CACHE_MB=0`), each a fresh worker.

Each side's time is the whole `lm_eval.simple_evaluate` call, model loading included (the worker
loads its model on the first job). Needs a release worker: `cargo build --release` (or give
--jetbatch-bin).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import random
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "clients" / "python" / "tests"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from harness import start_nats, start_worker  # noqa: E402
from tiny_lm import write_tiny_llama  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog a batch of jobs waits on bus for worker with free device "
         "language models score continuations by sum their token log probabilities rolling windows cover long "
         "text in pieces model can read numbers like and symbols are tokens too").split()
TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


FEWSHOT_TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {data}
test_split: test
fewshot_split: train
fewshot_config:
  sampler: first_n
num_fewshot: 5
description: "The following are multiple choice questions (with answers) about batch inference.\\n\\n"
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
"""


def write_fewshot_task(dir: pathlib.Path, questions: int, seed: int = 5) -> None:
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    for name, n in (("train", 5), ("mc", questions)):
        with open(dir / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"question": words(14, 30) + "?", "choices": [words(2, 6) for _ in range(4)],
                                    "answer": rng.randrange(4)}) + "\n")
    (dir / "bench_mc.yaml").write_text(FEWSHOT_TASK.format(train=dir / "train.jsonl", data=dir / "mc.jsonl"))


def write_task(dir: pathlib.Path, questions: int, seed: int = 5) -> None:
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    with open(dir / "mc.jsonl", "w") as f:
        for i in range(questions):
            f.write(json.dumps({"question": words(8, 16) + "?", "choices": [words(1, 4) for _ in range(4)],
                                "answer": rng.randrange(4)}) + "\n")
    (dir / "bench_mc.yaml").write_text(TASK.format(data=dir / "mc.jsonl"))


def worker_stats(port: int) -> str:
    """What the worker's /metrics say of the run: batches, compute time, the prefix cache."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            name = name.split("{", 1)[0]
            total[name] = total.get(name, 0.0) + float(value)
    get = lambda k: total.get(k, 0.0)  # noqa: E731
    batches = get("jetbatch_batch_size_count")
    looked, hit = get("jetbatch_prefix_lookup_tokens_total"), get("jetbatch_prefix_hit_tokens_total")
    return (f"{batches:.0f} batches (mean {get('jetbatch_batch_size_sum') / max(batches, 1):.1f} jobs), "
            f"engine {get('jetbatch_batch_compute_seconds_sum'):.1f} s; prefix cache: {hit:.0f} of {looked:.0f} "
            f"context tokens from the cache ({100 * hit / max(looked, 1):.0f} %)")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return rev + ("+changes" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=None, help="default 300 (120 with --fewshot)")
    ap.add_argument("--fewshot", action="store_true", help="5-shot MMLU-format task, hidden-512 8-layer model, prefix cache on vs off")
    ap.add_argument("--batch-size", type=int, default=32, help="lm-eval's batch_size for the HF backend")
    ap.add_argument("--jetbatch-bin", default=str(ROOT / "target" / "release" / "jetbatch"))
    args = ap.parse_args()
    args.questions = args.questions or (120 if args.fewshot else 300)

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from jetbatch.lm_eval import JetbatchLM

    with tempfile.TemporaryDirectory(prefix="jetbatch-lm-eval-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "tasks").mkdir()
        if args.fewshot:
            model_dir = tmp / "models" / "bench-llama"
            subprocess.run([sys.executable, str(ROOT / "loadtest" / "baselines" / "lm_model.py"), str(model_dir),
                            "--hidden", "512", "--layers", "8", "--seed", "11", "--max-positions", "2048"], check=True)
            write_fewshot_task(tmp / "tasks", args.questions)
        else:
            model_dir = write_tiny_llama(tmp / "models" / "bench-llama", seed=11, vocab_size=32000, hidden=256, layers=4,
                                         max_positions=512, std=0.05)
            write_task(tmp / "tasks", args.questions)
        tm = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)

        def timed(model, **kw):
            t0 = time.perf_counter()
            r = lm_eval.simple_evaluate(model=model, tasks=["bench_mc"], task_manager=tm, log_samples=True, **kw)
            return time.perf_counter() - t0, r

        def jetbatch_run(name: str, env: dict):
            """A fresh nats-server and worker (so no result cache or prefix cache carries over)."""
            nats, url = start_nats(tmp / f"nats-{name}")
            os.environ.update(env)
            worker = start_worker(url, tmp / "models", tmp / f"worker-{name}", binary=args.jetbatch_bin, worker_id=name)
            try:
                lm = JetbatchLM(model="bench-llama", nats_url=url, progress=False)
                out = timed(lm)
                lm.close()
                stats[name] = worker_stats(worker.port)
                return out
            finally:
                for key in env:
                    os.environ.pop(key, None)
                worker.stop()
                nats.stop()

        stats = {}
        hf_s, hf = timed("hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu", batch_size=args.batch_size)
        jb_s, jb = jetbatch_run("bench", {})
        off = jetbatch_run("bench-no-prefix", {"JETBATCH_PREFIX_CACHE_MB": "0"}) if args.fewshot else None

    def lls(r):
        return [ll for s in sorted(r["samples"]["bench_mc"], key=lambda s: s["doc_id"]) for ll, _ in s["filtered_resps"]]

    runs = [(f"lm-eval `hf` (batch_size {args.batch_size})", hf_s, hf), ("`jetbatch` (one local worker)", jb_s, jb)]
    if off is not None:
        runs.append(("`jetbatch`, prefix cache off", *off))
    diff = max(abs(a - b) for _, _, r in runs[1:] for a, b in zip(lls(hf), lls(r)))
    requests = len(lls(hf))
    accs = [r["results"]["bench_mc"]["acc,none"] for _, _, r in runs]
    shots = "5-shot MMLU format, " if args.fewshot else ""
    rows = "\n".join(f"| {name} | {secs:.1f} s | {requests / secs:.1f} | {acc:.4f} |" for (name, secs, _), acc in zip(runs, accs))
    print(f"""
- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {machine()}; commit {commit()}
- lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else '?'}, torch {torch.__version__} ({torch.get_num_threads()} threads), {shots}{args.questions} questions x 4 choices = {requests} loglikelihood requests

| backend | wall time | requests/s | acc |
| --- | --- | --- | --- |
{rows}

ratio (hf / jetbatch): **{hf_s / jb_s:.2f}x**""" + (f"; prefix cache on / off: **{off[0] / jb_s:.2f}x**" if off else "")
          + f"; largest loglikelihood difference {diff:.2e}")
    for name, line in stats.items():
        print(f"- worker `{name}`: {line}")
    if len(set(accs)) != 1 or not math.isclose(diff, 0.0, abs_tol=1e-3):
        sys.exit("the backends disagree (see above)")


if __name__ == "__main__":
    main()
