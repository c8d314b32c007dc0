"""Detectors on conversations without a server: the sidecar's scoring and `feed`, on offline rows.

`monitor eval`, `monitor calibrate` and the demo's prompt checks use this, so a detector is measured
offline with the same scorer, scope and aggregation as in production.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from monitor.detectors.runtime import DetectorSet, DetectorState, feed
from monitor.offline.rows import ConversationRows


@dataclass
class Verdict:
    detector: str
    score: float  # NaN when no token was in scope
    fired: bool
    state: DetectorState | None


def judge(detset: DetectorSet, conv: ConversationRows) -> dict[str, Verdict]:
    """Every detector's verdict on one conversation, its tokens fed in one batch."""
    with torch.no_grad():
        scores = {k: v.cpu().numpy() for k, v in detset.scorer.score({layer: conv.rows[layer] for layer in detset.layers}).items()}
    positions = np.arange(len(conv.token_ids))
    out = {}
    for det in detset.detectors:
        state, _ = feed(det, None, positions, conv.n_prompt, scores)
        score = state.score if state is not None else float("nan")
        out[det.spec.name] = Verdict(det.spec.name, score, bool(state is not None and state.fired), state)
    return out
