# The two commands: `make repro` (whole pipeline on the embedded default) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1

.PHONY: install repro test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the build this project is tested with
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

repro: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH dvc repro

test: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q

test-fast: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.installed
	$(PY) bench/lip.py
	$(PY) bench/data.py
