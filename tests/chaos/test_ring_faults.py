"""Whatever a ring holds, the sidecar goes on: bad slots and rings are skipped and counted, dead producers
let go of, replaced rings attached, and a reload that would break scoring refused before it applies.

The sidecar is the real loop over real ring files; each test drives it one poll at a time.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from monitor.config import ConfigError, load_config
from monitor.sidecar import loop as loop_module
from monitor.sidecar.loop import Sidecar
from monitor.transport.meta import SlotMeta
from monitor.transport.ring import HEADER_BYTES, SLOT_HEADER, RingError, RingSpec, RingWriter
from as_user import exit_code_as
from sidecar_helpers import D, publish_request, tiny_monitor


def sidecar_for(tmp_path) -> tuple[Sidecar, list]:
    cfg = tiny_monitor(tmp_path, {"prometheus": {"enabled": False}})
    sidecar = Sidecar(load_config(cfg))
    verdicts: list = []
    sidecar.bus.on_detector(lambda u: verdicts.append((u.request_id, u.fired)) if u.final else None)
    return sidecar, verdicts


def ring(tmp_path, name="k-x.ring", layers=(2,), d_model=D) -> RingWriter:
    return RingWriter(tmp_path / "rings" / name, RingSpec(slots=16, slot_rows=8, d_model=d_model, layers=layers,
                                                          dtype=torch.float32))


def turn(sidecar: Sidecar, polls: int = 3) -> None:
    sidecar.discover()
    for _ in range(polls):
        sidecar.poll_once()


def test_corrupt_slots_are_skipped_and_counted(tmp_path):
    sidecar, verdicts = sidecar_for(tmp_path)
    w = ring(tmp_path)
    turn(sidecar)
    publish_request(w, [0.0, 9.0], req="before")
    publish_request(w, [9.0], req="garbled-meta")
    publish_request(w, [9.0], req="too-many-rows")
    publish_request(w, [0.0, 7.0], req="after")
    b = w._m.mm
    off1, off2 = w._slot_offset(1), w._slot_offset(2)
    b[off1 + SLOT_HEADER : off1 + SLOT_HEADER + 9] = b"{not json"  # metadata a reader cannot parse
    struct.pack_into("<I", b, off2 + 8, 10_000)  # more rows than a slot holds
    turn(sidecar)
    snap = sidecar.snapshot()
    assert verdicts == [("before", True), ("after", True)]  # the loop read on past both
    assert snap.rings.corrupt_slots == 2 and snap.heartbeat_age_s < 5
    sidecar.close()
    w.close()


def test_a_ring_without_the_detectors_layer_is_counted_not_fatal(tmp_path):
    """A producer tapping another layer (or another width): its slots are skipped and counted; a good ring
    beside it is scored as usual, and finished requests on the bad ring still end."""
    sidecar, verdicts = sidecar_for(tmp_path)
    wrong_layer, wrong_width, good = ring(tmp_path, "k-a.ring", layers=(1,)), ring(tmp_path, "k-b.ring", d_model=32), \
        ring(tmp_path, "k-c.ring")
    turn(sidecar)
    assert len(sidecar.readers) == 3
    for w in (wrong_layer, wrong_width):
        w.publish(1, SlotMeta((), (), time.time()), [torch.zeros(2, w.spec.d_model)])
    publish_request(good, [0.0, 9.0], req="good")
    turn(sidecar)
    assert verdicts == [("good", True)]
    assert sidecar.snapshot().stats.slots_skipped == {"unusable_ring": 2}
    sidecar.close()


def test_unreadable_ring_files_are_skipped(tmp_path, caplog):
    sidecar, verdicts = sidecar_for(tmp_path)
    rings = tmp_path / "rings"
    good = ring(tmp_path, "k-good.ring")
    (rings / "k-empty.ring").write_bytes(b"")
    (rings / "k-short.ring").write_bytes(b"MMRING01" + bytes(100))  # a truncated header
    raw = bytearray(Path(good.path).read_bytes()[:HEADER_BYTES])
    struct.pack_into("<I", raw, 36, 99)  # an unknown dtype code
    (rings / "k-dtype.ring").write_bytes(bytes(raw) + bytes(good.spec.file_bytes - HEADER_BYTES))
    for _ in range(3):
        turn(sidecar)
    assert list(sidecar.readers) == [str(good.path)]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3  # each bad file named once, not once a second
    assert any("unknown row dtype code 99" in e for e in errors) and any("truncated" in e for e in errors)
    publish_request(good, [0.0, 9.0], req="good")
    turn(sidecar)
    assert verdicts == [("good", True)]
    sidecar.close()


def test_a_slot_that_raises_is_skipped_and_the_loop_goes_on(tmp_path, monkeypatch):
    sidecar, verdicts = sidecar_for(tmp_path)
    w = ring(tmp_path)
    turn(sidecar)
    real = sidecar.detectors.scorer.score
    calls = {"n": 0}

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(rows)

    monkeypatch.setattr(sidecar.detectors.scorer, "score", flaky)
    publish_request(w, [9.0], req="unlucky")
    publish_request(w, [0.0, 9.0], req="next")
    turn(sidecar)
    snap = sidecar.snapshot()
    assert verdicts == [("next", True)] and snap.stats.slots_skipped == {"error": 1}
    # The unlucky request's rows were lost, but its finish was not: it ended, its state was released.
    assert snap.stats.requests_finished == 2 and snap.requests_in_flight == 0
    sidecar.close()


PRODUCER = textwrap.dedent("""
    import sys, time, torch
    from monitor.transport.ring import RingSpec, RingWriter
    RingWriter(sys.argv[1], RingSpec(slots=16, slot_rows=8, d_model=16, layers=(2,), dtype=torch.float32))
    print("ready", flush=True)
    time.sleep(600)
""")


def test_dead_producers_are_let_go_and_replaced_rings_attached(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "PRODUCER_GRACE_S", 0.2)
    sidecar, verdicts = sidecar_for(tmp_path)
    path = tmp_path / "rings/k-x.ring"
    path.parent.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", PRODUCER, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    turn(sidecar)
    assert list(sidecar.readers) == [str(path)]
    child.send_signal(signal.SIGKILL)  # no atexit: the ring stays, marked open, its producer gone
    child.wait()
    time.sleep(0.3)
    turn(sidecar)
    assert sidecar.readers == {} and path.exists()
    turn(sidecar)
    assert sidecar.readers == {}  # not attached again while nothing changes
    # vLLM restarts and its new ring gets the same name (same pid in a fresh container): attached, read.
    w = RingWriter(path, RingSpec(slots=16, slot_rows=8, d_model=D, layers=(2,), dtype=torch.float32))
    turn(sidecar)
    publish_request(w, [0.0, 9.0], req="after-restart")
    turn(sidecar)
    assert verdicts == [("after-restart", True)]
    # And once more while attached: the file is replaced under the reader's feet.
    w2 = RingWriter(path, RingSpec(slots=16, slot_rows=8, d_model=D, layers=(2,), dtype=torch.float32))
    turn(sidecar)
    publish_request(w2, [0.0, 9.0], req="second-restart")
    turn(sidecar)
    assert verdicts[-1] == ("second-restart", True) and len(sidecar.readers) == 1
    sidecar.close()
    w.close(unlink=False)
    w2.close()


def test_a_reload_that_would_break_scoring_is_refused(tmp_path):
    sidecar, verdicts = sidecar_for(tmp_path)
    w = ring(tmp_path)
    turn(sidecar)
    cfg_path = tmp_path / "m.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    broken = dict(cfg, saes=[dict(cfg["saes"][0], layer=3)], taps=[{"layer": 3}])  # the ring carries layer 2 only
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(ConfigError, match=r"carries layers \[2\], the detectors need \[3\]"):
        sidecar.reload(load_config(tmp_path / "broken.yaml"))
    assert sidecar.detectors.layers == [2]
    # Settings read only at start: the reload applies the rest and says which need a restart.
    later = dict(cfg, sinks={"prometheus": {"enabled": False}, "kafka": {"enabled": True, "spool_dir": "/x"}})
    (tmp_path / "later.yaml").write_text(yaml.safe_dump(later))
    sidecar.reload(load_config(tmp_path / "later.yaml"))
    assert sidecar.snapshot().stats.restart_required == ["sinks"]
    publish_request(w, [0.0, 9.0], req="still-scored")
    turn(sidecar)
    assert verdicts == [("still-scored", True)]
    sidecar.close()
    w.close()


WRITER = textwrap.dedent("""
    import sys, torch
    from monitor.transport.ring import RingError, RingSpec, RingWriter
    try:
        RingWriter(sys.argv[1], RingSpec(slots=64, slot_rows=512, d_model=64, layers=(2,), dtype=torch.bfloat16))
    except RingError as e:
        print("refused:", e)
""")


def test_a_ring_larger_than_its_tmpfs_is_refused_not_a_sigbus(tmpfs):
    """The ring is reserved up front: on a tmpfs too small for it the producer gets an error it can act on
    (the plugin turns its tap off), where a sparse file killed it with SIGBUS at the first write."""
    tiny_shm = tmpfs("1m")
    r = subprocess.run([sys.executable, "-c", WRITER, str(tiny_shm / "k-x.ring")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr  # alive: no SIGBUS (exit 135)
    assert "refused: cannot reserve 8 MiB for the ring" in r.stdout and "lower transport.slots" in r.stdout
    assert list(tiny_shm.iterdir()) == []  # nothing half-made left behind
    with pytest.raises(RingError):
        RingWriter(tiny_shm / "k-y.ring", RingSpec(slots=64, slot_rows=512, d_model=64, layers=(2,)))


def test_ring_files_are_shared_with_the_group_only_when_asked():
    """0660 (the chart: vLLM and the sidecar share a group): a process of another uid in that group can open
    the ring read-write, as the sidecar does; a uid outside the group cannot."""
    if os.geteuid() != 0:
        pytest.skip("switching uid needs root")
    # As Kubernetes makes a pod's emptyDir with an fsGroup: the folder group-owned and group-writable.
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    os.chown(shm, 0, 4242)
    os.chmod(shm, 0o2770)
    path = shm / "k-g.ring"
    w = RingWriter(path, RingSpec(slots=4, slot_rows=2, d_model=8, layers=(2,), dtype=torch.float32), mode=0o660)
    assert path.stat().st_gid == 4242  # inherited from the setgid folder
    assert (path.stat().st_mode & 0o777) == 0o660

    def opens() -> int:
        """Open the ring read-write, as the sidecar's RingReader does."""
        os.close(os.open(path, os.O_RDWR))
        return 0

    same_group, other = exit_code_as(65532, 4242, opens) == 0, exit_code_as(65533, 4343, opens) == 0
    w.close()
    shm.rmdir()
    assert same_group and not other


def test_check_config_refuses_a_ring_larger_than_its_folder(tmpfs, tmp_path):
    tiny_shm = tmpfs("1m")
    cfg = tiny_monitor(tmp_path, {"prometheus": {"enabled": False}})
    doc = yaml.safe_load(cfg.read_text())
    doc["transport"] = {"directory": str(tiny_shm), "name": "k", "slots": 64, "slot_rows": 512}
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"transport.slots: a ring of 64 slots x 512 rows at d_model 16 needs 5 MiB, "
                                          r"more than all of .* \(1 MiB\)"):
        load_config(cfg)
    doc["transport"]["slots"] = 2
    cfg.write_text(yaml.safe_dump(doc))
    load_config(cfg)
