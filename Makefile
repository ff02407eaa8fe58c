# One virtualenv, installed from the constraints that are known to work together.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE := disabled
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup setup-gpu wordnet browser test test-fast demo compare train-cluster prefect-up prefect-down mlflow-ui bench clean

setup: $(STAMP) wordnet

# WordNet 3.0 (real data for the query list and its tests), from Debian's wordnet-base.
WORDNET_DIR := /usr/share/wordnet
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
wordnet:
	@test -f $(WORDNET_DIR)/data.noun || { command -v apt-get >/dev/null && \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wordnet-base) >/dev/null; } || \
	  { echo "make setup: could not install WordNet (Debian's wordnet-base) into $(WORDNET_DIR)"; exit 1; }

# Debian's chromium, for the test that drives the MLflow UI in a real browser (CI runs it; without
# a browser that one test skips, saying why).
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium) >/dev/null; } || \
	  { echo "make browser: could not install Debian's chromium"; exit 1; }

# torch first, so nothing pulls a CUDA build; dataclasses (an old backport that
# img2dataset pulls) shadows the standard library inside Prefect's server: remove it.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps openai-clip==1.0.1
	-$(PIP) uninstall -q -y dataclasses
	touch $(STAMP)

# The [gpu] extra (faiss-gpu-cu12) for dedup on CUDA machines. faiss-cpu and faiss-gpu-cu12 both
# install the `faiss` module: remove the CPU build, then reinstall the GPU build's files over it.
# Run it again after `make setup` reinstalls faiss-cpu.
setup-gpu: setup
	$(PIP) install -q -c constraints.txt -e ".[dev,gpu]"
	-$(PIP) uninstall -q -y faiss-cpu
	$(PIP) install -q --force-reinstall --no-deps faiss-gpu-cu12
	$(PY) -c "import faiss; print('faiss', faiss.__version__, 'GPU build:', hasattr(faiss, 'StandardGpuResources'), 'GPUs:', faiss.get_num_gpus())"

# Two pytest-xdist workers, a test file each at a time (module fixtures such as the 2-node Ray cluster
# stay in one process): 1.35x faster on 2 cores, as most slow tests wait on servers and start-ups.
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
TEST_DIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup
	$(PY) -m pytest $(TEST_DIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(TEST_DIST) $(PYTEST_ARGS)

# The whole DAG on the embedded default: synthetic web on 127.0.0.1, local Ray, SQLite MLflow.
DEMO_DIR ?= runs/demo
demo: setup
	$(VENV)/bin/clip-pipeline demo --storage $(DEMO_DIR)

# Training variants on the demo's corpus (built first if missing), side by side in MLflow's compare view.
COMPARE_VARY ?= batch_size=64,256
compare: setup
	$(VENV)/bin/clip-pipeline compare --storage $(DEMO_DIR) --vary $(COMPARE_VARY)

# The same training as a Ray Job on RAY_ADDRESS, or on a local head when it is unset.
train-cluster: setup
	PY=$(PY) bash scripts/train_cluster.sh

PREFECT_PORT ?= 4200
export PREFECT_PORT
prefect-up: setup
	PY=$(PY) bash scripts/prefect_up.sh

prefect-down:
	bash scripts/prefect_down.sh

# The MLflow UI over the demo's SQLite store (or MLFLOW_TRACKING_URI), on 127.0.0.1.
MLFLOW_PORT ?= 5000
mlflow-ui: setup
	@echo "MLflow UI: open http://127.0.0.1:$(MLFLOW_PORT)/#/experiments/1/runs?workflowType=machine_learning (the demo's runs)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(abspath $(DEMO_DIR))/mlflow.db}

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
