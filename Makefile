# model-storage: the targets people expect. `make test` installs everything the suite needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
SYSTEM_BINS := prometheus promtool prometheus-alertmanager amtool victoria-metrics chromium rsync openssl gcc
SYSTEM_PKGS := prometheus prometheus-alertmanager victoria-metrics chromium rsync openssl gcc libc6-dev
# The scan's C loop (exporter/index/_listing.c) is built against these headers; Debian's python3 has
# them in python3-dev (a Python built from source, as pyenv's, has them already).
PY_HEADERS := $(shell python3 -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["include"], "Python.h"))')
PYTEST_ARGS ?=

.PHONY: all install lock system-deps run test test-fast test-compose test-kubernetes kubernetes docs check lint fmt typecheck imports bench stress stress-exporter stress-cleaner clean

all: test

# Every package at the version in $(CONSTRAINTS): the tools that judge a change do not move under it.
# The editable install compiles exporter/index/_listing.c in place (system-deps brings the compiler).
$(STAMP): pyproject.toml setup.py exporter/index/_listing.c $(CONSTRAINTS) | system-deps
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -U pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Re-pin: the newest versions pyproject.toml allows, resolved in a scratch venv, written to $(CONSTRAINTS).
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q --disable-pip-version-check -U pip
	.venv-lock/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	{ sed -n '/^#/p' $(CONSTRAINTS); .venv-lock/bin/pip freeze --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-lock

# Debian's Prometheus, Alertmanager, VictoriaMetrics and Chromium (the suite runs the real binaries),
# and gcc with the Python headers for the scan's C loop.
system-deps:
	@missing=""; for b in $(SYSTEM_BINS); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	pkgs="$(SYSTEM_PKGS)"; [ -f "$(PY_HEADERS)" ] || { missing="$$missing Python.h"; pkgs="$$pkgs python3-dev"; }; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null; \
	fi

run: $(STAMP)
	@mkdir -p storage/models/raw storage/models/quantized storage/models/repository
	$(PY) -m tools.localstack

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The import contracts in pyproject.toml: exporter and cleaner apart, layers inside the exporter, pure modules pure, no cycles.
imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

check: lint typecheck imports

test: $(STAMP) system-deps check
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The suite without the slow end-to-end tests (marked in tests/conftest.py): a quick run between edits.
test-fast: $(STAMP) system-deps check
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# The compose stack on a real Docker engine (root: installs the engine and Compose v2 if missing,
# builds local stand-in images once); `make test` runs it too, and skips it without root.
test-compose: $(STAMP) system-deps
	$(VENV)/bin/pytest tests/test_compose_stack.py -v -s $(PYTEST_ARGS)

# docs/configuration.md's settings reference from the settings table (FIELDS); a test fails when they differ.
docs: $(STAMP)
	$(PY) -m tools.settings_doc

# deploy/kubernetes/base/{prometheusrule,grafana-dashboard}.yaml from rules/ and grafana/dashboards/.
kubernetes: $(STAMP)
	$(PY) deploy/kubernetes/generate.py

# The manifests rendered with kubectl kustomize and validated offline (also part of `make test`).
test-kubernetes: $(STAMP) system-deps
	$(VENV)/bin/pytest tests/test_kubernetes.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

# Chaos rounds against the real exporter with both cores busy: ROUNDS (500), SEED (random), SCRUB (off|on),
# ONLY (comma-separated workloads to draw from; default all). Mount workloads are in the mix: run as root.
ROUNDS ?= 500
SEED ?=
SCRUB ?= off
ONLY ?=
stress-exporter: $(STAMP)
	$(PY) -m tests.chaos --rounds $(ROUNDS) --scrub $(SCRUB) $(if $(SEED),--seed $(SEED)) $(if $(ONLY),--only $(ONLY))

# Writers against the cleaner killed at every crash point and held in every window, in every mode
# (mounts a tmpfs: run as root). `make test` runs a reduced set of it.
stress-cleaner: $(STAMP)
	$(PY) -m tests.cleaner_torture --full

# Both stress runs at full size: the exporter's chaos rounds with the scrub off (the event path
# alone must be exact) and on, then the cleaner's torture. `make test` runs a short version of each.
stress: $(STAMP)
	$(MAKE) stress-exporter SCRUB=off
	$(MAKE) stress-exporter SCRUB=on
	$(MAKE) stress-cleaner

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build exporter/index/_listing*.so
