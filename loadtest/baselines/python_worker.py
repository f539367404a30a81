"""A good Python JetStream worker: the baseline jetbatch is measured against.

What a competent team writes with nats-py and torch, and nothing naive:
- asyncio; one durable pull consumer; fetches of up to --max-batch jobs, topped up for at most
  --max-wait-ms (dynamic batching, as jetbatch's max_batch_size / max_wait_ms);
- one batch prefetched while the model runs, the forward pass in a worker thread under
  torch.inference_mode() so the event loop keeps pulling and publishing;
- inputs joined into one buffer and viewed as a tensor (torch.frombuffer, no per-element Python);
- results published concurrently with Nats-Msg-Id, each job acked only after its result's PubAck
  (the same guarantee jetbatch gives), bad jobs answered with an error result and terminated.

Same wire format as jetbatch (MessagePack jobs and results, schemas/), so the same load generator
drives both. Serves one TorchScript model with a fixed per-job shape (the `mlp` demo model).

    python python_worker.py --nats-url nats://127.0.0.1:4222 --stream PYBASE_JOBS \
        --consumer pybase-workers --results-prefix pybase.results --model models/mlp/model.pt
"""

import argparse
import asyncio
import os
import time

import msgpack
import nats
import torch

WORKER = f"python-{os.getpid()}"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--stream", required=True, help="jobs stream")
    p.add_argument("--consumer", required=True, help="durable pull consumer (created by the caller)")
    p.add_argument("--results-prefix", required=True, help="results go to <prefix>.<job id>")
    p.add_argument("--model", required=True, help="TorchScript file")
    p.add_argument("--features", type=int, default=16, help="per-job input: f32[features]")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p.parse_args()


async def next_batch(sub, max_batch, max_wait):
    """Up to max_batch jobs: block for the first, then top up for at most max_wait seconds.

    nats-py raises both its own TimeoutError and a bare asyncio.TimeoutError from fetch (the
    former is a subclass of the latter), so the latter is what is caught.
    """
    while True:
        try:
            msgs = await sub.fetch(max_batch, timeout=1.0)
            break
        except asyncio.TimeoutError:
            continue
    deadline = time.monotonic() + max_wait
    while len(msgs) < max_batch:
        left = deadline - time.monotonic()
        # Under a millisecond the pull request's expiry (timeout less 0.1 ms) is next to nothing.
        if left < 0.001:
            break
        try:
            msgs += await sub.fetch(max_batch - len(msgs), timeout=left)
        except asyncio.TimeoutError:
            break
    return msgs


def error_result(job_id, code, message):
    return msgpack.packb({
        "id": job_id, "model": "", "kind": "tensor", "status": "error",
        "error": {"code": code, "message": message}, "cached": False, "worker": WORKER,
        "timing": {"queued_ms": 0.0, "compute_ms": 0.0, "batch_size": 0},
    })


async def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = torch.jit.load(args.model).eval()
    nc = await nats.connect(args.nats_url, name=WORKER, pending_size=64 * 1024 * 1024)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=args.consumer, stream=args.stream)
    batches = asyncio.Queue(maxsize=1)  # exactly one batch prefetched
    inflight = set()

    async def publish_and_ack(msg, job_id, body):
        await js.publish(f"{args.results_prefix}.{job_id}", body, headers={"Nats-Msg-Id": job_id})
        await msg.ack()

    async def puller():
        while True:
            await batches.put(await next_batch(sub, args.max_batch, args.max_wait_ms / 1000))

    def forward(x):
        with torch.inference_mode():
            return model(x).contiguous()

    async def runner():
        loop = asyncio.get_running_loop()
        while True:
            msgs = await batches.get()
            started = time.monotonic()
            good, buffers = [], []
            for m in msgs:
                job = None
                try:
                    job = msgpack.unpackb(m.data)
                    t = job["input"]["inputs"][0]
                    if t["dtype"] != "f32" or len(t["data"]) != 4 * feature_len:
                        raise ValueError(f"input: expected f32[{feature_len}]")
                    good.append((m, job["id"]))
                    buffers.append(t["data"])
                except Exception as e:  # noqa: BLE001 - any bad job gets an error result
                    job_id = job.get("id", "unknown") if isinstance(job, dict) else "unknown"
                    await js.publish(f"{args.results_prefix}.{job_id}", error_result(job_id, "bad_request", str(e)))
                    await m.term()
            if not good:
                continue
            x = torch.frombuffer(bytearray(b"".join(buffers)), dtype=torch.float32).view(len(good), feature_len)
            y = await loop.run_in_executor(None, forward, x)
            compute_ms = (time.monotonic() - started) * 1000
            rows = y.numpy()
            shape = list(rows.shape[1:])
            for (m, job_id), row in zip(good, rows):
                body = msgpack.packb({
                    "id": job_id, "model": "mlp", "kind": "tensor", "status": "ok",
                    "output": {"outputs": [{"dtype": "f32", "shape": shape, "data": row.tobytes()}]},
                    "cached": False, "worker": WORKER,
                    "timing": {"queued_ms": 0.0, "compute_ms": compute_ms, "batch_size": len(good)},
                })
                task = asyncio.create_task(publish_and_ack(m, job_id, body))
                inflight.add(task)
                task.add_done_callback(inflight.discard)

    feature_len = args.features
    await asyncio.gather(puller(), runner())


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
