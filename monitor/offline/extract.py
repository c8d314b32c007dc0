"""Pick a row source by name: `transformers` (float32, cached on disk) or `vllm` (the tap itself, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from monitor.offline import OfflineError
from monitor.offline.rows import RowSource

BACKENDS = ("transformers", "vllm")


def row_source(model_dir: str | Path, layers: Sequence[int], backend: str = "transformers") -> RowSource:
    if backend == "vllm":
        from monitor.offline.rows_vllm import VLLMRows

        return VLLMRows(model_dir, layers)
    if backend == "transformers":
        from monitor.offline.rows_transformers import TransformersRows

        return TransformersRows(model_dir, layers)
    raise OfflineError(f"unknown rows backend {backend!r}: one of {', '.join(BACKENDS)}")
