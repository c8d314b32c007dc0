"""Drift on synthetic streams: a shifted stream is flagged, a stable one is not (monitor.detectors.drift)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from monitor.config.models import DetectorSpec, Drift
from monitor.detectors.drift import DriftTracker, make_baseline, psi, rate_psi, score_bins
from monitor.provenance import Baseline, Calibration
from monitor.scoring.space import HeadInfo
from monitor.scoring.tokens import TokenScores
from monitor.sinks.metrics import drift_families

SHIFT = 0.25  # the rule's line (deploy/prometheus/rules.yml)
STABLE = 0.1


def detector_set(baseline: Baseline) -> SimpleNamespace:
    spec = DetectorSpec.model_validate({
        "name": "pii-probe", "concept": "pii", "inputs": [{"probe": "pii"}], "aggregation": {"kind": "mean"},
        "threshold": 0.9, "calibration": Calibration(threshold=0.9, target_fpr=0.01, baseline=baseline)})
    return SimpleNamespace(detectors=[SimpleNamespace(spec=spec)],
                           heads={"probe:pii": HeadInfo("probe:pii", "probe", ("pii/score",))})


def tokens(logits: np.ndarray) -> TokenScores:
    n = len(logits)
    return TokenScores(positions=np.arange(n), is_prompt=np.ones(n, bool), scores={"probe:pii": logits[:, None]})


@pytest.fixture
def calibrated():
    rng = np.random.default_rng(0)
    benign = rng.beta(2, 8, 5000)  # benign scores: mostly low
    return make_baseline(benign, {"pii/score": 0.05}, n_tokens=100_000)


def test_baseline_bins_hold_a_tenth_each(calibrated):
    assert len(calibrated.score_edges) == 9
    assert np.allclose(calibrated.score_fractions, 0.1, atol=0.002)


def test_stable_stream_is_not_flagged_and_shifted_one_is(calibrated):
    rng = np.random.default_rng(1)
    ds = detector_set(calibrated)
    for name, scores, flagged in (("same distribution", rng.beta(2, 8, 1000), False),
                                  ("scores moved up", rng.beta(4, 6, 1000), True)):
        t = DriftTracker(window_requests=1000, window_tokens=10_000, min_requests=200)
        t.follow(ds)
        for s in scores:
            t.on_final(ds.detectors[0].spec, float(s))
        (d,) = t.detectors()
        assert d.requests == 1000
        assert (d.psi > SHIFT) is flagged and (d.psi < STABLE) is (not flagged), (name, d.psi)


def test_no_figure_before_the_window_can_say_anything(calibrated):
    ds = detector_set(calibrated)
    t = DriftTracker(window_requests=1000, window_tokens=10_000, min_requests=200)
    t.follow(ds)
    for s in np.linspace(0.9, 1.0, 199):  # far off, but too few
        t.on_final(ds.detectors[0].spec, float(s))
    t.on_final(ds.detectors[0].spec, float("nan"))  # nothing in scope: not a score
    assert t.detectors()[0].psi is None and t.detectors()[0].requests == 199
    t.on_final(ds.detectors[0].spec, 0.95)
    assert t.detectors()[0].psi > SHIFT


def test_window_slides_back_to_stable(calibrated):
    """After a burst of shifted traffic, a window's worth of normal traffic clears the figure."""
    rng = np.random.default_rng(2)
    ds = detector_set(calibrated)
    t = DriftTracker(window_requests=500, window_tokens=10_000, min_requests=200)
    t.follow(ds)
    spec = ds.detectors[0].spec
    for s in rng.beta(8, 2, 500):
        t.on_final(spec, float(s))
    assert t.detectors()[0].psi > SHIFT
    for s in rng.beta(2, 8, 500):
        t.on_final(spec, float(s))
    assert t.detectors()[0].psi < STABLE


def test_feature_firing_rate_shift(calibrated):
    rng = np.random.default_rng(3)
    ds = detector_set(calibrated)
    for rate, flagged in ((0.05, False), (0.30, True)):
        t = DriftTracker(window_requests=1000, window_tokens=20_000, min_requests=200)
        for _ in range(60):  # requests of 500 prompt tokens; the window keeps the last ~20k
            logits = np.where(rng.random(500) < rate, 2.0, -3.0).astype(np.float32)
            t.on_tokens(tokens(logits), ds)
        (i,) = t.inputs()
        assert 20_000 <= i.tokens < 20_500
        assert i.baseline == 0.05 and i.rate == pytest.approx(rate, abs=0.01)
        assert (i.psi > SHIFT) is flagged and (i.psi < STABLE) is (not flagged), (rate, i.psi)


def test_row_zero_and_generated_tokens_do_not_count(calibrated):
    ds = detector_set(calibrated)
    t = DriftTracker(window_requests=1000, window_tokens=1000, min_requests=200)
    ts = TokenScores(positions=np.arange(4), is_prompt=np.array([True, True, False, False]),
                     scores={"probe:pii": np.array([[5.0], [-1.0], [5.0], [5.0]], np.float32)})
    t.on_tokens(ts, ds)
    (i,) = t.inputs()
    assert (i.tokens, i.rate) == (1, 0.0)


def test_psi_helpers():
    assert psi(np.array([0.5, 0.5]), np.array([500, 500])) < 0.001
    assert rate_psi(0.01, 0, 0) == pytest.approx(psi(np.array([0.01, 0.99]), np.array([0, 0])))
    edges = np.array([0.2, 0.5])
    assert score_bins(np.array([0.1, 0.2, 0.49, 0.5, 0.9, np.nan]), edges).tolist() == [1, 2, 2]


def test_metrics_show_drift_once_there_is_enough(calibrated):
    rng = np.random.default_rng(4)
    ds = detector_set(calibrated)
    t = DriftTracker(window_requests=400, window_tokens=1000, min_requests=200)
    t.follow(ds)

    class Families:
        def collect(self):
            return drift_families(t, "m")

    reg = CollectorRegistry()
    reg.register(Families())
    text = generate_latest(reg).decode()
    assert 'misalignment_monitor_drift_window_requests{detector="pii-probe",model_name="m"} 0.0' in text
    assert "misalignment_monitor_detector_score_psi{" not in text
    for s in rng.beta(8, 2, 400):
        t.on_final(ds.detectors[0].spec, float(s))
    t.on_tokens(tokens(np.full(1000, 3.0, np.float32)), ds)
    text = generate_latest(reg).decode()
    value = float(next(line.split()[-1] for line in text.splitlines()
                       if line.startswith("misalignment_monitor_detector_score_psi{")))
    assert value > SHIFT
    assert 'misalignment_monitor_feature_firing_rate{feature="pii/score",model_name="m"} 1.0' in text
    assert 'misalignment_monitor_feature_firing_rate_baseline{feature="pii/score",model_name="m"} 0.05' in text


def test_config_refuses_a_window_too_small_for_its_minimum():
    with pytest.raises(ValueError, match="min_requests .* cannot exceed window_requests"):
        Drift(window_requests=100, min_requests=200)


def test_baseline_shape_is_checked():
    with pytest.raises(ValueError, match="score_fractions needs 3 entries"):
        Baseline(score_edges=[0.1, 0.2], score_fractions=[1.0], n_requests=1, n_tokens=0)
