"""The Python half of scripts/gpu-check.sh: random-weight Llama models, the jobs, transformers'
references and baselines on the same device, and the Markdown table.

    python3 scripts/gpu_check.py build WORK --device cuda [--big]   # models + jobs + references
    python3 scripts/gpu_check.py kernels WORK --device cuda          # which SDPA kernel runs
    python3 scripts/gpu_check.py report WORK                          # compare, print the table

Needs torch, transformers, tokenizers and safetensors only (no Rust, no nats-py): jetbatch itself
runs from the carried release binary, driven by `jetbatch submit` (see gpu-check.sh).
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

# Tolerances of |logprob error| / max(1, |logprob|) against transformers in the same dtype and
# device (fp32: the project's 1e-4). Reduced precision: kernels and summation orders differ
# between libtorch's and transformers' graphs, so the bound is the dtype's resolution over a few
# layers; greedy agreement is reported as the share of tokens before the first that differs.
TOL = {"f32": 1e-4, "bf16": 3e-2, "f16": 5e-3}
GREEDY_MIN = {"f32": 1.0, "bf16": 0.8, "f16": 0.8}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), weights random from a fixed seed.
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, hidden_act="silu", rope_theta=10000.0,
)


def tokenizer_json(vocab):
    """A word-level tokenizer over `vocab` ids ("t0", "t1", …): jetbatch needs one to load a model,
    the checks send token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def build_model(folder, config, seed, std, save_dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
        for name, p in model.named_parameters():
            # Wider than the default init so logits are peaked and greedy choices are not near-ties.
            if p.dim() >= 2:
                p.data.normal_(0.0, std)
    model = model.to(save_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_json(config["vocab_size"]).save(str(folder / "tokenizer.json"))
    return model


def write_toml(folder, dtype, max_length, extra=()):
    lines = ['backend = "hf"', "max_batch_size = 64", "max_wait_ms = 5", "preload = true", f"max_length = {max_length}", *extra]
    if dtype != "f32":
        lines.append(f'dtype = "{dtype}"')
    (folder / "jetbatch.toml").write_text("\n".join(lines) + "\n")


def variant(models, base, dtype, max_length, tag="", extra=()):
    """`base` in `dtype`: a folder of links to its files with its own jetbatch.toml."""
    folder = models / f"{base}-{dtype}{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    for f in (models / base).iterdir():
        if f.name != "jetbatch.toml" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    write_toml(folder, dtype, max_length, extra)
    return folder.name


def fewshot_jobs(rng, vocab, n, shared, own, cont):
    """Few-shot-shaped scoring jobs: one shared prefix of `shared` tokens, then each job's own."""
    prefix = [rng.randrange(2, vocab) for _ in range(shared)]
    return [{"id": f"fs{i}", "kind": "loglikelihood",
             "input": {"context_tokens": prefix + [rng.randrange(2, vocab) for _ in range(rng.randint(*own))],
                       "continuation_tokens": [rng.randrange(2, vocab) for _ in range(rng.randint(*cont))]}}
            for i in range(n)]


def make_jobs(rng, vocab, n_score, n_gen, ctx, cont, prompt, new, tag):
    jobs = []
    for i in range(n_score):
        c = [rng.randrange(2, vocab) for _ in range(rng.randint(*ctx))]
        k = [rng.randrange(2, vocab) for _ in range(rng.randint(*cont))]
        jobs.append({"id": f"{tag}-s{i}", "kind": "loglikelihood", "input": {"context_tokens": c, "continuation_tokens": k}})
    for i in range(n_gen):
        p = [rng.randrange(2, vocab) for _ in range(rng.randint(*prompt))]
        jobs.append({"id": f"{tag}-g{i}", "kind": "generate", "input": {"prompt_tokens": p},
                     "params": {"max_new_tokens": rng.randint(*new), "temperature": 0.0}})
    return jobs


def left_pad(seqs, device):
    """Token ids `[B, W]` padded on the left with 0, their attention mask, and W."""
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids.to(device), mask.to(device), width


@torch.no_grad()
def hf_scores(model, jobs, device, batch=64):
    """Log-prob sums of continuations, batched with left padding (as a Python worker would)."""
    out = {}
    for at in range(0, len(jobs), batch):
        chunk = jobs[at:at + batch]
        ids, mask, width = left_pad([j["input"]["context_tokens"] + j["input"]["continuation_tokens"] for j in chunk], device)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for r, j in enumerate(chunk):
            n = len(j["input"]["continuation_tokens"])
            rows = logits[r, width - n - 1:width - 1].float().log_softmax(-1)
            target = torch.tensor(j["input"]["continuation_tokens"], device=device)
            out[j["id"]] = rows.gather(1, target[:, None]).sum().item()
    return out


@torch.no_grad()
def hf_generate(model, jobs, device, batch=64):
    """Greedy tokens with transformers' batched `generate` (static batches, left padding, KV cache)."""
    out, tokens = {}, 0
    for at in range(0, len(jobs), batch):
        chunk = jobs[at:at + batch]
        ids, mask, width = left_pad([j["input"]["prompt_tokens"] for j in chunk], device)
        new = max(j["params"]["max_new_tokens"] for j in chunk)
        # No EOS stop: every row runs to its length; the report cuts both sides after EOS.
        model.generation_config.eos_token_id = None
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        for r, j in enumerate(chunk):
            seq = gen[r, width:width + j["params"]["max_new_tokens"]].tolist()
            out[j["id"]] = seq
            tokens += len(seq)
    return out, tokens


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def cmd_build(a):
    from transformers import LlamaForCausalLM

    work = Path(a.work)
    models = work / "models"
    rng = random.Random(7)
    plan = {"device": a.device, "gpu": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "checks": [], "bench": None}
    t0 = time.time()
    build_model(models / "tiny-llama", TINY, 1, 0.2, torch.float32)
    write_toml(models / "tiny-llama", "f32", 512)
    sets = [("tiny-llama", TINY, 512, ["f32", "bf16", "f16"], make_jobs(rng, TINY["vocab_size"], 48, 12, (1, 60), (1, 8), (2, 40), (4, 24), "tiny"))]
    if a.big:
        build_model(models / "llama-1b", LLAMA_1B, 2, 0.02, torch.bfloat16)
        write_toml(models / "llama-1b", "f32", 2048)
        sets.append(("llama-1b", LLAMA_1B, 2048, ["f32", "bf16"], make_jobs(rng, LLAMA_1B["vocab_size"], 32, 8, (8, 200), (1, 8), (4, 60), (8, 32), "big")))
    print(f"models built in {time.time() - t0:.1f}s", file=sys.stderr)
    all_jobs = []
    for base, config, max_len, dtypes, jobs in sets:
        for dtype in dtypes:
            name = base if dtype == "f32" else variant(models, base, dtype, max_len)
            model = LlamaForCausalLM.from_pretrained(models / base, dtype=DTYPES[dtype]).to(a.device).eval()
            scoring = [j for j in jobs if j["kind"] == "loglikelihood"]
            gens = [j for j in jobs if j["kind"] == "generate"]
            ref_scores = hf_scores(model, scoring, a.device)
            ref_gen, _ = hf_generate(model, gens, a.device)
            tagged = [dict(j, id=f"{name}-{j['id']}", model=name, cache=False) for j in jobs]
            all_jobs += tagged
            plan["checks"].append({"model": name, "dtype": dtype, "eos": config["eos_token_id"],
                                   "scores": {f"{name}-{k}": v for k, v in ref_scores.items()},
                                   "generate": {f"{name}-{k}": v for k, v in ref_gen.items()}})
            del model
            if a.device == "cuda":
                torch.cuda.empty_cache()
    # The benchmark: the largest model in its serving dtype, a scoring backlog and a generation mix.
    base, config, max_len, dtypes, _ = sets[-1]
    bench_dtype = "bf16" if a.device == "cuda" else "f32"
    name = base if bench_dtype == "f32" else f"{base}-{bench_dtype}"
    # The prefix cache: few-shot jobs on the bench model with it (`name`) and without (`off`); a
    # few of each among the checks, so both models are loaded before the timed runs.
    off = variant(models, base, bench_dtype, max_len, "-noprefix", ["prefix_cache_mb = 0"])
    n_fs, shared = (1024, 768) if a.big else (256, 192)
    fewshot = fewshot_jobs(random.Random(13), config["vocab_size"], n_fs, shared, (16, 64), (1, 4))
    for model, file in ((name, "bench-fewshot-on.jsonl"), (off, "bench-fewshot-off.jsonl")):
        tagged = [dict(j, id=f"{model}-{j['id']}", model=model, cache=False) for j in fewshot]
        all_jobs += [dict(j, id=f"warm-{j['id']}") for j in tagged[:4]]
        with open(work / file, "w") as f:
            for j in tagged:
                f.write(json.dumps(j) + "\n")
    plan["fewshot"] = {"on": name, "off": off, "jobs": n_fs, "shared": shared, "dtype": bench_dtype}
    with open(work / "check-jobs.jsonl", "w") as f:
        for j in all_jobs:
            f.write(json.dumps(j) + "\n")
    n_score, n_gen = (2000, 256) if a.big else (400, 48)
    bench = make_jobs(random.Random(11), config["vocab_size"], n_score, n_gen, (16, 120), (1, 6), (4, 40), (8, 64), "bench")
    for kind, file in (("loglikelihood", "bench-score.jsonl"), ("generate", "bench-gen.jsonl")):
        with open(work / file, "w") as f:
            for j in bench:
                if j["kind"] == kind:
                    f.write(json.dumps(dict(j, model=name, cache=False)) + "\n")
    model = LlamaForCausalLM.from_pretrained(models / base, dtype=DTYPES[bench_dtype]).to(a.device).eval()
    scoring = [j for j in bench if j["kind"] == "loglikelihood"]
    gens = [j for j in bench if j["kind"] == "generate"]
    hf_scores(model, scoring[:64], a.device)  # warm-up
    hf_generate(model, gens[:8], a.device)
    sync(a.device)
    t = time.time()
    hf_scores(model, scoring, a.device)
    sync(a.device)
    score_s = time.time() - t
    t = time.time()
    _, tokens = hf_generate(model, gens, a.device)
    sync(a.device)
    gen_s = time.time() - t
    plan["bench"] = {"model": name, "score_jobs": len(scoring), "gen_jobs": len(gens),
                     "hf_score_jobs_s": len(scoring) / score_s, "hf_gen_tokens_s": tokens / gen_s}
    (work / "plan.json").write_text(json.dumps(plan))
    print(f"references and baselines in {time.time() - t0:.1f}s", file=sys.stderr)


def cmd_kernels(a):
    """Profiles SDPA at the shapes the engine uses (GQA read in place, fp32 causal prefill, bf16
    padded prefill with an additive mask, bf16 decode over a cache) and names the kernels run."""
    from torch.profiler import ProfilerActivity, profile
    import torch.nn.functional as F

    dev = a.device
    kind = torch.bfloat16 if dev == "cuda" else torch.float32
    heads, kv, d = 32, 8, 64
    cases = {
        "prefill, unpadded causal": (8, 256, 256, None, True),
        "prefill, padded (mask)": (8, 256, 256, "mask", False),
        "decode over a cache (mask)": (32, 1, 300, "mask", False),
    }
    found = {}
    for label, (b, t, s, mask, causal) in cases.items():
        q = torch.randn(b, heads, t, d, device=dev, dtype=kind)
        k = torch.randn(b, kv, s, d, device=dev, dtype=kind)
        v = torch.randn(b, kv, s, d, device=dev, dtype=kind)
        m = torch.zeros(b, 1, t, s, device=dev, dtype=kind) if mask else None
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as prof:
            F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)
            sync(dev)
        names = sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ("flash", "efficient", "fmha", "cudnn", "math", "_scaled_dot_product"))})
        found[label] = names
    Path(a.work, "kernels.json").write_text(json.dumps(found))
    for k, v in found.items():
        print(f"{k}: {', '.join(v)}", file=sys.stderr)


def agreement(want, got, eos):
    """Tokens of `want` before the first that `got` differs on (both cut after EOS)."""
    def cut(seq):
        return seq[:seq.index(eos) + 1] if eos in seq else seq
    want, got = cut(want), cut(got)
    same = 0
    for x, y in zip(want, got):
        if x != y:
            break
        same += 1
    return same, len(want)


def cmd_report(a):
    work = Path(a.work)
    plan = json.loads((work / "plan.json").read_text())
    results = {}
    with open(work / "check-results.jsonl") as f:
        for line in f:
            r = json.loads(line)
            results[r["id"]] = r
    ok = True
    print(f"### GPU check — {plan['gpu']} ({plan['device']})\n")
    print("| model | dtype | scoring jobs | worst rel. logprob error | tolerance | greedy tokens agreeing | pass |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c in plan["checks"]:
        worst, missing = 0.0, 0
        for jid, want in c["scores"].items():
            r = results.get(jid)
            if not r or r.get("status") != "ok":
                missing += 1
                continue
            got = r["output"]["logprob"]
            worst = max(worst, abs(got - want) / max(1.0, abs(want)))
        same = total = 0
        for jid, want in c["generate"].items():
            r = results.get(jid)
            if not r or r.get("status") != "ok":
                missing += 1
                continue
            s, t = agreement(want, r["output"]["tokens"], c["eos"])
            same, total = same + s, total + t
        share = same / max(total, 1)
        passed = missing == 0 and worst <= TOL[c["dtype"]] and share >= GREEDY_MIN[c["dtype"]]
        ok &= passed
        print(f"| {c['model']} | {c['dtype']} | {len(c['scores'])} | {worst:.2e} | {TOL[c['dtype']]:g} | {same}/{total} | {'yes' if passed else 'NO'}{f' ({missing} without a result)' if missing else ''} |")
    kernels = work / "kernels.json"
    if kernels.exists():
        print("\n| attention case (SDPA, same shapes in PyTorch) | kernels |\n| --- | --- |")
        for k, v in json.loads(kernels.read_text()).items():
            print(f"| {k} | {', '.join(v) or '?'} |")
    b = plan["bench"]
    timing = json.loads((work / "bench-timing.json").read_text()) if (work / "bench-timing.json").exists() else None
    if b and timing:
        gen_tokens = 0
        with open(work / "bench-gen-results.jsonl") as f:
            for line in f:
                r = json.loads(line)
                gen_tokens += len(r.get("output", {}).get("tokens", []))
        jb_score = b["score_jobs"] / timing["score_s"]
        jb_gen = gen_tokens / timing["gen_s"]
        print(f"\n| benchmark ({b['model']}) | jetbatch (submit → results, e2e) | transformers (same device) | ratio |\n| --- | --- | --- | --- |")
        print(f"| loglikelihood backlog, {b['score_jobs']} jobs | {jb_score:.0f} jobs/s | {b['hf_score_jobs_s']:.0f} jobs/s (batches of 64) | {jb_score / b['hf_score_jobs_s']:.2f}x |")
        print(f"| greedy generate, {b['gen_jobs']} jobs | {jb_gen:.0f} tokens/s | {b['hf_gen_tokens_s']:.0f} tokens/s (generate, batches of 64) | {jb_gen / b['hf_gen_tokens_s']:.2f}x |")
    fs = plan.get("fewshot")
    if fs and timing and "fewshot_on_s" in timing:
        ok &= fewshot_report(work, fs, timing)
    sys.exit(0 if ok else 1)


def fewshot_report(work, fs, timing):
    """The prefix cache on the device: every few-shot job's log-prob with the cache as without it
    (within the dtype's tolerance), and the backlog's rate with against without."""
    def scores(file):
        with open(work / file) as f:
            rows = [json.loads(line) for line in f]
        return {r["id"].split("-fs", 1)[1]: r["output"]["logprob"] for r in rows if r.get("status") == "ok"}
    on, off = scores("bench-fewshot-on-results.jsonl"), scores("bench-fewshot-off-results.jsonl")
    worst = max((abs(on[k] - off[k]) / max(1.0, abs(off[k])) for k in on.keys() & off.keys()), default=float("inf"))
    passed = len(on) == len(off) == fs["jobs"] and worst <= TOL[fs["dtype"]]
    rate_on, rate_off = fs["jobs"] / timing["fewshot_on_s"], fs["jobs"] / timing["fewshot_off_s"]
    print(f"\n| prefix cache ({fs['on']}, {fs['jobs']} jobs over a {fs['shared']}-token prefix) | with | without | ratio | worst rel. difference | pass |\n| --- | --- | --- | --- | --- | --- |")
    print(f"| loglikelihood backlog (submit → results) | {rate_on:.0f} jobs/s | {rate_off:.0f} jobs/s | {rate_on / rate_off:.2f}x | {worst:.2e} (tolerance {TOL[fs['dtype']]:g}) | {'yes' if passed else 'NO'} |")
    return passed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("build", "kernels", "report"):
        s = sub.add_parser(name)
        s.add_argument("work")
        s.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
        s.add_argument("--big", action="store_true", help="also the 1B-class Llama (Llama-3.2-1B's config)")
    a = p.parse_args()
    if a.device == "cuda" and a.cmd != "report" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is compared within 1e-4: no TF32
    {"build": cmd_build, "kernels": cmd_kernels, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
