"""`monitor eval`: detectors measured on labeled conversations, scored exactly as the sidecar would.

Input: labelled conversations (`monitor.offline.records`). Every detector whose concept a record labels is judged on it through the sidecar's own
scorer and `feed` (same scope, same aggregation, row 0 skipped), on the tapped layer's rows from
transformers in float32 (the rows vLLM's tap produces, to cos >= 0.999; `rows_transformers`), or
with `--backend vllm` from vLLM offline, the tap itself (`rows_vllm`).
A detector "fires" when its score >= its threshold, as in production; a conversation in which no
token is in the detector's scope gets no score and never fires.

Metrics: AUROC (Mann-Whitney, ties counted half), TPR at 1% and 5% FPR (the threshold that keeps
the FPR on these negatives at most the target, as `monitor calibrate` picks it), and at the
detector's own threshold: precision, recall and the FPR achieved on the negatives. A detector with
a record tier gets recall and FPR at each tier (`tiers`), overall and by family.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from monitor.detectors.runtime import build_detector_set
from monitor.offline import OfflineError, require
from monitor.offline.extract import row_source
from monitor.offline.judge import judge
from monitor.offline.records import Record
from monitor.offline.thresholds import threshold_at_fpr

def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (= the ROC curve's area).

    Rank-based rather than scikit-learn's roc_auc_score, which rejects the -inf that stands for
    "no token in scope" (ranked below every scored record); the tests check it against sklearn.
    """
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    allv = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = avg_rank[inverse]
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, target: float) -> float:
    thr, _ = threshold_at_fpr(neg, target)
    return float((np.asarray(pos) >= thr).mean())


@dataclass
class TierFigures:
    """At one threshold tier of a detector: `page` (its threshold) or `record` (its record_threshold)."""

    tier: str
    threshold: float
    recall: float | None  # None when there is no positive
    fpr: float | None  # None when there is no negative


def tier_figures(tiers: dict[str, float], pos: np.ndarray, neg: np.ndarray) -> list[TierFigures]:
    return [TierFigures(t, thr, float((pos >= thr).mean()) if len(pos) else None,
                        float((neg >= thr).mean()) if len(neg) else None) for t, thr in tiers.items()]


@dataclass
class FamilyFigures:
    """One family of conversations (a data file, or a record's `family`): how the detector does on it."""

    family: str
    auroc: float | None  # None when the family lacks a class
    recall: float | None
    fpr_at_threshold: float | None
    n_pos: int
    n_neg: int
    tiers: list[TierFigures] = field(default_factory=list)  # with a record tier: figures at each tier


@dataclass
class SourceFalsePositives:
    """Negatives of one source family (look-alike ISBNs, talk about the concept, ...) at the shipped threshold."""

    source: str
    fired: int
    n: int

    @property
    def fpr(self) -> float:
        return self.fired / self.n


@dataclass
class DetectorReport:
    detector: str
    concept: str
    auroc: float
    tpr_at_1pct_fpr: float
    tpr_at_5pct_fpr: float
    precision: float | None  # None when nothing fired
    recall: float
    fpr_at_threshold: float
    threshold: float
    n_pos: int
    n_neg: int
    pos_scores: list[float] = field(default_factory=list, repr=False)
    neg_scores: list[float] = field(default_factory=list, repr=False)
    families: list[FamilyFigures] = field(default_factory=list)
    tiers: list[TierFigures] = field(default_factory=list)  # with a record tier: figures at each (record, page)
    negative_sources: list[SourceFalsePositives] = field(default_factory=list)  # highest FPR first

    @property
    def worst_family(self) -> FamilyFigures | None:
        """The family where it breaks first: lowest AUROC, then highest FPR, then lowest recall."""
        ranked = [f for f in self.families if f.auroc is not None]
        if len(self.families) < 2 or not ranked:
            return None
        return min(ranked, key=lambda f: (f.auroc, -(f.fpr_at_threshold or 0.0), f.recall or 0.0))

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("detector", "pos_scores", "neg_scores"):
            d.pop(k)
        d["worst_family"] = None if self.worst_family is None else self.worst_family.family
        d["negative_sources"] = [{"source": s.source, "fired": s.fired, "n": s.n, "fpr": round(s.fpr, 4)}
                                 for s in self.negative_sources]
        return d


def report(name: str, concept: str, threshold: float, pos: np.ndarray, neg: np.ndarray,
           record_threshold: float | None = None) -> DetectorReport:
    if len(pos) == 0 or len(neg) == 0:
        raise OfflineError(f"detector {name}: concept {concept!r} has {len(pos)} positive and {len(neg)} negative "
                           "records; both classes are needed")
    # No token in scope: no score, never fires; ranked below every scored record.
    pos = np.where(np.isnan(pos), -np.inf, pos)
    neg = np.where(np.isnan(neg), -np.inf, neg)
    tp, fp = int((pos >= threshold).sum()), int((neg >= threshold).sum())
    return DetectorReport(
        detector=name, concept=concept, auroc=auroc(pos, neg), tpr_at_1pct_fpr=tpr_at_fpr(pos, neg, 0.01),
        tpr_at_5pct_fpr=tpr_at_fpr(pos, neg, 0.05), precision=tp / (tp + fp) if tp + fp else None,
        recall=tp / len(pos), fpr_at_threshold=fp / len(neg), threshold=float(threshold), n_pos=len(pos),
        n_neg=len(neg), pos_scores=[float(x) for x in pos], neg_scores=[float(x) for x in neg],
        tiers=tier_figures(_tiers(threshold, record_threshold), pos, neg))


def _tiers(threshold: float, record_threshold: float | None) -> dict[str, float]:
    return {} if record_threshold is None else {"record": record_threshold, "page": threshold}


def score_records(loaded, records: list[Record], model_dir: Path, backend: str = "transformers") -> dict[str, tuple[list, list]]:
    """detector -> (positives, negatives) on the records that label its concept: (score, record) pairs."""
    concepts = {d.spec.concept for d in loaded.detectors}
    for r in records:
        unknown = set(r.labels) - concepts
        if unknown:
            raise OfflineError(f"line {r.line}: label(s) {sorted(unknown)} match no detector's concept "
                               f"(the detectors watch {sorted(concepts)})")
    detset = build_detector_set(loaded, "cpu")
    convs = row_source(model_dir, detset.layers, backend).many([r.messages for r in records], progress="activations")
    out: dict[str, tuple[list, list]] = {d.spec.name: ([], []) for d in loaded.detectors}
    for rec, conv in zip(records, convs):
        verdicts = judge(detset, conv)
        for d in loaded.detectors:
            label = rec.labels.get(d.spec.concept)
            if label is not None:
                out[d.spec.name][0 if label else 1].append((verdicts[d.spec.name].score, rec))
    return out


def _scores(pairs: list[tuple[float, Record]]) -> np.ndarray:
    return np.array([-np.inf if np.isnan(s) else s for s, _ in pairs], np.float64)


def breakdown(rep: DetectorReport, pos: list[tuple[float, Record]], neg: list[tuple[float, Record]]) -> None:
    """Fill in the per-family figures and the false positives by source family."""
    thr = rep.threshold
    tiers = {t.tier: t.threshold for t in rep.tiers}
    for fam in sorted({r.family or "" for _, r in pos + neg}):
        p = _scores([x for x in pos if (x[1].family or "") == fam])
        n = _scores([x for x in neg if (x[1].family or "") == fam])
        rep.families.append(FamilyFigures(
            fam, auroc(p, n) if len(p) and len(n) else None, float((p >= thr).mean()) if len(p) else None,
            float((n >= thr).mean()) if len(n) else None, len(p), len(n), tier_figures(tiers, p, n)))
    by_source: dict[str, list[int]] = {}
    for s, r in neg:
        counts = by_source.setdefault(r.source_family, [0, 0])
        counts[0] += int(not np.isnan(s) and s >= thr)
        counts[1] += 1
    rep.negative_sources = sorted((SourceFalsePositives(k, f, n) for k, (f, n) in by_source.items()),
                                  key=lambda x: (-x.fpr, -x.n, x.source))


def evaluate(loaded, records: list[Record], model_dir: Path, backend: str = "transformers") -> list[DetectorReport]:
    scored = score_records(loaded, records, model_dir, backend)
    out = []
    for d in loaded.detectors:
        pos, neg = scored[d.spec.name]
        if not pos and not neg:
            continue
        rep = report(d.spec.name, d.spec.concept, d.spec.threshold, _scores(pos), _scores(neg), d.spec.record_threshold)
        breakdown(rep, pos, neg)
        out.append(rep)
    return out


def table(reports: list[DetectorReport]) -> str:
    head = f"{'detector':<26} {'concept':<18} {'AUROC':>6} {'TPR@1%':>7} {'TPR@5%':>7} {'thresh':>8} " \
           f"{'prec':>5} {'recall':>6} {'FPR@thr':>7} {'pos':>5} {'neg':>5}"
    rows = [head, "-" * len(head)]
    for r in reports:
        prec = "-" if r.precision is None else f"{r.precision:.2f}"
        rows.append(f"{r.detector:<26} {r.concept:<18} {r.auroc:>6.3f} {r.tpr_at_1pct_fpr:>7.2f} {r.tpr_at_5pct_fpr:>7.2f} "
                    f"{r.threshold:>8.3g} {prec:>5} {r.recall:>6.2f} {r.fpr_at_threshold:>7.3f} {r.n_pos:>5} {r.n_neg:>5}")
        for t in r.tiers:
            if t.tier == "record":  # the page tier is the row above
                rows.append(f"{'  record tier':<26} {'':<18} {'':>6} {'':>7} {'':>7} {t.threshold:>8.3g} {'':>5} "
                            f"{t.recall:>6.2f} {t.fpr:>7.3f}")
    return "\n".join(rows)


def shift_table(reports: list[DetectorReport], top: int = 5) -> str:
    """Distribution shift: each detector per family (the worst one named), and the negatives' source
    families that fire most at the shipped threshold."""
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    rows = []
    for r in reports:
        worst = r.worst_family
        rows.append(f"\n{r.detector} by family" + (f" (worst: {worst.family})" if worst else "") + ":")
        record = bool(r.tiers)
        rows.append(f"  {'family':<30} {'AUROC':>6} {'recall':>6} {'FPR@thr':>7} {'pos':>5} {'neg':>5}"
                    + (f" {'recall@record':>13} {'FPR@record':>10}" if record else ""))
        for f in r.families:
            rec = next((t for t in f.tiers if t.tier == "record"), None)
            rows.append(f"  {f.family:<30} {num(f.auroc, '6.3f'):>6} {num(f.recall, '6.2f'):>6} "
                        f"{num(f.fpr_at_threshold, '7.3f'):>7} {f.n_pos:>5} {f.n_neg:>5}"
                        + (f" {num(rec.recall, '13.2f'):>13} {num(rec.fpr, '10.3f'):>10}" if rec else ""))
        firing = [s for s in r.negative_sources if s.fired]
        if firing:
            shown = ", ".join(f"{s.source} {s.fired}/{s.n}" for s in firing[:top])
            more = f" (+{len(firing) - top} more)" if len(firing) > top else ""
            rows.append(f"  negatives firing at the threshold, by source: {shown}{more}")
        else:
            rows.append(f"  no negative fires at the threshold ({len(r.negative_sources)} source families)")
    return "\n".join(rows)


def plots(reports: list[DetectorReport], folder: Path) -> list[Path]:
    """Per detector: ROC curve, and score histograms of positives vs negatives with the threshold (and the record
    tier's, when the detector has one)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for r in reports:
        pos, neg = np.array(r.pos_scores), np.array(r.neg_scores)
        fig, (roc, hist) = plt.subplots(1, 2, figsize=(11, 4.2))
        finite = np.concatenate([pos, neg])
        finite = finite[np.isfinite(finite)]
        thresholds = np.unique(np.concatenate([finite, [np.inf]]))[::-1]
        tpr = [(pos >= t).mean() for t in thresholds] + [1.0]
        fpr = [(neg >= t).mean() for t in thresholds] + [1.0]
        roc.plot(fpr, tpr, drawstyle="steps-post", label=f"AUROC {r.auroc:.3f}")
        roc.plot([0, 1], [0, 1], ls=":", c="grey")
        roc.scatter([r.fpr_at_threshold], [r.recall], c="red", zorder=3, label=f"threshold {r.threshold:.3g}")
        record = next((t for t in r.tiers if t.tier == "record"), None)
        if record is not None:
            roc.scatter([record.fpr], [record.recall], c="orange", zorder=3, marker="s",
                        label=f"record tier {record.threshold:.3g}")
        roc.axvline(0.01, ls="--", c="grey", lw=0.8)
        roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"{r.detector}: ROC", xscale="symlog",
                xlim=(0, 1))
        roc.set_xscale("symlog", linthresh=0.01)
        roc.legend(loc="lower right")
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 1.0
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        hist.hist(neg[np.isfinite(neg)], bins=bins, alpha=0.6, label=f"negatives ({r.n_neg})", density=True)
        hist.hist(pos[np.isfinite(pos)], bins=bins, alpha=0.6, label=f"positives ({r.n_pos})", density=True)
        hist.axvline(r.threshold, c="red", label="threshold")
        if record is not None:
            hist.axvline(record.threshold, c="orange", ls="--", label="record tier")
        hist.set(xlabel="detector score", ylabel="density", title=f"{r.detector}: scores ({r.concept})")
        hist.legend()
        fig.tight_layout()
        path = folder / f"{r.detector}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

