"""What else the model represented at a token: the strongest features of a full SAE encode.

The traffic path scores only watched columns. An incident wants more: for the few tokens that drove
a detector, every feature of every SAE on that layer, ranked. That is a full encode, so it runs on
those rows only (the cost follows fires, not traffic), and the full SAE is loaded on the first
incident rather than at start (memory: the SAE's weights, once it has been needed).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch


class ContextEncoder:
    def __init__(self, name: str, layer: int, load: Callable[[], object], device: torch.device | str = "cpu") -> None:
        self.name, self.layer = name, layer
        self._load = load
        self._sae = None
        self._lock = threading.Lock()
        self.device = torch.device(device)

    @property
    def loaded(self) -> bool:
        return self._sae is not None

    def _encoder(self):
        with self._lock:
            if self._sae is None:
                self._sae = self._load().to(self.device).eval()
            return self._sae

    @torch.no_grad()
    def top(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[m, d] rows -> ([m, k] activations, [m, k] feature indices), strongest first; zeros excluded
        by the caller (an inactive feature is not "represented")."""
        sae = self._encoder()
        acts = sae.encode(rows.to(self.device, sae.dtype)).float()
        k = min(k, acts.shape[-1])
        values, indices = acts.topk(k, dim=-1)
        return values.cpu(), indices.cpu()
