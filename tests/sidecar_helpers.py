"""A tiny monitor (one ReLU SAE feature, one detector) over a real ring, for service-level tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
import yaml
from sae_lens import SAE, StandardSAEConfig

from monitor.transport.meta import Segment, SlotMeta
from monitor.transport.ring import RingSpec, RingWriter

D = 16


def tiny_monitor(tmp_path: Path, sinks: dict, severity: str = "critical", shadow: bool = False,
                 tiered: float | None = None) -> Path:
    """Feature 3 of a 16->8 ReLU SAE is relu(x[0]); detector `feat` fires when its max reaches 5 (with
    `shadow`, so does `feat-shadow`, the same detector in shadow mode; with `tiered`, `feat-tiered` records at
    2 and pages at `tiered`)."""
    sae = SAE.from_dict(StandardSAEConfig(d_in=D, d_sae=8, apply_b_dec_to_input=False).to_dict())
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 3] = 1.0
        sae.b_enc.zero_()
    sae.save_model(tmp_path / "sae")
    (tmp_path / "det").mkdir()
    (tmp_path / "det/f.yaml").write_text(yaml.safe_dump({
        "name": "feat", "concept": "c", "inputs": [{"sae": "s", "feature": 3}], "aggregation": {"kind": "max"},
        "threshold": 5.0, "severity": severity}))
    if shadow:
        (tmp_path / "det/g.yaml").write_text(yaml.safe_dump({
            "name": "feat-shadow", "concept": "c", "inputs": [{"sae": "s", "feature": 3}], "aggregation": {"kind": "max"},
            "threshold": 5.0, "severity": severity, "mode": "shadow"}))
    if tiered is not None:
        (tmp_path / "det/t.yaml").write_text(yaml.safe_dump({
            "name": "feat-tiered", "concept": "c", "inputs": [{"sae": "s", "feature": 3}], "aggregation": {"kind": "max"},
            "record_threshold": 2.0, "threshold": tiered, "severity": severity}))
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "tiny", "num_layers": 4, "d_model": D}, "taps": [{"layer": 2}],
        "saes": [{"name": "s", "layer": 2, "path": "sae"}], "detectors": ["det"],
        "transport": {"directory": str(tmp_path / "rings"), "name": "k"},
        "sinks": sinks, "deployment": {"name": "unit"}}))
    return cfg


def open_ring(tmp_path: Path) -> RingWriter:
    return RingWriter(tmp_path / "rings/k-x.ring", RingSpec(slots=16, slot_rows=8, d_model=D, layers=(2,),
                                                           dtype=torch.float32))


def start_service(cfg: Path, ring: RingWriter, **options) -> tuple[threading.Thread, threading.Event]:
    """`monitor sidecar`'s service in a thread (`options`: run_sidecar's, e.g. decisions=PATH), returned once it
    reads the ring."""
    from monitor.sidecar.service import run_sidecar

    stop = threading.Event()
    service = threading.Thread(target=run_sidecar, args=(cfg,), kwargs={"stop": stop, "watch_every": 0.2, **options},
                               daemon=True)
    service.start()
    deadline = time.time() + 30
    while ring.counters()["reader_seq"] == 0:
        assert time.time() < deadline, "the sidecar never attached to the ring"
        ring.publish(0, SlotMeta(), None)
        time.sleep(0.2)
    return service, stop


def publish_request(ring: RingWriter, x0: list[float], req: str = "abc", n_prompt: int = 2) -> None:
    """One finished request whose feature-3 activations are `x0`, from one forward pass."""
    x = torch.zeros(len(x0), D)
    x[:, 0] = torch.tensor(x0)
    internal = f"chatcmpl-{req}-12345678"
    seg = Segment(internal, f"chatcmpl-{req}", req, 0, 0, len(x0), n_prompt, 0)
    ring.publish(1, SlotMeta((seg,), (internal,), time.time()), [x])
