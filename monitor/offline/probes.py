"""Fit linear probes on a tapped layer's residual rows, and calibrate their thresholds.

A probe is a logistic regression on the *mean* of a conversation's residual rows (positions >= 1:
row 0 is the same token at the same position in every chat, an attention sink with a huge norm
that carries no information). Because the logit is linear, the mean of per-token logits equals
the logit of the mean row, so the sidecar's `mean` aggregation (which averages logits and applies
the sigmoid last) reproduces the trained classifier exactly. A detector may aggregate the same
per-token logits otherwise (the max of rolling means finds a concept in one turn of a long
conversation that the mean of all of them dilutes); `aggregated_scores` computes what the sidecar
would report, through its own aggregators. A probe for a `last` detector is fit on the scope's last
row instead: with `scope: prompt` the assistant header's last token, where the model has read the whole
request and decides how to answer (Arditi et al. 2024 find harmful and harmless requests separable there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from monitor.offline import require
from monitor.offline.rows import ConversationRows
from monitor.offline.thresholds import fpr_upper_bound, threshold_at_fpr
from monitor.provenance import Calibration, TrainingData
from monitor.scoring.probe import LinearProbe, ProbeMetadata
from monitor.scoring.space import sigmoid

Scope = Literal["prompt", "generation", "both"]


def token_slice(conv: ConversationRows, scope: Scope) -> slice:
    """Which rows a detector with this scope sees (never row 0, see module doc)."""
    n = len(conv.token_ids)
    if scope == "prompt":
        return slice(1, max(conv.n_prompt, 2))
    if scope == "generation":
        return slice(max(conv.n_prompt, 1), n)
    return slice(1, n)


def scope_rows(conv: ConversationRows, layer: int | Sequence[int], scope: Scope) -> torch.Tensor:
    """The rows a detector with this scope sees; the last row when the scope is empty. Several layers: each
    token's rows of those layers side by side, in order (what a probe over several layers reads)."""
    if not isinstance(layer, int):
        return torch.cat([scope_rows(conv, la, scope) for la in layer], dim=-1)
    rows = conv.rows[layer][token_slice(conv, scope)]
    return rows if rows.shape[0] else conv.rows[layer][-1:]


def pooled(convs: list[ConversationRows], layer: int | Sequence[int], scope: Scope = "both",
           last: bool = False) -> torch.Tensor:
    """Each conversation's mean row over the scope; with `last`, its last row instead (for a detector that
    aggregates with `last`, the classifier it runs is then the one trained)."""
    if last:
        return torch.stack([scope_rows(c, layer, scope)[-1].float() for c in convs])
    return torch.stack([scope_rows(c, layer, scope).float().mean(0) for c in convs])


@dataclass
class FitResult:
    probe: LinearProbe
    train_auroc: float
    folds: list[tuple[np.ndarray, LinearProbe]]  # (held-out indices, the probe fit without them)


def aggregated_logits(probe: LinearProbe, convs: list[ConversationRows], scope: Scope, aggregation) -> np.ndarray:
    """The per-token logits of a detector's scope aggregated by the sidecar's own aggregator (its score is
    the sigmoid of this, for a probe-only detector)."""
    from monitor.detectors.aggregate import Ragged, make_aggregator

    out = np.empty(len(convs))
    for i, c in enumerate(convs):
        logits = probe.logits(scope_rows(c, probe.meta.read_layers, scope)).numpy()[:, :1].astype(np.float64)
        agg = make_aggregator(aggregation, capacity=1)
        agg.update(Ragged.of(np.array([0]), np.array([0]), np.array([len(logits)])), logits[None])
        out[i] = float(agg.value(np.array([0]))[0, 0])
    return out


def aggregated_scores(probe: LinearProbe, convs: list[ConversationRows], scope: Scope, aggregation) -> np.ndarray:
    """What the sidecar reports for a probe-only detector with this aggregation."""
    return sigmoid(aggregated_logits(probe, convs, scope, aggregation))


def platt_scale(probe: LinearProbe, aggregated: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Rescale the probe in place so that sigmoid(aggregate) is a calibrated probability for its detector.

    A probe fit on mean rows gives per-token logits of a larger spread than the means it saw; a max of
    rolling means of them then lands far out on the sigmoid (scores like 0.99999), where thresholds are
    unreadable. A 1-D logistic fit of the labels on the aggregated logits (`aggregated`, scored out of
    fold) gives a > 0 and c with p = sigmoid(a * s + c); since rolling means and maxima commute with a
    positive affine map, folding a into the weights and a * b + c into the bias makes the detector's
    score that probability. The ranking, and so AUROC, is unchanged."""
    require("sklearn")
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1e6, max_iter=1000).fit(aggregated.reshape(-1, 1), y)
    a, c = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if a <= 0:
        return 1.0, 0.0  # no usable ranking to calibrate: leave the probe as fit
    probe.weight = probe.weight * a
    probe.bias = probe.bias * a + c
    return a, c


def fit_logistic_probe(
    x: torch.Tensor,
    y: np.ndarray,
    *,
    name: str,
    concept: str,
    model: str,
    layer: int | Sequence[int],
    training: TrainingData,
    c: float | None = None,
    groups: np.ndarray | None = None,
) -> FitResult:
    """Standardise, then L2 logistic regression (C chosen by 5-fold CV on AUROC when not given).

    Also returns the fold probes, so that each record can be scored by a probe fit without its fold. With
    `groups` (e.g. the template source of each record) whole groups are held out together, so the
    scores, and a threshold calibrated on them, reflect phrasings the probe has not seen. Scores of
    the records a probe was fit on are overconfident: a threshold set on them fires too often.
    """
    import warnings

    require("sklearn")
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    # scikit-learn 1.8 announces changes to LogisticRegressionCV's defaults and attributes; we pass
    # and read nothing they affect (L2 penalty, C_), and the warnings would bury the command's output.
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn.linear_model")
    xn = x.double().numpy()
    mean = xn.mean(0)
    std = xn.std(0) + 1e-6
    z = (xn - mean) / std
    # Stratified as well as grouped: a fold without positives has no AUROC, and would decide C by default.
    splitter = StratifiedGroupKFold(5, shuffle=True, random_state=0) if groups is not None \
        else StratifiedKFold(5, shuffle=True, random_state=0)
    folds = list(splitter.split(z, y, groups))
    if c is None:
        # C by cross-validation over the same grouped folds: folds that share a template family with
        # the training rows reward memorising it, and pick a C that transfers worse.
        cv = LogisticRegressionCV(Cs=np.logspace(-4, 1, 8).tolist(), cv=folds, scoring="roc_auc", max_iter=5000)
        cv.fit(z, y)
        c = float(cv.C_[0])
    meta = ProbeMetadata(
        name=name, concept=concept, model=model, d_in=x.shape[1], standardize=True,
        layer=layer if isinstance(layer, int) else layer[0],
        layers=None if isinstance(layer, int) or len(layer) == 1 else list(layer),
        aggregation="mean", training=training, metrics={"C": c},
    )

    def f32(a) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32)

    def probe_of(rows: np.ndarray) -> LinearProbe:
        clf = LogisticRegression(C=c, max_iter=5000).fit(z[rows], y[rows])
        return LinearProbe(f32(clf.coef_), f32(clf.intercept_), meta, f32(mean), f32(std))

    probe = probe_of(np.arange(len(y)))
    train_auroc = float(roc_auc_score(y, probe.logits(torch.tensor(xn)).numpy()[:, 0]))
    return FitResult(probe, train_auroc, [(held, probe_of(kept)) for kept, held in folds])


def calibrate_probe(probe: LinearProbe, negative_scores: np.ndarray, target_fpr: float, data: str, date: str) -> None:
    thr, achieved = threshold_at_fpr(negative_scores, target_fpr)
    fp = int((np.asarray(negative_scores) >= thr).sum())
    probe.meta.calibration = Calibration(
        threshold=thr, target_fpr=target_fpr, achieved_fpr=achieved, n_benign=len(negative_scores),
        fpr_upper_95=fpr_upper_bound(fp, len(negative_scores)), data=data, date=date,
    )

