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

.PHONY: setup lint typecheck test test-unit demo up bench bench-deps screenshots gpu-check lock clean

setup: $(STAMP)  ## create .venv and install the locked dependencies (idempotent)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.lock
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# ruff (lint and format), the layer contracts of pyproject.toml ([tool.importlinter]) and mypy;
# .ci/run runs this before the tests.
lint: setup typecheck  ## ruff check, ruff format --check, lint-imports (the layer contracts), mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: setup  ## mypy --strict over kiln, serving, tasks and flows (pyproject.toml's [tool.mypy])
	$(VENV)/bin/mypy

test: setup  ## every test: unit, integration (DVC, Prefect, PostgreSQL, subprocesses), e2e
	$(VENV)/bin/pytest

test-unit: setup
	$(VENV)/bin/pytest tests/unit

demo: setup  ## the journey so far, end to end on the embedded defaults
	$(VENV)/bin/kiln demo

# Kiln as a local service (flows/up.py): a Prefect server + UI on 127.0.0.1:4200, the
# deployments of prefect.yaml, a process worker, the gateway (`kiln serve`) and an admin key.
# Ctrl-C stops everything it started. Other ports:
#   make up UP_ARGS="--prefect-port 4300 --gateway-port 8100"
# The cluster form (docs/cluster.md): Prefect on PostgreSQL, the *-cluster deployments on the
# kiln-cluster pool (concurrency limit KILN_POOL_CONCURRENCY, default 2), KILN_DATABASE_URL on
# PostgreSQL; other machines run only a worker and `kiln serve --role ...`:
#   KILN_PREFECT_DATABASE_URL=postgresql+asyncpg://... make up CLUSTER=1 UP_ARGS="--workers 2"
up: setup  ## Prefect server + UI, deployments, worker and gateway until Ctrl-C (CLUSTER=1: docs/cluster.md)
	$(PY) -m flows.up $(if $(CLUSTER),--cluster) $(UP_ARGS)

bench: setup bench-deps  ## optimize + serve benchmarks of digits and MiniLM -> bench/results.{json,md}
	$(VENV)/bin/dvc repro train_digits build_minilm
	$(PY) bench/optimize_bench.py
	$(PY) bench/serve_bench.py

screenshots: setup  ## headless-Chromium captures of the Prefect UI's deploy run and a drift report -> bench/*.png
	command -v chromium || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PY) bench/screenshots.py

bench-deps:  ## the serve benchmark's load generator (wrk, from Debian's packages) and py-spy (its profile section)
	command -v wrk || (apt-get update -qq && apt-get install -y -qq wrk)
	$(VENV)/bin/py-spy --version || $(PY) -m pip install -q py-spy

# GPU check (bench/README-gpu.md). Builds bench/gpu-carry/
# (git-ignored, ~49 MiB: the models from data/, and the wheels Kiln's engine needs there, from
# PyPI), then runs bench/gpu_check.py here: on a host without CUDA it prints "no CUDA device:
# nothing to check" and exits 0; with CUDA it compiles, times, then serves both models with
# Kiln's engine and a burst of requests, and writes bench/gpu_check.{md,json}. A session whose
# task has a device machine runs it there in one call, after `make gpu-check` here:
#   run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --carry bench/gpu-carry --out $OUT",
#       carry=["bench/gpu-carry"], timeout_s=420)
# and copies gpu_check.md and gpu_check.json from the reply's files into bench/.
gpu-check: setup  ## GPU check: carry folder for the GPU machine, then the check (no CUDA: says so)
	test -f data/digits/model.pt2 -a -f data/minilm/model/model.safetensors || $(VENV)/bin/dvc repro
	$(PY) bench/prepare_gpu_check.py --data-root data --out bench/gpu-carry
	$(PY) bench/gpu_check.py --carry bench/gpu-carry --out bench

lock:  ## re-resolve requirements.in into exact pins in requirements.lock
	rm -rf /tmp/kiln-lock && $(PYTHON) -m venv /tmp/kiln-lock
	/tmp/kiln-lock/bin/pip install --disable-pip-version-check -q -r requirements.in
	/tmp/kiln-lock/bin/pip freeze --all --exclude-editable | grep -v "^pip==" > requirements.lock
	rm -rf /tmp/kiln-lock

clean:
	rm -rf $(VENV) .kiln .pytest_cache
