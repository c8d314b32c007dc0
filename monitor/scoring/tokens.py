"""What scoring hands down the data path: a slot's token scores, and the cost of a scored slot."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenScores:
    """Scores of a slot's new tokens (every request's), per head, in that head's space (`scoring.space`)."""

    positions: np.ndarray  # [n]
    is_prompt: np.ndarray  # [n] bool
    scores: dict[str, np.ndarray]  # head -> [n, k]: SAE activations, probe logits


@dataclass(frozen=True)
class SlotScored:
    rows: int
    seconds: float  # scoring time of the slot's rows (one batched pass)
    step_time: float | None  # wall-clock end of the forward pass that produced them
