# The two commands of the README. Both install what they need first (scripts/bootstrap.sh).
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: demo test build bench bootstrap install install-check

## A local nats-server, the built-in demo models, a worker, and a few demo jobs with their results.
demo: bootstrap
	$(ENV) cargo build --release --locked
	$(ENV) ./target/release/jetbatch demo

## The whole test suite (unit, integration against real nats-servers, schema checks), then the
## Python client's tests against the worker binary that cargo test built (target/debug/jetbatch).
## A Rust test that fails is rerun once alone (scripts/test.sh says why) and must pass then.
test: bootstrap
	$(ENV) scripts/test.sh
	.venv/bin/python -m pytest -q clients/python/tests

## The benchmarks of loadtest/README.md: `make bench` (all) or `make bench WHICH=engine` (engine,
## batching, bus, python, generation, scaling, and the LM ones: lm-score, mc, lm-generate, lm-e2e);
## `REPEAT=3` reports each ratio as the median of 3 rounds; reports in loadtest-report/.
## `make bench WHICH=fewshot`: 5-shot multiple choice through lm-eval, jetbatch vs lm-eval's HF
## backend, prefix cache on vs off (loadtest/lm_eval_bench.py --fewshot; not part of `all`).
WHICH ?= all
REPEAT ?= 1
bench: bootstrap
ifeq ($(WHICH),fewshot)
	$(ENV) cargo build --release --locked --bin jetbatch
	$(ENV) .venv/bin/python loadtest/lm_eval_bench.py --fewshot
else
	$(ENV) cargo run --release --locked -p jetbatch-loadtest -- bench $(WHICH) --repeat $(REPEAT) --out loadtest-report
endif

build: bootstrap
	$(ENV) cargo build --release --locked

## Installs the release binary for hosts without the build tree: PREFIX/bin/jetbatch, and libtorch's
## shared libraries in PREFIX/lib/jetbatch (found through the rpath $$ORIGIN/../lib/jetbatch).
PREFIX ?= /usr/local
install: build
	./scripts/install.sh $(PREFIX)

## The install layout's test (tests/install.rs, which the suite runs on the debug binary) on the
## release binary: installed to a temporary prefix, moved, run with a clean environment.
install-check: build
	$(ENV) JETBATCH_INSTALL_BIN=target/release/jetbatch cargo test --locked --test install

bootstrap:
	./scripts/bootstrap.sh
