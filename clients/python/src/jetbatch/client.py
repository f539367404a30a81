"""The asyncio client: publish jobs into JETBATCH_JOBS, collect their results from JETBATCH_RESULTS.

It follows `jetbatch submit` (src/submit.rs): streams are only looked up (a producer's account may
not create them) and created only when missing; jobs go out with `Nats-Msg-Id: <id>` so JetStream
drops a re-published id; a result counts as a job's answer only when its body's id and its
`Jetbatch-Job-Hash` header (BLAKE3 of the job's payload, 32 hex digits) both match; results that
the live subscription missed are read from the results stream when it goes quiet. A job the jobs
stream drops as a duplicate (another job under its id within the duplicate window) is sorted out at
once: its stored answer collected, this very job queued waited for, anything else named and never
waited for (`JetbatchDuplicateIds` once the other jobs are in).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Optional, Sequence, Union

import blake3
import msgpack
import nats
from nats.js import api
from nats.js.errors import NotFoundError

from .types import JetbatchTimeout, Job, Result, StreamChunk, model_token, valid_job_id

log = logging.getLogger("jetbatch")

JOB_HASH_HEADER = "Jetbatch-Job-Hash"
# Priority levels, highest first; each has its subjects and its consumer (see the README).
PRIORITIES = ("high", "normal", "low")

# Quiet time after which the consumer's state is reported, as `jetbatch submit` does.
STALL_REPORT_S = 4.0
POLL_S = 2.0
# How long a streamed job's last chunks are waited for once its result is in.
CHUNK_GRACE_S = 2.0
# Seconds without any result before `JetbatchTimeout` (the lm-eval backend's default too).
IDLE_TIMEOUT_S = 300.0
# The workers' service name (`$SRV.INFO.jetbatch` finds them) and how long discovery listens.
SERVICE = "jetbatch"
DISCOVERY_S = 0.5


class JetbatchError(Exception):
    """The bus refused something (streams missing and not creatable, a publish not acknowledged)."""


class JetbatchDuplicateIds(JetbatchError):
    """Jobs the jobs stream dropped as duplicates of other jobs under their ids (published within its
    duplicate window): they are not queued and will never be answered. `dropped` maps each id to
    why and what to do. Raised once every other job of the call is answered (and yielded)."""

    def __init__(self, dropped: dict[str, str]):
        shown = "; ".join(f"{i}: {why}" for i, why in list(dropped.items())[:10])
        more = f" (and {len(dropped) - 10} more)" if len(dropped) > 10 else ""
        super().__init__(f"{len(dropped)} job(s) not queued and not answered, their ids being used by other jobs: {shown}{more}")
        self.dropped = dropped


def job_hash(payload: bytes) -> str:
    """A job's fingerprint on the wire, as the worker computes it (src/bus/publish.rs `job_hash`)."""
    return blake3.blake3(payload).hexdigest()[:32]


def derive_id(job: Job, run_id: str) -> str:
    """The job's own id, else `<run_id>.<hash of the job>`: the same job in the same run always
    gets the same id, which is what lets a re-run find its results."""
    if job.id is not None:
        return job.id
    canonical = json.dumps(job.body(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return f"{run_id}.{blake3.blake3(canonical).hexdigest()[:32]}"


def split_servers(servers: Union[str, Sequence[str], None]) -> list[str]:
    """Server URLs from a list or a string separated by `,` or `|` (lm-eval splits its model_args
    on commas, so `|` is the separator that survives there). Default: `$NATS_URL`, else local."""
    if servers is None:
        servers = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    if isinstance(servers, str):
        servers = servers.replace("|", ",").split(",")
    urls = [s.strip() for s in servers if s.strip()]
    if not urls:
        raise ValueError("servers: no NATS URL given")
    return urls


@dataclass(frozen=True)
class Topology:
    """Subject prefix and stream names; the defaults are the worker's (`jetbatch serve --help`)."""

    prefix: str = "jetbatch"
    jobs_stream: str = "JETBATCH_JOBS"
    results_stream: str = "JETBATCH_RESULTS"
    dead_stream: str = "JETBATCH_DEAD"
    consumer: str = "jetbatch-workers"
    duplicate_window_s: float = 120.0
    # The JetStream API's subject prefix: another one where the streams live in the workers'
    # account and this one imports their API under it (`JS.jetbatch.API` under
    # deploy/nats/accounts-tenants.conf), as `jetbatch submit --js-api-prefix`.
    js_api_prefix: str = "$JS.API"
    results_max_age_s: float = 24 * 3600.0

    def jobs_subject(self, model: str, priority: str = "normal") -> str:
        """`<prefix>.jobs.<model token>` for normal jobs, with `.high` or `.low` after it for the
        others; a dot in the model's name is written `%2E` there."""
        return f"{self.prefix}.jobs.{model_token(model)}" + ("" if priority == "normal" else f".{priority}")

    def consumer_of(self, priority: str) -> str:
        """The workers' durable consumer of a priority level."""
        return self.consumer if priority == "normal" else f"{self.consumer}-{priority}"

    def result_subject(self, job_id: str) -> str:
        return f"{self.prefix}.results.{job_id}"


class _Pending:
    """One distinct job of a submit call: its id, payload, hash and where it sits in the input
    (identical jobs share an id, are computed once and answer every position)."""

    __slots__ = ("id", "model", "payload", "hash", "indices", "priority", "derived")

    def __init__(self, job_id: str, model: str, payload: bytes, priority: str, derived: bool):
        self.id, self.model, self.payload, self.priority = job_id, model, payload, priority
        self.hash = job_hash(payload)
        self.indices: list[int] = []
        # Whether the id is `<run_id>.<hash>`: a squatted one calls for a new run id, not a new id.
        self.derived = derived

    def new_id_advice(self) -> str:
        return "use a new run_id" if self.derived else "give this job a new id"


class _Duplicate:
    """What a job the jobs stream dropped as a duplicate comes to: `answered` (`detail` is the
    stored answer), `queued` (this very job, published before), `unverified` (the queue cannot be
    read with this account; `detail` says why) or `dropped` (never answered; `detail` says why)."""

    __slots__ = ("p", "kind", "detail")

    def __init__(self, p: _Pending, kind: str, detail):
        self.p, self.kind, self.detail = p, kind, detail


def _decode(payload: bytes) -> dict:
    """A result is encoded like its job: JSON when it starts with `{`, MessagePack otherwise."""
    if payload[:1] == b"{":
        return json.loads(payload)
    return msgpack.unpackb(payload, raw=False)


def _answer(p: _Pending, headers: Optional[dict], payload: bytes) -> Optional[dict]:
    """The decoded result when the message answers this very job (id and job hash match)."""
    if not headers or headers.get(JOB_HASH_HEADER) != p.hash or not payload:
        return None
    try:
        d = _decode(payload)
    except (ValueError, msgpack.UnpackException):
        return None
    return d if isinstance(d, dict) and d.get("id") == p.id else None


async def _log_error(e: Exception) -> None:
    # One line per connection error (nats-py's default prints a traceback for each reconnect try).
    log.warning("nats: %s", e)


class Client:
    """Publishes jobs and collects their results.

    `run_id`: jobs without an id get `<run_id>.<hash of the job>`. Given (here or per call), a run
    is resumable: running the same jobs again reads the results already in the results stream
    (kept 24 h) instead of computing them; without it each call gets a fresh random run id.
    `max_inflight` bounds published-but-unanswered jobs. `idle_timeout`: seconds without any
    result before `JetbatchTimeout`. `encoding`: "msgpack" (default) or "json".
    """

    def __init__(
        self,
        servers: Union[str, Sequence[str], None] = None,
        *,
        run_id: Optional[str] = None,
        topology: Topology = Topology(),
        encoding: str = "msgpack",
        max_inflight: int = 1024,
        idle_timeout: float = IDLE_TIMEOUT_S,
        progress: bool = False,
        connect_options: Optional[dict] = None,
    ):
        if encoding not in ("msgpack", "json"):
            raise ValueError(f"encoding: {encoding!r} is neither msgpack nor json")
        if max_inflight < 1:
            raise ValueError("max_inflight: must be at least 1")
        if run_id is not None and not valid_job_id(run_id):
            raise ValueError(f"run_id: {run_id!r} is not a job id prefix ([A-Za-z0-9_:-] tokens separated by dots)")
        self.servers = split_servers(servers)
        self.run_id = run_id
        self.topology = topology
        self.encoding = encoding
        self.max_inflight = max_inflight
        self.idle_timeout = idle_timeout
        self.progress = progress
        self._connect_options = connect_options or {}
        self._nc = None
        self._streams_checked = False

    def _js(self):
        return self._nc.jetstream(prefix=self.topology.js_api_prefix)

    async def connect(self) -> "Client":
        if self._nc is None:
            opts = {"max_reconnect_attempts": -1, "error_cb": _log_error, **self._connect_options}
            self._nc = await nats.connect(servers=self.servers, **opts)
        return self

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None

    async def __aenter__(self) -> "Client":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def ensure_streams(self) -> None:
        """Looks the jobs and results streams up; creates them (as `jetbatch setup` does) only when
        missing, and says what to run when that is refused."""
        if self._streams_checked:
            return
        js = self._js()
        t = self.topology
        try:
            await js.stream_info(t.jobs_stream)
            await js.stream_info(t.results_stream)
        except NotFoundError:
            try:
                await js.add_stream(api.StreamConfig(
                    name=t.jobs_stream, subjects=[t.jobs_subject("*", p) for p in PRIORITIES],
                    retention=api.RetentionPolicy.WORK_QUEUE,
                    storage=api.StorageType.FILE, duplicate_window=t.duplicate_window_s))
                await js.add_stream(api.StreamConfig(
                    name=t.results_stream, subjects=[f"{t.prefix}.results.>"], retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType.FILE, max_age=t.results_max_age_s, duplicate_window=t.duplicate_window_s,
                    allow_direct=True))
                await js.add_stream(api.StreamConfig(
                    name=t.dead_stream, subjects=[f"{t.prefix}.dead.>"], retention=api.RetentionPolicy.LIMITS,
                    storage=api.StorageType.FILE, duplicate_window=t.duplicate_window_s))
            except Exception as e:  # any refusal: the message says what to do
                raise JetbatchError(
                    f"streams missing and cannot be created ({e}); run `jetbatch setup` with a worker's credentials") from e
        self._streams_checked = True

    def _prepare(self, jobs: Iterable[Union[Job, dict]], run_id: str, priority: str) -> tuple[list[_Pending], int]:
        by_id: dict[str, _Pending] = {}
        n = 0
        for n, job in enumerate(jobs, start=1):
            if isinstance(job, dict):
                job = Job.from_dict(job)
            body = job.body()
            job_id = derive_id(job, run_id)
            p = by_id.get(job_id)
            if p is None:
                wire = {"id": job_id, **body}
                payload = msgpack.packb(wire, use_bin_type=True) if self.encoding == "msgpack" else json.dumps(wire).encode()
                p = by_id[job_id] = _Pending(job_id, job.model, payload, priority, derived=job.id is None)
            elif job.id is not None and {"id": job_id, **body} != _decode(p.payload):
                raise ValueError(f"id: {job_id!r} is given to two different jobs (positions {p.indices[0]} and {n - 1})")
            p.indices.append(n - 1)
        return list(by_id.values()), n

    async def _stored(self, pending: list[_Pending]) -> list[tuple[_Pending, dict]]:
        """Results already in the results stream that answer these jobs (direct gets, 64 at a time)."""
        js = self._js()
        sem = asyncio.Semaphore(64)

        async def one(p: _Pending):
            async with sem:
                try:
                    m = await js.get_last_msg(self.topology.results_stream, self.topology.result_subject(p.id), direct=True)
                except NotFoundError:
                    return None
                d = _answer(p, m.headers, m.data or b"")
                return (p, d) if d is not None else None

        found = await asyncio.gather(*(one(p) for p in pending))
        return [f for f in found if f is not None]

    async def _stored_under(self, p: _Pending) -> Optional[_Duplicate]:
        """What the results stream holds under the job's id: its answer, another job's, or nothing."""
        try:
            m = await self._js().get_last_msg(self.topology.results_stream, self.topology.result_subject(p.id), direct=True)
        except NotFoundError:
            return None
        d = _answer(p, m.headers, m.data or b"")
        if d is not None:
            return _Duplicate(p, "answered", d)
        return _Duplicate(p, "dropped", f"a different job under this id is answered already; {p.new_id_advice()}")

    async def _queued_hashes(self, ids: set[str]) -> dict[str, str]:
        """Id -> job hash of the jobs in the jobs stream (queued or being worked on) under `ids`, read
        one by one: the stream's subjects name models, not ids. Needs `$JS.API.STREAM.MSG.GET` on it."""
        js = self._js()
        state = (await js.stream_info(self.topology.jobs_stream)).state
        found: dict[str, str] = {}

        async def one(seq: int):
            try:
                m = await js.get_msg(self.topology.jobs_stream, seq=seq)
            except NotFoundError:
                return  # acked (a work queue removes it) or cancelled
            job_id = (m.headers or {}).get("Nats-Msg-Id")
            if job_id in ids:
                found[job_id] = job_hash(m.data or b"")

        # 64 gets at a time: a deep queue is not turned into one task per message at once.
        for start in range(state.first_seq, state.last_seq + 1, 64):
            await asyncio.gather(*(one(seq) for seq in range(start, min(start + 64, state.last_seq + 1))))
        return found

    async def _resolve_duplicates(self, dups: list[_Pending]) -> list[_Duplicate]:
        """Sorts out jobs dropped as duplicates. The queue is read before the results are looked up
        again: a job that leaves the queue was answered first, so none is missed between the two."""
        resolved, unanswered = [], []
        for p in dups:
            d = await self._stored_under(p)
            if d is not None:
                resolved.append(d)
            else:
                unanswered.append(p)
        if not unanswered:
            return resolved
        try:
            queued = await self._queued_hashes({p.id for p in unanswered})
        except (nats.errors.Error, asyncio.TimeoutError) as e:
            why = (f"this account cannot look into the jobs queue ({e!r}) to tell whether it is this very job; "
                   "waiting for it — a result for a different job under this id ends the wait")
            return resolved + [_Duplicate(p, "unverified", why) for p in unanswered]
        for p in unanswered:
            h = queued.get(p.id)
            if h == p.hash:
                resolved.append(_Duplicate(p, "queued", None))
            elif h is not None:
                resolved.append(_Duplicate(p, "dropped", f"a different job under this id is queued; {p.new_id_advice()}"))
            else:
                resolved.append(await self._stored_under(p) or _Duplicate(
                    p, "dropped", f"the earlier job under this id is neither queued nor answered (cancelled?); {p.new_id_advice()}"))
        return resolved

    async def consumer_status(self) -> str:
        """What the workers' consumers (one per priority level) say: are workers pulling, how many
        jobs wait or are worked on."""
        t = self.topology
        infos = []
        for p in PRIORITIES:
            name = t.consumer_of(p)
            try:
                infos.append((name, await self._js().consumer_info(t.jobs_stream, name)))
            except Exception:
                return f"consumer {name} cannot be looked up (not created yet: no worker has started?)"
        # An idle worker keeps a pull request open on every level; a busy one holds jobs of some.
        if all(not i.num_waiting and not i.num_ack_pending for _, i in infos):
            pending = sum(i.num_pending for _, i in infos)
            return f"consumers {t.consumer}: no worker is pulling (0 pull requests waiting); {pending} job(s) pending"
        return "consumers " + "; ".join(
            f"{name}: {i.num_waiting} pull request(s) waiting, {i.num_pending} job(s) pending, {i.num_ack_pending} being worked on"
            for name, i in infos)

    async def served_models(self, window: float = DISCOVERY_S) -> dict[str, list[str]]:
        """Model name -> the workers serving it, as the workers of this prefix answer `info`
        (`jetbatch pool list`) within `window` seconds. Empty when no worker answered."""
        await self.connect()
        inbox = self._nc.new_inbox()
        found: list[dict] = []

        async def on_instance(msg):
            try:
                found.append(json.loads(msg.data))
            except ValueError:
                pass  # another service framework's reply

        sub = await self._nc.subscribe(inbox, cb=on_instance)
        try:
            await self._nc.publish(f"$SRV.INFO.{SERVICE}", b"", reply=inbox)
            await asyncio.sleep(window)
        finally:
            await sub.unsubscribe()
        served: dict[str, list[str]] = {}
        for instance in found:
            meta = instance.get("metadata") or {}
            if meta.get("prefix") != self.topology.prefix or not meta.get("endpoints"):
                continue
            try:
                info = json.loads((await self._nc.request(f"{meta['endpoints']}.info", b"{}", timeout=10)).data)
            except Exception as e:  # a worker that went away meanwhile
                log.warning("worker %s: info not answered (%s)", meta.get("worker"), e)
                continue
            for m in info.get("models", []):
                served.setdefault(m["name"], []).append(info.get("worker", ""))
        return served

    async def cancel(self, job_ids: Iterable[str]) -> int:
        """Deletes the jobs under these ids still queued in the jobs stream (not those a worker
        has taken: they finish); returns how many. Needs `$JS.API.STREAM.MSG.GET` and `DELETE` on
        the jobs stream (`jetbatch cancel` does the same)."""
        await self.connect()
        ids = set(job_ids)
        js = self._js()
        state = (await js.stream_info(self.topology.jobs_stream)).state
        deleted = 0
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                m = await js.get_msg(self.topology.jobs_stream, seq=seq)
                if (m.headers or {}).get("Nats-Msg-Id") in ids and await js.delete_msg(self.topology.jobs_stream, seq):
                    deleted += 1
            except NotFoundError:
                continue  # taken and acked meanwhile, or deleted
        return deleted

    async def submit(
        self,
        jobs: Iterable[Union[Job, dict]],
        *,
        ordered: bool = False,
        run_id: Optional[str] = None,
        progress: Optional[bool] = None,
        timeout: Optional[float] = None,
        priority: str = "normal",
    ) -> AsyncIterator[Result]:
        """Publishes `jobs` and yields one `Result` per job (`result.index` is its position) as
        they arrive, or in input order with `ordered=True`. `timeout`: seconds for the whole call.
        `priority`: `high`, `normal` or `low` — workers take higher levels first (low jobs age, so
        they are never starved). Error results are yielded like the others (`result.error`, or
        `result.output` raises)."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority: {priority!r} is not one of {', '.join(PRIORITIES)}")
        run_id = run_id or self.run_id
        resumable = run_id is not None
        if run_id is None:
            run_id = uuid.uuid4().hex
        elif not valid_job_id(run_id):
            raise ValueError(f"run_id: {run_id!r} is not a job id prefix")
        pending, total = self._prepare(jobs, run_id, priority)
        if not pending:
            return
        await self.connect()
        await self.ensure_streams()
        by_id = {p.id: p for p in pending}
        t = self.topology
        # Derived ids all live under the run id (and given ids often under one prefix): listen
        # there only, not to every producer's results.
        parents = {p.id.rpartition(".")[0] for p in pending}
        parent = parents.pop() if len(parents) == 1 else ""
        queue: asyncio.Queue = asyncio.Queue()

        async def on_msg(msg):
            queue.put_nowait(msg)

        sub = await self._nc.subscribe(
            f"{t.prefix}.results.{parent}.>" if parent else f"{t.prefix}.results.>",
            cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await self._nc.flush()
        bar = _progress_bar(total) if (self.progress if progress is None else progress) else None
        deadline = None if timeout is None else time.monotonic() + timeout
        emitter = _Emitter(ordered)
        publisher = None
        say = bar.write if bar is not None else log.warning
        dropped: dict[str, str] = {}
        unverified: set[str] = set()
        try:
            missing = dict(by_id)
            if resumable:
                for p, d in await self._stored(pending):
                    if missing.pop(p.id, None) is not None:
                        for r in emitter.add(p, d, resumed=True, bar=bar):
                            yield r
            slots = asyncio.Semaphore(self.max_inflight)
            published: set[str] = set()
            publisher = asyncio.create_task(self._publish(missing, published, slots, queue))
            idle = 0.0
            while missing:
                wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
                try:
                    msg = await asyncio.wait_for(queue.get(), wait)
                except asyncio.TimeoutError:
                    msg = None
                if publisher.done() and publisher.exception() is not None:
                    raise publisher.exception()
                if isinstance(msg, _Duplicate):
                    p = msg.p
                    if msg.kind == "answered":
                        say(f"id {p.id!r}: published before and answered; its stored answer is collected")
                        del missing[p.id]
                        _free(p.id, published, slots)
                        for r in emitter.add(p, msg.detail, resumed=True, bar=bar):
                            yield r
                    elif msg.kind == "queued":
                        say(f"id {p.id!r}: this very job is queued already (published before); waiting for its answer")
                    elif msg.kind == "unverified":
                        say(f"id {p.id!r}: dropped as a duplicate of a job published earlier under this id; {msg.detail}")
                        unverified.add(p.id)
                    else:
                        say(f"id {p.id!r}: not queued, dropped as a duplicate: {msg.detail}")
                        dropped[p.id] = msg.detail
                        del missing[p.id]
                        _free(p.id, published, slots)
                    continue
                if msg is not None:
                    job_id = msg.subject[len(t.prefix) + len(".results."):]
                    p = missing.get(job_id)
                    d = _answer(p, msg.headers, msg.data) if p is not None else None
                    if p is not None and d is None and job_id in unverified:
                        # The job the unverified duplicate stood behind was another one.
                        why = f"the job queued under this id was a different one (it is answered now); {p.new_id_advice()}"
                        say(f"id {job_id!r}: not queued, dropped as a duplicate: {why}")
                        dropped[job_id] = why
                        del missing[job_id]
                        _free(job_id, published, slots)
                    elif p is not None and d is None:
                        log.warning("a result under id %s answers another job; still waiting for ours", job_id)
                    if d is not None:
                        del missing[job_id]
                        _free(job_id, published, slots)
                        idle = 0.0
                        for r in emitter.add(p, d, resumed=False, bar=bar):
                            yield r
                    continue
                if deadline is not None and time.monotonic() >= deadline:
                    raise JetbatchTimeout(f"no result for {len(missing)} job(s) within {timeout} s", sorted(missing))
                # Quiet: the live feed may have missed results (a reconnect); read them from the stream.
                idle += POLL_S
                for p, d in await self._stored(list(missing.values())):
                    if missing.pop(p.id, None) is not None:
                        _free(p.id, published, slots)
                        idle = 0.0
                        for r in emitter.add(p, d, resumed=False, bar=bar):
                            yield r
                if missing and idle >= STALL_REPORT_S and (idle - STALL_REPORT_S) % 10 < POLL_S:
                    line = f"no result for {idle:.0f} s: {await self.consumer_status()}"
                    (bar.write if bar is not None else log.warning)(line)
                if missing and idle >= self.idle_timeout:
                    raise JetbatchTimeout(
                        f"no result for {len(missing)} job(s) after waiting {self.idle_timeout:.0f} s without progress; "
                        f"{await self.consumer_status()}", sorted(missing))
            if dropped:
                raise JetbatchDuplicateIds(dropped)
        finally:
            if publisher is not None and not publisher.done():
                publisher.cancel()
            await sub.unsubscribe()
            if bar is not None:
                bar.close()

    async def _publish(self, missing: dict[str, _Pending], published: set[str], slots: asyncio.Semaphore,
                       queue: asyncio.Queue) -> None:
        """Publishes each job still missing once a slot is free (its result frees it), with
        pipelined acks. A job answered meanwhile (found in the results stream) is not sent. Jobs
        the stream dropped as duplicates are sorted out as their acks come and put on `queue`."""
        js = self._js()
        ct = "application/msgpack" if self.encoding == "msgpack" else "application/json"
        acks: list[tuple[_Pending, asyncio.Future]] = []

        async def settle():
            pubacks = await self._await_acks([ack for _, ack in acks])
            dups = [p for (p, _), ack in zip(acks, pubacks) if ack.duplicate]
            if dups:
                for d in await self._resolve_duplicates(dups):
                    queue.put_nowait(d)
            acks.clear()

        for p in list(missing.values()):
            await slots.acquire()
            if p.id not in missing:
                slots.release()
                continue
            published.add(p.id)
            headers = {"Nats-Msg-Id": p.id, "Content-Type": ct}
            acks.append((p, await js.publish_async(self.topology.jobs_subject(p.model, p.priority), p.payload, headers=headers)))
            if len(acks) >= 256:
                await settle()
        await settle()

    @staticmethod
    async def _await_acks(acks: list) -> list[api.PubAck]:
        try:
            return await asyncio.wait_for(asyncio.gather(*acks), 30)
        except asyncio.TimeoutError as e:
            raise JetbatchError("the jobs stream did not acknowledge published jobs within 30 s") from e

    async def stream(self, job: Union[Job, dict], **kw) -> AsyncIterator[Union[StreamChunk, Result]]:
        """One `generate` job, streamed (`params.stream` is set): yields its `StreamChunk`s as the
        worker sends them, then its `Result` (an answer from the worker's cache streams as one chunk;
        one read back from the results stream, or an error, comes alone). `kw` as for `submit`."""
        if isinstance(job, dict):
            job = Job.from_dict(job)
        if job.kind != "generate":
            raise ValueError(f"kind: only generate jobs stream, not {job.kind}")
        job = dataclasses.replace(job, params={**(job.params or {}), "stream": True})
        run_id = kw.get("run_id") or self.run_id
        if run_id is None:
            kw["run_id"] = run_id = uuid.uuid4().hex
        job_id = derive_id(job, run_id)
        await self.connect()
        queue: asyncio.Queue = asyncio.Queue()

        async def on_chunk(msg):
            queue.put_nowait(_decode(msg.data))

        async def collect():
            async for r in self.submit([job], **kw):
                queue.put_nowait(r)

        sub = await self._nc.subscribe(f"{self.topology.prefix}.stream.{job_id}", cb=on_chunk)
        await self._nc.flush()
        task = asyncio.create_task(collect())
        result: Optional[Result] = None
        done = False
        try:
            # Chunks come before the result, but on another subscription, whose order nats-py does
            # not keep: the result may overtake the last chunks by a little.
            while result is None or not (done or result.resumed or not result.ok):
                try:
                    item = await asyncio.wait_for(queue.get(), POLL_S if result is None else CHUNK_GRACE_S)
                except asyncio.TimeoutError:
                    if result is not None:
                        break
                    if task.done():
                        task.result()  # submit's error, if it failed
                        raise JetbatchError(f"job {job_id}: the call ended without its result")
                    continue
                if isinstance(item, Result):
                    result = item
                elif item.get("done"):
                    done = True
                else:
                    yield StreamChunk(item["id"], item["index"], item["text"], item["token"])
            yield result
        finally:
            task.cancel()
            await sub.unsubscribe()

    async def run(self, jobs: Iterable[Union[Job, dict]], **kw) -> list[Result]:
        """All results, in input order (see `submit` for the options)."""
        kw["ordered"] = True
        return [r async for r in self.submit(jobs, **kw)]


def _free(job_id: str, published: set[str], slots: asyncio.Semaphore) -> None:
    """A job's result came: its slot is free, if it took one."""
    if job_id in published:
        published.discard(job_id)
        slots.release()


class _Emitter:
    """Turns answers of distinct jobs into one `Result` per input position, in order if asked."""

    def __init__(self, ordered: bool):
        self.ordered = ordered
        self.buffer: dict[int, Result] = {}
        self.next = 0

    def add(self, p: _Pending, d: dict, resumed: bool, bar) -> list[Result]:
        out = []
        for i in p.indices:
            r = Result.from_wire(d, index=i, resumed=resumed)
            if bar is not None:
                bar.update(1)
            if not self.ordered:
                out.append(r)
                continue
            self.buffer[i] = r
        if self.ordered:
            while self.next in self.buffer:
                out.append(self.buffer.pop(self.next))
                self.next += 1
        return out


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="job", desc="jetbatch")


class SyncClient:
    """The client for synchronous code: its own event loop runs in a thread, so it also works
    where a loop is already running (notebooks). Same arguments as `Client`."""

    def __init__(self, *args, **kw):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jetbatch-client", daemon=True)
        self._thread.start()
        self.client = Client(*args, **kw)

    def _call(self, coro):
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted here (Ctrl-C): the call stops in the loop's thread too.
            future.cancel()
            raise

    def run(self, jobs: Iterable[Union[Job, dict]], **kw) -> list[Result]:
        return self._call(self.client.run(jobs, **kw))

    def served_models(self, timeout: float = 10.0, **kw) -> dict[str, list[str]]:
        """`Client.served_models`, connecting included, within `timeout` seconds."""
        return self._call(asyncio.wait_for(self.client.served_models(**kw), timeout))

    def cancel(self, job_ids: Iterable[str]) -> int:
        return self._call(self.client.cancel(job_ids))

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self.client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(jobs: Iterable[Union[Job, dict]], servers: Union[str, Sequence[str], None] = None, **kw) -> list[Result]:
    """One call from synchronous code: connect, run `jobs`, close. `kw` goes to `SyncClient`
    (and `ordered`, `run_id`, `progress`, `timeout` to `Client.run`)."""
    call_kw = {k: kw.pop(k) for k in ("run_id", "progress", "timeout") if k in kw}
    with SyncClient(servers, **kw) as c:
        return c.run(jobs, **call_kw)
