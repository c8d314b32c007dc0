"""Slot metadata stays small and bounded: ids written once, long ids cut, and a step too big for one
slot's metadata split over several slots instead of losing its rows."""

from __future__ import annotations

import time

import numpy as np
import torch

from monitor.plugin.capture import _Publisher
from monitor.transport.meta import MAX_ID_CHARS, Segment, SlotMeta, parse_request_id, wire_id
from monitor.transport.ring import RingReader, RingSpec, RingWriter


def decode_step(n_requests: int, id_chars: int = 36) -> list[Segment]:
    """One decode step: every request one row further, with ids as vLLM's OpenAI server makes them."""
    out = []
    for i in range(n_requests):
        req = wire_id(f"chatcmpl-{str(i).rjust(id_chars, 'x')}-{i:08x}")
        external, request_id, sample = parse_request_id(req)
        out.append(Segment(req, external, request_id, sample, 100 + i, 1, 50, i))
    return out


def test_ids_are_written_once_and_read_back_whole():
    segs = decode_step(3) + [Segment("odd id", "resp-1", "caller-1", 2, 0, 4, 4, 3)]  # not derivable: explicit
    meta = SlotMeta(segs, ("done",), 1.0)
    raw = meta.to_bytes()
    assert raw.count(b"x" * 30) == 3  # each request's id once, not three times
    back = SlotMeta.from_bytes(raw)
    assert back == meta
    table = back.table()
    assert [table.ids(i) for i in range(4)] == [(s.external_id, s.request_id, s.sample) for s in segs]


def test_a_huge_request_id_is_cut_with_its_hash():
    caller = "a" * 12_000
    req = wire_id(f"2_chatcmpl-{caller}-0badcafe")
    external, request_id, sample = parse_request_id(req)
    assert len(req) < MAX_ID_CHARS and sample == 2 and external == f"chatcmpl-{request_id}"
    assert request_id.startswith("a" * 200 + "~") and len(request_id) == 217
    assert wire_id(f"2_chatcmpl-{caller[:-1]}b-0badcafe") != req  # another id, another hash
    assert wire_id("chatcmpl-short-0badcafe") == "chatcmpl-short-0badcafe"


def test_a_step_too_big_for_one_slots_metadata_loses_no_rows(tmp_path):
    """2,000 decoding requests with 200-character ids in one step (~500 kB of metadata) and as many
    finishing: spread over slots, every row and every finish arrives, nothing counted as dropped."""
    n = 2000
    spec = RingSpec(slots=256, slot_rows=4096, d_model=8, layers=(0,), dtype=torch.float32)
    writer = RingWriter(tmp_path / "r.ring", spec)
    reader = RingReader(writer.path)
    segs = decode_step(n, id_chars=200)
    rows = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 8)
    _Publisher(writer).publish(1, segs, [s.req for s in segs], [rows], time.time(), np.arange(n, dtype=np.int32))
    slots = reader.poll(256)
    counters = writer.counters()
    assert counters["dropped_slots"] == 0 and counters["errors"] == 0 and len(slots) > 8
    got = {}
    for slot in slots:
        assert len(slot.meta.to_bytes()) <= spec.meta_bytes
        for s in slot.meta.segments:
            got[s.req] = (s.start, float(slot.rows[0][s.row, 0]), int(slot.token_ids[s.row]))
    assert got == {s.req: (s.start, float(i), i) for i, s in enumerate(segs)}  # each row with its request
    finished = [r for slot in slots for r in slot.meta.finished]
    assert sorted(finished) == sorted(s.req for s in segs)
    writer.close()
