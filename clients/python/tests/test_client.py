"""jetbatch.Client against a real nats-server and worker: round trips, order, duplicates, resume,
results that answer another job, ids the jobs stream drops as duplicates, error results, timeouts,
the sync wrapper."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time

import msgpack
import nats
import pytest

import jetbatch
from jetbatch import (ChoicesOutput, Client, GenerateOutput, JetbatchTimeout, Job, JobError, LoglikelihoodOutput, Result,
                      RollingOutput, StreamChunk, TopLogprobs)

from conftest import DOTTED_MODEL, MODEL, NAMED_MODEL
from harness import ROOT, Proc, free_port, nats_server_bin, start_nats, start_worker

PAIRS = [("the quick brown", " fox jumps"), ("a batch of jobs waits ", "on the bus"), ("", "the lazy dog"),
         ("numbers like 12", " 345 and 6789")]


def run(coro):
    return asyncio.run(coro)


async def collect(url, jobs, **kw):
    async with Client(url, **{k: kw.pop(k) for k in ("run_id", "encoding", "max_inflight", "idle_timeout") if k in kw}) as c:
        return [r async for r in c.submit(jobs, **kw)]


def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models / MODEL)


def reference_logprob(models, context, continuation):
    """transformers on the same folder, the harness's split (trailing spaces move to the continuation)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = tokenizer(models)
    model = AutoModelForCausalLM.from_pretrained(models / MODEL, dtype=torch.float32)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context, add_special_tokens=False) if context else [tok.bos_token_id]
    whole = tok.encode(context + continuation, add_special_tokens=False) if context else ctx + tok.encode(continuation, add_special_tokens=False)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0], -1)
    return float(logp[-len(cont):].gather(1, torch.tensor(cont)[:, None]).sum()), len(cont)


def test_round_trip_typed_results_in_order(worker, nats_url, models):
    jobs = [Job.loglikelihood(MODEL, c, x) for c, x in PAIRS]
    jobs.append(Job.loglikelihood_rolling(MODEL, "the quick brown fox jumps over the lazy dog " * 4))
    jobs.append(Job.generate(MODEL, "the quick", {"max_new_tokens": 8}))
    results = run(collect(nats_url, jobs, ordered=True))
    assert [r.index for r in results] == list(range(len(jobs)))
    assert all(r.ok and r.error is None and r.worker == "py-tests" and not r.resumed for r in results)
    for (context, continuation), r in zip(PAIRS, results):
        assert isinstance(r.output, LoglikelihoodOutput)
        want, n = reference_logprob(models, context, continuation)
        assert r.output.tokens == n
        assert math.isclose(r.output.logprob, want, rel_tol=1e-4, abs_tol=1e-4), (context, r.output.logprob, want)
    rolling, gen = results[-2].output, results[-1].output
    assert isinstance(rolling, RollingOutput) and rolling.tokens > 64 and rolling.logprob < 0
    tok = tokenizer(models)
    assert isinstance(gen, GenerateOutput) and gen.prompt_tokens == len(tok.encode("the quick")) and len(gen.tokens) <= 8
    assert gen.text == tok.decode(gen.tokens, skip_special_tokens=True)
    assert gen.finish_reason in ("length", "eos", "stop")


def test_choices_are_typed_and_each_equals_its_one_continuation_job(worker, nats_url, models):
    context, choices = "the quick brown", [" fox", " dog jumps", " cat"]
    jobs = [Job.choices(MODEL, context, choices, params={"top_logprobs": 3})]
    jobs += [Job.loglikelihood(MODEL, context, x, params={"top_logprobs": 3}) for x in choices]
    results = run(collect(nats_url, jobs, ordered=True))
    out = results[0].output
    assert isinstance(out, ChoicesOutput) and len(out) == 3
    singles = [r.output for r in results[1:]]
    assert all(isinstance(s, LoglikelihoodOutput) for s in singles)
    for i, (choice, single) in enumerate(zip(out, singles)):
        assert choice.tokens == single.tokens and choice.is_greedy == single.is_greedy
        assert math.isclose(choice.logprob, single.logprob, rel_tol=1e-5, abs_tol=1e-5)
        want, n = reference_logprob(models, context, choices[i])
        assert n == choice.tokens and math.isclose(choice.logprob, want, rel_tol=1e-4, abs_tol=1e-4)
        assert len(choice.top_logprobs) == choice.tokens == len(single.top_logprobs)
        assert [t.ids for t in choice.top_logprobs] == [t.ids for t in single.top_logprobs]
    assert out.best == max(range(3), key=lambda i: out.logprobs[i])
    tok = tokenizer(models)
    for top in out[1].top_logprobs:
        assert isinstance(top, TopLogprobs) and len(top.ids) == len(top.tokens) == len(top.logprobs) == 3
        assert top.logprobs == sorted(top.logprobs, reverse=True) and all(lp <= 0 for lp in top.logprobs)
        assert top.tokens == [tok.decode([i]) for i in top.ids]


def test_generate_top_logprobs_are_typed_and_the_greedy_token_leads(worker, nats_url):
    [r] = run(collect(nats_url, [Job.generate(MODEL, "the quick", {"max_new_tokens": 6, "top_logprobs": 2})]))
    out = r.output
    assert isinstance(out, GenerateOutput) and len(out.top_logprobs) == len(out.tokens) > 0
    assert all(isinstance(t, TopLogprobs) and len(t.ids) == 2 for t in out.top_logprobs)
    assert [t.ids[0] for t in out.top_logprobs] == out.tokens  # greedy: each token is the most likely


def test_a_streamed_generation_yields_typed_chunks_then_its_result(worker, nats_url):
    job = Job.generate(MODEL, "a batch of jobs", {"max_new_tokens": 8, "stop_token_ids": []})

    async def go():
        async with Client(nats_url) as c:
            return [x async for x in c.stream(job)]

    *chunks, result = run(go())
    assert isinstance(result, Result) and result.ok and not result.cached and len(result.output.tokens) == 8
    assert len(chunks) > 1 and all(isinstance(c, StreamChunk) and c.id == result.id for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    rest = iter(result.output.tokens)
    assert all(c.token in rest for c in chunks)  # each chunk's newest token, in the result's order
    assert "".join(c.text for c in chunks) == result.output.text
    # Again under a fresh run id: the worker's cache answers, as one chunk with the whole text.
    *chunks, again = run(go())
    assert again.cached and again.output == result.output
    assert [(c.index, c.text) for c in chunks] == [(0, result.output.text)]
    with pytest.raises(ValueError, match="kind"):
        run(anext_of(Client(nats_url).stream(Job.loglikelihood(MODEL, "a", " b"))))


async def anext_of(it):
    return await it.__anext__()


def test_model_names_with_dots_and_a_name_key_are_served(worker, nats_url):
    context, continuation = "the quick brown", " fox"
    jobs = [Job.loglikelihood(m, context, continuation) for m in (MODEL, DOTTED_MODEL, NAMED_MODEL, "Absent2.5-1B")]
    plain, dotted, named, absent = run(collect(nats_url, jobs, ordered=True))
    # The same weights under three names: the same numbers, within float rounding (one model's
    # prefix cache may hold this context from earlier tests, another's not).
    for r, name in ((dotted, DOTTED_MODEL), (named, NAMED_MODEL)):
        assert r.ok and r.model == name and r.output.is_greedy == plain.output.is_greedy
        assert abs(r.output.logprob - plain.output.logprob) <= 1e-5 * max(1.0, abs(plain.output.logprob))
    # Not served: answered unknown_model, not refused for its subject.
    assert absent.error.code == "unknown_model" and "Absent2.5-1B" in absent.error.message
    assert jetbatch.Topology().jobs_subject(DOTTED_MODEL, "low") == "jetbatch.jobs.Tiny2%2E5-0%2E5B-Instruct.low"


def test_results_carry_their_provenance_and_the_prompt_a_chat_template_rendered(worker, nats_url):
    import tomllib

    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    chat = [{"role": "user", "content": "the quick brown"}]
    jobs = [Job.loglikelihood(MODEL, "the quick brown", " fox"), Job(MODEL, "loglikelihood", {"messages": chat, "continuation": " fox"}),
            Job(MODEL, "generate", {"messages": chat}, {"max_new_tokens": 2}), Job.loglikelihood(DOTTED_MODEL, "a", " b"),
            Job.loglikelihood("absent-model", "a", " b")]
    plain, scored, generated, dotted, absent = run(collect(nats_url, jobs, ordered=True, encoding="json"))
    p = plain.provenance
    assert (p.dtype, p.device, p.jetbatch, p.chat_template) == ("f32", "cpu", version, None)
    assert len(p.model_fingerprint) == 16 and int(p.model_fingerprint, 16) >= 0
    # The worker rendered the conversation (conftest's CHAT_TEMPLATE) and says what it scored.
    rendered = "<|user|>the quick brown\n<|assistant|>"
    assert scored.provenance.chat_template.prompt == generated.provenance.chat_template.prompt == rendered
    assert scored.provenance.chat_template.template_hash == generated.provenance.chat_template.template_hash
    # Scoring the messages is scoring the text they render to.
    [as_text] = run(collect(nats_url, [Job.loglikelihood(MODEL, rendered, " fox")]))
    assert scored.output == as_text.output
    # A copy of the folder under another name is the same weights: the same fingerprint.
    assert dotted.provenance.model_fingerprint == p.model_fingerprint
    assert absent.error.code == "unknown_model" and absent.provenance is None


def test_unordered_yields_each_position_once_and_json_equals_msgpack(worker, nats_url):
    jobs = [Job.loglikelihood(MODEL, c, x) for c, x in PAIRS]
    unordered = run(collect(nats_url, jobs))
    assert sorted(r.index for r in unordered) == list(range(len(jobs)))
    as_json = run(collect(nats_url, jobs, encoding="json", ordered=True))
    by_index = {r.index: r.output.logprob for r in unordered}
    assert [r.output.logprob for r in as_json] == [by_index[i] for i in range(len(jobs))]


def test_identical_jobs_are_computed_once_and_answer_every_position(worker, nats_url):
    job = Job.loglikelihood(MODEL, "the quick brown", " fox")
    results = run(collect(nats_url, [job, Job.loglikelihood(MODEL, "the quick", " brown"), job], ordered=True))
    assert results[0].id == results[2].id != results[1].id
    assert results[0].output == results[2].output
    assert results[0].id.count(".") == 1  # <run id>.<hash>


def test_bounded_inflight_still_answers_everything(worker, nats_url):
    jobs = [Job.loglikelihood(MODEL, "the quick brown", f" fox {i}") for i in range(6)]
    results = run(collect(nats_url, jobs, max_inflight=1, ordered=True))
    assert [r.index for r in results] == list(range(6)) and all(r.ok for r in results)


def test_a_rerun_under_the_same_run_id_reads_the_results_stream(worker, nats_url):
    run_id = f"resume-{time.time_ns()}"
    jobs = [Job.loglikelihood(MODEL, c, x) for c, x in PAIRS]
    first = run(collect(nats_url, jobs, run_id=run_id, ordered=True))
    again = run(collect(nats_url, jobs, run_id=run_id, ordered=True))
    assert not any(r.resumed for r in first) and all(r.resumed for r in again)
    assert [r.id for r in again] == [r.id for r in first]
    assert [r.output for r in again] == [r.output for r in first]
    # Another run id: new ids, nothing to resume.
    other = run(collect(nats_url, jobs, run_id=run_id + "-b", ordered=True))
    assert not any(r.resumed for r in other) and {r.id for r in other}.isdisjoint(r.id for r in first)


def test_a_stored_result_of_another_job_under_our_id_is_not_taken(worker, nats_url):
    run_id = f"foreign-{time.time_ns()}"
    job = Job.loglikelihood(MODEL, "the quick brown", " fox")
    job_id = jetbatch.derive_id(job, run_id)

    async def plant():
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        fake = {"id": job_id, "model": MODEL, "kind": "loglikelihood", "status": "ok", "cached": False, "worker": "impostor",
                "timing": {"queued_ms": 0, "compute_ms": 0, "batch_size": 1},
                "output": {"logprob": 0.0, "is_greedy": True, "tokens": 1}}
        await js.publish(f"jetbatch.results.{job_id}", msgpack.packb(fake),
                         headers={"Jetbatch-Job-Hash": "0" * 32, "Nats-Msg-Id": f"{job_id}:{'0' * 32}"})
        await nc.close()

    run(plant())
    [r] = run(collect(nats_url, [job], run_id=run_id))
    assert r.worker == "py-tests" and not r.resumed and r.output.logprob < 0


def test_a_duplicate_of_the_same_answered_job_is_collected_at_once(worker, nats_url, caplog):
    job = Job.loglikelihood(MODEL, "the quick brown", " fox", id=f"dup-{time.time_ns()}")
    [first] = run(collect(nats_url, [job]))
    # No run id: nothing is looked up first, the job is published again and dropped as a duplicate.
    with caplog.at_level(logging.WARNING, logger="jetbatch"):
        [again] = run(collect(nats_url, [job]))
    assert again.resumed and again.output == first.output and again.worker == first.worker
    assert f"id {job.id!r}: published before and answered; its stored answer is collected" in caplog.text


def test_a_duplicate_of_another_job_is_named_at_once_and_not_waited_for(worker, nats_url):
    taken = Job.loglikelihood(MODEL, "a", " b", id=f"taken-{time.time_ns()}")
    run(collect(nats_url, [taken]))
    mine = Job.loglikelihood(MODEL, "a", " c", id=taken.id)
    ok = Job.loglikelihood(MODEL, "a", " d")
    t0 = time.monotonic()
    results = []

    async def go():
        async with Client(nats_url, idle_timeout=20) as c:
            async for r in c.submit([mine, ok]):
                results.append(r)

    with pytest.raises(Exception) as e:
        run(go())
    assert time.monotonic() - t0 < 10, "not waited for"
    assert isinstance(e.value, jetbatch.JetbatchDuplicateIds), e.value
    assert e.value.dropped == {taken.id: "a different job under this id is answered already; give this job a new id"}
    assert [(r.index, r.ok) for r in results] == [(1, True)], "the other job is answered before the error"


def test_a_squatted_run_id_is_named_at_once(tmp_path):
    """Another producer publishes a different job under our predictable `<run_id>.<hash>` first."""
    server, url = start_nats(tmp_path)
    try:
        run_id = "squatted"
        job = Job.loglikelihood(MODEL, "a", " b")
        job_id = jetbatch.derive_id(job, run_id)

        async def squat():
            async with Client(url) as c:
                await c.connect()
                await c.ensure_streams()
            nc = await nats.connect(url)
            await nc.jetstream().publish(f"jetbatch.jobs.{MODEL}", b'{"squat": 1}', headers={"Nats-Msg-Id": job_id})
            await nc.close()

        run(squat())
        t0 = time.monotonic()
        with pytest.raises(Exception) as e:
            run(collect(url, [job], run_id=run_id, idle_timeout=8))
        assert time.monotonic() - t0 < 5, "not waited for"
        assert isinstance(e.value, jetbatch.JetbatchDuplicateIds), e.value
        assert e.value.dropped == {job_id: "a different job under this id is queued; use a new run_id"}
    finally:
        server.stop()


def test_error_results_are_typed(worker, nats_url):
    jobs = [Job.loglikelihood("no-such-model", "a", " b"),
            Job(MODEL, "loglikelihood", {"context": "a", "continuation": " b", "extra": 1}),
            Job.loglikelihood(MODEL, "a", " b")]
    bad_model, bad_input, good = run(collect(nats_url, jobs, ordered=True))
    assert bad_model.status == "error" and bad_model.error.code == "unknown_model"
    assert bad_input.error.code == "bad_request" and "extra" in bad_input.error.message
    with pytest.raises(JobError) as e:
        bad_input.output
    assert e.value.code == "bad_request" and e.value.job_id == bad_input.id
    assert good.ok and good.output.logprob < 0


def test_priority_publishes_on_the_levels_subject(worker, nats_url):
    async def delivered(consumer):
        nc = await nats.connect(nats_url)
        try:
            return (await nc.jetstream().consumer_info("JETBATCH_JOBS", consumer)).delivered.consumer_seq
        finally:
            await nc.close()

    before = {c: run(delivered(c)) for c in ("jetbatch-workers-high", "jetbatch-workers", "jetbatch-workers-low")}
    for level, context in (("high", "high"), ("low", "low one"), ("low", "low two")):
        [r] = run(collect(nats_url, [Job.loglikelihood(MODEL, context, " priority")], priority=level))
        assert r.ok, r.error
    after = {c: run(delivered(c)) for c in before}
    assert {c: after[c] - before[c] for c in before} == {"jetbatch-workers-high": 1, "jetbatch-workers": 0, "jetbatch-workers-low": 2}
    with pytest.raises(ValueError, match="priority: 'urgent' is not one of high, normal, low"):
        run(collect(nats_url, [Job.loglikelihood(MODEL, "a", " b")], priority="urgent"))


def test_deadlines_take_datetimes_and_epoch_seconds():
    from datetime import datetime, timedelta, timezone

    noon = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
    job = lambda d: Job.loglikelihood(MODEL, "a", " b", deadline=d)
    assert job(noon).body()["deadline"] == "2026-11-26T12:00:00+00:00"
    assert job(noon.astimezone(timezone(timedelta(hours=1)))).body()["deadline"] == "2026-11-26T13:00:00+01:00"
    assert job(1795694400).body()["deadline"] == 1795694400000
    assert job(1795694400.25).body()["deadline"] == 1795694400250
    assert job("2026-11-26T12:00:00Z").body()["deadline"] == "2026-11-26T12:00:00Z"
    line = {"model": MODEL, "kind": "embed", "input": {"text": "x"}, "deadline": 1795694400123}
    assert Job.from_dict(line).body()["deadline"] == 1795694400123, "a JSONL line's milliseconds stay as written"
    with pytest.raises(ValueError, match="deadline: a datetime needs a timezone"):
        job(datetime(2026, 11, 26, 12))
    with pytest.raises(ValueError, match="milliseconds"):
        job(1795694400000)
    with pytest.raises(ValueError, match="deadline: expected"):
        job(True)


def test_a_job_past_its_deadline_is_answered_timeout(worker, nats_url):
    past, ahead = time.time() - 3600, time.time() + 600
    jobs = [Job.loglikelihood(MODEL, "a", " b", deadline=past), Job.loglikelihood(MODEL, "a", " b", deadline=ahead)]
    late, on_time = run(collect(nats_url, jobs, ordered=True))
    assert late.status == "error" and late.error.code == "timeout" and late.error.message.startswith("deadline "), late
    assert on_time.ok and on_time.output.logprob < 0


def test_invalid_jobs_are_refused_before_publishing():
    with pytest.raises(ValueError, match="model"):
        Job.loglikelihood(".hidden", "x", "y")
    with pytest.raises(ValueError, match="model"):
        Job.loglikelihood("a/b", "x", "y")
    with pytest.raises(ValueError, match="reply_to"):
        Job.from_dict({"model": MODEL, "kind": "embed", "input": {"text": "x"}, "reply_to": "_INBOX.x"})
    with pytest.raises(ValueError, match="run_id"):
        Client("nats://127.0.0.1:1", run_id="a..b")


def test_no_worker_pulling_times_out_naming_the_missing_jobs(tmp_path):
    server, url = start_nats(tmp_path)
    try:
        jobs = [Job.loglikelihood(MODEL, "a", " b"), Job.loglikelihood(MODEL, "a", " c")]
        t0 = time.monotonic()
        with pytest.raises(JetbatchTimeout) as e:
            run(collect(url, jobs, idle_timeout=4))
        assert len(e.value.missing) == 2 and "cannot be looked up" in str(e.value)
        assert time.monotonic() - t0 < 15
        with pytest.raises(JetbatchTimeout, match="within 1"):
            run(collect(url, jobs, timeout=1))
    finally:
        server.stop()


def test_sync_wrapper_and_server_lists(worker, nats_url):
    # `|` separates URLs where lm-eval's model_args split on commas; a dead one is skipped.
    urls = f"nats://127.0.0.1:1|{nats_url}"
    assert jetbatch.split_servers(urls) == ["nats://127.0.0.1:1", nats_url]
    [r] = jetbatch.run([{"model": MODEL, "kind": "loglikelihood", "input": {"context": "a", "continuation": " b"}}],
                       servers=[nats_url])
    assert r.ok and r.index == 0
    with jetbatch.SyncClient(nats_url) as c:
        assert c.run([Job.loglikelihood(MODEL, "a", " b")])[0].output == r.output


def test_tenant_accounts_answer_each_tenant_and_hide_the_others_results(tmp_path, models, monkeypatch):
    """deploy/nats/accounts-tenants.conf: two tenants share the pool, each sees its own results only."""
    port = free_port()
    conf = (ROOT / "deploy/nats/nats-server.conf").read_text()
    conf = conf.replace("/data/jetstream", str(tmp_path / "store")).replace("include ./accounts.conf", "include ./accounts-tenants.conf")
    (tmp_path / "nats-server.conf").write_text(conf)
    (tmp_path / "accounts-tenants.conf").write_text((ROOT / "deploy/nats/accounts-tenants.conf").read_text())
    env = dict(os.environ, WORKER_PASSWORD="work-pw", TEAM_A_PASSWORD="a-pw", TEAM_B_PASSWORD="b-pw")
    server = Proc([nats_server_bin(), "-c", str(tmp_path / "nats-server.conf"), "-p", str(port), "-m", str(free_port())],
                  tmp_path / "nats.log", port, "nats-server", env=env)
    monkeypatch.setenv("JETBATCH_NATS_USER", "worker")
    monkeypatch.setenv("JETBATCH_NATS_PASSWORD", "work-pw")
    worker = start_worker(f"nats://127.0.0.1:{port}", models, tmp_path / "worker", worker_id="tenants")
    tenant = jetbatch.Topology(js_api_prefix="JS.jetbatch.API")
    job = Job.loglikelihood(MODEL, "the quick brown", " fox")
    try:
        async def go():
            answers = {}
            for user in ("team-a", "team-b"):
                url = f"nats://{user}:{user[-1]}-pw@127.0.0.1:{port}"
                async with Client(url, run_id=f"{user}.run-1", topology=tenant, idle_timeout=60) as c:
                    [answers[user]] = [r async for r in c.submit([job])]
            b = await nats.connect(f"nats://team-b:b-pw@127.0.0.1:{port}")
            try:
                js = b.jetstream(prefix="JS.jetbatch.API")
                own = await js.get_last_msg("JETBATCH_RESULTS", f"jetbatch.results.{answers['team-b'].id}", direct=True)
                with pytest.raises(Exception):
                    await js.get_last_msg("JETBATCH_RESULTS", f"jetbatch.results.{answers['team-a'].id}", direct=True)
                with pytest.raises(Exception):
                    await js.get_msg("JETBATCH_RESULTS", seq=1)
            finally:
                await b.close()
            return answers, own

        answers, own = run(go())
        assert all(r.ok for r in answers.values()) and answers["team-a"].output == answers["team-b"].output
        assert answers["team-a"].id.startswith("team-a.run-1.") and own.data
    finally:
        worker.stop()
        server.stop()
