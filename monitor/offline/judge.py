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


def head_scores(detset: DetectorSet, conv: ConversationRows) -> dict[str, np.ndarray]:
    """Every scored head's per-token outputs [tokens, columns], as the sidecar's scorer computes them."""
    with torch.no_grad():
        out = detset.scorer.score({layer: conv.rows[layer] for layer in detset.layers})
    return {k: v.cpu().numpy() for k, v in out.items()}


def prompt_firing(detset: DetectorSet, scores: dict[str, np.ndarray], n_prompt: int) -> dict[str, int]:
    """Per input label, on how many prompt tokens (row 0 left out) it fired, as the sidecar's drift counts it."""
    out = {}
    for name, values in scores.items():
        fired = (values[1:max(n_prompt, 1)] > 0).sum(axis=0)
        out |= {label: int(f) for label, f in zip(detset.heads[name].columns, fired)}
    return out


def judge(detset: DetectorSet, conv: ConversationRows,
          scores: dict[str, np.ndarray] | None = None) -> dict[str, Verdict]:
    """Every detector's verdict on one conversation, its tokens fed in one batch (`scores`: its heads'
    outputs, when the caller has them already)."""
    scores = head_scores(detset, conv) if scores is None else scores
    positions = np.arange(len(conv.token_ids))
    out = {}
    for det in detset.detectors:
        bank = DetectorBank(det, capacity=1)
        feed_one(bank, positions, conv.n_prompt, scores)
        top = sorted(bank.top(0), key=lambda t: (t[0], t[1]), reverse=True)
        out[det.spec.name] = Verdict(det.spec.name, float(bank.score[0]), bool(bank.fired[0]), tuple(p for _, p, _ in top))
    return out
