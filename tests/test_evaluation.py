"""`monitor eval`: metrics agree with scikit-learn, bad input is named, and a run on committed data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from monitor.offline import OfflineError
from monitor.offline.evaluate import auroc, report, tpr_at_fpr
from monitor.offline.records import read_labeled

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_tpr_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounded: many ties, across classes too
    neg = np.round(rng.normal(0.0, 1.0, 700), 1)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    assert auroc(pos, neg) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, thr = roc_curve(y, s)
    for target in (0.01, 0.05, 0.2):
        # The best TPR among operating points whose FPR stays within the target.
        assert tpr_at_fpr(pos, neg, target) == pytest.approx(tpr[fpr <= target + 1e-12].max())


def test_report_at_the_detectors_threshold():
    r = report("d", "c", 0.5, np.array([0.9, 0.6, 0.4, np.nan]), np.array([0.1, 0.55, 0.2, 0.3, 0.0]))
    assert (r.n_pos, r.n_neg) == (4, 5)
    assert r.recall == 0.5 and r.precision == pytest.approx(2 / 3) and r.fpr_at_threshold == pytest.approx(0.2)
    with pytest.raises(OfflineError, match="detector d: concept 'c' has 2 positive and 0 negative"):
        report("d", "c", 0.5, np.array([0.9, 0.6]), np.array([]))


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}], "labels": {"pii": 1}}\n{oops', r":2: not valid JSON"),
    ('{"labels": {"pii": 1}}', r":1: needs `messages` \(a chat\) or `text`"),
    ('{"text": "hi"}', r":1: needs `labels`"),
    ('{"text": "hi", "labels": {"pii": 2}}', r":1: labels.pii must be 0 or 1, got 2"),
    ('{"messages": [{"role": "user"}], "labels": {"pii": 0}}', r":1: `messages` must be a non-empty list"),
    ('', r"no records"),
])
def test_bad_lines_are_named(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text(line)
    with pytest.raises(OfflineError, match=message):
        read_labeled(f)


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", "eval", *args], capture_output=True, text=True,
                          timeout=600)


def test_unknown_concept_is_an_error(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "hi", "labels": {"pii": 0}}\n{"text": "yo", "labels": {"toxicity": 1}}\n')
    res = eval_cli("--detectors", str(ROOT / "detectors"), "--data", str(f), "--json")
    assert res.returncode == 2 and "line 2: label(s) ['toxicity'] match no detector's concept" in res.stderr
    assert res.stdout == ""


def test_eval_on_committed_test_data(tmp_path):
    """A slice of the committed pii test split through the shipped packs: JSON on stdout, then plots."""
    lines = (ROOT / "data/concepts/pii/test.jsonl").read_text().splitlines()
    pos = [line for line in lines if json.loads(line)["labels"]["pii"] == 1][:15]
    neg = [line for line in lines if json.loads(line)["labels"]["pii"] == 0][:25]
    data = tmp_path / "slice.jsonl"
    data.write_text("\n".join(pos + neg) + "\n")
    res = eval_cli("--detectors", str(ROOT / "detectors"), "--data", str(data), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)  # nothing but the JSON object on stdout
    assert set(out) == {"pii-probe", "pii-sae-feature"}  # only detectors whose concept the data labels
    keys = {"concept", "auroc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "precision", "recall", "fpr_at_threshold",
            "threshold", "n_pos", "n_neg", "families", "tiers", "negative_sources", "worst_family"}
    for name, r in out.items():
        assert set(r) == keys and (r["n_pos"], r["n_neg"]) == (15, 25), name
    assert out["pii-probe"]["auroc"] > 0.9
    fams = out["pii-probe"]["families"]
    assert [f["family"] for f in fams] == ["slice"] and out["pii-probe"]["worst_family"] is None  # one file: no worst
    sources = out["pii-probe"]["negative_sources"]
    assert sum(s["n"] for s in sources) == 25 and [s["fpr"] for s in sources] == sorted((s["fpr"] for s in sources), reverse=True)
    report_dir = tmp_path / "report"
    res = eval_cli("--detectors", str(ROOT / "detectors/pii_probe.yaml"), "--data", str(data), "--report", str(report_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pii-probe" in res.stdout and (report_dir / "pii-probe.png").stat().st_size > 10_000


def test_families_and_the_worst_one_are_named(tmp_path):
    """Two files are two families; a family where the detector breaks is named, and its firing negatives listed."""
    from monitor.offline.evaluate import breakdown, report, shift_table
    from monitor.offline.records import Record

    def rec(family, source):
        return Record([{"role": "user", "content": "x"}], {"pii": 0}, 1, source, family)

    pos = [(0.9, rec("single-turn", "p")) for _ in range(10)] + [(0.8, rec("multi-turn", "p")) for _ in range(10)]
    neg = [(0.1, rec("single-turn", "chat#1")) for _ in range(10)] + \
          [(0.85, rec("multi-turn", "isbn#2")) for _ in range(4)] + [(0.2, rec("multi-turn", "chat#3")) for _ in range(6)]
    scores = lambda pairs: np.array([s for s, _ in pairs])  # noqa: E731
    r = report("pii-probe", "pii", 0.5, scores(pos), scores(neg))
    breakdown(r, pos, neg)
    by = {f.family: f for f in r.families}
    assert by["single-turn"].auroc == 1.0 and by["single-turn"].fpr_at_threshold == 0.0
    assert by["multi-turn"].auroc == 0.6 and by["multi-turn"].fpr_at_threshold == 0.4
    assert r.worst_family.family == "multi-turn"
    assert [(s.source, s.fired, s.n) for s in r.negative_sources] == [("isbn", 4, 4), ("chat", 0, 16)]
    text = shift_table([r])
    assert "(worst: multi-turn)" in text and "isbn 4/4" in text
