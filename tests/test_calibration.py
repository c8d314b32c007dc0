"""`monitor calibrate`: the FPR guarantee on synthetic scores, refusal of small sets, and a run on committed data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import beta

from monitor.offline.thresholds import fpr_upper_bound, min_samples
from monitor.offline.thresholds import threshold_at_fpr

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
    assert "40 benign conversations cannot show an FPR of 0.01" in res.stderr and f"at least {min_samples(0.01)}" in res.stderr


def test_probe_train_refuses_what_it_cannot_do(tmp_path):
    from monitor.offline import OfflineError
    from monitor.offline.records import Record
    from monitor.offline.train import train_probe

    def records(n_pos, n_neg, concept="pii"):
        return [Record([{"role": "user", "content": f"x{i}"}], {concept: int(i < n_pos)}, i + 1)
                for i in range(n_pos + n_neg)]

    kw = dict(name="p", detector_name="p-probe", layer=15, scope="prompt", validation=0.2, severity="warning",
              out_probe=tmp_path / "p", out_detector=tmp_path / "p.yaml", model_name="m")
    with pytest.raises(OfflineError, match=r"line\(s\) \[1, 2, 3, 4, 5\]... carry no label for 'pii'"):
        train_probe(records(20, 400, "other"), Path("d.jsonl"), "pii", tmp_path, target_fpr=0.01, **kw)
    with pytest.raises(OfflineError, match="3 positive and 400 negative records for 'pii'; a probe needs at least 10"):
        train_probe(records(3, 400), Path("d.jsonl"), "pii", tmp_path, target_fpr=0.01, **kw)
    with pytest.raises(OfflineError, match="100 negatives cannot calibrate a threshold at FPR 0.01; use at least 300"):
        train_probe(records(50, 100), Path("d.jsonl"), "pii", tmp_path, target_fpr=0.01, **kw)


def test_train_calibrate_eval_on_committed_data(tmp_path):
    """`monitor probe train` on a slice of the pii train split, `monitor calibrate` on a slice of the benign
    calibration set (with its drift baseline), `monitor eval` on a slice of test. Slices keep CI's cold
    activation cache to a minute."""
    import json

    def head(src: Path, n: int, dest: Path) -> Path:
        dest.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
        return dest

    data = head(ROOT / "data/concepts/pii/train.jsonl", 360, tmp_path / "train.jsonl")
    probe_dir, det_file = tmp_path / "probes/pii_t", tmp_path / "pack/pii_t_probe.yaml"
    res = run("probe", "train", "--data", str(data), "--concept", "pii", "--name", "pii_t", "--target-fpr", "0.05",
              "--aggregation", "rolling_mean_max", "--window", "16",
              "--probe-dir", str(probe_dir), "--detector-file", str(det_file))
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((probe_dir / "probe.json").read_text())
    assert meta["layer"] == 15 and meta["aggregation"] == "rolling_mean_max" and meta["metrics"]["validation_auroc"] > 0.9
    assert meta["training"]["sha256"] and meta["calibration"]["target_fpr"] == 0.05
    assert yaml.safe_load(det_file.read_text())["aggregation"] == {"kind": "rolling_mean_max", "window": 16}
    # A monitor config that knows the new probe, for the detector that uses it.
    cfg = tmp_path / "monitor.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "smollm2-135m-instruct", "num_layers": 30, "d_model": 576},
                                   "taps": [{"layer": 15}], "probes": [{"name": "pii_t", "path": str(probe_dir)}],
                                   "detectors": [str(det_file.parent)]}))
    benign = head(ROOT / "data/benign/calibration.jsonl", 300, tmp_path / "benign.jsonl")
    res = run("calibrate", "--config", str(cfg), "--detectors", str(det_file.parent), "--benign", str(benign),
              "--target-fpr", "0.02", "--record-fpr", "0.01")
    assert res.returncode == 2 and "--record-fpr 0.01 must lie between --target-fpr 0.02 and 1" in res.stderr
    res = run("calibrate", "--config", str(cfg), "--detectors", str(det_file.parent), "--benign", str(benign),
              "--target-fpr", "0.02", "--record-fpr", "0.1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "record tier" in res.stdout
    doc = yaml.safe_load(det_file.read_text())
    cal = doc["calibration"]
    assert doc["threshold"] == cal["threshold"] and cal["n_benign"] == 300 and cal["target_fpr"] == 0.02
    assert cal["achieved_fpr"] <= 0.02 < cal["fpr_upper_95"] and len(cal["data_sha256"]) == 64
    base = cal["baseline"]  # for the sidecar's drift figures: score bins and the input's firing rate
    assert base["n_requests"] == 300 and abs(sum(base["score_fractions"]) - 1) < 1e-9
    assert len(base["score_fractions"]) == len(base["score_edges"]) + 1 and 0 <= base["input_rates"]["pii_t/score"] < 0.5
    assert det_file.read_text().startswith("#")  # the file's comment header is kept
    # The record tier, from the same 300 conversations, with its own provenance.
    rec = doc["record_calibration"]
    assert doc["record_threshold"] == rec["threshold"] < doc["threshold"] and rec["target_fpr"] == 0.1
    assert cal["achieved_fpr"] <= rec["achieved_fpr"] <= 0.1 and rec["n_benign"] == 300
    assert rec["data_sha256"] == cal["data_sha256"]
    test = head(ROOT / "data/concepts/pii/test.jsonl", 150, tmp_path / "test.jsonl")
    res = run("eval", "--config", str(cfg), "--detectors", str(det_file.parent), "--data", str(test), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout)["pii-t-probe"]
    assert r["threshold"] == cal["threshold"] and r["auroc"] > 0.95 and r["n_pos"] > 20
    # Recall at each tier: the record tier catches at least what the page tier does.
    tiers = {t["tier"]: t for t in r["tiers"]}
    assert tiers["page"]["threshold"] == cal["threshold"] and tiers["page"]["recall"] == r["recall"]
    assert tiers["record"]["threshold"] == rec["threshold"] and tiers["record"]["recall"] >= r["recall"]
    assert all({t["tier"] for t in f["tiers"]} == {"record", "page"} for f in r["families"])
