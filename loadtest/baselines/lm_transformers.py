"""transformers in process, no bus: the other side of the `mc` and `lm-generate` benchmarks.

    python lm_transformers.py score MODEL_DIR JOBS.jsonl      # {"context", "continuation"} a line
    python lm_transformers.py generate MODEL_DIR JOBS.jsonl   # {"prompt", "max_new_tokens"} a line

`score`: every job (each multiple-choice option on its own, as lm-evaluation-harness sends them)
scored in batches of 64 in file order, by python_worker.py's `LmScorer` (the same code the bus
baseline runs). `generate`: greedy, transformers' batched `generate`, static batches of 64 in file
order, left padding, KV cache; a batch runs to its longest `max_new_tokens` and each job keeps its
own. All jobs are due at the start, so a job's latency is the end of its batch.

Prints one JSON object: jobs, wall_s, jobs_per_s, and for `generate` tokens, tokens_per_s,
p50_ms, p99_ms and the generated token ids of the first --sample jobs.
"""

import argparse
import json
import os
import sys
import time

import torch

BATCH = 64


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["score", "generate"])
    p.add_argument("model")
    p.add_argument("jobs")
    p.add_argument("--sample", type=int, default=16, help="generate: jobs whose tokens are printed")
    return p.parse_args()


def score(args, jobs):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from python_worker import LmScorer

    scorer = LmScorer(args)
    scorer.forward([scorer.parse({"input": j}) for j in jobs[:BATCH]])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(jobs), BATCH):
        scorer.forward([scorer.parse({"input": j}) for j in jobs[i:i + BATCH]])
    wall = time.perf_counter() - start
    return {"jobs": len(jobs), "wall_s": wall, "jobs_per_s": len(jobs) / wall}


def generate(args, jobs):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.model, "tokenizer.json"), padding_side="left")
    pad, eos = model.config.pad_token_id or 0, model.config.eos_token_id
    tok.pad_token_id = pad

    def run(batch):
        enc = tok([j["prompt"] for j in batch], padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max(j["max_new_tokens"] for j in batch), do_sample=False, pad_token_id=pad, eos_token_id=eos)
        tokens = []
        for row, j in zip(out[:, enc["input_ids"].shape[1]:].tolist(), batch):
            row = row[:j["max_new_tokens"]]
            tokens.append(row[:row.index(eos) + 1] if eos in row else row)
        return tokens

    run(jobs[:4])  # warm-up
    latencies, generated = [], []
    start = time.perf_counter()
    for i in range(0, len(jobs), BATCH):
        batch = jobs[i:i + BATCH]
        generated += run(batch)
        latencies += [time.perf_counter() - start] * len(batch)
    wall = time.perf_counter() - start
    latencies.sort()
    n = sum(map(len, generated))
    return {
        "jobs": len(jobs), "wall_s": wall, "jobs_per_s": len(jobs) / wall, "tokens": n, "tokens_per_s": n / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1e3, "p99_ms": latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)] * 1e3,
        "sample": generated[:args.sample],
    }


def main():
    args = parse_args()
    with open(args.jobs) as f:
        jobs = [json.loads(line) for line in f if line.strip()]
    print(json.dumps((score if args.mode == "score" else generate)(args, jobs)))


if __name__ == "__main__":
    main()
