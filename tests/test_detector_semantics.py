"""Each aggregation on hand-built score sequences, streamed in chunks, and detector decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitor.config.models import DetectorSpec
from monitor.detectors.aggregate import Ragged
from monitor.detectors.aggregate import make_aggregator as make_vec
from monitor.detectors.runtime import CompiledDetector, DetectorBank, InputRef, in_scope
from monitor.detectors.updates import ranked


class One:
    """One request's aggregation, through the arrays the sidecar uses for many."""

    def __init__(self, agg_spec) -> None:
        self.agg = make_vec(agg_spec, capacity=1)

    def update(self, values: np.ndarray) -> None:
        self.agg.update(Ragged.of(np.array([0]), np.array([0]), np.array([len(values)])), values[None, :, None])

    @property
    def value(self) -> float:
        return float(self.agg.value(np.array([0]))[0, 0])


def make_aggregator(agg_spec) -> One:
    return One(agg_spec)


class State:
    """One request's detector state in a bank: update() says whether that update fired it."""

    def __init__(self, det: CompiledDetector) -> None:
        self.bank = DetectorBank(det, capacity=1)
        self.running = None

    def update(self, positions, columns, running: bool = False) -> bool:
        batch = Ragged.of(np.array([0]), np.array([0]), np.array([len(positions)]))
        scores = {"h": np.stack(columns, axis=1)}
        step = self.bank.update(batch, np.asarray(positions), scores, running)
        if running:
            self.running = step.running[0]
        return bool(len(step.fired))

    @property
    def score(self) -> float:
        return float(self.bank.score[0])

    @property
    def fired(self) -> bool:
        return bool(self.bank.fired[0])

    @property
    def fired_at(self) -> int:
        return int(self.bank.fired_at[0])

    @property
    def alert_id(self) -> str | None:
        return self.bank.alert_ids.get(0)

    def evidence(self):
        return ranked(self.bank.top(0))

SEQ = np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.0, 1.0, 0.3])


def spec(**agg):
    return DetectorSpec.model_validate({"name": "d", "concept": "c", "inputs": [{"sae": "s", "feature": 1}],
                                        "aggregation": agg, "threshold": 0.5}).aggregation


def feed(agg, seq, chunks):
    bounds = np.linspace(0, len(seq), chunks + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        agg.update(seq[a:b])
    return agg.value


def ema_max(seq, alpha):
    e, best = None, -math.inf
    for v in seq:
        e = v if e is None else alpha * v + (1 - alpha) * e
        best = max(best, e)
    return best


@pytest.mark.parametrize("chunks", [1, 3, 8])  # streaming in any chunking gives the same verdict
@pytest.mark.parametrize("agg,expected", [
    ({"kind": "max"}, 1.0),
    ({"kind": "mean"}, SEQ.mean()),
    ({"kind": "ema_max", "alpha": 0.5}, ema_max(SEQ, 0.5)),
    ({"kind": "rolling_mean_max", "window": 3}, max(SEQ[i:i + 3].mean() for i in range(6))),
    ({"kind": "count_above", "token_threshold": 0.7, "min_tokens": 2}, 4.0),
    ({"kind": "count_above", "token_threshold": 0.7, "min_tokens": 5}, 0.0),
    ({"kind": "fraction_above", "token_threshold": 0.7, "min_tokens": 1}, 4 / 8),
], ids=["max", "mean", "ema", "rolling", "count", "count-below-min", "fraction"])
def test_aggregations(agg, expected, chunks):
    assert feed(make_aggregator(spec(**agg)), SEQ, chunks) == pytest.approx(expected)


def test_rolling_mean_before_window_is_mean_so_far():
    a = make_aggregator(spec(kind="rolling_mean_max", window=5))
    a.update(np.array([0.2, 0.4]))
    assert a.value == pytest.approx(0.3)


def test_mean_drowns_a_short_burst_that_rolling_catches():
    burst = np.r_[np.zeros(60), np.ones(4), np.zeros(60)]
    mean, rolling = make_aggregator(spec(kind="mean")), make_aggregator(spec(kind="rolling_mean_max", window=4))
    mean.update(burst)
    rolling.update(burst)
    assert mean.value < 0.05 and rolling.value == 1.0


def detector(threshold=0.5, combine="any", inputs=None, agg=None, scope="both"):
    inputs = inputs or [{"sae": "s", "feature": 1}]
    s = DetectorSpec.model_validate({"name": "d", "concept": "c", "inputs": inputs, "combine": combine,
                                     "aggregation": agg or {"kind": "max"}, "threshold": threshold, "scope": scope})
    refs = [InputRef("h", i, inp.get("weight", 1.0), "probe" in inp, f"x/{i}") for i, inp in enumerate(inputs)]
    return CompiledDetector(s, refs)


def new_state(det: CompiledDetector) -> State:
    return State(det)


def test_fires_once_mid_stream_and_keeps_the_same_alert():
    st = new_state(detector(threshold=0.8))
    assert st.update(np.array([1, 2]), [np.array([0.1, 0.2])]) is False
    assert st.update(np.array([3, 4]), [np.array([0.3, 0.85])]) is True  # fires mid-generation
    alert = st.alert_id
    assert st.fired_at == 4
    assert st.update(np.array([5]), [np.array([0.99])]) is False  # later evidence: no second fire
    assert st.alert_id == alert and st.score == pytest.approx(0.99)
    assert [e.position for e in st.evidence()][:2] == [5, 4]


def test_combine_any_all_weighted():
    two = [{"sae": "s", "feature": 1}, {"sae": "s", "feature": 2, "weight": 2.0}]
    a, b = np.array([0.9, 0.1]), np.array([0.2, 0.3])
    pos = np.array([1, 2])
    for combine, want in (("any", 0.9), ("all", 0.3), ("weighted", 0.9 + 2 * 0.2)):
        st = new_state(detector(combine=combine, inputs=two))
        st.update(pos, [a, b])
        assert st.score == pytest.approx(want), combine


def test_probe_detector_reports_probability_of_mean_logit():
    st = new_state(detector(inputs=[{"probe": "p"}], agg={"kind": "mean"}, threshold=0.5))
    logits = np.array([2.0, -1.0, 0.5])
    st.update(np.array([1, 2, 3]), [logits])
    assert st.score == pytest.approx(1 / (1 + math.exp(-logits.mean())))


def test_probe_count_threshold_is_a_probability():
    st = new_state(detector(inputs=[{"probe": "p"}], agg={"kind": "count_above", "token_threshold": 0.5,
                                                         "min_tokens": 1}, threshold=2))
    st.update(np.array([1, 2, 3]), [np.array([0.1, -0.1, 3.0])])  # p = .52, .48, .95
    assert st.score == 2.0 and st.fired


def test_scope_and_attention_sink():
    s = detector(scope="prompt").spec
    pos = np.arange(0, 8)
    assert in_scope(s, pos, n_prompt=5).tolist() == [False, True, True, True, True, False, False, False]
    g = detector(scope="generation").spec
    assert in_scope(g, pos, n_prompt=5).tolist() == [False] * 5 + [True] * 3


AGGS = [{"kind": "max"}, {"kind": "mean"}, {"kind": "ema_max", "alpha": 0.3}, {"kind": "rolling_mean_max", "window": 3},
        {"kind": "count_above", "token_threshold": 0.5, "min_tokens": 2},
        {"kind": "fraction_above", "token_threshold": 0.5, "min_tokens": 2}]


@pytest.mark.parametrize("agg", AGGS, ids=[a["kind"] for a in AGGS])
@pytest.mark.parametrize("combine,probes", [("any", False), ("all", False), ("weighted", False), ("any", True)])
def test_running_score_is_the_score_after_each_token(agg, combine, probes):
    """What an incident's trajectory shows: the score the detector had after each token, in any chunking."""
    rng = np.random.default_rng(7)
    inputs = [{"probe": "p", "output": "a"}, {"probe": "p", "output": "b"}] if probes else \
        [{"sae": "s", "feature": 1}, {"sae": "s", "feature": 2, "weight": 0.5}]
    det = detector(combine=combine, inputs=inputs, agg=agg)
    cols = [rng.normal(size=20), rng.normal(size=20)]
    chunked, one_by_one = new_state(det), new_state(det)
    running = []
    for a, b in ((0, 7), (7, 8), (8, 20)):
        chunked.update(np.arange(a, b) + 1, [c[a:b] for c in cols], running=True)
        running.extend(chunked.running.tolist())
    reference = []
    for j in range(20):
        one_by_one.update(np.array([j + 1]), [c[j : j + 1] for c in cols])
        reference.append(one_by_one.score)
    assert np.allclose(running, reference) and chunked.score == pytest.approx(one_by_one.score)
