"""Spot check of LM scoring on a real-sized vocabulary: transformers, the way a good Python worker
scores a batch of loglikelihood requests (left padding, one forward per batch, log-softmax on the
scored positions, no_grad), on the same 64 windows that tests/scoring_spot.rs gives jetbatch's
engine. Builds the model first if DIR does not hold it.

    .venv/bin/python loadtest/spot/score_transformers.py DIR   # DIR/big-vocab: Llama, vocab 32000, hidden 256, 4 layers
"""
import json, sys, time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

root = Path(sys.argv[1])
model_dir = root / "big-vocab"
if not (model_dir / "model.safetensors").exists():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "jetbatch.toml").write_text('backend = "hf"\nmax_batch_size = 64\n')
model = LlamaForCausalLM.from_pretrained(model_dir).eval()

# The same windows as tests/scoring_spot.rs: contexts of 20-60 tokens, continuations of 1-8.
windows = []
for i in range(64):
    ctx = [3 + (t * 13 + i) % 250 for t in range(20 + (i * 7) % 40)]
    cont = [3 + (t * 31 + i) % 250 for t in range(1 + i % 8)]
    windows.append((ctx, cont))


def score(batch):
    rows = [(c + k)[:-1] for c, k in batch]
    width = max(map(len, rows))
    ids = torch.tensor([[2] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        out = []
        for b, (_, k) in enumerate(batch):
            logp = torch.log_softmax(logits[b, width - len(k):].float(), -1)
            out.append(float(logp.gather(1, torch.tensor(k)[:, None]).sum()))
    return out


score(windows)
for rnd in range(2):
    n, start = 10, time.perf_counter()
    for _ in range(n):
        score(windows)
    el = time.perf_counter() - start
    print(json.dumps({"round": rnd, "ms_per_batch": round(el * 1e3 / n, 1), "jobs_per_s": round(64 * n / el)}))
