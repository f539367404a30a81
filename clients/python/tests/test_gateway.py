"""`jetbatch gateway` through the OpenAI Python SDK (PyPI `openai`) and lm-eval's
`local-completions` backend, against the native path on the same worker: echo + logprobs summing
to the native `loglikelihood`, chat streamed and not equal to the native `generate` (and its
log-probs streamed equal to unstreamed), errors as
the SDK raises them, and lm-eval's OpenAI-completions backend scoring a local multiple-choice task
with the samples of the `jetbatch` backend (log-likelihoods within 1e-4, same greedy flags)."""
from __future__ import annotations

import json
import math
import time
import urllib.request

import openai
import pytest

import jetbatch
from jetbatch import Job
from jetbatch.lm_eval import JetbatchLM

from conftest import MODEL
from harness import Proc, free_port, jetbatch_bin
from test_lm_eval import TASKS_DIR, assert_same_evaluation, evaluate

KEY = "sk-gateway-test"


@pytest.fixture(scope="module")
def gateway(worker, nats_url, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    g = Proc([jetbatch_bin(), "gateway", "--nats-url", nats_url, "--addr", f"127.0.0.1:{port}", "--api-keys", KEY,
              "--models-ttl-secs", "1"], log, port, "jetbatch gateway")
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:
        req = urllib.request.Request(f"{base}/models", headers={"Authorization": f"Bearer {KEY}"})
        try:
            listed = [m["id"] for m in json.load(urllib.request.urlopen(req))["data"]]
        except OSError:
            listed = []
        if MODEL in listed:
            break
        assert time.monotonic() < deadline, f"{MODEL} never listed by the gateway: {log.read_text()[-2000:]}"
        time.sleep(0.2)
    yield base
    g.stop()


@pytest.fixture
def sdk(gateway):
    client = openai.OpenAI(base_url=gateway, api_key=KEY, max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(models / MODEL))


def native(nats_url, kind, input, params=None):
    [result] = jetbatch.run([Job(MODEL, kind, input, params)], servers=nats_url)
    return result.output


def test_echo_logprobs_sum_to_the_native_loglikelihood(sdk, nats_url, tokenizer):
    context = tokenizer("Question: what jumps over the lazy dog?\nAnswer:", add_special_tokens=False).input_ids
    continuation = tokenizer(" jumps jobs device", add_special_tokens=False).input_ids
    r = sdk.completions.create(model=MODEL, prompt=context + continuation, echo=True, max_tokens=0, logprobs=1)
    logprobs = r.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(context) + len(continuation) and logprobs.token_logprobs[0] is None
    got = sum(logprobs.token_logprobs[len(context):])
    want = native(nats_url, "loglikelihood", {"context_tokens": context, "continuation_tokens": continuation})
    assert math.isclose(got, want.logprob, rel_tol=1e-5, abs_tol=1e-5), (got, want.logprob)
    greedy = all(lp == max(top.values()) for lp, top in zip(logprobs.token_logprobs[len(context):], logprobs.top_logprobs[len(context):]))
    assert greedy == want.is_greedy
    assert r.usage.prompt_tokens == len(context) + len(continuation)


def test_completions_equal_the_native_generate(sdk, nats_url):
    r = sdk.completions.create(model=MODEL, prompt="the quick brown", max_tokens=6, temperature=0)
    want = native(nats_url, "generate", {"prompt": "the quick brown"}, {"max_new_tokens": 6, "temperature": 0})
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == len(want.tokens)


def test_chat_streamed_and_not_equals_the_native_generate(sdk, nats_url):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    want = native(nats_url, "generate", {"messages": messages}, {"max_new_tokens": 8})
    r = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == len(want.tokens)
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Log-probs, streamed (each chunk its tokens') and not: the same tokens and values.
    r = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, logprobs=True, top_logprobs=2)
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, logprobs=True, top_logprobs=2,
                                              stream=True, extra_body={"cache": False}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in r.choices[0].logprobs.content]
    assert len(streamed) == len(want.tokens) and all(len(t.top_logprobs) == 2 for t in streamed)


def test_errors_are_raised_as_the_sdk_raises_openais(sdk):
    with pytest.raises(openai.NotFoundError) as e:
        sdk.completions.create(model="no-such-model", prompt="x")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model=MODEL, prompt="x", frequency_penalty=0.5)
    assert e.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(sdk.base_url), api_key="wrong", max_retries=0).models.list()


def test_lm_eval_local_completions_scores_as_the_jetbatch_backend(gateway, nats_url, models, monkeypatch):
    monkeypatch.chdir(TASKS_DIR)
    args = (f"model={MODEL},base_url={gateway}/completions,tokenizer={models / MODEL},tokenizer_backend=huggingface,"
            "num_concurrent=4,max_retries=1")
    want_lm = JetbatchLM(model=MODEL, nats_url=nats_url, progress=False)
    try:
        want = evaluate(want_lm, ["jb_mc"])
    finally:
        want_lm.close()
    # lm-eval's OpenAI backends send this key.
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    got = evaluate("local-completions", ["jb_mc"], model_args=args)
    assert_same_evaluation(got, want, ["jb_mc"])


def test_lm_eval_local_chat_completions_generates_as_the_jetbatch_backend(gateway, nats_url, monkeypatch):
    # Both send the chat as messages for the worker to render with the model's template.
    monkeypatch.chdir(TASKS_DIR)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    want_lm = JetbatchLM(model=MODEL, nats_url=nats_url, progress=False)
    try:
        want = evaluate(want_lm, ["jb_gen"], apply_chat_template=True)
    finally:
        want_lm.close()
    got = evaluate("local-chat-completions", ["jb_gen"], apply_chat_template=True,
                   model_args=f"model={MODEL},base_url={gateway}/chat/completions,num_concurrent=4,max_retries=1")
    responses = lambda r: [s["filtered_resps"] for s in sorted(r["samples"]["jb_gen"], key=lambda s: s["doc_id"])]  # noqa: E731
    assert responses(got) == responses(want)
    assert any(r[0] for r in responses(want)), "the generations are not all empty"
    assert got["results"]["jb_gen"]["exact_match,none"] == want["results"]["jb_gen"]["exact_match,none"]
