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
# Prefect's server sends usage telemetry by default; offline it logs an error on every run.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# The UIs (`make ui`): loopback only. Flows and `make serve-flows` talk to the Prefect server
# when PREFECT_API_URL points at it (export PREFECT_API_URL=http://127.0.0.1:4200/api).
PREFECT_UI_PORT ?= 4200
MLFLOW_UI_PORT ?= 5000
# A tracking server in MLFLOW_TRACKING_URI (http/https) serves its own UI: nothing to start.
MLFLOW_SERVER = $(filter http://% https://%,$(MLFLOW_TRACKING_URI))
MLFLOW_UI = $(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(MLFLOW_UI_PORT)

.PHONY: setup pipeline test test-fast bench serve monitor quality drift review feedback-demo feedback-export status lineage reproduce rollback ui ui-prefect ui-mlflow serve-flows schedule dvc-repro data-add sweep clean clean-all

setup: $(STAMP) .prefect/prefect.db

# Prefect's database, created once here: its migrations add ~5 s to whichever run comes first.
.prefect/prefect.db: $(STAMP)
	$(VENV)/bin/prefect server database upgrade -y > /dev/null

# torch first and pinned: the CPU wheel on this machine; a bare `torch` would pull CUDA.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps -c constraints.txt kserve==0.21.0  # KServe's SDK models (serving/kserve.py); its model-server pins (psutil<6, pandas<3, protobuf<7) conflict with ours and are not needed to render and validate
	@touch $@

pipeline: setup  ## run the whole lifecycle on params.yaml (reruns skip what did not change)
	$(PY) -m flows.lifecycle

# Two workers, one test file each at a time (module fixtures such as a whole-flow project stay
# in one worker): the suite waits on servers, subprocesses and flows much of its time, so a
# second worker fills those waits. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup  ## the whole suite, whole-flow tests included (TEST_WORKERS=2 by default)
	$(PY) -m pytest $(XDIST)

test-fast: setup  ## everything but the whole-flow and multi-process tests
	$(PY) -m pytest $(XDIST) -m "not slow"

bench: setup  ## pipeline cold/no-op times, orchestration overhead (flow vs its stages run directly), SFT tokens/s vs plain TRL, eval time per task and the gate's false-block rate, CPU-engine batching speed-up, gateway load test, the plane's overhead, cache speed-up and requests lost during a release, the record of every answer's cost on the gateway, Prometheus' scrape cost on an engine, the drift checks' false-alarm rate and power, the feedback endpoint's throughput and the export's rows a second
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.orchestration
	$(PY) -m benchmarks.prepare
	$(PY) -m benchmarks.training
	$(PY) -m benchmarks.evaluation
	$(PY) -m benchmarks.engine
	$(PY) -m benchmarks.serving_load
	$(PY) -m benchmarks.plane
	$(PY) -m benchmarks.record
	$(PY) -m benchmarks.monitoring
	$(PY) -m benchmarks.drift
	$(PY) -m benchmarks.feedback

data-add: setup  ## add your data: make data-add FILE=path [FORMAT=auto] (copied to data/raw/, tracked by DVC; a FORMAT is recorded in data/raw/dataset_info.json)
	@test -n "$(FILE)" || { echo "usage: make data-add FILE=path/to/data.jsonl [FORMAT=alpaca|sharegpt|openai|prompt_completion|preference|kto|text]"; exit 2; }
	$(PY) -m pipelines.sources add "$(FILE)" --format $(or $(FORMAT),auto)
	@$(PY) -m flows.deployments data-added "$(FILE)"

dvc-repro: setup  ## the artifact stages alone, without Prefect
	$(VENV)/bin/dvc repro

sweep: setup  ## SFT hyperparameter sweep (params.yaml `sweep`): trials side by side, on Ray with RUNNER=ray or $$RAY_ADDRESS; only the best is registered (<model>-sweep)
	$(PY) -m flows.sweep $(if $(RUNNER),--runner $(RUNNER))

serve: setup  ## the serving plane: gateway on serve.port, the champion's engines behind it, releases go into it (Ctrl-C stops it)
	$(PY) -m serving.plane

monitor: setup  ## Prometheus + Alertmanager + the alert receiver against `make serve`'s plane (params `monitor:`; needs apt-get install prometheus prometheus-alertmanager); prints the URLs; Ctrl-C stops all three
	$(PY) -m monitoring

status: setup  ## champion, previous and candidate: metrics, ages, the latest versions and the champion's release history
	$(PY) -m registry.cli status

lineage: setup  ## what made a version: make lineage VERSION=3 (text, and lineage-v3.png)
	@test -n "$(VERSION)" || { echo "usage: make lineage VERSION=N   (make status lists the versions)"; exit 2; }
	$(PY) -m registry.cli lineage $(VERSION)

reproduce: setup  ## rebuild a version from its record in a scratch worktree and compare every hash: make reproduce VERSION=3
	@test -n "$(VERSION)" || { echo "usage: make reproduce VERSION=N   (make status lists the versions)"; exit 2; }
	$(PY) -m registry.cli reproduce $(VERSION)

rollback: setup  ## champion <- previous: on a running plane, switched live (no restart); else the aliases alone. REASON="..." is recorded on the version rolled back
	$(PY) -m registry.cli rollback $(if $(REASON),--reason "$(REASON)")

quality: setup  ## online quality now: a sample of the recorded answers scored by the judge (flows/watch.py; scheduled by serve-flows)
	$(PY) -m flows.watch quality

drift: setup  ## drift now: the recorded prompts vs the training prompts and the window before (flows/watch.py; scheduled by serve-flows)
	$(PY) -m flows.watch drift

review: setup  ## review users' feedback now: a batch paused for your decision in the Prefect UI of `make ui` (flows/review.py)
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_UI_PORT)/api} $(PY) -m flows.review

feedback-demo: setup  ## the feedback loop on the embedded default, played by scripted users against `make serve`, `make ui` and `make serve-flows`: ask in a phrasing the champion gets wrong, correct, review, export, the triggered run released, right before -> after (flows/feedback_demo.py; ARGS='--reviewer NAME' accepts the review for you)
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_UI_PORT)/api} $(PY) -m flows.feedback_demo $(ARGS)

feedback-export: setup  ## accepted feedback -> data/feedback/{train,test}/*.jsonl (pairs, KTO, SFT rows with provenance); starts a lifecycle run when feedback_loop's policy holds (STORE=url for another record)
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_UI_PORT)/api} $(PY) -m pipelines.feedback_export $(if $(STORE),--store "$(STORE)")

serve-flows: setup  ## serve the deployments (lifecycle on orchestration.cron and on new data, release, rollback) against the Prefect server of `make ui`
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_UI_PORT)/api} $(PY) -m flows.deployments serve

schedule: serve-flows  ## alias of serve-flows

ui: setup  ## the Prefect UI and the MLflow UI together (Ctrl-C stops both)
	@PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_UI_PORT)/api $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_UI_PORT) & prefect_pid=$$!; \
	$(if $(MLFLOW_SERVER),mlflow_pid=;,$(MLFLOW_UI) & mlflow_pid=$$!;) \
	trap 'kill $$prefect_pid $$mlflow_pid 2>/dev/null' INT TERM EXIT; \
	sleep 3; \
	echo; echo "Prefect UI: http://127.0.0.1:$(PREFECT_UI_PORT)   (flows: export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_UI_PORT)/api)"; \
	echo "MLflow UI:  $(or $(MLFLOW_SERVER),http://127.0.0.1:$(MLFLOW_UI_PORT))"; echo; \
	wait

ui-prefect: setup  ## Prefect UI on http://127.0.0.1:4200
	PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_UI_PORT)/api $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_UI_PORT)

ui-mlflow: setup  ## MLflow UI on http://127.0.0.1:5000 (a tracking server in MLFLOW_TRACKING_URI: says where its UI is)
	$(if $(MLFLOW_SERVER),@echo "MLflow's UI is the tracking server's own: open $(MLFLOW_SERVER)",$(MLFLOW_UI))

clean:  ## remove generated data, models, metrics and caches (keeps .venv, your files in data/raw, the model registry and the DVC remote)
	rm -rf data/generated data/prepared models metrics reports .prefect dvc.lock params.run.yaml

clean-all: clean  ## also delete the model registry (mlflow.db, mlartifacts/) and the DVC remote: every released model; asks first (FORCE=1 skips)
	@if [ "$(FORCE)" != 1 ]; then \
	  printf 'This deletes mlflow.db, mlartifacts/ and .dvc-remote/: every registered model version and the only copies of released models. Type "delete" to go on: '; \
	  read answer; [ "$$answer" = delete ] || { echo "kept the registry and the DVC remote"; exit 1; }; \
	fi
	rm -rf mlflow.db mlartifacts .dvc-remote
