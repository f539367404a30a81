"""Session fixtures: a real nats-server and a real worker (harness.py) serving a tiny random
Llama-style model that the session builds from a fixed seed (tiny_lm.py)."""
from __future__ import annotations

import os
import pathlib
import shutil
import sys

import pytest

# lm-eval's tasks read local JSON files only; their dataset cache stays out of the home folder.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "jetbatch-tests-hf-datasets"))

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from harness import start_nats, start_worker  # noqa: E402
from tiny_lm import write_tiny_llama  # noqa: E402

MODEL = "tiny-llama"
# The same weights with a tokenizer that puts <s> in front of every text.
BOS_MODEL = "tiny-llama-bos"
# tiny-llama's folder copied under a name with dots, and under a folder whose jetbatch.toml names it.
DOTTED_MODEL = "Tiny2.5-0.5B-Instruct"
NAMED_MODEL = "tiny.named-1.0"
# Small, so truncation and several rolling windows are exercised by short texts.
MAX_POSITIONS = 64
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("models")
    write_tiny_llama(d / MODEL, max_positions=MAX_POSITIONS, chat_template=CHAT_TEMPLATE)
    write_tiny_llama(d / BOS_MODEL, max_positions=MAX_POSITIONS, bos_in_template=True)
    shutil.copytree(d / MODEL, d / DOTTED_MODEL)
    shutil.copytree(d / MODEL, d / "named-folder")
    (d / "named-folder" / "jetbatch.toml").write_text(f'backend = "hf"\nname = "{NAMED_MODEL}"\n')
    return d


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory) -> str:
    p, url = start_nats(tmp_path_factory.mktemp("nats"))
    yield url
    p.stop()


@pytest.fixture(scope="session")
def worker(nats_url, models, tmp_path_factory):
    w = start_worker(nats_url, models, tmp_path_factory.mktemp("worker"))
    yield w
    w.stop()
