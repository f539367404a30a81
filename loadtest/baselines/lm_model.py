"""Writes the LM benchmarks' model: a Llama-architecture Hugging Face folder with random weights
from a fixed seed, GQA, and a byte-level BPE tokenizer with a real-sized vocabulary (trained here on
pseudo-words from the same seed), which both transformers and the Rust `tokenizers` crate load.

    python lm_model.py OUT_DIR [--vocab 32000 --hidden 256 --layers 4 --seed 0 --max-positions 512]

The folder gets config.json, model.safetensors, tokenizer.json, tokenizer_config.json and a
jetbatch.toml (batches of 64, continuous generation), so jetbatch serves it as it is.
"""

import argparse
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<s>", "</s>", "<pad>"]
JETBATCH_TOML = """# LM benchmarks: a random Llama-architecture decoder (loadtest/baselines/lm_model.py).
backend = "hf"
max_batch_size = 64
max_wait_ms = 5
max_new_tokens_limit = 128
preload = true
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-positions", type=int, default=512)
    return p.parse_args()


def tokenizer(vocab, seed):
    """A byte-level BPE of exactly `vocab` tokens, trained on pseudo-words (syllable strings): the
    merges give a real vocabulary's size and shape (every byte, then longer and longer pieces)."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels] + [c + v + e for c in consonants[:8] for v in vowels for e in "nrst"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(200_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((" ".join(words[i:i + 50]) for i in range(0, len(words), 50)), trainer)
    if tok.get_vocab_size() != vocab:
        raise SystemExit(f"tokenizer: {tok.get_vocab_size()} tokens trained, {vocab} asked (too few pseudo-words for this vocabulary)")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    heads = max(4, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=args.max_positions, bos_token_id=0, eos_token_id=1,
        pad_token_id=2, tie_word_embeddings=False,
        # Wider than the default 0.02, so logits are far apart and greedy tokens do not hinge on rounding.
        initializer_range=0.1,
    )
    LlamaForCausalLM(config).save_pretrained(args.out, safe_serialization=True)
    tokenizer(args.vocab, args.seed).save_pretrained(args.out)
    (args.out / "jetbatch.toml").write_text(JETBATCH_TOML)


if __name__ == "__main__":
    main()
