"""Faults of the Kafka sink's disk spool: every accepted alert reaches a real Kafka consumer, or is counted.

Each test plays what an operator would meet: a power cut's leftovers, a stray file, two sidecars on
one folder, a full disk, a bug in the sender, a SIGKILL. The broker is the real test broker (tansu).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from monitor.config.models import Kafka
from monitor.sinks.kafka import KafkaSink
from monitor.sinks.spool import DB_NAME, QUARANTINE, Spool, SpoolError

TOPIC = "misalignment-monitor.alerts"


def event(i: int, pad: int = 0) -> dict:
    return {"specversion": "1.0", "id": f"ev-{i}", "subject": f"req-{i % 7}", "type": "test", "source": "/chaos",
            "data": {"seq": i, "pad": "x" * pad}}


def consume_ids(bootstrap: str, expect: int, timeout: float = 60.0) -> list[str]:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    tp = TopicPartition(TOPIC, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    out: list[str] = []
    deadline = time.time() + timeout
    while len(set(out)) < expect and time.time() < deadline:
        for msg in c.poll(timeout_ms=500).get(tp, []):
            out.append(json.loads(msg.value)["id"])
    c.close()
    return out


def until(cond, timeout: float = 60.0) -> bool:
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return cond()


def cfg_for(bootstrap: str, spool: Path, **kw) -> Kafka:
    return Kafka(enabled=True, bootstrap_servers=[bootstrap], topic=TOPIC, spool_dir=str(spool), **kw)


def test_power_cut_leftovers_are_quarantined_and_delivery_goes_on(broker, tmp_path):
    """A zero-byte event file and a damaged database (what a power cut leaves) do not stop delivery."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / f"{0:020d}.json").write_bytes(b"")  # the old format's empty file
    (spool / f"{1:020d}.json").write_text(json.dumps({"key": "req-1", "topic": TOPIC, "event": event(1)}))
    (spool / "notes.txt").write_text("an operator's stray file")
    sink = KafkaSink(cfg_for(broker.bootstrap, spool), retry_every=0.2)
    for i in range(2, 12):
        sink.submit(event(i))
    assert until(lambda: sink.counters.sent == 11)
    stats = sink.stats()
    sink.close()
    assert stats.quarantined == 1 and stats.sender_up and stats.sender_errors == 0
    assert (spool / QUARANTINE).is_dir() and len(list((spool / QUARANTINE).glob("*.json.*[0-9]"))) == 1
    assert set(consume_ids(broker.bootstrap, 11)) == {f"ev-{i}" for i in range(1, 12)}
    # Now the database itself is garbage: it is moved aside, counted, and a fresh spool delivers.
    (spool / DB_NAME).write_bytes(os.urandom(8192))
    sink = KafkaSink(cfg_for(broker.bootstrap, spool), retry_every=0.2)
    sink.submit(event(12))
    assert until(lambda: sink.counters.sent == 1)
    assert sink.stats().quarantined == 1
    sink.close()
    assert "ev-12" in consume_ids(broker.bootstrap, 12)


def test_the_spool_is_private_and_owned_by_one_sidecar(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o755)
    os.chmod(spool, 0o755)
    first = Spool(spool, 1 << 20)
    assert (spool.stat().st_mode & 0o777) == 0o700 and ((spool / DB_NAME).stat().st_mode & 0o777) == 0o600
    with pytest.raises(SpoolError, match=f"{spool} is in use by another sidecar \\(pid {os.getpid()}\\)"):
        Spool(spool, 1 << 20)
    first.close()
    Spool(spool, 1 << 20).close()  # free again once the first one closed


def test_the_sender_survives_its_own_errors(broker, tmp_path, monkeypatch):
    sink = KafkaSink(cfg_for(broker.bootstrap, tmp_path / "spool"), retry_every=0.2)
    real_head = sink.spool.head
    calls = {"n": 0}

    def failing_head(n):
        calls["n"] += 1
        if calls["n"] <= 3:
            raise OSError("injected: the disk hiccuped")
        return real_head(n)

    monkeypatch.setattr(sink.spool, "head", failing_head)
    for i in range(5):
        sink.submit(event(i))
    assert until(lambda: sink.counters.sent == 5, timeout=30)
    stats = sink.stats()
    sink.close()
    assert stats.sender_errors == 3 and stats.sender_up
    assert set(consume_ids(broker.bootstrap, 5)) == {f"ev-{i}" for i in range(5)}


def fill_up(path: Path) -> None:
    """Write to `path` until the disk is full (ENOSPC)."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def test_a_full_disk_counts_what_it_loses(tmpfs):
    """ENOSPC on the spool's disk (cap set far above the disk): events spool until the disk is full, the rest
    are counted as lost to `disk_full`; the sender lives on, and what was spooled stays readable."""
    small_tmpfs = tmpfs("256k")
    cfg = cfg_for("127.0.0.1:1", small_tmpfs / "spool", spool_max_bytes=64 << 20)
    sink = KafkaSink(cfg, retry_every=600)
    n = 400
    for i in range(n):
        sink.submit(event(i, pad=900))
    assert until(lambda: len(sink.spool) + sink.counters.dropped_disk_full == n, timeout=90)
    stats = sink.stats()
    sink.close()
    assert stats.dropped_disk_full > 0 and stats.spool_events > 0 and stats.sender_up
    assert stats.spool_events + stats.dropped_disk_full == n
    # The restart meets the disk as full as the sidecar left it (closing may free a little: fill that too).
    # Whether SQLite then needs a page it cannot have depends on the state its log was left in, so both
    # outcomes occur; what must never happen is the events being moved aside as if damaged, or lost.
    fill_up(small_tmpfs / "filler")
    try:
        in_place = Spool(cfg.spool_dir, cfg.spool_max_bytes)
    except SpoolError as e:
        assert "cannot be opened: database or disk is full (free space" in str(e)
    else:
        assert len(in_place) == stats.spool_events and in_place.quarantined == 0
        in_place.close()
    assert not (Path(cfg.spool_dir) / QUARANTINE).exists()
    moved = small_tmpfs.parent / "moved"  # where an operator with more room would look at it
    subprocess.run(["cp", "-a", cfg.spool_dir, str(moved)], check=True)
    reopened = Spool(moved, cfg.spool_max_bytes)
    assert len(reopened) == stats.spool_events and reopened.head(1)[0].key == "req-0"
    assert reopened.quarantined == 0
    reopened.close()


CHILD = textwrap.dedent("""
    import json, sys, time
    from monitor.config.models import Kafka
    from monitor.sinks.kafka import KafkaSink
    spool, n = sys.argv[1], int(sys.argv[2])
    sink = KafkaSink(Kafka(enabled=True, bootstrap_servers=["127.0.0.1:1"], topic="misalignment-monitor.alerts",
                           spool_dir=spool), retry_every=600)
    for i in range(n):
        sink.submit({"id": f"ev-{i}", "subject": f"req-{i % 7}", "data": {"seq": i}})
    while len(sink.spool) < n:  # on disk: accepted
        time.sleep(0.01)
    print("accepted", len(sink.spool), flush=True)
    time.sleep(600)
""")


def test_sigkill_loses_no_accepted_event(broker, tmp_path):
    """The sidecar is SIGKILLed with the broker down: every event it had accepted is delivered by the next one."""
    spool = tmp_path / "spool"
    n = 300
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(spool), str(n)], stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().split()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert line == ["accepted", str(n)]
    sink = KafkaSink(cfg_for(broker.bootstrap, spool), retry_every=0.2)
    assert until(lambda: sink.counters.sent == n)
    sink.close()
    got = consume_ids(broker.bootstrap, n)
    assert set(got) == {f"ev-{i}" for i in range(n)}
    seqs = [int(i.split("-")[1]) for i in got]
    assert seqs == sorted(seqs)  # spooled order kept


def test_a_spool_write_error_sends_directly_or_counts(broker, tmp_path, monkeypatch):
    """An I/O error writing the spool (not a full disk): the events go straight to Kafka when it is up."""
    sink = KafkaSink(cfg_for(broker.bootstrap, tmp_path / "spool"), retry_every=0.2)

    def broken(entries):
        raise OSError("injected: EIO")

    monkeypatch.setattr(sink.spool, "append", broken)
    for i in range(4):
        sink.submit(event(i))
    assert until(lambda: sink.counters.sent == 4, timeout=30)
    stats = sink.stats()
    sink.close()
    assert stats.dropped_spool_error == 0 and stats.sender_up
    assert set(consume_ids(broker.bootstrap, 4)) == {f"ev-{i}" for i in range(4)}
