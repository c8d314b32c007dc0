"""The sidecar's vectorised loop against the one-request-at-a-time reference, on random traffic.

Random streams through a real ring: many requests interleaved in each slot, chunked prefills and
decode steps, prefix-cache gaps, preempted requests re-sending positions already scored, requests
finishing mid-slot and requests abandoned until they time out. Every verdict the sidecar gives must
equal what the scalar reference (`reference_detectors`) computes from the same rows, batch by batch.
Also: sampling, the tracked-request limit, and two producers writing the same rows (tensor parallelism).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sae_lens import SAE, StandardSAEConfig

from monitor.config import load_config
from monitor.sidecar.loop import Sidecar
from monitor.transport.meta import Segment, SlotMeta
from monitor.transport.ring import RingSpec, RingWriter
from reference_detectors import feed as reference_feed

D = 16
DETECTORS = [
    {"name": "max", "inputs": [{"sae": "s", "feature": 1}], "aggregation": {"kind": "max"}, "threshold": 2.2},
    {"name": "mean-prompt", "inputs": [{"sae": "s", "feature": 2}], "aggregation": {"kind": "mean"},
     "scope": "prompt", "threshold": 0.55},
    {"name": "ema-generation", "inputs": [{"sae": "s", "feature": 3}, {"sae": "s", "feature": 4}],
     "aggregation": {"kind": "ema_max", "alpha": 0.4}, "scope": "generation", "threshold": 1.3},
    {"name": "rolling-weighted", "inputs": [{"sae": "s", "feature": 5}, {"sae": "s", "feature": 6, "weight": 0.5}],
     "combine": "weighted", "aggregation": {"kind": "rolling_mean_max", "window": 3}, "threshold": 1.1},
    {"name": "count-all", "inputs": [{"sae": "s", "feature": 1}, {"sae": "s", "feature": 7}], "combine": "all",
     "aggregation": {"kind": "count_above", "token_threshold": 0.5, "min_tokens": 2}, "threshold": 3},
]


def monitor_config(tmp_path: Path, **extra) -> Path:
    """Feature j of the SAE is relu(x[j]): the test knows every score from the rows it sends."""
    sae = SAE.from_dict(StandardSAEConfig(d_in=D, d_sae=8, apply_b_dec_to_input=False).to_dict())
    with torch.no_grad():
        sae.W_enc.zero_()
        for j in range(8):
            sae.W_enc[j, j] = 1.0
        sae.b_enc.zero_()
    sae.save_model(tmp_path / "sae")
    (tmp_path / "det").mkdir()
    for d in DETECTORS:
        (tmp_path / f"det/{d['name']}.yaml").write_text(yaml.safe_dump({"concept": "c", **d}))
    cfg = tmp_path / "m.yaml"
    doc = {"model": {"name": "tiny", "num_layers": 4, "d_model": D}, "taps": [{"layer": 2}],
           "saes": [{"name": "s", "layer": 2, "path": "sae"}], "detectors": ["det"],
           "transport": {"directory": str(tmp_path / "rings"), "name": "k", "request_timeout_s": 0.5},
           "sinks": {"prometheus": {"enabled": False}}, "deployment": {"name": "unit"}}
    for key, value in extra.items():
        doc[key] = value
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def ring(tmp_path: Path, name: str = "k-a") -> RingWriter:
    (tmp_path / "rings").mkdir(exist_ok=True)
    return RingWriter(tmp_path / f"rings/{name}.ring", RingSpec(slots=512, slot_rows=64, d_model=D, layers=(2,),
                                                               dtype=torch.float32))


class Traffic:
    """Random requests and the slots that carry them, with what each request was fed, batch by batch."""

    def __init__(self, rng: np.random.Generator, n: int, abandon: bool = True) -> None:
        self.rng = rng
        self.requests = []
        for i in range(n):
            n_prompt = int(rng.integers(2, 30))
            length = n_prompt + int(rng.integers(0, 25))
            x = np.maximum(rng.normal(0.3, 1.0, (length, D)), -1).astype(np.float32)
            self.requests.append({"req": f"r{i}-0000abcd", "id": f"r{i}", "n_prompt": n_prompt, "x": x,
                                  "sent": 0, "done": False, "abandon": abandon and i % 11 == 5,
                                  "start": int(rng.integers(1, 4)) if i % 7 == 3 else 0})  # prefix-cache gap
        self.batches: dict[str, list[np.ndarray]] = {r["req"]: [] for r in self.requests}

    def slots(self):
        """Yields (segments, rows, finished) until every request is done."""
        live = list(range(min(12, len(self.requests))))
        waiting = list(range(len(live), len(self.requests)))
        while live:
            segs, rows, finished, row = [], [], [], 0
            for i in list(live):
                r = self.requests[i]
                begin = max(r["sent"], r["start"])
                if self.rng.random() < 0.1 and r["sent"] > 2:  # preempted: recomputes positions already sent
                    begin = int(self.rng.integers(r["start"], r["sent"]))
                step = 1 if r["sent"] >= r["n_prompt"] else int(self.rng.integers(1, 8))
                end = min(len(r["x"]), max(begin, r["sent"]) + step)
                if row + end - begin > 64 or self.rng.random() < 0.15:
                    continue  # not in this step
                segs.append(Segment(r["req"], f"chatcmpl-{r['id']}", r["id"], 0, begin, end - begin, r["n_prompt"],
                                    row))
                rows.append(r["x"][begin:end])
                self.batches[r["req"]].append(np.arange(begin, end))
                row += end - begin
                r["sent"] = max(r["sent"], end)
                if r["sent"] == len(r["x"]):
                    live.remove(i)
                    if not r["abandon"]:
                        finished.append(r["req"])
                    if waiting:
                        live.append(waiting.pop(0))
            if segs:
                yield tuple(segs), np.concatenate(rows), tuple(finished)


def reference_verdicts(side: Sidecar, traffic: Traffic) -> dict[tuple[str, str], tuple]:
    """(req, detector) -> (score, fired, fired_at, top positions), as the scalar reference computes them."""
    out = {}
    for r in traffic.requests:
        scores_all = {k: v.numpy() for k, v in side.detectors.scorer.score({2: torch.from_numpy(r["x"])}).items()}
        next_pos = 0
        states = {}
        for positions in traffic.batches[r["req"]]:
            keep = positions[positions >= next_pos]  # what the sidecar keeps: new positions only
            if not len(keep):
                continue
            next_pos = int(keep[-1]) + 1
            batch = {h: s[keep] for h, s in scores_all.items()}
            for det in side.detectors.detectors:
                st, _ = reference_feed(det, states.get(det.spec.name), keep, r["n_prompt"], batch)
                if st is not None:
                    states[det.spec.name] = st
        for name, st in states.items():
            out[(r["req"], name)] = (st.score, st.fired, st.fired_at if st.fired else None, evidence_key(st.top))
    return out


def evidence_key(top) -> tuple:
    """Top tokens as (scores, positions of those above the weakest): ReLU features tie at 0 a lot, and
    which of several tied tokens is evidence is arbitrary."""
    scores = sorted(round(s, 9) for s, _, _ in top)
    return scores, sorted(p for s, p, _ in top if round(s, 9) > scores[0])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_traffic_matches_the_reference(tmp_path, seed):
    side = Sidecar(load_config(monitor_config(tmp_path)), device="cpu")
    producer = ring(tmp_path)
    side.discover()
    finals, fires = [], []
    side.bus.on_detector(lambda u: (finals if u.final else fires).append(u))
    traffic = Traffic(np.random.default_rng(seed), 60)
    for step, (segs, rows, finished) in enumerate(traffic.slots()):
        assert producer.publish(step, SlotMeta(segs, finished, time.time()), [torch.from_numpy(rows)])
        if step % 3 == 2:  # several slots per poll, as under load
            side.poll_once()
    side.poll_once()
    assert side.stats.duplicate_rows > 0 and side.stats.uncovered_positions > 0  # the stream exercised both
    time.sleep(0.6)
    side.poll_once()  # abandoned requests time out
    assert side.stats.requests_expired == sum(r["abandon"] for r in traffic.requests) > 0
    assert side.requests == {}
    want = reference_verdicts(side, traffic)
    got = {(u.req, u.detector.name): (u.score, u.fired, u.fired_at, evidence_key(u.top)) for u in finals}
    assert got.keys() == want.keys()
    for key, (score, fired, fired_at, top) in want.items():
        g = got[key]
        assert g[0] == pytest.approx(score, rel=1e-9, abs=1e-9), key
        assert g[1:] == (fired, fired_at, top), key
    assert {(u.req, u.detector.name) for u in fires} == {k for k, v in want.items() if v[1]}
    assert any(v[1] for v in want.values()) and not all(v[1] for v in want.values())


def one_request(req: str, n: int, x0: float, n_prompt: int = 2) -> tuple[tuple[Segment, ...], np.ndarray]:
    x = np.zeros((n, D), dtype=np.float32)
    x[:, 1] = x0
    return (Segment(f"{req}-0000abcd", f"chatcmpl-{req}", req, 0, 0, n, n_prompt, 0),), x


def test_sampling_scores_a_deterministic_share_and_pinned_requests(tmp_path):
    from monitor.sidecar.sampling import chosen
    from monitor.transport.pinned import PinnedWriter, pinned_path

    ids = [f"req-{i}" for i in range(4000)]
    share = sum(chosen(i, 0.25) for i in ids) / len(ids)
    assert 0.22 < share < 0.28 and [chosen(i, 0.25) for i in ids[:50]] == [chosen(i, 0.25) for i in ids[:50]]
    cfg = monitor_config(tmp_path, sampling={"fraction": 0.01, "always": [{"header": "X-Tenant", "values": ["acme"]}]})
    side = Sidecar(load_config(cfg), device="cpu")
    producer = ring(tmp_path)
    side.discover()
    pinned = next(i for i in ids if not chosen(i, 0.01))
    PinnedWriter(pinned_path(tmp_path / "rings", "k")).add(pinned)
    verdicts = []
    side.bus.on_detector(lambda u: verdicts.append(u.request_id) if u.final else None)
    out = [i for i in ids[:40] if not chosen(i, 0.01) and i != pinned][:3]
    for step, rid in enumerate([pinned, *out]):
        segs, x = one_request(rid, 4, 3.0)
        producer.publish(step, SlotMeta(segs, (), None), [torch.from_numpy(x)])
    side.poll_once()
    assert set(side.requests) == {f"{pinned}-0000abcd"}  # sampled-out requests leave no state at all
    for step, rid in enumerate([pinned, *out], start=10):  # their later rows and finish change nothing
        seg = Segment(f"{rid}-0000abcd", f"chatcmpl-{rid}", rid, 0, 4, 1, 2, 0)
        producer.publish(step, SlotMeta((seg,), (seg.req,), None), [torch.ones(1, D)])
    side.poll_once()
    assert verdicts and set(verdicts) == {pinned}
    assert side.stats.requests_sampled_out == 3 and side.stats.requests_seen == 1 and side.skipped == {}


def test_requests_over_the_limit_are_counted_not_half_scored(tmp_path):
    side = Sidecar(load_config(monitor_config(tmp_path, sampling={"max_requests": 2})), device="cpu")
    producer = ring(tmp_path)
    side.discover()
    for step, rid in enumerate(["a", "b", "c"]):
        segs, x = one_request(rid, 3, 3.0)
        producer.publish(step, SlotMeta(segs, (), None), [torch.from_numpy(x)])
    side.poll_once()
    assert set(side.requests) == {"a-0000abcd", "b-0000abcd"} and side.stats.requests_over_limit == 1
    producer.publish(5, SlotMeta((), ("a-0000abcd",), None), None)
    segs, x = one_request("d", 3, 3.0)
    producer.publish(6, SlotMeta(segs, (), None), [torch.from_numpy(x)])  # a slot is free again
    seg = Segment("c-0000abcd", "chatcmpl-c", "c", 0, 3, 1, 2, 0)
    producer.publish(7, SlotMeta((seg,), (), None), [torch.ones(1, D)])  # c stays out: never half-scored
    side.poll_once()
    assert set(side.requests) == {"b-0000abcd", "d-0000abcd"} and side.stats.requests_over_limit == 1


def test_two_producers_of_the_same_rows_give_one_verdict(tmp_path):
    """Tensor parallelism, had every rank tapped: two rings carry the same steps. The sidecar keeps one
    copy of each row and gives each request one verdict, whichever ring it reads first."""
    side = Sidecar(load_config(monitor_config(tmp_path)), device="cpu")
    rank0, rank1 = ring(tmp_path, "k-r0"), ring(tmp_path, "k-r1")
    side.discover()
    finals, fires = [], []
    side.bus.on_detector(lambda u: (finals if u.final else fires).append(u))
    traffic = Traffic(np.random.default_rng(9), 20, abandon=False)
    rows = 0
    for step, (segs, x, finished) in enumerate(traffic.slots()):
        for producer in (rank0, rank1):
            producer.publish(step, SlotMeta(segs, finished, time.time()), [torch.from_numpy(x)])
        rows += len(x)
        if step % 4 == 3:
            side.poll_once()
    side.poll_once()
    want = reference_verdicts(side, traffic)
    got = [(u.req, u.detector.name) for u in finals]
    assert len(got) == len(set(got)) and set(got) == set(want)
    assert len(fires) == len({(u.req, u.detector.name) for u in fires})  # each fire once
    for u in finals:
        assert u.score == pytest.approx(want[(u.req, u.detector.name)][0], rel=1e-9, abs=1e-9)
    # every row of the second copy was recognised as one: a position already scored, or a request already ended
    assert side.stats.duplicate_rows + side.stats.late_rows >= rows


def test_middleware_pins_requests_whose_headers_match(tmp_path, monkeypatch):
    import asyncio

    from monitor.plugin.middleware import MonitorMiddleware
    from monitor.transport.pinned import PinnedReader

    cfg = monitor_config(tmp_path, sampling={"fraction": 0.1, "always": [{"header": "X-Tenant", "values": ["acme"]}]})
    (tmp_path / "rings").mkdir()
    monkeypatch.setenv("MISALIGNMENT_MONITOR_CONFIG", str(cfg))

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})

    mw = MonitorMiddleware(app)

    async def call(headers):
        sent = []

        async def send(message):
            sent.append(message)

        await mw({"type": "http", "headers": headers}, None, send)
        return dict(sent[0]["headers"])[b"x-request-id"].decode()

    acme = asyncio.run(call([(b"x-tenant", b"acme"), (b"x-request-id", b"call-1")]))
    other = asyncio.run(call([(b"x-tenant", b"globex")]))
    generated = asyncio.run(call([(b"X-Tenant", b"acme")]))  # header names are case-insensitive; the id is made here
    reader = PinnedReader(tmp_path / "rings", "k")
    assert acme == "call-1" and acme in reader and generated in reader and other not in reader
    (pinned_file,) = (tmp_path / "rings").glob("k-pinned-*.ids")
    assert pinned_file.read_text().split() == ["call-1", generated]  # ids only: no header values


def test_a_request_whose_rows_were_all_dropped_is_counted_unscored(tmp_path):
    """Only its end reached the sidecar (a full ring dropped every row): no verdict can exist, and
    the metric says so; a second copy of the end (another producer) is not counted twice."""
    side = Sidecar(load_config(monitor_config(tmp_path)), device="cpu")
    producer = ring(tmp_path)
    side.discover()
    verdicts = []
    side.bus.on_detector(lambda u: verdicts.append(u.request_id) if u.final else None)
    segs, x = one_request("a", 3, 3.0)
    producer.publish(0, SlotMeta(segs, (), None), [torch.from_numpy(x)])
    producer.publish(1, SlotMeta((), ("a-0000abcd", "lost-0000abcd"), None), None)
    producer.publish(2, SlotMeta((), ("lost-0000abcd",), None), None)
    side.poll_once()
    assert set(verdicts) == {"a"} and side.stats.requests_seen == 1
    assert side.stats.requests_no_rows == 1 and side.stats.requests_finished == 1
