"""Detector banks (state in arrays over requests) against the scalar reference, on random streams.

Many requests at once, each fed its tokens in random chunks across polls, with requests finishing
and their slots reused by new ones mid-stream: every request's score, fire, fire position, running
score and evidence must equal what the one-request-at-a-time reference computes.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from monitor.config.models import DetectorSpec
from monitor.detectors.aggregate import Ragged
from monitor.detectors.runtime import CompiledDetector, DetectorBank, InputRef, scope_batch
from reference_detectors import feed as reference_feed

AGGREGATIONS = {
    "max": {"kind": "max"},
    "mean": {"kind": "mean"},
    "last": {"kind": "last"},
    "ema": {"kind": "ema_max", "alpha": 0.3},
    "rolling": {"kind": "rolling_mean_max", "window": 4},
    "count": {"kind": "count_above", "token_threshold": 0.6, "min_tokens": 2},
    "fraction": {"kind": "fraction_above", "token_threshold": 0.6, "min_tokens": 1},
}


def compiled(agg: dict, combine: str, probes: bool, scope: str, threshold: float,
             record_threshold: float | None = None) -> CompiledDetector:
    if probes:
        inputs = [{"probe": "p", "output": o, "weight": w} for o, w in (("a", 1.0), ("b", 0.5))]
        refs = [InputRef("probe:p", j, w, True, f"p/{o}") for j, (o, w) in enumerate((("a", 1.0), ("b", 0.5)))]
    else:
        inputs = [{"sae": "s", "feature": f, "weight": w} for f, w in ((3, 1.0), (7, -0.5))]
        refs = [InputRef("sae:s", j, w, False, f"s/{f}") for j, (f, w) in enumerate(((3, 1.0), (7, -0.5)))]
    spec = DetectorSpec.model_validate({"name": "d", "concept": "c", "inputs": inputs, "aggregation": agg,
                                        "combine": combine, "scope": scope, "threshold": threshold,
                                        "record_threshold": record_threshold})
    return CompiledDetector(spec, refs)


def stream(rng, n_requests: int):
    """Requests of random length and prompt, each cut into random consecutive chunks."""
    out = []
    for r in range(n_requests):
        length = int(rng.integers(1, 40))
        n_prompt = int(rng.integers(1, length + 1))
        cuts = np.sort(rng.choice(np.arange(1, length), size=min(length - 1, int(rng.integers(0, 6))), replace=False))
        bounds = [0, *cuts.tolist(), length]
        chunks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        out.append({"id": r, "n_prompt": n_prompt, "chunks": chunks, "scores": rng.normal(0, 1.5, (length, 2))})
    return out


def final_score_quantile(det, requests, head, q: float = 0.5) -> float:
    """A threshold that a share `1 - q` of the requests end above: both outcomes get exercised."""
    finals = []
    for req in requests:
        st = None
        for a, b in req["chunks"]:
            st, _ = reference_feed(det, st, np.arange(a, b), req["n_prompt"], {head: req["scores"][a:b]})
        if st is not None:
            finals.append(st.score)
    return float(np.quantile(finals, q))


@pytest.mark.parametrize("scope", ["both", "prompt", "generation"])
@pytest.mark.parametrize("combine", ["any", "all", "weighted"])
@pytest.mark.parametrize("probes", [True, False], ids=["probes", "features"])
@pytest.mark.parametrize("agg", list(AGGREGATIONS), ids=list(AGGREGATIONS))
def test_bank_equals_reference(agg, combine, probes, scope):
    rng = np.random.default_rng(zlib.crc32(f"{agg}{combine}{probes}{scope}".encode()))
    head = "probe:p" if probes else "sae:s"
    requests = stream(rng, 60)
    untuned = compiled(AGGREGATIONS[agg], combine, probes, scope, 1e9)
    threshold = final_score_quantile(untuned, requests, head)
    # `any` detectors carry two tiers (record where about 3 in 4 requests end, page where half do): alerts fire
    # at the record tier and some escalate to the page tier later in their stream.
    record = final_score_quantile(untuned, requests, head, 0.25) if combine == "any" else None
    det = compiled(AGGREGATIONS[agg], combine, probes, scope, threshold,
                   record if record is not None and record < threshold else None)
    bank = DetectorBank(det, capacity=4)  # grows as requests arrive
    free: list[int] = []
    slot_of: dict[int, int] = {}
    ref_state: dict[int, object] = {}
    pending = {r["id"]: list(r["chunks"]) for r in requests}
    alive: list[int] = []
    waiting = list(range(len(requests)))
    results = {}
    escalations = 0
    next_slot = 0
    while waiting or alive:
        # Up to 12 requests in flight; new ones take freed slots.
        while waiting and len(alive) < 12:
            rid = waiting.pop(0)
            if free:
                slot_of[rid] = free.pop()
            else:
                slot_of[rid] = next_slot
                next_slot += 1
                if next_slot > bank.capacity:
                    bank.grow(2 * bank.capacity)
            alive.append(rid)
        # One poll: a random subset of live requests each bring their next chunk, laid end to end.
        movers = [rid for rid in alive if rng.random() < 0.7] or alive[:1]
        flat_pos, flat_scores, firsts, starts, counts, prompts, slots = [], [], [], [], [], [], []
        row = 0
        for rid in movers:
            req = requests[rid]
            a, b = pending[rid].pop(0)
            flat_pos.append(np.arange(a, b))
            flat_scores.append(req["scores"][a:b])
            firsts.append(row), starts.append(a), counts.append(b - a), prompts.append(req["n_prompt"])
            slots.append(slot_of[rid])
            row += b - a
        positions = np.concatenate(flat_pos)
        scores = {head: np.concatenate(flat_scores).astype(np.float32)}
        found = scope_batch(det.spec, np.array(slots), np.array(firsts), np.array(starts), np.array(counts),
                            np.array(prompts))
        step = None
        if found is not None:
            batch, which = found
            step = bank.update(batch, positions, scores, running=True)
        for j, rid in enumerate(movers):
            req = requests[rid]
            pos = flat_pos[j]
            st, fired = reference_feed(det, ref_state.get(rid), pos, req["n_prompt"],
                                       {head: req["scores"][pos[0]: pos[-1] + 1].astype(np.float32)}, running=True)
            if st is not None:
                ref_state[rid] = st
            k = None if found is None else np.flatnonzero(which == j)
            if st is None:
                assert k is None or len(k) == 0
                continue
            k = int(k[0])
            assert (k in step.fired.tolist()) == fired
            assert (k in step.escalated.tolist()) == st.escalated_now
            escalations += st.escalated_now
            n = int(batch.counts[k])
            np.testing.assert_allclose(step.running[k, :n], st.running, rtol=1e-9, atol=1e-9)
        for rid in list(movers):
            if not pending[rid]:  # finished: compare its verdict, free its slot
                slot = slot_of[rid]
                st = ref_state.get(rid)
                results[rid] = st
                if st is None:
                    assert not bank.active[slot]
                else:
                    assert bank.active[slot]
                    np.testing.assert_allclose(bank.score[slot], st.score, rtol=1e-9, atol=1e-12)
                    assert bool(bank.fired[slot]) == st.fired and bool(bank.paged[slot]) == st.paged
                    if st.fired:
                        assert bank.fired_at[slot] == st.fired_at
                        assert bank.alert_ids[slot]
                    mine = sorted((round(s, 9), p) for s, p, _ in bank.top(slot))
                    theirs = sorted((round(s, 9), p) for s, p, _ in st.top)
                    assert mine == theirs
                    by_pos = {p: i for _, p, i in st.top}
                    for _, p, inputs in bank.top(slot):
                        assert inputs == pytest.approx(by_pos[p])
                bank.reset(np.array([slot]))
                free.append(slot)
                alive.remove(rid)
    assert len(results) == len(requests)
    fired = [st.fired for st in results.values() if st is not None]
    assert any(fired) and not all(fired), "the stream must exercise both outcomes"
    if det.spec.record_threshold is not None:
        paged = [st.paged for st in results.values() if st is not None]
        assert sum(paged) < sum(fired), "some alerts must stay at the record tier"


def test_ragged_layout():
    b = Ragged.of(np.array([5, 2]), np.array([0, 3]), np.array([3, 1]))
    assert b.mask.tolist() == [[True, True, True], [True, False, False]]
    assert b.gather(np.array([10.0, 11, 12, 13]), pad=-1).tolist() == [[10, 11, 12], [13, -1, -1]]


def test_a_last_prompt_detector_waits_for_the_prompts_end():
    """A long prompt prefilled in two chunks: the end of the first chunk is not where the model decides, so a high
    score there fires nothing; the verdict is the prompt's last token, read when it arrives."""
    det = compiled({"kind": "last"}, "any", True, "prompt", 0.5)
    bank = DetectorBank(det, capacity=2)
    n_prompt, head = 20, "probe:p"
    scores = np.full((24, 2), -4.0, dtype=np.float32)
    scores[9] = 6.0  # the first chunk ends on a token that looks like the concept
    for a, b in ((0, 10), (10, 24)):  # chunk 1: prompt 0-9; chunk 2: the rest of the prompt, then generation
        found = scope_batch(det.spec, np.array([0]), np.array([0]), np.array([a]), np.array([b - a]), np.array([n_prompt]))
        if a == 0:
            assert found is None  # nothing judged yet
            continue
        step = bank.update(found[0], np.arange(a, b), {head: scores[a:b]})
        assert len(step.fired) == 0 and bank.score[0] < 0.05  # the header's last token (19) decides: -4
    scores[19] = 6.0  # the same prompt whose end looks like the concept fires, at its last token
    bank.reset(np.array([0]))
    found = scope_batch(det.spec, np.array([0]), np.array([0]), np.array([10]), np.array([14]), np.array([n_prompt]))
    step = bank.update(found[0], np.arange(10, 24), {head: scores[10:24]})
    assert step.fired.tolist() == [0] and bank.fired_at[0] == 19
