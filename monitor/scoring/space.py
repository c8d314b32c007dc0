"""Score spaces, decided once: what number each kind of head gives, and the one sigmoid/logit pair.

- An SAE feature head gives the feature's **activation** (non-negative, in the SAE's units).
- A probe head gives a **logit**. Detectors aggregate logits over tokens and apply the sigmoid
  last, so a probe trained on mean-pooled rows is reproduced exactly under `mean` aggregation, and
  max / EMA / rolling means commute with the monotone sigmoid anyway. A probe-only detector's score
  and threshold are therefore **probabilities**.

Every conversion between logits and probabilities in the package goes through `sigmoid`/`logit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

HeadKind = Literal["sae", "probe"]
Space = Literal["activation", "logit", "probability"]
OUTPUT_SPACE: dict[HeadKind, Space] = {"sae": "activation", "probe": "logit"}
_EPS = 1e-7


@dataclass(frozen=True)
class HeadInfo:
    """One scored head: what it is, which space its numbers are in, and a label per output column."""

    name: str
    kind: HeadKind
    columns: tuple[str, ...]  # "<sae>/<feature>" or "<probe>/<output>"

    @property
    def space(self) -> Space:
        return OUTPUT_SPACE[self.kind]


def sigmoid(x):
    """Logit -> probability; numerically stable for arrays and scalars; NaN stays NaN."""
    if isinstance(x, float):  # the per-update path: math is ~10x quicker than numpy on one value
        if x != x:
            return x
        if x >= 0:
            return 1.0 / (1.0 + math.exp(-x))
        e = math.exp(x)
        return e / (1.0 + e)
    # Clipped so exp never overflows; sigmoid(+-500) is 1 or 0 to double precision anyway.
    out = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float64), -500.0, 500.0)))
    return float(out) if out.ndim == 0 else out


def logit(p):
    """Probability -> logit, clipped away from 0 and 1 so thresholds of 0 or 1 stay finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    out = np.log(p / (1 - p))
    return float(out) if out.ndim == 0 else out
