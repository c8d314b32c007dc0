"""What scoring hands down the data path: one request's token scores, and the cost of a scored slot."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenScores:
    """Scores of some of one request's tokens, per head, in that head's space (`scoring.space`)."""

    req: str
    request_id: str
    external_id: str
    sample: int
    positions: np.ndarray
    is_prompt: np.ndarray
    scores: dict[str, np.ndarray]  # head -> [n, k]: SAE activations, probe logits


@dataclass(frozen=True)
class SlotScored:
    rows: int
    seconds: float  # scoring time of the slot's rows (one batched pass)
    step_time: float | None  # wall-clock end of the forward pass that produced them
