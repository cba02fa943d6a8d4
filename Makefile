# The two commands a new user needs: `make pipeline` and `make test`. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Embedded stores, all inside the project folder and all git-ignored.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_HOME := $(CURDIR)/.prefect
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup pipeline test test-fast bench serve rollback ui-prefect ui-mlflow schedule dvc-repro data-add clean clean-all

setup: $(STAMP)

# torch first and pinned: the CPU wheel on this machine; a bare `torch` would pull CUDA.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

pipeline: setup  ## run the whole lifecycle on params.yaml (reruns skip what did not change)
	$(PY) -m flows.lifecycle

test: setup  ## the whole suite, whole-flow tests included
	$(PY) -m pytest

test-fast: setup  ## everything but the whole-flow and multi-process tests
	$(PY) -m pytest -m "not slow"

bench: setup  ## pipeline cold/no-op times, SFT tokens/s vs plain TRL, eval time per task and the gate's false-block rate, CPU-engine batching speed-up, gateway load test, the plane's overhead, cache speed-up and requests lost during a release
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.prepare
	$(PY) -m benchmarks.training
	$(PY) -m benchmarks.evaluation
	$(PY) -m benchmarks.engine
	$(PY) -m benchmarks.serving_load
	$(PY) -m benchmarks.plane

data-add: setup  ## add your data: make data-add FILE=path [FORMAT=auto] (copied to data/raw/, tracked by DVC)
	@test -n "$(FILE)" || { echo "usage: make data-add FILE=path/to/data.jsonl [FORMAT=alpaca|sharegpt|openai|...]"; exit 2; }
	$(PY) -m pipelines.sources add "$(FILE)" --format $(or $(FORMAT),auto)

dvc-repro: setup  ## the artifact stages alone, without Prefect
	$(VENV)/bin/dvc repro

serve: setup  ## the serving plane: gateway on serve.port, the champion's engines behind it, releases go into it (Ctrl-C stops it)
	$(PY) -m serving.plane

rollback: setup  ## champion <- previous: on a running plane, switched live (no restart); else the aliases alone
	$(PY) -m registry.cli rollback

schedule: setup  ## serve the flow with its cron schedule and data-changed trigger (needs `make ui-prefect`)
	$(PY) -m flows.schedule serve

ui-prefect: setup  ## Prefect UI on http://127.0.0.1:4200
	$(VENV)/bin/prefect server start

ui-mlflow: setup  ## MLflow UI on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --port 5000

clean:  ## remove generated data, models, metrics and caches (keeps .venv, your files in data/raw, the model registry and the DVC remote)
	rm -rf data/generated data/prepared models metrics reports .prefect dvc.lock

clean-all: clean  ## also delete the model registry (mlflow.db, mlartifacts/) and the DVC remote: every released model; asks first (FORCE=1 skips)
	@if [ "$(FORCE)" != 1 ]; then \
	  printf 'This deletes mlflow.db, mlartifacts/ and .dvc-remote/: every registered model version and the only copies of released models. Type "delete" to go on: '; \
	  read answer; [ "$$answer" = delete ] || { echo "kept the registry and the DVC remote"; exit 1; }; \
	fi
	rm -rf mlflow.db mlartifacts .dvc-remote
