"""Which layer, or which layers together, carry each concept best? (docs/detectors.md, "Probe options")

    python scripts/probe_layers.py harmful_request prompt_injection

For each layer in LAYERS, and for rows of layers 10, 15 and 20 side by side (a multi-layer probe): a
logistic-regression probe on the prompt's mean row, fit on the concept's train split (with 300 benign
chats), its per-token logits aggregated as the shipped detectors do (max of rolling means over 16
tokens), AUROC on the test split. Rows at these layers are extracted once and cached (several minutes
per concept on two cores).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from probe_options import aggregate  # noqa: E402

from monitor.offline.evaluate import auroc  # noqa: E402
from monitor.offline.records import read_labeled  # noqa: E402
from monitor.offline.rows_transformers import TransformersRows  # noqa: E402
from monitor.paths import cache_dir  # noqa: E402

LAYERS = [6, 10, 15, 20, 24]
CONCAT = (10, 15, 20)


def main(concepts: list[str]) -> None:
    from sklearn.linear_model import LogisticRegression

    warnings.filterwarnings("ignore", category=FutureWarning)
    rows = TransformersRows(cache_dir() / "models" / "SmolLM2-135M-Instruct", LAYERS)
    for concept in concepts:
        train = read_labeled(ROOT / f"data/concepts/{concept}/train.jsonl") \
            + read_labeled(ROOT / "data/benign/train.jsonl")[:300]
        test = read_labeled(ROOT / f"data/concepts/{concept}/test.jsonl")
        y = np.array([r.labels.get(concept, 0) for r in train])
        yt = np.array([r.labels[concept] for r in test])
        tr = rows.many([r.messages for r in train], progress=f"{concept} train")
        te = rows.many([r.messages for r in test], progress=f"{concept} test")
        for name in [*LAYERS, "concat"]:
            def get(c, name=name):
                return torch.cat([c.rows[la] for la in CONCAT], -1) if name == "concat" else c.rows[name]

            x = torch.stack([get(c)[1:max(c.n_prompt, 2)].float().mean(0) for c in tr]).double().numpy()
            mu, sd = x.mean(0), x.std(0) + 1e-6
            for c_reg in (0.01, 0.1):
                clf = LogisticRegression(C=c_reg, max_iter=3000).fit((x - mu) / sd, y)
                w, b = clf.coef_[0], clf.intercept_[0]
                st = np.array([aggregate("rolling16", ((get(c)[1:max(c.n_prompt, 2)].double().numpy() - mu) / sd) @ w + b)
                               for c in te])
                print(f"{concept} layer {name} C={c_reg}: test AUROC {auroc(st[yt == 1], st[yt == 0]):.4f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["harmful_request", "prompt_injection"])
