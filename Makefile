# The one entry point. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
# The interpreter .venv is built on: the distribution's CPython 3.11 where there is one (Debian
# and Ubuntu build it with PGO and LTO, as the python:3.11 images of the Dockerfile are built),
# else $(PYTHON). A plain source build (pyenv's default: no PGO, no LTO) ran pure-Python code
# about 20 % slower here, and the B2 benchmark about 15 % (BENCHMARKS.md, fourteenth pass).
# `make install VENV_PYTHON=/path/to/python3.x` overrides.
VENV_PYTHON ?= $(or $(firstword $(wildcard /usr/bin/python3.11 /usr/local/bin/python3.11)),$(shell command -v $(PYTHON)))
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
# Test processes: three on two cores keeps both busy while the long fault tests wait on servers.
TEST_WORKERS ?= 3
export UV_PROJECT_ENVIRONMENT := $(CURDIR)/$(VENV)
export UV_LINK_MODE := copy
PROTO_FILES := $(shell find protos/charai -name '*.proto' | sort)
BUF_VERSION := 1.75.0
BUF := $(TOOLS)/node_modules/.bin/buf
GEN_DIR := protos/src
# The packages protoc writes under $(GEN_DIR)/charai; `make proto` replaces them. Beside them,
# $(GEN_DIR)/charai/taskapi is hand-written (shared helpers of the messages): never deleted, never diffed.
GEN_PACKAGES := tasks store
HAND_WRITTEN := taskapi

.PHONY: FORCE help install proto proto-check lint breaking format typecheck compose-check check test test-unit test-integration test-e2e demo run bench clean

FORCE:

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(BUF): | $(UV)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

# Rewritten only when the choice of interpreter changes, which then rebuilds .venv on it.
$(TOOLS)/venv-python: FORCE | $(UV)
	@echo "$(VENV_PYTHON)" | cmp -s - $@ || echo "$(VENV_PYTHON)" > $@

$(VENV)/.installed: uv.lock pyproject.toml $(wildcard */pyproject.toml */*/pyproject.toml) $(TOOLS)/venv-python | $(UV)
	$(UV) sync --frozen --all-packages --python "$(VENV_PYTHON)"
	touch $@

install: $(VENV)/.installed ## Create .venv with every package (uv workspace, locked)

proto: install ## Regenerate protos/src from protos/charai (grpcio-tools + mypy-protobuf)
	rm -rf $(addprefix $(GEN_DIR)/charai/,$(GEN_PACKAGES))
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -I protos \
	  --python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
	  --mypy_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) $(PROTO_FILES)

proto-check: install ## Fail when the committed generated code is stale
	@tmp=$$(mktemp -d); \
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -I protos --python_out=$$tmp --grpc_python_out=$$tmp \
	  --mypy_out=$$tmp --mypy_grpc_out=$$tmp $(PROTO_FILES) && \
	diff -r $$tmp/charai $(GEN_DIR)/charai -x __pycache__ -x py.typed $(addprefix -x ,$(HAND_WRITTEN)) >/dev/null \
	  || { echo "generated code in $(GEN_DIR) is stale: run 'make proto' and commit"; rm -rf $$tmp; exit 1; }; \
	rm -rf $$tmp; echo "generated code is up to date"

lint: install $(BUF) ## ruff (lint + format check) and buf lint (protos)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cd protos && $(CURDIR)/$(BUF) lint

format: install ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: install ## mypy --strict over every package and the tests
	$(VENV)/bin/mypy $(addprefix $(GEN_DIR)/charai/,$(HAND_WRITTEN)) libs/core/src libs/worker/src services/*/src clients/python/src tools/devstack/src tests

compose-check: ## docker-compose accepts compose.yaml (installs Debian's docker-compose if missing)
	@command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; }
	CHARAI_INTERNAL_TOKEN=check CHARAI_MEDIA_SIGNING_KEY=check CHARAI_WEBHOOK_SIGNING_KEY=check docker-compose -f compose.yaml config -q
	CHARAI_INTERNAL_TOKEN=check CHARAI_MEDIA_SIGNING_KEY=check CHARAI_WEBHOOK_SIGNING_KEY=check docker-compose -f compose.yaml --profile emulator config -q
	@echo "compose.yaml is valid"

breaking: $(BUF) ## buf breaking: the protos change nothing a client of main relies on (wire and JSON, file level)
	cd protos && $(CURDIR)/$(BUF) breaking --against '$(CURDIR)/.git#branch=main,subdir=protos'

check: proto-check lint breaking typecheck compose-check ## Everything static: generated code, lint, proto compatibility, types, compose.yaml

test: install ts console chromium postgres ## Run every test (unit, integration with real NATS + gRPC, end-to-end through the stack)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -q --durations=25 tests

test-unit: install ## Domain core only (fast, no I/O)
	$(PY) -m pytest -q tests/unit

test-integration: install postgres
	$(PY) -m pytest -q tests/integration

test-e2e: install ts console chromium
	$(PY) -m pytest -q tests/e2e

run: install console ## Run the whole stack on loopback in the foreground (Ctrl-C stops it); CHARAI_GATEWAY_PROCESSES=N: a gateway of N processes
	$(PY) -m charai.devstack run

demo: install ## Start the stack, generate one image and one voice with live progress, save them, stop
	$(PY) -m charai.devstack demo

bench: install ## Benchmarks vs BullMQ, Celery and floors (B1-B7 and W1); writes BENCHMARKS.md. BENCH_ARGS="--shape B1 --quick"
	$(PY) -m bench run $(BENCH_ARGS)

# -- Node: the TypeScript client, the task console, the browser test ---------------------------
TS_DIR := clients/typescript
CONSOLE_SRC := clients/console
CONSOLE_DIST := services/gateway/src/charai/gateway/console_dist
CHROMIUM := /usr/bin/chromium
NPM_CI := npm ci --no-audit --no-fund --loglevel=error

.PHONY: node ts console chromium postgres clean-node

$(TS_DIR)/node_modules/.installed: $(TS_DIR)/package-lock.json
	cd $(TS_DIR) && $(NPM_CI)
	touch $@

$(CONSOLE_SRC)/node_modules/.installed: $(CONSOLE_SRC)/package-lock.json
	cd $(CONSOLE_SRC) && $(NPM_CI)
	touch $@

node: $(TS_DIR)/node_modules/.installed $(CONSOLE_SRC)/node_modules/.installed ## npm packages of the TypeScript client and the console (npm ci, locked)

$(TS_DIR)/dist/index.js: $(TS_DIR)/node_modules/.installed $(PROTO_FILES) $(TS_DIR)/buf.gen.yaml $(TS_DIR)/tsconfig.json \
		$(wildcard $(TS_DIR)/src/*.ts $(TS_DIR)/src/seed/*.ts $(TS_DIR)/proto/google/rpc/*.proto)
	cd $(TS_DIR) && npm run --silent build

ts: $(TS_DIR)/dist/index.js ## TypeScript client: generate code from the protos (buf + protoc-gen-es), build with tsc

$(CONSOLE_DIST)/index.html: $(TS_DIR)/dist/index.js $(CONSOLE_SRC)/node_modules/.installed $(CONSOLE_SRC)/build.mjs \
		$(CONSOLE_SRC)/tsconfig.json $(wildcard $(CONSOLE_SRC)/src/*)
	cd $(CONSOLE_SRC) && npm run --silent build

console: $(CONSOLE_DIST)/index.html ## Build the task console (esbuild) into the gateway, which serves it at /

postgres: ## PostgreSQL server binaries for the tests, which start their own private server (apt-get when missing)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

$(CHROMIUM):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

chromium: $(CHROMIUM) ## Debian's chromium for the browser test (apt-get, when missing)

clean-node: ## Remove the npm packages and build output of the TypeScript client and the console
	rm -rf $(TS_DIR)/node_modules $(TS_DIR)/dist $(TS_DIR)/src/gen $(CONSOLE_SRC)/node_modules $(CONSOLE_DIST)

clean: ## Remove the venv, tools and local state
	rm -rf $(VENV) $(TOOLS) .data .pytest_cache .mypy_cache .ruff_cache
