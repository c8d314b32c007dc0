"""One probe over several tapped layers: trained offline on the layers' rows side by side, scored by the
sidecar as one partial probe per layer whose logits add up. Its scores in the sidecar equal the offline
scorer's."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
import yaml

from monitor.config.load import ConfigError, load_config
from monitor.config.models import Mean
from monitor.offline.probes import aggregated_scores, fit_logistic_probe
from monitor.offline.rows import ConversationRows
from monitor.provenance import TrainingData
from monitor.scoring import BatchedScorer, LinearProbe
from monitor.scoring.probe import ProbeError, ProbeMetadata
from monitor.transport.meta import Segment, SlotMeta
from monitor.transport.ring import RingSpec, RingWriter
from sidecar_helpers import start_service

D = 16
LAYERS = [1, 3]  # tapped layers 1, 2, 3: the probe reads two of them, in this order


def _conversation(rng, n: int, positive: bool) -> ConversationRows:
    """Rows at three layers; a positive conversation carries its concept as a weak signal spread over
    layers 1 and 3 (neither alone separates as well as both)."""
    rows = {layer: torch.tensor(rng.normal(0, 1, (n, D)), dtype=torch.float32) for layer in (1, 2, 3)}
    if positive:
        rows[1][1:, 0] += 0.8
        rows[3][1:, 5] += 0.8
    return ConversationRows(list(range(n)), n_prompt=n - 2, rows=rows)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(11)
    convs = [_conversation(rng, int(rng.integers(6, 14)), k % 2 == 0) for k in range(120)]
    y = np.array([1 - k % 2 for k in range(120)])
    x = torch.stack([torch.cat([c.rows[la][1:] for la in LAYERS], dim=1).mean(0) for c in convs])
    fit = fit_logistic_probe(x, y, name="two", concept="c", model="tiny", layer=LAYERS,
                             training=TrainingData(path="synthetic", n_pos=60, n_neg=60), c=1.0)
    return fit.probe, rng


def test_a_probe_over_layers_says_which_and_splits_into_parts_that_add_up(trained):
    probe, rng = trained
    assert probe.meta.layers == LAYERS and probe.meta.layer == 1 and probe.d_in == 2 * D
    parts = probe.per_layer()
    assert sorted(parts) == LAYERS and all(p.d_in == D for p in parts.values())
    x = {la: torch.tensor(rng.normal(0, 1, (9, D)), dtype=torch.float32) for la in (1, 2, 3)}
    whole = probe.logits(torch.cat([x[la] for la in LAYERS], dim=1))
    torch.testing.assert_close(parts[1].logits(x[1]) + parts[3].logits(x[3]), whole, rtol=1e-5, atol=1e-5)
    # Scored with another head on the same layer, in chunks smaller than the rows: the same logits.
    other = LinearProbe(torch.ones(1, D), torch.zeros(1), ProbeMetadata(name="o", concept="c", model="m", layer=1, d_in=D))
    scorer = BatchedScorer({1: {"p@1": parts[1], "other": other}, 3: {"p@3": parts[3]}}, max_rows=4,
                           sums={"p": ["p@1", "p@3"]})
    out = scorer.score(x)
    assert set(out) == {"p", "other"}
    torch.testing.assert_close(out["p"], whole, rtol=1e-5, atol=1e-5)
    # Rows without one of its layers give no score at all, never part of one.
    assert "p" not in scorer.score({1: x[1]})


def test_bad_layer_lists_are_refused():
    with pytest.raises(ValueError, match="must be the first of layers"):
        ProbeMetadata(name="p", concept="c", model="m", layer=3, layers=[1, 3], d_in=2 * D)
    with pytest.raises(ValueError, match="two or more distinct layers"):
        ProbeMetadata(name="p", concept="c", model="m", layer=1, layers=[1, 1], d_in=2 * D)
    with pytest.raises(ValueError, match="not a multiple"):
        ProbeMetadata(name="p", concept="c", model="m", layer=1, layers=[1, 3], d_in=2 * D + 1)
    meta = ProbeMetadata(name="p", concept="c", model="m", layer=1, layers=[1, 3], d_in=2 * D)
    with pytest.raises(ProbeError, match="weight width"):
        LinearProbe(torch.zeros(1, D), torch.zeros(1), meta)


def _monitor(tmp_path, probe: LinearProbe, taps=(1, 2, 3)):
    probe.save(tmp_path / "probe")
    (tmp_path / "det").mkdir(exist_ok=True)
    (tmp_path / "det/p.yaml").write_text(yaml.safe_dump({
        "name": "two-layers", "concept": "c", "inputs": [{"probe": "two"}], "aggregation": {"kind": "mean"},
        "threshold": 0.5, "scope": "both"}))
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "num_layers": 4, "d_model": D}, "taps": [{"layer": la} for la in taps],
        "probes": [{"name": "two", "path": "probe"}], "detectors": ["det"],
        "transport": {"directory": str(tmp_path / "rings"), "name": "k"}, "sinks": {}, "deployment": {"name": "unit"}}))
    return cfg


def test_a_config_that_does_not_tap_every_layer_of_the_probe_is_refused(tmp_path, trained):
    cfg = _monitor(tmp_path, trained[0], taps=(1, 2))
    with pytest.raises(ConfigError, match=r"probes\[0\]\.path: probe reads layer\(s\) \[3\], not tapped"):
        load_config(cfg)


def test_the_sidecar_scores_a_probe_over_layers_as_the_offline_scorer_does(tmp_path, trained):
    """The real sidecar over a real ring, each request's rows in two steps (prefill, then decode with other
    requests' rows around them): every verdict's score equals `aggregated_scores` on the same rows."""
    probe, _ = trained
    cfg = _monitor(tmp_path, probe)
    rng = np.random.default_rng(5)
    convs = {f"r{k}": _conversation(rng, int(rng.integers(5, 12)), k % 3 == 0) for k in range(24)}
    ring = RingWriter(tmp_path / "rings/k-x.ring", RingSpec(slots=16, slot_rows=64, d_model=D, layers=(1, 2, 3),
                                                           dtype=torch.float32))
    log = tmp_path / "decisions.jsonl"
    service, stop = start_service(cfg, ring, decisions=log)
    deadline = time.time() + 30
    try:
        names = list(convs)
        for i in range(0, len(names), 4):  # four requests per step: prefill all but the last 2 rows, then the rest
            group = names[i:i + 4]
            for step, finished in ((0, False), (1, True)):
                segs, parts, row = [], {la: [] for la in (1, 2, 3)}, 0
                for name in group:
                    c = convs[name]
                    lo, hi = (0, len(c.token_ids) - 2) if step == 0 else (len(c.token_ids) - 2, len(c.token_ids))
                    segs.append(Segment(name, f"chatcmpl-{name}", name, 0, lo, hi - lo, c.n_prompt, row))
                    row += hi - lo
                    for la in parts:
                        parts[la].append(c.rows[la][lo:hi])
                meta = SlotMeta(tuple(segs), tuple(group) if finished else (), time.time())
                assert ring.publish(1, meta, [torch.cat(parts[la]) for la in (1, 2, 3)])
                time.sleep(0.05)
        while len([line for line in log.read_text().splitlines() if '"final"' in line]) < len(convs) \
                if log.exists() else True:
            assert time.time() < deadline + 60, "the sidecar did not judge every request"
            time.sleep(0.2)
    finally:
        stop.set()
        service.join(10)
        ring.close()
    finals = {r["request_id"]: r["score"] for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "final"}
    offline = aggregated_scores(probe, list(convs.values()), "both", Mean(kind="mean"))
    np.testing.assert_allclose([finals[n] for n in convs], offline, rtol=1e-5, atol=1e-6)
    assert 0 < sum(s >= 0.5 for s in offline) < len(offline)  # both sides are present: the comparison means something
