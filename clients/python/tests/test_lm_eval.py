"""The jetbatch backend against lm-eval's own HF backend on the same weights: local JSON tasks of
each output type (multiple_choice with acc_mutual_info's empty contexts, loglikelihood_rolling
over several windows, generate_until with stop strings) give equal samples (log-likelihoods
within 1e-4, same greedy flags, same generations) and equal metrics. Also the chat-template
route, lm-eval's --use_cache, and the `lm-eval-jetbatch` command."""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from jetbatch.lm_eval import JetbatchLM

from conftest import BOS_MODEL, MODEL

TASKS_DIR = pathlib.Path(__file__).parent / "fixtures" / "tasks"
TASKS = ["jb_mc", "jb_rolling", "jb_gen"]
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def task_manager() -> TaskManager:
    # Our tasks only: indexing lm-eval's thousands of built-in tasks takes seconds per evaluation.
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def evaluate(model, tasks=TASKS, **kw):
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=task_manager(), log_samples=True, **kw)


def assert_same(got, want, path="") -> None:
    """Equal structure and values; floats within TOL (relative or absolute)."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and isinstance(want, (int, float)), f"{path}: {got!r} vs {want!r}"
        assert math.isclose(got, want, rel_tol=TOL, abs_tol=TOL) or (math.isnan(got) and math.isnan(want)), \
            f"{path}: {got!r} vs {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(got)} vs {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{path}: {got!r} vs {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} vs {want!r}"


def assert_same_evaluation(got, want, tasks) -> None:
    for task in tasks:
        assert_same(got["results"][task], want["results"][task], f"results.{task}")
        g = sorted(got["samples"][task], key=lambda s: s["doc_id"])
        w = sorted(want["samples"][task], key=lambda s: s["doc_id"])
        assert len(g) == len(w) > 0
        for gs, ws in zip(g, w):
            assert_same(gs, ws, f"samples.{task}[{ws['doc_id']}]")


@pytest.fixture(autouse=True)
def in_tasks_dir(monkeypatch):
    # The task YAMLs name their data files relative to their own folder.
    monkeypatch.chdir(TASKS_DIR)


@pytest.fixture(scope="session")
def hf_reference(models):
    # Session-scoped, so it changes directory itself (monkeypatch is per test).
    old = os.getcwd()
    os.chdir(TASKS_DIR)
    try:
        return evaluate("hf", model_args=f"pretrained={models / MODEL},dtype=float32", device="cpu", batch_size=4)
    finally:
        os.chdir(old)


@pytest.fixture
def jetbatch_lm():
    """Makes backends and closes their connections after the test."""
    made = []

    def make(nats_url, **kw):
        made.append(JetbatchLM(model=MODEL, nats_url=nats_url, progress=False, **kw))
        return made[-1]

    yield make
    for lm in made:
        lm.close()


def test_registered_under_jetbatch():
    assert get_model("jetbatch") is JetbatchLM


def test_equal_to_the_hf_backend_on_every_output_type(worker, nats_url, hf_reference, jetbatch_lm):
    got = evaluate(jetbatch_lm(nats_url))
    assert_same_evaluation(got, hf_reference, TASKS)
    gens = [s["filtered_resps"][0] for s in hf_reference["samples"]["jb_gen"]]
    # The stop strings did cut some generations (the post-hoc cut is exercised) and not all.
    assert any(len(g) < 6 for g in gens) and any(len(g) >= 6 for g in gens), gens
    # acc_mutual_info's unconditional requests have an empty context.
    mc_args = [a for s in hf_reference["samples"]["jb_mc"] for a in s["arguments"]]
    assert any(a[0] == "" for a in mc_args)


def test_chat_template_rendered_from_the_tokenizer_equals_hf(worker, nats_url, models, hf_reference, jetbatch_lm):
    tasks = ["jb_mc", "jb_gen"]
    want = evaluate("hf", tasks, model_args=f"pretrained={models / MODEL},dtype=float32", device="cpu", batch_size=4,
                    apply_chat_template=True, limit=4)
    got = evaluate(jetbatch_lm(nats_url, tokenizer=str(models / MODEL)), tasks, apply_chat_template=True, limit=4)
    assert_same_evaluation(got, want, tasks)
    assert "<|assistant|>" in want["samples"]["jb_gen"][0]["arguments"][0][0]


def test_chat_template_rendered_by_the_worker_equals_hf_without_a_local_tokenizer(worker, nats_url, models, jetbatch_lm):
    tasks = ["jb_mc", "jb_gen"]
    want = evaluate("hf", tasks, model_args=f"pretrained={models / MODEL},dtype=float32", device="cpu", batch_size=4,
                    apply_chat_template=True, limit=4)
    lm = jetbatch_lm(nats_url)
    got = evaluate(lm, tasks, apply_chat_template=True, limit=4)
    # The samples too: the prompts the worker rendered are in them, as the HF backend's are.
    assert_same_evaluation(got, want, tasks)
    assert "<|assistant|>" in got["samples"]["jb_mc"][0]["arguments"][0][0]
    pool = got["config"]["jetbatch"]
    assert pool["one_model"] and len(pool["model_fingerprint"]) == 1 and pool["dtype"] == ["f32"]
    assert pool["device"] == ["cpu"] and pool["worker"] == ["py-tests"] and len(pool["chat_template_hash"]) == 1


def test_without_a_tokenizer_chat_messages_go_to_the_worker(nats_url, jetbatch_lm):
    lm = jetbatch_lm(nats_url)
    history = [{"role": "user", "content": "the quick, brown fox"}]
    assert lm._prompt(lm.apply_chat_template(history)) == {"messages": history}
    assert lm._context(lm.apply_chat_template(history)) == {"messages": history}
    with pytest.raises(ValueError, match="tokenizer"):
        lm._plain(lm.apply_chat_template(history), "loglikelihood_rolling")


def test_two_weights_under_one_name_are_visible_in_the_results_config(caplog):
    from jetbatch import Provenance, Result, Timing
    from jetbatch.lm_eval import _Provenance

    seen = _Provenance()
    for i, fingerprint in enumerate(["aaaa", "aaaa", "bbbb"]):
        p = Provenance(fingerprint, "f32", "cpu" if i else "cuda:0", "0.1.0")
        seen.add(Result(f"j{i}", MODEL, "loglikelihood", "ok", False, f"w{i}", Timing(0, 0, 1), provenance=p))
    info = seen.info(MODEL)
    assert not info["one_model"] and info["model_fingerprint"] == ["aaaa", "bbbb"]
    assert info["device"] == ["cpu", "cuda:0"] and info["worker"] == ["w0", "w1", "w2"]
    assert "different weights" in caplog.text and caplog.text.count("different weights") == 1


def test_a_model_the_pool_does_not_serve_is_refused_at_start_with_a_suggestion(worker, nats_url):
    with pytest.raises(ValueError, match="'tiny-lama' is not served by the pool .*did you mean 'tiny-llama'"):
        JetbatchLM(model="tiny-lama", nats_url=nats_url, progress=False)


def test_the_command_names_a_model_the_pool_does_not_serve_in_one_line(worker, nats_url, tmp_path):
    command = pathlib.Path(sys.executable).parent / "lm-eval-jetbatch"
    out = subprocess.run(
        [str(command), "run", "--model", "jetbatch", "--model_args", f"model=tiny-lama,nats_url={nats_url}",
         "--tasks", "jb_mc", "--include_path", str(TASKS_DIR), "--output_path", str(tmp_path)],
        cwd=TASKS_DIR, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "error: model: 'tiny-lama' is not served by the pool" in out.stderr and "did you mean 'tiny-llama'" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def test_an_interrupted_call_cancels_its_queued_jobs(tmp_path, caplog):
    import asyncio

    import nats
    from lm_eval.api.instance import Instance

    from harness import start_nats
    from jetbatch import JetbatchTimeout

    server, url = start_nats(tmp_path / "nats")  # and no worker
    try:
        lm = JetbatchLM(model=MODEL, nats_url=url, progress=False, idle_timeout=1)
        assert "no worker answered" in caplog.text
        requests = [Instance("loglikelihood", {}, ("the quick brown", f" fox {i}"), i) for i in range(5)]
        with pytest.raises(JetbatchTimeout):
            lm.loglikelihood(requests)
        lm.close()
        assert "cancelled 5 queued job(s)" in caplog.text

        async def queued():
            nc = await nats.connect(url)
            try:
                return (await nc.jetstream().stream_info("JETBATCH_JOBS")).state.messages
            finally:
                await nc.close()

        assert asyncio.run(queued()) == 0
    finally:
        server.stop()


def test_a_ctrl_c_during_a_call_cancels_its_queued_jobs(tmp_path, caplog, monkeypatch):
    import asyncio
    import concurrent.futures

    from lm_eval.api.instance import Instance

    from harness import start_nats
    from jetbatch import SyncClient

    server, url = start_nats(tmp_path / "nats")  # and no worker: the jobs stay queued
    try:
        lm = JetbatchLM(model=MODEL, nats_url=url, progress=False)
        real_call = SyncClient._call

        def ctrl_c_after_2s(self, coro):
            # The call's coroutine runs on; Ctrl-C reaches the thread waiting for it.
            monkeypatch.setattr(SyncClient, "_call", real_call)
            original = concurrent.futures.Future.result
            monkeypatch.setattr(concurrent.futures.Future, "result",
                                lambda f, timeout=None: original(f, 2) if timeout is None else original(f, timeout))
            try:
                return real_call(self, coro)
            except concurrent.futures.TimeoutError:
                raise KeyboardInterrupt
            finally:
                monkeypatch.setattr(concurrent.futures.Future, "result", original)

        monkeypatch.setattr(SyncClient, "_call", ctrl_c_after_2s)
        requests = [Instance("loglikelihood", {}, ("the quick brown", f" fox {i}"), i) for i in range(4)]
        with pytest.raises(KeyboardInterrupt):
            lm.loglikelihood(requests)
        assert "cancelled 4 queued job(s)" in caplog.text
        assert lm._client.served_models() == {}  # the client still answers after the interrupt
        lm.close()
    finally:
        server.stop()


def test_generation_kwargs_map_onto_generate_params(nats_url, jetbatch_lm):
    lm = jetbatch_lm(nats_url, truncate="left")
    params, until = lm._generate_params({"until": ["\n", "", "x" * 300], "max_gen_toks": 5, "do_sample": False, "temperature": 0.7})
    assert params == {"max_new_tokens": 5, "stop": ["\n"], "truncate": "left"} and until == ["\n", "", "x" * 300]
    params, _ = lm._generate_params({"until": "Q:", "do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 3})
    assert params == {"max_new_tokens": 256, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ["Q:"], "truncate": "left"}
    with pytest.raises(ValueError, match="gen_kwargs.num_beams"):
        lm._generate_params({"until": [], "num_beams": 4})


def test_use_cache_answers_a_second_run_without_the_bus(worker, nats_url, hf_reference, tmp_path, jetbatch_lm):
    first = evaluate(jetbatch_lm(nats_url), use_cache=str(tmp_path / "cache"))
    # Nothing listens on port 1: only the cache can answer.
    second = evaluate(jetbatch_lm("nats://127.0.0.1:1"), use_cache=str(tmp_path / "cache"))
    assert_same_evaluation(second, first, TASKS)
    assert_same_evaluation(first, hf_reference, TASKS)


def test_the_lm_eval_jetbatch_command(worker, nats_url, hf_reference, tmp_path):
    command = pathlib.Path(sys.executable).parent / "lm-eval-jetbatch"
    out = subprocess.run(
        [str(command), "run", "--model", "jetbatch", "--model_args", f"model={MODEL},nats_url=nats://127.0.0.1:1|{nats_url}",
         "--tasks", "jb_mc", "--include_path", str(TASKS_DIR), "--batch_size", "8", "--output_path", str(tmp_path)],
        cwd=TASKS_DIR, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    saved = json.loads(pathlib.Path(path).read_text())
    assert_same(saved["results"]["jb_mc"], hf_reference["results"]["jb_mc"])
    # The device the pool ran on, not lm-eval's default cuda:0; and what produced the results.
    assert saved["config"]["device"] == "cpu"
    assert saved["config"]["jetbatch"]["dtype"] == ["f32"] and len(saved["config"]["jetbatch"]["model_fingerprint"]) == 1


# lm-eval 0.4.13 encodes loglikelihood contexts, rolling texts and generate_until contexts with
# the tokenizer's special tokens (add_bos_token unset): a tokenizer that adds <s> gets <s> in front,
# and the worker encodes as it does.
def test_a_tokenizer_that_adds_bos_scores_as_the_hf_backend(worker, nats_url, models):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    pairs = [Instance("loglikelihood", {}, ("the quick brown", " fox"), 0), Instance("loglikelihood", {}, ("", "the lazy dog"), 1)]
    texts = [Instance("loglikelihood_rolling", {}, ("the quick brown fox jumps over the lazy dog " * 3,), 0)]
    hf = HFLM(pretrained=str(models / BOS_MODEL), dtype="float32", device="cpu")
    ours = JetbatchLM(model=BOS_MODEL, nats_url=nats_url, progress=False)
    try:
        assert_same(ours.loglikelihood(pairs), hf.loglikelihood(pairs))
        assert_same(ours.loglikelihood_rolling(texts), hf.loglikelihood_rolling(texts))
    finally:
        ours.close()
