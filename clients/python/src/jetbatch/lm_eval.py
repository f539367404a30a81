"""An lm-evaluation-harness (0.4.x) backend that runs every request on a jetbatch worker pool.

    lm-eval-jetbatch --model jetbatch --model_args model=NAME,nats_url=nats://a:4222|nats://b:4222 --tasks ...

or, in Python, `lm_eval.simple_evaluate(model=JetbatchLM(model="NAME"), tasks=[...])`.

Each call (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) publishes all its requests
at once and matches the results back to them in order; the worker does the tokenising, the
harness's context/continuation split, truncation and rolling windows (README "Language models").
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import sys
import uuid
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from .client import IDLE_TIMEOUT_S, JetbatchError, SyncClient, Topology, derive_id
from .types import JetbatchTimeout, Job, JobError, Result

log = logging.getLogger("jetbatch.lm_eval")

# The worker takes at most 16 stop strings of 1-256 characters (schemas/job.schema.json); the
# others are applied by the post-hoc cut alone, which gives the same text (generation is only
# longer before the cut).
MAX_STOP, MAX_STOP_LEN = 16, 256
# Sampling parameters that map one to one onto `generate` params.
PASSTHROUGH = ("top_p", "top_k", "seed")
# apply_chat_template without a local tokenizer hands the messages to the worker, which renders
# the model's own template: the rendered "prompt" is this marker followed by the messages as JSON.
MESSAGES_MARK = "\x00jetbatch-messages\x00"
# How long the check that the pool serves the model may take at start.
MODEL_CHECK_S = 5.0


class ModelNotServed(ValueError):
    """The pool's workers do not serve the model asked for."""


@register_model("jetbatch")
class JetbatchLM(LM):
    """`model`: the model's name in the worker's repository. `nats_url`: server URLs separated by
    `|` (or `,` when given in Python). `run_id`: makes the evaluation resumable (a re-run reads the
    answers already in the results stream). `tokenizer`: a Hugging Face tokenizer (path or name)
    to render chat templates locally, exactly as the HF backend does; without it, `generate_until`
    and `loglikelihood` send the chat messages for the worker to render with the model's own
    template (the logged samples then show the prompt it rendered). `truncate="left"`: prompts longer than
    `max_length - max_gen_toks` are cut from the left by the worker (as the HF backend does)
    instead of answered with `bad_request`. `batch_size`, `max_batch_size` and `device` are
    accepted for lm-eval's sake: the worker batches and picks its device itself."""

    def __init__(
        self,
        model: str,
        nats_url: Optional[str] = None,
        run_id: Optional[str] = None,
        tokenizer: Optional[str] = None,
        truncate: Optional[str] = None,
        max_gen_toks: int = 256,
        max_inflight: int = 4096,
        idle_timeout: float = IDLE_TIMEOUT_S,
        prefix: str = "jetbatch",
        encoding: str = "msgpack",
        progress: bool = True,
        batch_size=None,
        max_batch_size=None,
        device=None,
    ):
        super().__init__()
        if truncate not in (None, "left"):
            raise ValueError(f"truncate: {truncate!r}; only 'left' (or nothing)")
        self.model = model
        self.truncate = truncate
        self.max_gen_toks = int(max_gen_toks)
        self.run_id = run_id
        self.progress = progress
        self._tokenizer_name = tokenizer
        self._tokenizer = None
        self._provenance = _Provenance()
        self._client = SyncClient(
            nats_url, topology=Topology(prefix=prefix), encoding=encoding, max_inflight=max_inflight,
            idle_timeout=idle_timeout,
        )
        self._check_model()

    def _check_model(self) -> None:
        """Refuses a model the pool's workers do not serve at once (naming the closest they do),
        rather than after sending every request. No worker answering is only a warning: workers
        may start later, and lm-eval's --use_cache may need no pool at all."""
        try:
            served = self._client.served_models(timeout=MODEL_CHECK_S)
        except Exception as e:  # noqa: BLE001 — no NATS (yet): the requests will say
            log.warning("model %s: not checked, the pool could not be asked (%s)", self.model, e or type(e).__name__)
            return
        if not served:
            log.warning("model %s: not checked, no worker answered (is the pool up?)", self.model)
        elif self.model not in served:
            close = difflib.get_close_matches(self.model, served, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ModelNotServed(f"model: {self.model!r} is not served by the pool (it serves {', '.join(sorted(served))}){hint}")

    def close(self) -> None:
        """Closes the connection (lm-eval never does; the process's end does it otherwise)."""
        self._client.close()

    def _run(self, jobs: list[Job]) -> list[Result]:
        if self.run_id is None:
            # Ids of our own (not resumable), so that an interrupted call can cancel its jobs.
            run_id = uuid.uuid4().hex
            jobs = [dataclasses.replace(j, id=derive_id(j, run_id)) for j in jobs]
        try:
            results = self._client.run(jobs, run_id=self.run_id, progress=self.progress)
        except BaseException:
            # Interrupted, or results stopped coming: the jobs still queued would be computed for
            # no one (a re-run with the same run_id would collect them, so those stay).
            if self.run_id is None:
                self._cancel({j.id for j in jobs})
            raise
        for r in results:
            self._provenance.add(r)
        failed = [r for r in results if r.error is not None]
        if failed:
            codes = sorted({r.error.code for r in failed})
            first = failed[0].error
            raise JobError(first.code, f"{len(failed)} of {len(results)} request(s) failed ({', '.join(codes)}); "
                                       f"first: {first.message}", first.job_id)
        return results

    def _cancel(self, ids: set[str]) -> None:
        try:
            n = self._client.cancel(ids)
            log.warning("cancelled %d queued job(s) of the interrupted call", n)
        except Exception as e:  # noqa: BLE001 — the original error is the one to raise
            log.warning("the interrupted call's queued jobs could not be cancelled: %s", e)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        jobs = [Job(self.model, "loglikelihood", {**self._context(req.args[0]), "continuation": req.args[1]}) for req in requests]
        out = []
        for req, r in zip(requests, self._run(jobs)):
            o = r.output
            answer = (o.logprob, o.is_greedy)
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
            _show_prompt(req, r)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        jobs = [Job.loglikelihood_rolling(self.model, self._plain(req.args[0], "loglikelihood_rolling")) for req in requests]
        out = []
        for req, r in zip(requests, self._run(jobs)):
            lp = r.output.logprob
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, lp)
            out.append(lp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs, untils = [], []
        for req in requests:
            context, gen_kwargs = req.args
            params, until = self._generate_params(gen_kwargs)
            jobs.append(Job(self.model, "generate", self._prompt(context), params))
            untils.append(until)
        out = []
        for req, until, r in zip(requests, untils, self._run(jobs)):
            # The harness's own cut at the first stop string, so the text is the HF backend's.
            text = postprocess_generated_text(r.output.text, until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            _show_prompt(req, r)
            out.append(text)
        return out

    def _generate_params(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        # The worker stops at the model's EOS ids and decodes without special tokens, so the EOS
        # string the HF backend adds to `until` can never appear in our text.
        until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
        params = {"max_new_tokens": int(kwargs.pop("max_gen_toks"))}
        do_sample = kwargs.pop("do_sample", False)
        temperature = float(kwargs.pop("temperature", 0.0))
        if do_sample and temperature > 0:
            params["temperature"] = temperature
        for key in PASSTHROUGH:
            if key in kwargs:
                params[key] = kwargs.pop(key)
        if kwargs:
            raise ValueError(f"gen_kwargs.{sorted(kwargs)[0]}: not supported by the jetbatch backend "
                             f"(it takes until, max_gen_toks, do_sample, temperature, {', '.join(PASSTHROUGH)})")
        stop = [s for s in until if 0 < len(s) <= MAX_STOP_LEN][:MAX_STOP]
        if stop:
            params["stop"] = stop
        if self.truncate:
            params["truncate"] = self.truncate
        return params, until

    def _prompt(self, context: str) -> dict:
        messages = _messages(context)
        return {"prompt": context} if messages is None else {"messages": messages}

    def _context(self, context: str) -> dict:
        messages = _messages(context)
        return {"context": context} if messages is None else {"messages": messages}

    def _plain(self, text: str, kind: str) -> str:
        if text.startswith(MESSAGES_MARK):
            raise ValueError(f"{kind} with --apply_chat_template needs tokenizer=… in model_args: "
                             "the worker renders chat templates for generate and loglikelihood only")
        return text

    def get_model_info(self) -> dict:
        """What produced the results, as lm-eval's results `config` records it (under `jetbatch`)."""
        return {"jetbatch": self._provenance.info(self.model)}

    # Chat templates: `--apply_chat_template` calls these.
    @property
    def tokenizer_name(self) -> str:
        return (self._tokenizer_name or f"jetbatch-{self.model}").replace("/", "__")

    def _hf_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_name)
        return self._tokenizer

    def chat_template(self, chat_template=False) -> Optional[str]:
        if chat_template is False or chat_template is None:
            return None
        if self._tokenizer_name is None:
            return ""  # the worker renders the model's own template
        return self._hf_tokenizer().get_chat_template(chat_template if isinstance(chat_template, str) else None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._tokenizer_name is None:
            if not add_generation_prompt:
                raise ValueError("prefilling the assistant message needs tokenizer=… to render the template locally")
            return MESSAGES_MARK + json.dumps(chat_history, ensure_ascii=False)
        return self._hf_tokenizer().apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )


def _messages(context: str) -> Optional[list]:
    """The chat messages a context made by `apply_chat_template` stands for; None for plain text."""
    if not context.startswith(MESSAGES_MARK):
        return None
    messages, end = json.JSONDecoder().raw_decode(context, len(MESSAGES_MARK))
    if context[end:]:
        raise ValueError("text after a chat-templated prompt (a gen_prefix?) needs tokenizer=… to render it locally")
    return messages


def _show_prompt(req, r: Result) -> None:
    """Puts the prompt the worker rendered in place of the messages' marker in the request, so the
    logged samples show what the model was given (as the HF backend's do). After the cache hook:
    lm-eval's cache is keyed by the request as it was made."""
    chat = r.provenance.chat_template if r.provenance is not None else None
    if chat is not None and req.args[0].startswith(MESSAGES_MARK):
        req.arguments = (chat.prompt, *req.args[1:])


class _Provenance:
    """What produced an evaluation's results, gathered from each result's provenance: the model's
    fingerprints (two mean the pool served different weights under one name), dtypes, devices,
    worker versions, chat template hashes and workers."""

    FIELDS = ("model_fingerprint", "dtype", "device", "jetbatch")

    def __init__(self):
        self.seen: dict[str, set] = {f: set() for f in (*self.FIELDS, "chat_template_hash", "worker")}

    def add(self, r: Result) -> None:
        p = r.provenance
        if p is None:
            return
        fingerprints = len(self.seen["model_fingerprint"])
        for f in self.FIELDS:
            self.seen[f].add(getattr(p, f))
        if p.chat_template is not None:
            self.seen["chat_template_hash"].add(p.chat_template.template_hash)
        self.seen["worker"].add(r.worker)
        if len(self.seen["model_fingerprint"]) > fingerprints > 0:
            log.warning("model %s: results from different weights (fingerprints %s): the pool serves two models "
                        "under one name", r.model, ", ".join(sorted(self.seen["model_fingerprint"])))

    def info(self, model: str) -> dict:
        """Each field's values, sorted (one each, for a consistent pool), and whether the weights agreed."""
        out = {"model": model, **{f: sorted(v) for f, v in self.seen.items()}}
        out["one_model"] = len(self.seen["model_fingerprint"]) <= 1
        return out


def main() -> None:
    """`lm-eval-jetbatch`: lm-eval's own command line, with the `jetbatch` backend registered
    (importing this module did that)."""
    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    lm_eval.simple_evaluate = _reporting_the_pool_device(lm_eval.simple_evaluate)
    try:
        cli_evaluate()
    except KeyboardInterrupt:
        # The call's queued jobs were cancelled on the way out (JetbatchLM._run).
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (JobError, JetbatchError, JetbatchTimeout, ModelNotServed) as e:
        # A user's error, said in one line: no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _reporting_the_pool_device(simple_evaluate):
    """lm-eval's command line records its `--device` (default cuda:0) as the results' device; the
    pool's models ran where their workers put them, which their results say."""
    @functools.wraps(simple_evaluate)
    def evaluate(*args, **kw):
        results = simple_evaluate(*args, **kw)
        pool = (results or {}).get("config", {}).get("jetbatch")
        if pool and pool["device"]:
            results["config"]["device"] = ",".join(pool["device"])
        return results

    return evaluate
