# The two commands: `make repro` (whole pipeline on the embedded default) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1

PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2

.PHONY: install lock repro test test-fast bench bench-gpu clean

# Every package at the exact version in requirements.lock (torch 2.14.1 / torchvision 0.29.1
# included), nothing resolved at install time; then the project itself, editable, without deps.
# Bytecode is compiled after the install, on every core (pip compiles file by file: measured on 2
# cores, install 1 min 50 s + compile 1 min 4 s instead of 3 min 40 s). Not compiling at all is
# slower: the first pipeline run's Ray processes then all compile the same modules at once (a fresh
# `make repro` took 1 min 45 s longer, and Ray's controller timed out once while starting). A few
# vendored Python 2 files in dependencies do not compile; pip skips them too, hence `|| true`.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	$(PY) -m pip install -q --no-compile --no-deps -r requirements.lock
	$(PY) -m compileall -qq -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

# Refresh requirements.lock after a change to pyproject.toml's dependencies (pins already in the
# lock are kept where they still fit); `make lock UPGRADE=1` moves every package to its newest
# allowed release. pip-compile runs in a throwaway venv; then `make install`.
lock:
	tmp=$$(mktemp -d) && python3 -m venv $$tmp \
	&& $$tmp/bin/pip install -q pip-tools==$(PIP_TOOLS_VERSION) \
	&& CUSTOM_COMPILE_COMMAND="make lock" $$tmp/bin/pip-compile --quiet --extra dev --strip-extras \
	   --allow-unsafe --no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade) \
	   -o requirements.lock pyproject.toml; rc=$$?; rm -rf $$tmp; exit $$rc

repro: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH dvc repro

# The README's results block, docs/results.md and reports/{recipe,imbalance,bf16_recipe}.{json,md},
# from the files each row names (metrics/, reports/history_*.json, reports/runs/,
# reports/ablation.json): after `make repro`.
results: $(VENV)/.installed
	$(PY) scripts/results.py

test: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q

test-fast: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m "not slow"

# LIP's cost vs VGG16-BN and its max-pool twin, with the step broken down (widths 0.25 and 1.0,
# fp32 and bf16; ~20 min on 2 cores), the CPU kernel pin's cost (bench/kernels.py), and bf16 vs
# fp32 on this CPU (-> reports/bf16_cpu.json); bench/compile.py times torch.compile separately.
bench: $(VENV)/.installed
	$(PY) bench/lip.py
	$(PY) bench/kernels.py
	$(PY) bench/bf16_cpu.py
	$(PY) bench/data.py
	# onnxruntime vs PyTorch prediction (width 0.25 here; --width 1.0 is the paper's network)
	$(PY) bench/onnx.py --width 0.25 --seconds 2

# On a GPU machine: the gpu-marked tests, throughput, loader and the paper run, one table (< 8 min).
bench-gpu: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/gpu.py
