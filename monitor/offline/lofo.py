"""`monitor probe lofo`: leave one family out. The figure to publish is how a probe does on a kind of
conversation it never saw, not on a random split of the kinds it did.

A family is what a record stands for: its `family` field, else its file's name (`records.py`). For each
family in turn, a probe is trained exactly as `monitor probe train` trains one (same rows, position,
family-grouped cross-validation for C) on every other family plus the benign files, thresholded at each
target FPR on the calibration set (as `monitor calibrate` does), and measured on the held-out family:
AUROC, TPR at 1% FPR of the family's own negatives, and recall and FPR at each calibrated threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from monitor.config.models import Aggregation
from monitor.offline import OfflineError
from monitor.offline.evaluate import auroc, tpr_at_fpr
from monitor.offline.extract import row_source
from monitor.offline.probes import Scope, aggregated_logits, fit_logistic_probe, pooled
from monitor.offline.records import Record, source_groups
from monitor.offline.thresholds import min_samples, threshold_at_fpr
from monitor.provenance import TrainingData


@dataclass
class HeldOut:
    family: str
    n_pos: int
    n_neg: int
    n_train: tuple[int, int]  # positives, negatives the probe was fit on
    auroc: float
    tpr_at_1pct: float  # at 1% FPR of this family's own negatives
    recall: dict[str, float]  # target FPR -> recall at the threshold calibrated for it
    fpr: dict[str, float]  # target FPR -> this family's false-positive rate there

    def as_dict(self) -> dict:
        return asdict(self)


def leave_one_family_out(records: list[Record], benign: list[Record], calibration: list[Record], concept: str,
                         model_dir: Path, *, layer: int | list[int], scope: Scope, aggregation: Aggregation,
                         target_fprs: list[float], backend: str = "transformers") -> list[HeldOut]:
    families = sorted({r.family or "" for r in records})
    if len(families) < 2:
        raise OfflineError(f"one family only ({families[0]!r}): leaving it out leaves nothing to train on; give "
                           "records of at least two families (a `family` field, or one file per family)")
    y_all = np.array([r.labels.get(concept, 0) for r in records])
    for fam in families:
        ys = {int(y) for r, y in zip(records, y_all) if r.family == fam}
        if ys != {0, 1}:
            raise OfflineError(f"family {fam!r} has only {'positive' if ys == {1} else 'negative'} records for "
                               f"{concept!r}: each family needs both to be measured")
    need = min_samples(min(target_fprs))
    if len(calibration) < need:
        raise OfflineError(f"{len(calibration)} calibration records cannot set a threshold at FPR {min(target_fprs):g}; "
                           f"use at least {need}")
    source = row_source(model_dir, [layer] if isinstance(layer, int) else list(layer), backend)
    convs = source.many([r.messages for r in records], progress="lofo records")
    benign_convs = source.many([r.messages for r in benign], progress="lofo benign") if benign else []
    calib_convs = source.many([r.messages for r in calibration], progress="lofo calibration")
    last = aggregation.kind == "last"
    x_all = pooled(convs, layer, scope, last=last)
    x_benign = pooled(benign_convs, layer, scope, last=last) if benign_convs else None
    groups_all = source_groups(records + benign)  # C by folds that hold whole families out, as probe train does
    out = []
    for fam in families:
        held = np.array([r.family == fam for r in records])
        x = x_all[~held] if x_benign is None else torch.cat([x_all[~held], x_benign])
        y = np.concatenate([y_all[~held], np.zeros(len(benign_convs), dtype=int)])
        groups = np.concatenate([groups_all[:len(records)][~held], groups_all[len(records):]])
        if y.sum() < 10 or (1 - y).sum() < 10:
            raise OfflineError(f"without family {fam!r}: {int(y.sum())} positive and {int((1 - y).sum())} negative "
                               "records to train on; a probe needs at least 10 of each")
        fit = fit_logistic_probe(x, y, name=f"lofo-{fam}", concept=concept, model=str(model_dir), layer=layer,
                                 training=TrainingData(path="-", n_pos=int(y.sum()), n_neg=int((1 - y).sum())),
                                 groups=groups)
        cal = aggregated_logits(fit.probe, calib_convs, scope, aggregation)
        s = aggregated_logits(fit.probe, [c for c, h in zip(convs, held) if h], scope, aggregation)
        yt = y_all[held]
        pos, neg = s[yt == 1], s[yt == 0]
        thresholds = {f"{t:g}": threshold_at_fpr(cal, t)[0] for t in target_fprs}
        out.append(HeldOut(
            family=fam, n_pos=int(len(pos)), n_neg=int(len(neg)), n_train=(int(y.sum()), int((1 - y).sum())),
            auroc=round(auroc(pos, neg), 4), tpr_at_1pct=round(tpr_at_fpr(pos, neg, 0.01), 4),
            recall={k: round(float((pos >= t).mean()), 4) for k, t in thresholds.items()},
            fpr={k: round(float((neg >= t).mean()), 4) for k, t in thresholds.items()}))
    return out


def table(concept: str, results: list[HeldOut]) -> str:
    """A markdown table, one row per held-out family."""
    tiers = list(results[0].recall) if results else []
    head = "| held-out family | pos/neg | AUROC | TPR @ 1% FPR | " + " | ".join(
        f"recall / FPR @ {float(t):.0%} calib." for t in tiers) + " |"
    lines = [f"**{concept}**", "", head, "|" + "---|" * (4 + len(tiers))]
    for r in results:
        cells = " | ".join(f"{r.recall[t]:.2f} / {r.fpr[t]:.1%}" for t in tiers)
        lines.append(f"| {r.family} | {r.n_pos}/{r.n_neg} | {r.auroc:.3f} | {r.tpr_at_1pct:.2f} | {cells} |")
    return "\n".join(lines)
