"""Jobs and results as `schemas/job.schema.json` and `schemas/result.schema.json` define them."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterator, Optional, Sequence, Union

# schemas/job.schema.json: `id` and `model`.
JOB_ID = re.compile(r"^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
MODEL_NAME_RULE = "1-64 of [A-Za-z0-9_.-], not starting with '.'"
MAX_ID_LEN = 256

KINDS = ("tensor", "generate", "loglikelihood", "loglikelihood_rolling", "embed", "classify")
ERROR_CODES = ("bad_request", "unknown_model", "unsupported_kind", "model_error", "out_of_memory", "timeout")


def model_token(model: str) -> str:
    """The model's subject token: a dot is written `%2E` (dots separate subject tokens)."""
    return model.replace(".", "%2E")


def valid_job_id(job_id: str) -> bool:
    return len(job_id) <= MAX_ID_LEN and JOB_ID.match(job_id) is not None


# Epoch seconds outside this range are surely not seconds: before 1973 or after 5138 (milliseconds?).
_EPOCH_SECONDS = (1e8, 1e11)


def wire_deadline(deadline: Union[datetime, int, float, str]) -> Union[str, int]:
    """`deadline` as the wire takes it: a timezone-aware datetime as RFC 3339, epoch seconds (an int
    or a float, as `time.time()` gives them) as integer milliseconds, a string as written (RFC 3339)."""
    if isinstance(deadline, datetime):
        if deadline.utcoffset() is None:
            raise ValueError("deadline: a datetime needs a timezone (e.g. datetime.now(timezone.utc))")
        return deadline.isoformat()
    if isinstance(deadline, str):
        return deadline
    if isinstance(deadline, (int, float)) and not isinstance(deadline, bool):
        if not _EPOCH_SECONDS[0] <= deadline < _EPOCH_SECONDS[1]:
            raise ValueError(f"deadline: {deadline!r} is not epoch seconds (as time.time() gives; milliseconds?)")
        return round(deadline * 1000)
    raise ValueError(f"deadline: expected a datetime, epoch seconds or an RFC 3339 string, not {type(deadline).__name__}")


@dataclass(frozen=True)
class Job:
    """One job. Without `id`, the client derives one from its run id and a hash of the job, so
    that running the same jobs again under the same run id finds the results already computed."""

    model: str
    kind: str
    input: dict
    params: Optional[dict] = None
    id: Optional[str] = None
    cache: Optional[bool] = None
    timeout_ms: Optional[int] = None
    # A datetime with a timezone, epoch seconds, or an RFC 3339 string; past it the job is answered
    # `timeout` unstarted, and a generation stops with `finish_reason` "deadline".
    deadline: Optional[Union[datetime, int, float, str]] = None

    def __post_init__(self):
        if not MODEL_NAME.match(self.model):
            raise ValueError(f"model: {self.model!r} is not a model name ({MODEL_NAME_RULE})")
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.id is not None and not valid_job_id(self.id):
            raise ValueError(f"id: {self.id!r} is not a job id (schemas/job.schema.json)")
        if self.deadline is not None:
            wire_deadline(self.deadline)

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        """A job as a JSONL line of `jetbatch submit` holds it."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if "reply_to" in unknown:
            raise ValueError("reply_to: the client collects results from the results stream; remove reply_to")
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown job field")
        if isinstance(d.get("deadline"), int):
            # The wire's integer form is milliseconds; the constructor takes seconds.
            d = {**d, "deadline": d["deadline"] / 1000}
        return cls(**d)

    @classmethod
    def loglikelihood(cls, model: str, context: str, continuation: str, **kw) -> "Job":
        return cls(model, "loglikelihood", {"context": context, "continuation": continuation}, **kw)

    @classmethod
    def choices(cls, model: str, context: str, continuations: Sequence[str], **kw) -> "Job":
        """A multiple-choice question in one job: each continuation is scored as
        `Job.loglikelihood(model, context, continuation)` would be; the output is a `ChoicesOutput`."""
        return cls(model, "loglikelihood", {"context": context, "continuations": list(continuations)}, **kw)

    @classmethod
    def loglikelihood_rolling(cls, model: str, text: str, **kw) -> "Job":
        return cls(model, "loglikelihood_rolling", {"text": text}, **kw)

    @classmethod
    def generate(cls, model: str, prompt: str, params: Optional[dict] = None, **kw) -> "Job":
        return cls(model, "generate", {"prompt": prompt}, params, **kw)

    @classmethod
    def embed(cls, model: str, text: str, **kw) -> "Job":
        return cls(model, "embed", {"text": text}, **kw)

    def body(self) -> dict:
        """The fields that define the computation (the id aside), in a fixed order."""
        b: dict[str, Any] = {"model": self.model, "kind": self.kind, "input": self.input}
        if self.params is not None:
            b["params"] = self.params
        if self.cache is not None:
            b["cache"] = self.cache
        if self.timeout_ms is not None:
            b["timeout_ms"] = self.timeout_ms
        if self.deadline is not None:
            b["deadline"] = wire_deadline(self.deadline)
        return b


class JobError(Exception):
    """An error result: `code` is one of `ERROR_CODES`, `message` names the offending field."""

    def __init__(self, code: str, message: str, job_id: str = ""):
        super().__init__(f"{code}: {message}" + (f" (job {job_id})" if job_id else ""))
        self.code = code
        self.message = message
        self.job_id = job_id


class JetbatchTimeout(TimeoutError):
    """Results stopped coming: `missing` jobs had no answer after waiting."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


def _float(v: Any) -> float:
    # JSON results carry non-finite floats as strings (result.schema.json $defs/float).
    if isinstance(v, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[v]
    return float(v)


def _pick(cls, d: dict, **conv):
    """Builds `cls` from the fields it knows (later schema versions may add more)."""
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kw[f.name] = conv[f.name](d[f.name]) if f.name in conv else d[f.name]
    return cls(**kw)


@dataclass(frozen=True)
class Timing:
    queued_ms: float
    compute_ms: float
    batch_size: int


@dataclass(frozen=True)
class TopLogprobs:
    """The k most likely tokens at one position, most likely first (`params.top_logprobs`)."""

    ids: list
    tokens: list
    logprobs: list


def _top(entries: list) -> list:
    return [TopLogprobs(e["ids"], e["tokens"], [_float(x) for x in e["logprobs"]]) for e in entries]


@dataclass(frozen=True)
class LoglikelihoodOutput:
    logprob: float
    is_greedy: bool
    tokens: int
    # With params.top_logprobs: one entry per continuation token.
    top_logprobs: Optional[list] = None


@dataclass(frozen=True)
class ChoicesOutput:
    """A `loglikelihood` job with `continuations`: one value per choice, in the job's order."""

    logprobs: list
    tokens: list
    is_greedy: list
    # With params.top_logprobs: per choice, one `TopLogprobs` per continuation token.
    top_logprobs: Optional[list] = None

    def __len__(self) -> int:
        return len(self.logprobs)

    def __getitem__(self, i: int) -> LoglikelihoodOutput:
        """Choice `i` as the job with that one continuation would have answered it."""
        top = None if self.top_logprobs is None else self.top_logprobs[i]
        return LoglikelihoodOutput(self.logprobs[i], self.is_greedy[i], self.tokens[i], top)

    def __iter__(self) -> Iterator[LoglikelihoodOutput]:
        return (self[i] for i in range(len(self)))

    @property
    def best(self) -> int:
        """The index of the most likely choice (the first of equals), as lm-eval's `acc` picks it."""
        return max(range(len(self.logprobs)), key=lambda i: (self.logprobs[i], -i))


@dataclass(frozen=True)
class RollingOutput:
    logprob: float
    tokens: int


@dataclass(frozen=True)
class GenerateOutput:
    text: str
    tokens: list
    finish_reason: str
    prompt_tokens: int
    # With params.top_logprobs: one entry per generated token.
    top_logprobs: Optional[list] = None


@dataclass(frozen=True)
class EmbedOutput:
    embedding: list
    dim: int
    # How many tokens the model read (special tokens included); None from a worker before it.
    tokens: Optional[int] = None


@dataclass(frozen=True)
class ClassifyOutput:
    logits: list
    probs: list
    label: str
    label_id: int


@dataclass(frozen=True)
class Tensor:
    """A result tensor: `data` is a list (JSON) or the raw little-endian bytes (MessagePack)."""

    dtype: str
    shape: list
    data: Union[list, bytes]


@dataclass(frozen=True)
class TensorOutput:
    outputs: list


@dataclass(frozen=True)
class StreamChunk:
    """A piece of a streamed `generate` result (schemas/stream-chunk.schema.json): the chunks'
    texts, in `index` order, concatenate to the result's text. A chunk is sent when the text
    grows (a token may add no whole character), and `token` is the newest token it covers."""

    id: str
    index: int
    text: str
    token: int


Output = Union[LoglikelihoodOutput, ChoicesOutput, RollingOutput, GenerateOutput, EmbedOutput, ClassifyOutput, TensorOutput]


def _output(kind: str, d: dict) -> Output:
    floats = lambda xs: [_float(x) for x in xs]  # noqa: E731
    if kind == "loglikelihood" and "logprobs" in d:
        return _pick(ChoicesOutput, d, logprobs=floats, top_logprobs=lambda per: [_top(e) for e in per])
    if kind == "loglikelihood":
        return _pick(LoglikelihoodOutput, d, logprob=_float, top_logprobs=_top)
    if kind == "loglikelihood_rolling":
        return _pick(RollingOutput, d, logprob=_float)
    if kind == "generate":
        return _pick(GenerateOutput, d, top_logprobs=_top)
    if kind == "embed":
        return _pick(EmbedOutput, d, embedding=floats)
    if kind == "classify":
        return _pick(ClassifyOutput, d, logits=floats, probs=floats)
    if kind == "tensor":
        return TensorOutput([_pick(Tensor, t) for t in d["outputs"]])
    raise ValueError(f"kind: {kind!r} is not a known job kind")


@dataclass(frozen=True)
class ChatPrompt:
    """A job's `messages` as the model's chat template rendered them."""

    template_hash: str
    prompt: str


@dataclass(frozen=True)
class Provenance:
    """What produced a result: the model folder's fingerprint (other weights, another value), its
    dtype and device, the worker's version, and where the job sent `messages`, the chat template's
    hash and the prompt it rendered."""

    model_fingerprint: str
    dtype: str
    device: str
    jetbatch: str
    chat_template: Optional[ChatPrompt] = None

    @classmethod
    def from_wire(cls, d: dict) -> "Provenance":
        return _pick(cls, d, chat_template=lambda c: _pick(ChatPrompt, c))


@dataclass(frozen=True)
class Result:
    """A job's answer. `index` is the job's position in what was submitted; `resumed` says it was
    read back from the results stream (a run before this one computed it)."""

    id: str
    model: str
    kind: str
    status: str
    cached: bool
    worker: str
    timing: Timing
    index: int = -1
    resumed: bool = False
    error: Optional[JobError] = None
    raw_output: Optional[dict] = field(default=None, repr=False)
    # Absent where the job named no model the worker serves (and from workers before provenance).
    provenance: Optional[Provenance] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def output(self) -> Output:
        """The typed output; raises the result's `JobError` when the job failed."""
        if self.error is not None:
            raise self.error
        return _output(self.kind, self.raw_output or {})

    @classmethod
    def from_wire(cls, d: dict, index: int = -1, resumed: bool = False) -> "Result":
        err = d.get("error")
        error = JobError(err["code"], err["message"], d["id"]) if d.get("status") == "error" and err else None
        return cls(
            id=d["id"], model=d["model"], kind=d["kind"], status=d["status"], cached=bool(d["cached"]),
            worker=d["worker"], timing=_pick(Timing, d["timing"]), index=index, resumed=resumed,
            error=error, raw_output=d.get("output"),
            provenance=Provenance.from_wire(d["provenance"]) if d.get("provenance") else None,
        )
