"""Tiny random Llama-style models as plain Hugging Face folders (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json; no jetbatch.toml), built from a fixed seed. Both
transformers (lm-eval's HF backend) and the worker's Rust `tokenizers` load them.

Also used by loadtest/lm_eval_bench.py for its 32k-vocabulary model.
"""
from __future__ import annotations

import json
import pathlib

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a batch of jobs waits on the bus for a worker with a free device",
    "language models score continuations by the sum of their token log probabilities",
    "what is the capital of france? paris is the capital of france.",
    "numbers like 12 345 and 6789 and symbols like ! ? , . ; : are tokens too",
]


def byte_level_bpe(vocab_size: int = 320, bos_in_template: bool = False):
    """A byte-level BPE trained on CORPUS; its post-processor adds `<s>` in front of each text
    (as Llama's tokenizers do) with `bos_in_template`, else no special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos_in_template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


def write_tiny_llama(
    out: pathlib.Path, *, seed: int = 7, vocab_size: int = 320, hidden: int = 64, layers: int = 2,
    max_positions: int = 64, std: float = 0.2, chat_template: str | None = None, bos_in_template: bool = False,
) -> pathlib.Path:
    """Writes the folder and returns it. `vocab_size` may exceed the tokenizer's (rows no text
    reaches, as padded vocabularies have). Weights are drawn with `std` (larger than the default
    init) so logits are peaked and greedy choices are no near-ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, rope_theta=10000.0,
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    model.save_pretrained(out, safe_serialization=True)
    byte_level_bpe(bos_in_template=bos_in_template).save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": max_positions, "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    return out
