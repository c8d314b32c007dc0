"""Detectors on conversations without a server: the sidecar's scoring and detector banks, on offline rows.

`monitor eval`, `monitor calibrate` and the demo's prompt checks use this, so a detector is measured
offline with the same scorer, scope and aggregation as in production.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from monitor.detectors.runtime import DetectorBank, DetectorSet, feed_one
from monitor.offline.rows import ConversationRows


@dataclass
class Verdict:
    detector: str
    score: float  # NaN when no token was in scope
    fired: bool
    evidence_positions: tuple[int, ...]  # the top tokens, highest score first


def judge(detset: DetectorSet, conv: ConversationRows) -> dict[str, Verdict]:
    """Every detector's verdict on one conversation, its tokens fed in one batch."""
    with torch.no_grad():
        scores = {k: v.cpu().numpy() for k, v in detset.scorer.score({layer: conv.rows[layer] for layer in detset.layers}).items()}
    positions = np.arange(len(conv.token_ids))
    out = {}
    for det in detset.detectors:
        bank = DetectorBank(det, capacity=1)
        feed_one(bank, positions, conv.n_prompt, scores)
        top = sorted(bank.top(0), key=lambda t: (t[0], t[1]), reverse=True)
        out[det.spec.name] = Verdict(det.spec.name, float(bank.score[0]), bool(bank.fired[0]), tuple(p for _, p, _ in top))
    return out
