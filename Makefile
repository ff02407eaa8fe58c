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

.PHONY: setup test test-fast clean

setup: $(STAMP)

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

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
