#!/usr/bin/env bash
# The CUDA check of issue 11, for a machine with an NVIDIA GPU, python3 with torch + transformers,
# and no Rust: it runs the release binary built elsewhere. Prints one Markdown table (correctness
# on CUDA in fp32, bf16, f16; the SDPA kernels chosen; scoring jobs/s and generation tokens/s
# against transformers on the same GPU; few-shot scoring with the prefix cache against without it:
# equal within the dtype's tolerance, and the ratio) and exits non-zero when a check fails.
#
#   scripts/gpu-check.sh --prepare                   # here: copy the release binary and nats-server into .gpu/
#   scripts/gpu-check.sh [--device cuda|cpu] [--quick] [--bin PATH] [--nats-server PATH] [--work DIR]
#
# --prepare needs `cargo build --release` done; .gpu/ is git-ignored (carry it to the GPU machine).
# --device cpu runs every part on the tiny model on the CPU (a dry run); --quick skips the 1B model.
# On the device tool: carry [".gpu"] and run `scripts/gpu-check.sh --work $OUT/work 2>&1 | tee $OUT/log`.
# Within 10 minutes on an H100: building the 1B random Llama and transformers' references is most of it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda BIG=--big BIN="$ROOT/.gpu/jetbatch" NATS="$ROOT/.gpu/nats-server" WORK="${TMPDIR:-/tmp}/jetbatch-gpu-check"

while [ $# -gt 0 ]; do
  case "$1" in
    --prepare)
      mkdir -p "$ROOT/.gpu"
      grep -qx '/.gpu/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$(git -C "$ROOT" rev-parse --git-path info/exclude)"
      cp "$ROOT/target/release/jetbatch" "$(readlink -f "$ROOT/.venv/bin/nats-server")" "$ROOT/.gpu/"
      # A carried tree is at most 64 MiB: without its symbols the binary fits.
      strip "$ROOT/.gpu/jetbatch"
      ls -la "$ROOT/.gpu"; exit 0 ;;
    --device) DEVICE="$2"; shift ;;
    --quick) BIG= ;;
    --bin) BIN="$2"; shift ;;
    --nats-server) NATS="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$DEVICE" = cpu ] && BIG=
PY="${PYTHON:-python3}"
[ -x "$BIN" ] || { echo "no jetbatch binary at $BIN (scripts/gpu-check.sh --prepare, or --bin)" >&2; exit 2; }
[ -x "$NATS" ] || NATS="$(command -v nats-server || true)"
[ -x "$NATS" ] || { echo "no nats-server (carry .gpu/nats-server, or --nats-server)" >&2; exit 2; }

# The binary's RUNPATH points into the build machine's .venv; LD_LIBRARY_PATH (searched first for a
# RUNPATH) points it at this machine's libtorch instead — the same libtorch version it was built
# against. Built against a CPU libtorch, the binary does not link libtorch_cuda: preloading it
# registers CUDA with libtorch (tch's documented `-ltorch_cuda` workaround, at run time).
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "$DEVICE" = cuda ]; then
  export LD_PRELOAD="$TORCH_LIB/libtorch_cuda.so${LD_PRELOAD:+:$LD_PRELOAD}"
else
  export CUDA_VISIBLE_DEVICES=
fi
"$BIN" --version

rm -rf "$WORK"; mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SECONDS=0
# Python first (it needs the GPU to itself while it builds and measures), then jetbatch.
LD_PRELOAD= "$PY" "$ROOT/scripts/gpu_check.py" build "$WORK" --device "$DEVICE" $BIG
LD_PRELOAD= "$PY" "$ROOT/scripts/gpu_check.py" kernels "$WORK" --device "$DEVICE"
echo "python side done at ${SECONDS}s" >&2

PORT=$(( 20000 + RANDOM % 20000 ))
URL="nats://127.0.0.1:$PORT"
"$NATS" -a 127.0.0.1 -p "$PORT" -js -sd "$WORK/js" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
"$BIN" serve --nats-url "$URL" --models "$WORK/models" --cache-dir "$WORK/cache" >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!
trap 'kill $WORKER_PID $NATS_PID 2>/dev/null || true' EXIT
submit() { "$BIN" submit --nats-url "$URL" --json --quiet --allow-errors -i "$1" -o "$2"; }

submit "$WORK/check-jobs.jsonl" "$WORK/check-results.jsonl"
echo "checks done at ${SECONDS}s" >&2
# Timed runs: the same model warm (the check jobs loaded it), its own backlog at once.
t=$(date +%s%N); submit "$WORK/bench-score.jsonl" "$WORK/bench-score-results.jsonl"; score_ns=$(( $(date +%s%N) - t ))
t=$(date +%s%N); submit "$WORK/bench-gen.jsonl" "$WORK/bench-gen-results.jsonl"; gen_ns=$(( $(date +%s%N) - t ))
# The prefix cache: the same few-shot backlog with it and without (each model loaded by the checks).
t=$(date +%s%N); submit "$WORK/bench-fewshot-on.jsonl" "$WORK/bench-fewshot-on-results.jsonl"; fs_on_ns=$(( $(date +%s%N) - t ))
t=$(date +%s%N); submit "$WORK/bench-fewshot-off.jsonl" "$WORK/bench-fewshot-off-results.jsonl"; fs_off_ns=$(( $(date +%s%N) - t ))
echo "{\"score_s\": $score_ns.0e-9, \"gen_s\": $gen_ns.0e-9, \"fewshot_on_s\": $fs_on_ns.0e-9, \"fewshot_off_s\": $fs_off_ns.0e-9}" >"$WORK/bench-timing.json"
grep -E "max_batch_tokens derived|out of memory|loading model" "$WORK/worker.log" | sed 's/^/worker: /' >&2 || true
echo "all done at ${SECONDS}s" >&2
LD_PRELOAD= "$PY" "$ROOT/scripts/gpu_check.py" report "$WORK"
