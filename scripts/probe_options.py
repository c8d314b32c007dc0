"""Which probe options win? Trained on each concept's train split, chosen on held-out train families,
reported on the test split (the figures in docs/detectors.md, "Probe options").

    python scripts/probe_options.py [--out artifacts/demo/probes/options.json]

Options, each scored as the sidecar's aggregations would (per-token logits of the linear probe that
`monitor probe train` fits on the mean of the prompt's rows, C chosen by family-grouped CV,
aggregated over the prompt, sigmoid last):
- aggregation: mean (the trained classifier exactly), max, EMA-max, max of rolling means (windows
  8, 16, 32), and softmax-weighted mean (attention-like pooling at temperature 1: tokens that look
  like the concept weigh more; not a sidecar aggregation, measured to see whether it would be worth one).
Threshold: at 1% FPR on the calibration set (data/benign/calibration.jsonl), as shipped. Figures on
the test split: AUROC overall and per family (single requests, conversations with earlier turns),
recall and FPR at that threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monitor.offline.evaluate import auroc, tpr_at_fpr  # noqa: E402
from monitor.offline.extract import row_source  # noqa: E402
from monitor.offline.probes import fit_logistic_probe  # noqa: E402
from monitor.offline.records import read_labeled  # noqa: E402
from monitor.offline.thresholds import threshold_at_fpr  # noqa: E402
from monitor.paths import cache_dir  # noqa: E402
from monitor.provenance import TrainingData  # noqa: E402

LAYER = 15
CONCEPTS = ("pii", "prompt_injection", "harmful_request")


def aggregate(kind: str, logits: np.ndarray) -> float:
    if kind == "mean":
        return float(logits.mean())
    if kind == "max":
        return float(logits.max())
    if kind == "ema_max":
        e, best = logits[0], logits[0]
        for v in logits[1:]:
            e = 0.3 * v + 0.7 * e
            best = max(best, e)
        return float(best)
    if kind.startswith("rolling"):
        w = int(kind.removeprefix("rolling"))
        if len(logits) < w:
            return float(logits.mean())
        c = np.concatenate([[0.0], np.cumsum(logits)])
        return float(((c[w:] - c[:-w]) / w).max())
    if kind == "softmax":
        weights = np.exp(logits - logits.max())
        return float((weights * logits).sum() / weights.sum())
    raise ValueError(kind)


AGGREGATIONS = ("mean", "max", "ema_max", "rolling8", "rolling16", "rolling32", "softmax")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts/demo/probes/options.json")
    args = ap.parse_args()
    model = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    rows = row_source(model, [LAYER])
    calib = read_labeled(ROOT / "data/benign/calibration.jsonl")
    calib_convs = rows.many([r.messages for r in calib], progress="calibration set")
    results = {}
    for concept in CONCEPTS:
        train = read_labeled(ROOT / f"data/concepts/{concept}/train.jsonl") \
            + read_labeled(ROOT / "data/benign/train.jsonl")
        test = read_labeled(ROOT / f"data/concepts/{concept}/test.jsonl")
        y = np.array([r.labels.get(concept, 0) for r in train])
        yt = np.array([r.labels[concept] for r in test])
        tr = rows.many([r.messages for r in train], progress=f"{concept} train")
        te = rows.many([r.messages for r in test], progress=f"{concept} test")
        groups = np.array([r.source.split("#")[0] if r.source else str(i) for i, r in enumerate(train)])
        x = torch.stack([c.rows[LAYER][1:max(c.n_prompt, 2)].float().mean(0) for c in tr])
        fit = fit_logistic_probe(x, y, name=concept, concept=concept, model="SmolLM2-135M-Instruct", layer=LAYER,
                                 training=TrainingData(path="-", n_pos=int(y.sum()), n_neg=int((1 - y).sum())),
                                 groups=groups)
        probe = fit.probe

        def token_logits(c):
            return probe.logits(c.rows[LAYER][1:max(c.n_prompt, 2)]).numpy()[:, 0].astype(np.float64)

        lt = [token_logits(c) for c in te]
        lc = [token_logits(c) for c in calib_convs]
        multi = np.array([sum(m["role"] == "user" for m in r.messages) > 1 for r in test])
        for agg in AGGREGATIONS:
            st = np.array([aggregate(agg, v) for v in lt])
            sc = np.array([aggregate(agg, v) for v in lc])
            thr, _ = threshold_at_fpr(sc, 0.01)
            pos, neg = st[yt == 1], st[yt == 0]
            fam = {name: round(auroc(st[(yt == 1) & (multi == m)], st[(yt == 0) & (multi == m)]), 4)
                   for name, m in (("single-turn", False), ("multi-turn", True))}
            key = f"{concept}/{agg}"
            results[key] = {"C": fit.probe.meta.metrics["C"], "test_auroc": round(auroc(pos, neg), 4),
                            "family_auroc": fam,
                            "test_tpr_at_1pct_fpr": round(tpr_at_fpr(pos, neg, 0.01), 3),
                            "recall_at_calibrated": round(float((pos >= thr).mean()), 3),
                            "fpr_at_calibrated": round(float((neg >= thr).mean()), 3)}
            print(key, results[key], flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
