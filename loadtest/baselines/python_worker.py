"""A good Python JetStream worker: the baseline jetbatch is measured against.

What a competent team writes with nats-py and torch, and nothing naive:
- asyncio; one durable pull consumer; fetches of up to --max-batch jobs, topped up for at most
  --max-wait-ms (dynamic batching, as jetbatch's max_batch_size / max_wait_ms);
- one batch prefetched while the model runs, the forward pass in a worker thread under
  torch.inference_mode() so the event loop keeps pulling and publishing;
- inputs joined into one buffer and viewed as a tensor (torch.frombuffer, no per-element Python);
- results published concurrently with Nats-Msg-Id, each job acked only after its result's PubAck
  (the same guarantee jetbatch gives), bad jobs answered with an error result and terminated;
- jobs held longer than a third of the consumer's ack_wait marked in progress (as jetbatch does),
  so a slow batch is not redelivered and computed twice.

Same wire format as jetbatch (MessagePack jobs and results, schemas/), so the same load generator
drives both. Serves one model, of one of three kinds:
- `tensor`: a TorchScript file with a fixed per-job shape (the `mlp` demo model);
- `loglikelihood`: a Hugging Face causal LM folder with transformers, as lm-evaluation-harness
  scores: each pair encoded whole and split after the context's own encoding, the batch sorted by
  length and right-padded, one forward, log-softmax on each row's continuation positions only,
  the continuation's log-probs gathered and compared with the argmax (`is_greedy`);
- `embed`: a sentence-transformers folder (all-MiniLM-L6-v2) with `SentenceTransformer.encode`,
  the batch's texts in one call (its own length sorting, padding and pooling), L2-normalised as
  jetbatch's default `normalize: true`.

    python python_worker.py --nats-url nats://127.0.0.1:4222 --stream PYBASE_JOBS \
        --consumer pybase-workers --results-prefix pybase.results --model models/mlp/model.pt
    python python_worker.py ... --kind loglikelihood --model models/lm
    python python_worker.py ... --kind embed --model path/to/all-MiniLM-L6-v2
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
    p.add_argument("--model", required=True, help="TorchScript file (tensor), HF folder (loglikelihood) or sentence-transformers folder (embed)")
    p.add_argument("--kind", choices=["tensor", "loglikelihood", "embed"], default="tensor")
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


class TensorModel:
    """A TorchScript model of f32[features] per job: inputs joined into one buffer, one forward."""

    kind = "tensor"

    def __init__(self, args):
        self.model = torch.jit.load(args.model).eval()
        self.name = os.path.basename(os.path.dirname(os.path.abspath(args.model)))
        self.features = args.features

    def parse(self, job):
        t = job["input"]["inputs"][0]
        if t["dtype"] != "f32" or len(t["data"]) != 4 * self.features:
            raise ValueError(f"input: expected f32[{self.features}]")
        return t["data"]

    def forward(self, inputs):
        x = torch.frombuffer(bytearray(b"".join(inputs)), dtype=torch.float32).view(len(inputs), self.features)
        with torch.inference_mode():
            rows = self.model(x).contiguous().numpy()
        shape = list(rows.shape[1:])
        return [{"outputs": [{"dtype": "f32", "shape": shape, "data": row.tobytes()}]} for row in rows]


class LmScorer:
    """loglikelihood with transformers, the way lm-evaluation-harness's HF backend scores."""

    kind = "loglikelihood"

    def __init__(self, args):
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
        self.model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        self.tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.model, "tokenizer.json"))
        self.name = os.path.basename(os.path.abspath(args.model))
        self.max_length = self.model.config.max_position_embeddings
        self.pad = self.model.config.pad_token_id or 0

    def parse(self, job):
        context, continuation = job["input"]["context"], job["input"]["continuation"]
        if not isinstance(context, str) or not isinstance(continuation, str) or not continuation:
            raise ValueError("input: expected context and a non-empty continuation (text)")
        # lm-evaluation-harness _encode_pair: trailing spaces move to the continuation, the pair is
        # encoded whole and split after the context's own tokens.
        trimmed = context.rstrip()
        continuation = context[len(trimmed):] + continuation
        whole, ctx = self.tok([trimmed + continuation, trimmed], add_special_tokens=False)["input_ids"]
        ctx = ctx or [self.model.config.bos_token_id]
        cont = whole[len(ctx):] if trimmed else whole
        return (ctx + cont)[-(self.max_length + 1):], len(cont)

    def forward(self, pairs):
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
        rows = [pairs[i][0][:-1] for i in order]
        width = len(rows[0])
        ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        out = [None] * len(pairs)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            for b, i in enumerate(order):
                tokens, n = pairs[i]
                logp = torch.log_softmax(logits[b, len(rows[b]) - n:len(rows[b])].float(), -1)
                target = torch.tensor(tokens[-n:])
                out[i] = {
                    "logprob": float(logp.gather(1, target[:, None]).sum()),
                    "tokens": n,
                    "is_greedy": bool((logp.argmax(-1) == target).all()),
                }
        return out


class SentenceEmbedder:
    """embed with sentence-transformers, as a team serving embeddings from Python does."""

    kind = "embed"

    def __init__(self, args):
        from sentence_transformers import SentenceTransformer
        self.model = SentenceTransformer(args.model, device="cpu")
        self.name = os.path.basename(os.path.abspath(args.model))

    def parse(self, job):
        text = job["input"]["text"]
        if not isinstance(text, str):
            raise ValueError("input.text: expected a string")
        if job.get("params", {}).get("normalize", True) is not True:
            raise ValueError("params.normalize: only the default (true) is served")
        return text

    def forward(self, texts):
        rows = self.model.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)
        return [{"embedding": row.tolist(), "dim": len(row)} for row in rows]


def error_result(job_id, kind, code, message):
    return msgpack.packb({
        "id": job_id, "model": "", "kind": kind, "status": "error",
        "error": {"code": code, "message": message}, "cached": False, "worker": WORKER,
        "timing": {"queued_ms": 0.0, "compute_ms": 0.0, "batch_size": 0},
    })


async def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = {"loglikelihood": LmScorer, "embed": SentenceEmbedder, "tensor": TensorModel}[args.kind](args)
    nc = await nats.connect(args.nats_url, name=WORKER, pending_size=64 * 1024 * 1024)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=args.consumer, stream=args.stream)
    batches = asyncio.Queue(maxsize=1)  # exactly one batch prefetched
    inflight = set()
    held = {}  # id(msg) -> (msg, when it was fetched or last marked in progress)
    info = await js.consumer_info(args.stream, args.consumer)
    keep_alive_period = info.config.ack_wait / 3

    async def publish_and_ack(msg, job_id, body):
        await js.publish(f"{args.results_prefix}.{job_id}", body, headers={"Nats-Msg-Id": job_id})
        await msg.ack()
        held.pop(id(msg), None)

    async def puller():
        while True:
            msgs = await next_batch(sub, args.max_batch, args.max_wait_ms / 1000)
            now = time.monotonic()
            held.update((id(m), (m, now)) for m in msgs)
            await batches.put(msgs)

    async def keep_alive():
        while True:
            await asyncio.sleep(keep_alive_period / 2)
            now = time.monotonic()
            for key, (m, since) in list(held.items()):
                if now - since > keep_alive_period and key in held:
                    held[key] = (m, now)
                    await m.in_progress()

    async def runner():
        loop = asyncio.get_running_loop()
        while True:
            msgs = await batches.get()
            started = time.monotonic()
            good, inputs = [], []
            for m in msgs:
                job = None
                try:
                    job = msgpack.unpackb(m.data)
                    inputs.append(model.parse(job))
                    good.append((m, job["id"]))
                except Exception as e:  # noqa: BLE001 - any bad job gets an error result
                    job_id = job.get("id", "unknown") if isinstance(job, dict) else "unknown"
                    await js.publish(f"{args.results_prefix}.{job_id}", error_result(job_id, model.kind, "bad_request", str(e)))
                    await m.term()
                    held.pop(id(m), None)
            if not good:
                continue
            outputs = await loop.run_in_executor(None, model.forward, inputs)
            compute_ms = (time.monotonic() - started) * 1000
            for (m, job_id), output in zip(good, outputs):
                body = msgpack.packb({
                    "id": job_id, "model": model.name, "kind": model.kind, "status": "ok",
                    "output": output, "cached": False, "worker": WORKER,
                    "timing": {"queued_ms": 0.0, "compute_ms": compute_ms, "batch_size": len(good)},
                })
                task = asyncio.create_task(publish_and_ack(m, job_id, body))
                inflight.add(task)
                task.add_done_callback(inflight.discard)

    await asyncio.gather(puller(), runner(), keep_alive())


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
