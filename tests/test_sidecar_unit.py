"""The sidecar's bookkeeping on a real ring with known rows (no vLLM): ids, chunks, dedupe, coverage, release."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
import yaml
from sae_lens import SAE, StandardSAEConfig

from monitor.config import load_config
from monitor.plugin.attribution import split_segments
from monitor.transport.meta import parse_request_id
from monitor.transport.meta import Segment, SlotMeta
from monitor.plugin.middleware import MonitorMiddleware
from monitor.scoring import LinearProbe, ProbeMetadata
from monitor.sidecar.loop import Sidecar
from monitor.transport.ring import RingSpec, RingWriter

D = 16


def test_parse_request_ids():
    assert parse_request_id("chatcmpl-abc-1a2b3c4d") == ("chatcmpl-abc", "abc", 0)
    assert parse_request_id("1_chatcmpl-my-id-0f0f0f0f") == ("chatcmpl-my-id", "my-id", 1)
    assert parse_request_id("cmpl-x-deadbeef") == ("cmpl-x", "x", 0)
    assert parse_request_id("batch-7-0123abcd") == ("batch-7", "batch-7", 0)  # offline LLM ids
    assert parse_request_id("weird") == ("weird", "weird", 0)


def seg(req, start, n, row, n_prompt=10):
    return Segment(req, f"chatcmpl-{req}", req, 0, start, n, n_prompt, row)


def test_split_segments_into_slots():
    chunks = split_segments([seg("a", 0, 5, 0), seg("b", 7, 4, 5)], max_rows=4)
    assert [(first, n) for first, n, _ in chunks] == [(0, 4), (4, 4), (8, 1)]
    flat = [(s.req, s.start, s.n, s.row) for _, _, segs in chunks for s in segs]
    assert flat == [("a", 0, 4, 0), ("a", 4, 1, 0), ("b", 7, 3, 1), ("b", 10, 1, 0)]


def test_middleware_sets_and_echoes_request_id():
    seen = {}

    async def app(scope, receive, send):
        seen["id"] = dict(scope["headers"])[b"x-request-id"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def send(m):
        sent.append(m)

    mw = MonitorMiddleware(app)
    asyncio.run(mw({"type": "http", "headers": []}, None, send))
    assert len(seen["id"]) == 32 and dict(sent[0]["headers"])[b"x-request-id"] == seen["id"]
    asyncio.run(mw({"type": "http", "headers": [(b"x-request-id", b"mine")]}, None, send))
    assert seen["id"] == b"mine" and dict(sent[-2]["headers"])[b"x-request-id"] == b"mine"


@pytest.fixture()
def setup(tmp_path):
    """A config with one ReLU SAE feature detector and one probe detector over a ring in tmp_path."""
    torch.manual_seed(0)
    sae = SAE.from_dict(StandardSAEConfig(d_in=D, d_sae=8, apply_b_dec_to_input=False).to_dict())
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 3] = 1.0  # feature 3 = relu(x[0])
        sae.b_enc.zero_()
    sae.save_model(tmp_path / "sae")
    w = torch.zeros(1, D)
    w[0, 1] = 1.0  # probe logit = x[1]
    LinearProbe(w, torch.zeros(1), ProbeMetadata(name="p", concept="c", model="m", layer=2, d_in=D)).save(tmp_path / "probe")
    (tmp_path / "det").mkdir()
    (tmp_path / "det/f.yaml").write_text(yaml.safe_dump({
        "name": "feat", "concept": "c", "inputs": [{"sae": "s", "feature": 3}], "aggregation": {"kind": "max"},
        "threshold": 5.0, "scope": "both"}))
    (tmp_path / "det/p.yaml").write_text(yaml.safe_dump({
        "name": "prb", "concept": "c", "inputs": [{"probe": "p"}], "aggregation": {"kind": "mean"},
        "threshold": 0.9, "scope": "prompt"}))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "model": {"num_layers": 4, "d_model": D}, "taps": [{"layer": 2}],
        "saes": [{"name": "s", "layer": 2, "path": "sae"}], "probes": [{"name": "p", "path": "probe"}],
        "detectors": ["det"], "transport": {"directory": str(tmp_path / "rings"), "name": "u", "request_timeout_s": 0.5}}))
    ring = RingWriter(tmp_path / "rings/u-x.ring", RingSpec(slots=16, slot_rows=32, d_model=D, layers=(2,),
                                                           dtype=torch.float32))
    side = Sidecar(load_config(tmp_path / "m.yaml"), device="cpu")
    side.discover()
    yield ring, side, tmp_path
    ring.close()


def rows(values0, values1=None):
    x = torch.zeros(len(values0), D)
    x[:, 0] = torch.tensor(values0, dtype=torch.float32)
    if values1 is not None:
        x[:, 1] = torch.tensor(values1, dtype=torch.float32)
    return [x]


def publish(ring, step, segs, x, finished=()):
    ring.publish(step, SlotMeta(tuple(segs), tuple(finished)), x)


def test_detectors_fire_once_with_evidence(setup):
    ring, side, _ = setup
    updates, tokens = [], []
    side.bus.on_detector(updates.append)
    side.bus.on_tokens(tokens.append)
    # prompt of 4 tokens (positions 0..3), then two decode steps
    publish(ring, 1, [seg("a", 0, 4, 0, n_prompt=4)], rows([9.0, 1.0, 2.0, 3.0], [9, 4, 4, 4]))
    publish(ring, 2, [seg("a", 4, 1, 0, n_prompt=4)], rows([6.0]))
    publish(ring, 3, [seg("a", 5, 1, 0, n_prompt=4)], rows([7.0]), finished=["a"])
    side.poll_once()
    fired = [u for u in updates if u.fired_now]
    assert [(u.detector.name, u.fired_at) for u in fired] == [("prb", 3), ("feat", 4)]
    # Row 0 (attention sink) never counts: its 9.0 would have fired `feat` at position 0.
    final = {u.detector.name: u for u in updates if u.final}
    assert final["feat"].score == 7.0 and final["feat"].evidence[0].position == 5
    assert final["prb"].score == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())
    assert sum(len(t.positions) for t in tokens) == 6
    assert side.requests == {} and side.stats.requests_finished == 1


def test_preempted_rows_are_deduplicated_and_cache_hits_counted(setup):
    ring, side, _ = setup
    publish(ring, 1, [seg("b", 16, 4, 0, n_prompt=30)], rows([1, 1, 1, 1]))  # positions 0..15 were cached
    publish(ring, 2, [seg("b", 16, 4, 0, n_prompt=30)], rows([1, 1, 1, 1]))  # recomputed after preemption
    side.poll_once()
    slot = side.requests["b"].slot
    assert side.table.uncovered[slot] == 16 and side.table.rows[slot] == 4 and side.stats.duplicate_rows == 4


def test_idle_requests_are_released(setup):
    ring, side, _ = setup
    publish(ring, 1, [seg("c", 0, 2, 0)], rows([1, 1]))
    side.poll_once()
    assert "c" in side.requests
    import time

    time.sleep(0.6)
    side.poll_once()
    assert "c" not in side.requests and side.stats.requests_expired == 1


def test_reload_changes_detectors_without_losing_requests(setup):
    ring, side, tmp = setup
    publish(ring, 1, [seg("d", 0, 3, 0)], rows([0, 2, 2]))
    side.poll_once()
    (tmp / "det/f.yaml").write_text(yaml.safe_dump({
        "name": "feat", "concept": "c", "inputs": [{"sae": "s", "feature": 3}], "aggregation": {"kind": "max"},
        "threshold": 1.0}))
    (tmp / "det/p.yaml").unlink()
    side.reload(load_config(tmp / "m.yaml"))
    assert [d.spec.name for d in side.detectors.detectors] == ["feat"]
    slot = side.requests["d"].slot
    assert [name for name, bank in side.banks.items() if bank.active[slot]] == ["feat"]
    fired = []
    side.bus.on_detector(lambda u: fired.append(u) if u.fired_now else None)
    publish(ring, 2, [seg("d", 3, 1, 0)], rows([1.5]))
    side.poll_once()
    assert [u.detector.name for u in fired] == ["feat"]  # the new threshold applies at once


def test_decision_log_carries_no_text(setup, tmp_path):
    from monitor.sinks.decisions import DecisionLog

    ring, side, _ = setup
    log = tmp_path / "d.jsonl"
    side.bus.on_detector(DecisionLog(log))
    publish(ring, 1, [seg("e", 0, 3, 0)], rows([0, 9, 9]), finished=["e"])
    side.poll_once()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {line["event"] for line in lines} == {"fired", "final"}
    assert all(set(line) >= {"request_id", "score", "threshold", "top_tokens"} for line in lines)
    assert not any("text" in line for line in lines)
