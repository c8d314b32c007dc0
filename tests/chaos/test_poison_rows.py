"""One bad value must not blind a detector: non-finite scores, lying ring segments, non-JSON numbers.

Each test failed on the code before issue 29 (the finding it reproduces is named) and drives the real
sidecar loop over a real ring, one poll at a time.
"""

from __future__ import annotations

import json
import math
import time

from test_ring_faults import ring, sidecar_for, turn

from monitor.sinks import strict_json
from monitor.sinks.events import EventBuilder
from monitor.transport.meta import Segment, SlotMeta
from sidecar_helpers import D, publish_request


def strict_loads(text: str):
    """A parser as strict as PostgreSQL's: no NaN/Infinity, no lone surrogates."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    doc = json.loads(text, parse_constant=refuse)
    text.encode("utf-8")  # a lone surrogate would fail here
    return doc


def test_a_nan_row_does_not_blind_the_request_and_is_counted(tmp_path):
    """Finding 1: one NaN row made the request's max NaN for good; a firing row after it never fired."""
    sidecar, verdicts = sidecar_for(tmp_path)
    w = ring(tmp_path)
    turn(sidecar)
    publish_request(w, [0.0, math.nan, 9.0], req="nan-then-fire")
    publish_request(w, [math.nan, math.nan], req="all-nan")
    turn(sidecar)
    assert ("nan-then-fire", True) in verdicts
    assert ("all-nan", True) not in verdicts  # no scored token in scope: no verdict at all, never a fire
    assert sidecar.snapshot().stats.nonfinite_rows == 3
    sidecar.close()


def test_an_infinite_row_neither_fires_nor_reaches_an_event(tmp_path):
    """Finding 1: a +inf row fired with `score: inf`, and the event carried a bare Infinity."""
    sidecar, verdicts = sidecar_for(tmp_path)
    updates = []
    sidecar.bus.on_detector(updates.append)
    w = ring(tmp_path)
    turn(sidecar)
    publish_request(w, [math.inf, 1.0], req="inf")
    publish_request(w, [0.0, math.inf, 6.0], req="fires-on-its-finite-row")
    turn(sidecar)
    assert ("inf", False) in verdicts and ("fires-on-its-finite-row", True) in verdicts
    assert sidecar.snapshot().stats.nonfinite_rows == 2
    builder = EventBuilder(model="tiny", deployment="unit")
    events = [e for u in updates if (e := builder.build(u)) is not None]
    assert events and all(math.isfinite(e["data"]["score"]) for e in events)
    for e in events:
        strict_loads(strict_json.dumps(e))
    sidecar.close()


def test_events_are_strict_json_whatever_a_value_holds():
    doc = {"score": math.inf, "low": -math.inf, "nan": math.nan, "id": "req-\ud800-x", "nested": [{"v": math.nan}],
           "fine": 1.5}
    back = strict_loads(strict_json.dumps(doc))
    assert back == {"score": None, "low": None, "nan": None, "id": "req-\ufffd-x", "nested": [{"v": None}], "fine": 1.5}


def test_a_segment_claiming_more_rows_than_its_slot_skips_that_slot_alone(tmp_path):
    """Finding 3: a slot whose header says 1 row while its segment claims 1,000 moved the request's position
    past its real rows (later dropped as duplicates: a request that should fire never did), and a later
    well-formed request never finished."""
    import torch

    sidecar, verdicts = sidecar_for(tmp_path)
    w = ring(tmp_path)
    turn(sidecar)
    internal = "chatcmpl-liar-12345678"
    lying = Segment(internal, "chatcmpl-liar", "liar", 0, 0, 1000, 2, 0)
    w.publish(1, SlotMeta((lying,), (), time.time()), [torch.zeros(1, D)])
    x = torch.zeros(3, D)
    x[2, 0] = 9.0
    honest = Segment(internal, "chatcmpl-liar", "liar", 0, 0, 3, 2, 0)  # its real rows, position 0 on
    w.publish(2, SlotMeta((honest,), (internal,), time.time()), [x])
    negative = Segment("chatcmpl-neg-12345678", "chatcmpl-neg", "neg", 0, 0, -5, 2, 0)
    w.publish(3, SlotMeta((negative,), (), time.time()), [torch.zeros(1, D)])
    publish_request(w, [0.0, 9.0], req="later")
    turn(sidecar)
    snap = sidecar.snapshot()
    assert ("liar", True) in verdicts and ("later", True) in verdicts
    assert snap.rings.corrupt_slots == 2 and snap.stats.duplicate_rows == 0 and snap.requests_in_flight == 0
    sidecar.close()
