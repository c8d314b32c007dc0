"""The GPU tier: run on a machine with CUDA (`bench/gpu/run.sh`), skipped everywhere else.

These tests need only torch, numpy, safetensors, PyYAML and the package's own light dependencies
(pydantic, python-json-logger): what a GPU machine without vLLM or sae-lens has once the wheels
`make gpu-wheels` downloads are installed there.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine (the GPU tier runs with bench/gpu/run.sh)")
    for item in items:
        if "/gpu/" in str(item.fspath):
            item.add_marker(skip)
