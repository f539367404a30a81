#!/usr/bin/env bash
# The Rust suite, as `make test` runs it. Every test binary runs (--no-fail-fast); a test that fails
# is run once more, alone (one test thread, nothing else running), and the suite passes only if
# each such test then passes. Why: a few fault and latency tests start real nats-servers, clusters
# and worker processes, and on 2 cores shared by parallel tests their elections and deadlines
# can run out (OpenMP threads spin-wait under oversubscription). A real defect fails alone too.
# Every retry is printed, so a test that starts needing it shows up in the CI log.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo test --locked --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && exit 0

# Pairs of (rerun arguments, failed tests) from cargo's output: each failing binary lists its
# failures under "failures:" and ends with "error: test failed, to rerun pass `ARGS`".
mapfile -t reruns < <(awk '
    /^failures:$/ { grab = 1; names = ""; next }
    grab && /^    [^ ]/ { sub(/^    /, ""); names = names " " $0; next }
    grab && /^test result:/ { grab = 0 }
    /^error: test failed, to rerun pass `/ {
        match($0, /`[^`]*`/); args = substr($0, RSTART + 1, RLENGTH - 2)
        if (names != "") print args "|" names
        names = ""
    }' "$log")
if [ ${#reruns[@]} -eq 0 ]; then
    echo "test.sh: the suite failed without a list of failed tests (a build error?): no retry" >&2
    exit "$status"
fi
for line in "${reruns[@]}"; do
    args=${line%%|*}
    names=${line#*|}
    echo "test.sh: RETRYING ALONE ($args):$names" >&2
    # shellcheck disable=SC2086 # args and names are word lists
    if ! cargo test --locked $args -- --exact --test-threads=1 $names; then
        echo "test.sh: FAILED AGAIN ALONE ($args):$names" >&2
        exit 1
    fi
    echo "test.sh: passed alone on retry ($args):$names" >&2
done
