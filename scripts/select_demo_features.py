"""Pick the demo's SAE-feature detectors: per concept, the single feature of the demo SAE that best
separates the train split, shipped only where it also holds up on the held-out test split.

    python scripts/select_demo_features.py --model DIR

The probe detectors are made by the product's own command (scripts/train_demo_detectors.sh runs
`monitor probe train` and `monitor eval`); this script only chooses features and writes
detectors/<concept>_sae_feature.yaml, with figures in artifacts/demo/probes/features.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitor.offline.records import read_labeled  # noqa: E402
from monitor.offline.rows_transformers import TransformersRows  # noqa: E402
from monitor.offline.probes import token_slice  # noqa: E402
from monitor.offline.thresholds import threshold_at_fpr  # noqa: E402
from monitor.scoring import WatchedEncoder  # noqa: E402


def messages_and_labels(path):
    return [(r.messages, r.labels) for r in read_labeled(path, require_labels=False)]

LAYER = 15
CONCEPTS = {
    "pii": ("critical", "Personal data or secrets (emails, phone numbers, card numbers, API keys) in the prompt."),
    "prompt_injection": ("critical", "An attempt to override the model's instructions or jailbreak it."),
    "harmful_request": ("warning", "A request for clearly dangerous help."),
}
TARGET_FPR = 0.01
FEATURE_MIN_TEST_AUROC = 0.9


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def tpr_at(y: np.ndarray, s: np.ndarray, thr: float) -> tuple[float, float]:
    pos, neg = s[y == 1], s[y == 0]
    return float((pos >= thr).mean()), float((neg >= thr).mean())


def feature_max(enc: WatchedEncoder, convs, scope="prompt") -> np.ndarray:
    out = []
    for c in convs:
        rows = c.rows[LAYER][token_slice(c, scope)]
        out.append(enc.encode(rows).max(0).values.numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sae", default=str(ROOT / "artifacts/demo/sae-l15"))
    args = ap.parse_args()
    from sae_lens import SAE

    today = date.today().isoformat()
    ex = TransformersRows(args.model, [LAYER], dtype=torch.bfloat16)  # as the committed feature detector was chosen
    sae = SAE.load_from_disk(args.sae)
    all_feats = WatchedEncoder.from_sae(sae, list(range(sae.cfg.d_sae)))
    labels = json.loads((Path(args.sae) / "feature_labels.json").read_text())["features"]
    benign_train = messages_and_labels(ROOT / "data/benign/train.jsonl")
    benign_test = messages_and_labels(ROOT / "data/benign/test.jsonl")
    summary: dict = {"layer": LAYER, "target_fpr": TARGET_FPR, "concepts": {}}
    (ROOT / "detectors").mkdir(exist_ok=True)

    for concept, (severity, description) in CONCEPTS.items():
        train_file = ROOT / f"data/concepts/{concept}/train.jsonl"
        test_file = ROOT / f"data/concepts/{concept}/test.jsonl"
        train = messages_and_labels(train_file) + benign_train
        test = messages_and_labels(test_file) + benign_test
        y_tr = np.array([lab.get(concept, 0) for _, lab in train])
        y_te = np.array([lab.get(concept, 0) for _, lab in test])
        c_tr = ex.many([m for m, _ in train], progress=f"{concept} train")
        c_te = ex.many([m for m, _ in test], progress=f"{concept} test")

        # The best single SAE feature, chosen on train, judged on test.
        f_tr, f_te = feature_max(all_feats, c_tr), feature_max(all_feats, c_te)
        from sklearn.metrics import roc_auc_score

        scores = [roc_auc_score(y_tr, f_tr[:, j]) if f_tr[:, j].max() > 0 else 0.5 for j in range(f_tr.shape[1])]
        best = int(np.argmax(scores))
        f_thr, f_fpr_tr = threshold_at_fpr(f_tr[y_tr == 0, best], TARGET_FPR)
        f_test_auroc = auroc(y_te, f_te[:, best])
        f_tpr, f_fpr = tpr_at(y_te, f_te[:, best], f_thr)
        feat_info = {
            "feature": best, "train_auroc": round(scores[best], 4), "test_auroc": round(f_test_auroc, 4),
            "threshold": f_thr, "test_tpr_at_threshold": round(f_tpr, 4), "test_fpr_at_threshold": round(f_fpr, 4),
            "top_contexts": labels[str(best)]["top_contexts"][:3], "shipped": f_test_auroc >= FEATURE_MIN_TEST_AUROC,
        }
        if feat_info["shipped"]:
            det = {
                "name": f"{concept.replace('_', '-')}-sae-feature", "concept": concept,
                "description": f"{description} SAE feature {best} of demo-l15 (max over the prompt).",
                "inputs": [{"sae": "demo-l15", "feature": best}], "aggregation": {"kind": "max"},
                "threshold": f_thr, "scope": "prompt", "severity": "info", "labels": {"source": "sae_feature"},
                "calibration": {"threshold": f_thr, "target_fpr": TARGET_FPR, "achieved_fpr": f_fpr_tr,
                                "n_benign": int((y_tr == 0).sum()),
                                "data": f"{train_file.relative_to(ROOT)} negatives + data/benign/train.jsonl",
                                "date": today},
            }
            (ROOT / f"detectors/{concept}_sae_feature.yaml").write_text(
                f"# {det['description']}\n# Chosen by scripts/select_demo_features.py; figures in docs/detectors.md.\n"
                + yaml.safe_dump(det, sort_keys=False))
        else:
            (ROOT / f"detectors/{concept}_sae_feature.yaml").unlink(missing_ok=True)
        summary["concepts"][concept] = {
            "train": {"file": str(train_file.relative_to(ROOT)), "n_pos": int(y_tr.sum()), "n_neg": int((1 - y_tr).sum())},
            "test": {"file": str(test_file.relative_to(ROOT)), "n_pos": int(y_te.sum()), "n_neg": int((1 - y_te).sum())},
            "sae_feature": feat_info,
        }
        print(json.dumps({concept: summary["concepts"][concept]}, indent=1, default=str), flush=True)
    (ROOT / "artifacts/demo/probes/features.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
