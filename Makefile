# Kiln's entry points. `make demo` and `make test` install first when needed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed
PYTHON ?= python3
# Nothing Kiln drives may phone home (Kiln sets these itself too; this covers `make` children).
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup test test-unit demo bench lock clean

setup: $(STAMP)  ## create .venv and install the locked dependencies (idempotent)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.lock
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup  ## every test: unit, integration (DVC, Prefect, PostgreSQL, subprocesses), e2e
	$(VENV)/bin/pytest

test-unit: setup
	$(VENV)/bin/pytest tests/unit

demo: setup  ## the journey so far, end to end on the embedded defaults
	$(VENV)/bin/kiln demo

bench: setup  ## optimize benchmark: every variant of digits and MiniLM -> bench/results.{json,md}
	$(VENV)/bin/dvc repro train_digits build_minilm
	$(PY) bench/optimize_bench.py

lock:  ## re-resolve requirements.in into exact pins in requirements.lock
	rm -rf /tmp/kiln-lock && $(PYTHON) -m venv /tmp/kiln-lock
	/tmp/kiln-lock/bin/pip install --disable-pip-version-check -q -r requirements.in
	/tmp/kiln-lock/bin/pip freeze --all --exclude-editable | grep -v "^pip==" > requirements.lock
	rm -rf /tmp/kiln-lock

clean:
	rm -rf $(VENV) .kiln .pytest_cache
