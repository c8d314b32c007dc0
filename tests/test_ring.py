"""The shared-memory ring: the producer never waits, the reader never takes a torn or stale slot."""

from __future__ import annotations

import multiprocessing as mp
import struct
import time

import numpy as np
import pytest
import torch

from monitor.plugin.capture import _Publisher
from monitor.transport.meta import MetaError, Segment, SlotMeta
from monitor.transport.ring import HEADER_BYTES, RingError, RingReader, RingSpec, RingWriter

SPEC = RingSpec(slots=4, slot_rows=8, d_model=16, layers=(3, 7), dtype=torch.bfloat16, meta_bytes=1024)


def rows(n: int, base: float) -> list[torch.Tensor]:
    return [torch.arange(n * 16, dtype=torch.float32).view(n, 16).to(torch.bfloat16) + base + li for li in range(2)]


@pytest.fixture()
def ring(tmp_path):
    w = RingWriter(tmp_path / "r.ring", SPEC)
    yield w
    w.close()


def test_roundtrip_rows_and_metadata(ring):
    r = RingReader(ring.path)
    assert r.spec == SPEC
    seg = Segment("a", "chatcmpl-a", "a", 0, 0, 5, 3, 0)
    assert ring.publish(1, SlotMeta((seg,), (), 12.5), rows(5, 0.0))
    assert ring.publish(2, SlotMeta(finished=("a",)), None)
    got = r.poll()
    assert [s.step for s in got] == [1, 2]
    assert got[0].meta == SlotMeta((seg,), (), 12.5) and got[1].meta.finished == ("a",)
    assert got[0].token_ids is None and got[1].token_ids is None  # none sent, none invented
    assert ring.publish(3, SlotMeta((seg,)), rows(5, 1.0), np.array([7, 8, 9, 10, 11], dtype=np.int32))
    (with_ids,) = r.poll()
    assert with_ids.token_ids.tolist() == [7, 8, 9, 10, 11] and with_ids.token_ids.dtype == np.int32
    assert torch.equal(got[0].rows[0], rows(5, 0.0)[0]) and torch.equal(got[0].rows[1], rows(5, 0.0)[1])
    assert got[1].rows == [] and r.poll() == []


def test_full_ring_drops_newest_and_counts(ring):
    r = RingReader(ring.path)
    results = [ring.publish(i, SlotMeta(), rows(2, i)) for i in range(6)]
    assert results == [True] * 4 + [False] * 2  # never blocks: the 5th and 6th are dropped
    c = ring.counters()
    assert c["dropped_slots"] == 2 and c["dropped_rows"] == 4 and c["published_rows"] == 8
    assert [s.step for s in r.poll()] == [0, 1, 2, 3]
    assert ring.publish(6, SlotMeta(), rows(2, 6))  # room again once the reader caught up
    assert [s.step for s in r.poll()] == [6]
    assert r.counters()["dropped_slots"] == 2  # the producer's counters reach the reader


def test_no_reader_never_blocks(ring):
    for i in range(100):
        ring.publish(i, SlotMeta(), rows(1, i))
    assert ring.counters()["dropped_slots"] == 96


def test_overwrite_oldest_detects_lost_slots(tmp_path):
    w = RingWriter(tmp_path / "o.ring", RingSpec(**{**SPEC.__dict__, "overwrite": True}))
    r = RingReader(w.path)
    for i in range(10):
        assert w.publish(i, SlotMeta(), rows(1, i))
    got = r.poll()
    assert [s.step for s in got] == [6, 7, 8, 9]
    assert r.lost_slots == 6
    w.close()


def test_torn_slot_is_not_returned(ring):
    r = RingReader(ring.path)
    ring.publish(0, SlotMeta(), rows(1, 0))
    ring.publish(1, SlotMeta(), rows(1, 1))
    # Put sequence 1's slot back in the producer's "being written" state (odd).
    off = HEADER_BYTES + 1 * SPEC.slot_bytes
    struct.pack_into("<Q", ring._m.mm, off, 2 * 1 + 1)
    got = r.poll()
    assert [s.seq for s in got] == [0]  # slot 1 is skipped until complete
    struct.pack_into("<Q", ring._m.mm, off, 2 * 1 + 2)
    assert [s.seq for s in r.poll()] == [1]


def test_restarted_reader_resumes(ring):
    r1 = RingReader(ring.path)
    ring.publish(0, SlotMeta(), rows(1, 0))
    assert len(r1.poll()) == 1
    r1.close()  # the sidecar stops ...
    for i in range(1, 7):
        ring.publish(i, SlotMeta(), rows(1, i))  # ... vLLM keeps going; slots beyond the ring are dropped
    r2 = RingReader(ring.path)  # ... and a new sidecar picks up where the old one left off
    assert [s.step for s in r2.poll()] == [1, 2, 3, 4]
    ring.publish(7, SlotMeta(), rows(1, 7))
    assert [s.step for s in r2.poll()] == [7]


def test_oversized_step_and_bad_file(ring, tmp_path):
    with pytest.raises(RingError, match="exceed the slot size"):
        ring.publish(0, SlotMeta(), rows(9, 0))
    bad = tmp_path / "bad.ring"
    bad.write_bytes(b"x" * 8192)
    with pytest.raises(RingError, match="not a monitor ring"):
        RingReader(bad)


def _produce(path: str, n: int) -> None:
    w = RingWriter(path, RingSpec(slots=16, slot_rows=64, d_model=32, layers=(1,), dtype=torch.float32))
    for i in range(n):
        k = 1 + i % 64
        w.publish(i, SlotMeta(), [torch.full((k, 32), float(i))])
    w.close(unlink=False)


def test_separate_process_producer(tmp_path):
    """A real second process writes as fast as it can; every slot read is intact."""
    path = tmp_path / "p.ring"
    proc = mp.get_context("spawn").Process(target=_produce, args=(str(path), 5000))
    proc.start()
    import time

    deadline = time.time() + 30
    while not path.exists() and time.time() < deadline:
        time.sleep(0.01)
    r = RingReader(path)
    seen = 0
    while True:
        done = not proc.is_alive()
        for s in r.poll(1000):
            assert s.rows[0].shape == (1 + s.step % 64, 32)
            assert bool((s.rows[0] == float(s.step)).all()), "torn slot"
            seen += 1
        if done and r.poll() == []:
            break
    proc.join()
    c = r.counters()
    assert c["closed"] == 1
    assert seen + c["dropped_slots"] + r.lost_slots == 5000 - (c["published_slots"] - r.next_seq)
    assert seen > 0


def test_metadata_roundtrip_and_version_mismatch():
    meta = SlotMeta((Segment("0_chatcmpl-x-1a2b3c4d", "chatcmpl-x", "x", 0, 7, 2, 5, 3),), ("done",), 1.5)
    raw = meta.to_bytes()
    assert SlotMeta.from_bytes(raw) == meta
    newer = raw[:2] + struct.pack("<H", 99) + raw[4:]
    with pytest.raises(MetaError, match="version 99 is not understood .* same release"):
        SlotMeta.from_bytes(newer)
    with pytest.raises(MetaError, match="malformed"):
        SlotMeta.from_bytes(raw[:30])  # cut short
    with pytest.raises(MetaError, match="ids' lengths add up to"):
        SlotMeta.from_bytes(raw + b"x")
    with pytest.raises(MetaError, match="version 2 is not understood"):  # the previous release's JSON
        SlotMeta.from_bytes(b'{"v":2,"segments":[],"finished":[]}')
    with pytest.raises(MetaError, match="neither this release's format nor valid JSON"):
        SlotMeta.from_bytes(b"{not json")


def test_metadata_keeps_odd_ids_and_a_missing_time():
    """Ids are whatever the engine was given: non-ASCII, a lone surrogate, ids that are not a worker's."""
    segs = (Segment("0_chatcmpl-\u00e9t\u00e9-\ud800-1a2b3c4d", "e", "r", 4, 0, 3, 2, 0),
            Segment("plain-id", "plain-id", "plain-id", 0, 5, 1, 5, 3))
    meta = SlotMeta(segs, ("fin-\udfff", "x"), None)
    back = SlotMeta.from_bytes(meta.to_bytes())
    assert back == meta and back.t is None and back.table().ids(0) == ("e", "r", 4)


def test_a_segment_that_claims_more_rows_than_its_slot_is_refused():
    meta = SlotMeta((Segment("a-1a2b3c4d", "a", "a", 0, 0, 1000, 4, 0),), (), 1.0)
    meta.check_rows(1000)
    with pytest.raises(MetaError, match=r"claims rows 0..1000 from position 0, the slot holds 1 rows"):
        meta.check_rows(1)
    with pytest.raises(MetaError, match="claims rows"):
        SlotMeta((Segment("a-1a2b3c4d", "a", "a", 0, 3, -2, 4, 0),), (), 1.0).check_rows(4)


def test_ring_from_another_release_is_refused(ring):
    with open(ring.path, "r+b") as f:  # a writer of format version 1 (metadata as untyped dicts)
        f.seek(8)
        f.write(struct.pack("<I", 1))
    with pytest.raises(RingError, match="ring version 1 is not supported"):
        RingReader(ring.path)


def test_reused_polls_lend_the_rings_own_rows_until_released(tmp_path):
    """Under drop_newest a reader polling with `reuse` gets the slots' rows in place (no copy); the
    producer cannot write a lent slot until the reader releases it (or polls again): lent rows never
    change. At most half the ring is lent, so a slow reader still leaves the producer room."""
    spec = RingSpec(slots=4, slot_rows=2, d_model=3, layers=(0,), dtype=torch.float32)
    w = RingWriter(tmp_path / "lend.ring", spec)
    r = RingReader(w.path)
    for k in range(4):
        assert w.publish(k, SlotMeta(), [torch.full((2, 3), float(k))])
    lent = r.poll(8, reuse=True)
    assert [float(s.rows[0][0, 0]) for s in lent] == [0.0, 1.0]  # half the ring
    base = r._rows[0].data_ptr()
    assert base <= lent[0].rows[0].data_ptr() < base + spec.slots * spec.slot_bytes  # the ring's memory itself
    assert not w.publish(4, SlotMeta(), [torch.full((2, 3), 9.0)])  # two lent, two unread: full, dropped, counted
    assert [float(s.rows[0][0, 0]) for s in lent] == [0.0, 1.0]
    r.release(lent[0].seq)  # done with the first: the producer may write there at once
    assert w.publish(5, SlotMeta(), [torch.full((2, 3), 5.0)])
    assert not w.publish(6, SlotMeta(), [torch.full((2, 3), 6.0)])
    assert float(lent[1].rows[0][0, 0]) == 1.0
    assert [float(s.rows[0][0, 0]) for s in r.poll(8, reuse=True)] == [2.0, 3.0]  # the next poll gives slot 1 back
    assert w.publish(7, SlotMeta(), [torch.full((2, 3), 7.0)])
    assert w.counters()["dropped_slots"] == 2
    r.close()
    w.close()


def test_a_request_whose_end_falls_in_a_dropped_slot_still_ends(tmp_path):
    """The slot that announces a request's end may be dropped (the ring is full): the end rides on the
    next slot that gets through, so the sidecar still closes the request and gives its verdict."""
    spec = RingSpec(slots=2, slot_rows=4, d_model=3, layers=(0,), dtype=torch.float32)
    w = RingWriter(tmp_path / "ends.ring", spec)
    r = RingReader(w.path)
    pub = _Publisher(w)
    row = [torch.ones(1, 3)]
    for step, req in enumerate(("a", "b", "c")):
        pub.publish(step, [Segment(req, req, req, 0, 0, 1, 1, 0)], [], row, 0.0)
    pub.publish(3, [], ["a", "b"], None, 0.0)  # full ring: the slot with both ends is dropped
    assert w.counters()["dropped_slots"] == 2
    assert [s.meta.finished for s in r.poll(8)] == [(), ()]
    pub.publish(4, [Segment("d", "d", "d", 0, 0, 1, 1, 0)], ["c"], row, 0.0)
    (last,) = r.poll(8)
    assert set(last.meta.finished) == {"a", "b", "c"}
    r.close()
    w.close()


def test_an_end_dropped_on_the_last_step_before_a_quiet_spell_still_arrives(tmp_path):
    """vLLM announces ends in a step of their own; if that slot is dropped and no request follows, the
    end is retried once the reader makes room, not left waiting for the next request."""
    spec = RingSpec(slots=2, slot_rows=4, d_model=3, layers=(0,), dtype=torch.float32)
    w = RingWriter(tmp_path / "quiet.ring", spec)
    r = RingReader(w.path)
    pub = _Publisher(w, retry_every=0.01)
    for step, req in enumerate(("a", "b")):
        pub.publish(step, [Segment(req, req, req, 0, 0, 1, 1, 0)], [], [torch.ones(1, 3)], 0.0)
    pub.publish(2, [], ["a", "b"], None, 0.0)  # full ring: dropped, and nothing comes after it
    time.sleep(0.1)
    assert [s.meta.finished for s in r.poll(8)] == [(), ()]  # the reader catches up: room again
    deadline, ends = time.time() + 5, []
    while time.time() < deadline and not ends:
        ends = [e for s in r.poll(8) for e in s.meta.finished]
        time.sleep(0.01)
    assert sorted(ends) == ["a", "b"]
    assert w.counters()["dropped_slots"] == 1
    r.close()
    w.close()


def test_under_overwrite_oldest_reused_polls_copy_out(tmp_path):
    """A producer that may overwrite any slot: the reader copies rows out (into reused buffers) and checks
    the slot was not overwritten meanwhile, as before."""
    spec = RingSpec(slots=2, slot_rows=2, d_model=3, layers=(0,), dtype=torch.float32, overwrite=True)
    w = RingWriter(tmp_path / "copy.ring", spec)
    r = RingReader(w.path)
    w.publish(0, SlotMeta(), [torch.full((2, 3), 1.0)])
    got = r.poll(2, reuse=True)
    w.publish(1, SlotMeta(), [torch.full((2, 3), 2.0)])
    w.publish(2, SlotMeta(), [torch.full((2, 3), 3.0)])  # lands on slot 0's place
    assert float(got[0].rows[0][0, 0]) == 1.0 and not r.lends
    r.close()
    w.close()
