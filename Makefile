# Waymark developer entry points. `make help` lists them.
CARGO ?= cargo
export WAYMARK_TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/postgres
export WAYMARK_TEST_REDIS_URL ?= redis://127.0.0.1:6379
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help run build services test bench lint fmt migrate clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

run: ## build and start the whole platform locally (waymark dev)
	$(CARGO) run --release -p waymark-cli --bin waymark -- dev

build: ## build every crate, test and bench target
	$(CARGO) build --workspace --all-targets

services: ## make PostgreSQL and Redis reachable (start, or install, them)
	bash scripts/ensure-services.sh

test: services ## fmt check, clippy, every unit and integration test (PostgreSQL and SQLite)
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace --no-fail-fast"; \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		echo "cargo-nextest not installed, falling back to: $(CARGO) test --workspace"; \
		$(CARGO) test --workspace; \
	fi

bench: services ## throughput and latency benchmark (BENCH_ARGS=... passes options)
	$(CARGO) build --release -p waymark-cli --bin waymark
	$(CARGO) run --release -p waymark-bench --bin waymark-bench -- $(BENCH_ARGS)

lint: ## buf lint of the protos, clippy, rustfmt check
	bash scripts/lint-protos.sh
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all --check

fmt: ## format the code
	$(CARGO) fmt --all

migrate: ## apply pending migrations of every service
	$(CARGO) run -p waymark-cli --bin waymark -- migrate

clean: ## remove build output
	$(CARGO) clean
