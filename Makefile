# The two commands of the README. Both install what they need first (scripts/bootstrap.sh).
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: demo test build bootstrap

## A local nats-server, the built-in demo models, a worker, and a few demo jobs with their results.
demo: bootstrap
	$(ENV) cargo build --release --locked
	$(ENV) ./target/release/jetbatch demo

## The whole test suite (unit, integration against real nats-servers, schema checks).
test: bootstrap
	$(ENV) cargo test --locked --all-targets

build: bootstrap
	$(ENV) cargo build --release --locked

bootstrap:
	./scripts/bootstrap.sh
