"""Residual rows for conversations without a running server, through transformers.

Offline work (SAE training, probe training, calibration, evaluation) needs the tap's numbers for
thousands of conversations, so they are computed here and cached on disk by content hash (model
fingerprint, layers, token ids): a re-run reads them back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from monitor.offline.rows import ConversationRows, Messages, tokenize_conversation
from monitor.paths import cache_dir

log = logging.getLogger("monitor.offline")


def _fingerprint(model_dir: Path) -> str:
    manifest = model_dir / "prepared.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    # A folder we did not prepare: fingerprint its config and weight file sizes.
    parts = [(model_dir / "config.json").read_text()]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(model_dir.glob("*.safetensors"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class TransformersRows:
    """`rows(messages)` -> token ids and residual rows at the requested layers.

    `dtype` is the model's compute dtype. float32 (the default) reproduces vLLM's rows best: the
    tap's bf16 rows have cosine >= 0.9999 with it, while transformers' own bf16 pass drifts to
    0.9985 at some tokens (vLLM's CPU kernels accumulate in float32). bfloat16 is 2.6x faster.
    """

    def __init__(
        self,
        model_dir: str | Path,
        layers: Sequence[int],
        dtype: torch.dtype = torch.float32,
        cache: bool = True,
        max_tokens: int = 1024,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.layers = sorted(set(layers))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).eval()
        n = self.model.config.num_hidden_layers
        bad = [layer for layer in self.layers if not 0 <= layer < n]
        if bad:
            raise ValueError(f"layers {bad} do not exist; the model has layers 0..{n - 1}")
        self.dtype = dtype
        self.max_tokens = max_tokens
        key = f"{_fingerprint(self.model_dir)}-{str(dtype).removeprefix('torch.')}"
        self.cache_root = cache_dir() / "activations" / key if cache else None

    def tokenize(self, messages: Messages, add_generation_prompt: bool | None = None) -> tuple[list[int], int]:
        """Chat-template token ids, and how many belong to the prompt (through the last assistant header)."""
        return tokenize_conversation(self.tokenizer, messages, add_generation_prompt, self.max_tokens)

    def _cache_path(self, ids: list[int]) -> Path | None:
        if self.cache_root is None:
            return None
        h = hashlib.sha256(json.dumps([self.layers, ids]).encode()).hexdigest()
        return self.cache_root / h[:2] / f"{h}.safetensors"

    @torch.no_grad()
    def rows_for_ids(self, ids: list[int]) -> dict[int, torch.Tensor]:
        path = self._cache_path(ids)
        if path is not None and path.is_file():
            t = load_file(str(path))
            return {layer: t[f"layer{layer}"] for layer in self.layers}
        rows = self._forward(ids)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({f"layer{k}": v for k, v in rows.items()}, str(tmp))
            tmp.replace(path)
        return rows

    def _forward(self, ids: list[int]) -> dict[int, torch.Tensor]:
        # Only the blocks up to the deepest tapped layer run, and never the 49k-wide LM head:
        # hooks read each block's output (= hidden_states[layer + 1], before the final norm).
        base = self.model.model
        blocks = base.layers
        captured: dict[int, torch.Tensor] = {}

        def hook(layer: int):
            def fn(_module, _inp, out):
                captured[layer] = (out[0] if isinstance(out, tuple) else out)[0].float().contiguous()
            return fn

        handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in self.layers]
        base.layers = blocks[: self.layers[-1] + 1]
        try:
            base(input_ids=torch.tensor([ids]), use_cache=False)
        finally:
            base.layers = blocks
            for h in handles:
                h.remove()
        return {layer: captured[layer] for layer in self.layers}

    def rows(self, messages: Messages, add_generation_prompt: bool | None = None) -> ConversationRows:
        ids, n_prompt = self.tokenize(messages, add_generation_prompt)
        return ConversationRows(ids, n_prompt, self.rows_for_ids(ids))

    def many(self, conversations: Iterable[Messages], progress: str | None = None) -> list[ConversationRows]:
        convs = list(conversations)
        out = []
        for i, m in enumerate(convs):
            out.append(self.rows(m))
            if progress and ((i + 1) % 50 == 0 or i + 1 == len(convs)):
                log.info("%s: rows of %d/%d conversations", progress, i + 1, len(convs),
                         extra={"task": progress, "done": i + 1, "total": len(convs)})
        return out
