"""`monitor calibrate`: the FPR guarantee on synthetic scores, refusal of small sets, and a run on committed data."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import beta

from monitor.calibration import fpr_upper_bound, min_samples
from monitor.probe_training import threshold_at_fpr

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("k, n", [(0, 300), (3, 300), (10, 1000), (0, 50)])
def test_upper_bound_is_clopper_pearson(k, n):
    assert fpr_upper_bound(k, n) == pytest.approx(beta.ppf(0.95, k + 1, n - k), rel=1e-6)


@pytest.mark.parametrize("target", [0.01, 0.05])
def test_threshold_keeps_the_fpr_on_synthetic_distributions(target):
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        benign = rng.standard_t(3, size=600)  # heavy tails: the hard case for a tail threshold
        thr, achieved = threshold_at_fpr(benign, target)
        assert achieved <= target and (benign >= thr).mean() == achieved
        # On fresh draws from the same distribution the true FPR stays under the 95% bound ~95% of the time.
        true_fpr = (rng.standard_t(3, size=200_000) >= thr).mean()
        covered += true_fpr <= fpr_upper_bound(int((benign >= thr).sum()), len(benign))
    assert covered >= 180


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], capture_output=True, text=True, timeout=900)


def test_too_small_a_benign_set_is_refused(tmp_path):
    data = tmp_path / "benign.jsonl"
    data.write_text("\n".join(['{"text": "hello there"}'] * 40) + "\n")
    res = run("calibrate", "--detectors", str(ROOT / "detectors/pii_probe.yaml"), "--benign", str(data),
              "--target-fpr", "0.01", "--dry-run")
    assert res.returncode == 2
    assert f"40 benign conversations cannot show an FPR of 0.01" in res.stderr and f"at least {min_samples(0.01)}" in res.stderr


def test_calibrate_then_eval_on_committed_data(tmp_path):
    """The shipped pii probe re-calibrated on the committed benign split, then evaluated on its test split."""
    det = tmp_path / "pack"
    det.mkdir()
    shutil.copy(ROOT / "detectors/pii_probe.yaml", det)
    benign = ROOT / "data/benign/train.jsonl"
    n = sum(1 for line in benign.read_text().splitlines() if line.strip())
    res = run("calibrate", "--detectors", str(det), "--benign", str(benign), "--target-fpr", "0.02")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = yaml.safe_load((det / "pii_probe.yaml").read_text())
    cal = doc["calibration"]
    assert doc["threshold"] == cal["threshold"] and cal["n_benign"] == n and cal["target_fpr"] == 0.02
    assert cal["achieved_fpr"] <= 0.02 < cal["fpr_upper_95"] and len(cal["data_sha256"]) == 64
    assert (det / "pii_probe.yaml").read_text().startswith("#")  # the file's comment header is kept
    res = run("eval", "--detectors", str(det), "--data", str(ROOT / "data/concepts/pii/test.jsonl"), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    r = json.loads(res.stdout)["pii-probe"]
    assert r["threshold"] == cal["threshold"] and r["auroc"] > 0.95
