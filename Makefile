# model-storage: the targets people expect. `make test` installs everything the suite needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_BINS := prometheus promtool prometheus-alertmanager amtool victoria-metrics rsync
SYSTEM_PKGS := prometheus prometheus-alertmanager victoria-metrics rsync
PYTEST_ARGS ?=

.PHONY: all install system-deps run test check lint fmt typecheck bench stress-exporter clean

all: test

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -U pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Prometheus, Alertmanager and VictoriaMetrics: the suite runs the real binaries.
system-deps:
	@missing=""; for b in $(SYSTEM_BINS); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_PKGS) >/dev/null; \
	fi

run: $(STAMP)
	@mkdir -p storage/models/raw storage/models/quantized storage/models/repository
	$(PY) -m exporter.localstack

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck

test: $(STAMP) system-deps check
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

# Chaos rounds against the real exporter with both cores busy: ROUNDS (500), SEED (random), SCRUB (off|on).
ROUNDS ?= 500
SEED ?=
SCRUB ?= off
stress-exporter: $(STAMP)
	$(PY) -m tests.chaos --rounds $(ROUNDS) --scrub $(SCRUB) $(if $(SEED),--seed $(SEED))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
