"""The real sidecar loop on CUDA over a real ring: the same scores, verdicts and incidents as on the CPU.

Two rings get the same slots (prefill and decode steps of 24 requests, bfloat16 rows, finishes); one
`Sidecar` scores on the CPU, the other on the GPU (the ring page-locked, rows staged on a side
stream, traces kept on the device). Five detectors cover the aggregations and scopes; thresholds sit
in a wide gap between the requests' CPU scores, so rounding cannot flip a verdict, and about half the
requests fire.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sae_folders import write_sae_folder

from monitor.config import load_config
from monitor.scoring.probe import LinearProbe, ProbeMetadata
from monitor.sidecar.loop import Sidecar
from monitor.transport.meta import Segment, SlotMeta
from monitor.transport.ring import RingSpec, RingWriter

D, D_SAE, LAYER, REQUESTS, PROMPT, DECODE = 256, 1024, 6, 24, 40, 12
DETECTORS = [
    {"name": "feat-max", "inputs": [{"sae": "s", "feature": 3}, {"sae": "s", "feature": 77}],
     "aggregation": {"kind": "max"}},
    {"name": "feat-rolling", "inputs": [{"sae": "s", "feature": f, "weight": 0.5} for f in (5, 9, 200)],
     "combine": "weighted", "aggregation": {"kind": "rolling_mean_max", "window": 4}},
    {"name": "probe-mean-prompt", "inputs": [{"probe": "p"}], "aggregation": {"kind": "mean"}, "scope": "prompt"},
    {"name": "probe-ema-generation", "inputs": [{"probe": "p"}], "aggregation": {"kind": "ema_max", "alpha": 0.3},
     "scope": "generation"},
    {"name": "probe-last-prompt", "inputs": [{"probe": "p"}], "aggregation": {"kind": "last"}, "scope": "prompt"},
]


def artifacts(folder: Path) -> None:
    write_sae_folder(folder / "sae", "jumprelu", D, D_SAE, seed=11)
    g = torch.Generator().manual_seed(12)
    meta = ProbeMetadata(name="p", concept="c", model="gpu-test", layer=LAYER, d_in=D)
    LinearProbe(torch.randn(1, D, generator=g) * D**-0.5, torch.zeros(1), meta).save(folder / "probe")


def write_config(folder: Path, rings: Path, thresholds: dict[str, float], device: str) -> Path:
    det = folder / f"detectors-{device}"
    det.mkdir(exist_ok=True)
    for d in DETECTORS:
        (det / f"{d['name']}.yaml").write_text(yaml.safe_dump({"concept": "c", **d, "threshold": thresholds[d["name"]]}))
    cfg = folder / f"monitor-{device}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": "gpu-test", "num_layers": 8, "d_model": D}, "taps": [{"layer": LAYER}],
        "saes": [{"name": "s", "layer": LAYER, "path": str(folder / "sae")}],
        "probes": [{"name": "p", "path": str(folder / "probe")}], "detectors": [str(det)],
        "scoring": {"device": device}, "transport": {"directory": str(rings), "name": "g"},
        "incidents": {"enabled": True}, "sinks": {"prometheus": {"enabled": False}}, "deployment": {"name": "gpu"}}))
    return cfg


def fill(ring: RingWriter) -> None:
    """Prefill 6 requests a slot, then decode all of them together; each finishes after its last step. A
    request's rows lean along a direction of its own, so requests score apart."""
    g = torch.Generator().manual_seed(13)
    lean = torch.randn(REQUESTS, D, generator=g)
    strength = torch.linspace(0, 3, REQUESTS)
    ids = [f"chatcmpl-q{i}-0000abcd" for i in range(REQUESTS)]
    step = 0

    def seg(i, start, n, row):
        return Segment(ids[i], f"chatcmpl-q{i}", f"q{i}", 0, start, n, PROMPT, row)

    def rows_of(i, n):
        return torch.randn(n, D, generator=g) + strength[i] * lean[i]

    for first in range(0, REQUESTS, 6):
        batch = range(first, first + 6)
        x = torch.cat([rows_of(i, PROMPT) for i in batch]).to(torch.bfloat16)
        segs = tuple(seg(i, 0, PROMPT, PROMPT * k) for k, i in enumerate(batch))
        ring.publish(step, SlotMeta(segs, (), 1.0), [x], np.arange(len(x), dtype=np.int32))
        step += 1
    for t in range(DECODE):
        x = torch.cat([rows_of(i, 1) for i in range(REQUESTS)]).to(torch.bfloat16)
        segs = tuple(seg(i, PROMPT + t, 1, i) for i in range(REQUESTS))
        finished = tuple(ids) if t == DECODE - 1 else ()
        ring.publish(step, SlotMeta(segs, finished, 1.0), [x], np.arange(len(x), dtype=np.int32))
        step += 1


def run(cfg: Path, rings: Path) -> dict:
    spec = RingSpec(slots=64, slot_rows=6 * PROMPT, d_model=D, layers=(LAYER,), dtype=torch.bfloat16)
    writer = RingWriter(rings / "g-test.ring", spec)
    side = Sidecar(load_config(cfg))
    out = {"tokens": {}, "verdicts": {}, "incidents": {}}
    side.bus.on_tokens(lambda t: [out["tokens"].setdefault(h, []).append(v.copy()) for h, v in t.scores.items()])

    def verdict(u):
        if u.final:
            out["verdicts"][(u.req, u.detector.name)] = (u.score, u.fired, u.fired_at)

    side.bus.on_detector(verdict)
    side.bus.on_incident(lambda inc: out["incidents"].__setitem__(inc.req, inc))
    side.discover()
    fill(writer)
    deadline = time.time() + 60
    while len(out["verdicts"]) < REQUESTS * len(DETECTORS) and time.time() < deadline:
        side.poll_once()
    out["registered"] = [r.registered for r in side.readers.values()]
    side.close()
    writer.close()
    out["tokens"] = {h: np.concatenate(v) for h, v in out["tokens"].items()}
    return out


def gap_thresholds(verdicts: dict) -> dict[str, float]:
    """Per detector, the middle of the widest gap between the requests' scores in their middle half."""
    out = {}
    for d in DETECTORS:
        scores = np.sort([s for (_, name), (s, _, _) in verdicts.items() if name == d["name"]])
        lo, hi = len(scores) // 4, 3 * len(scores) // 4
        k = lo + int(np.argmax(np.diff(scores[lo:hi + 1])))
        out[d["name"]] = float((scores[k] + scores[k + 1]) / 2)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shm = tempfile.TemporaryDirectory(dir="/dev/shm")  # where rings live in production (and can be page-locked)
    folder = Path(shm.name)
    artifacts(folder)
    never = {d["name"]: 1e9 for d in DETECTORS}
    (folder / "r0").mkdir()
    first = run(write_config(folder, folder / "r0", never, "cpu"), folder / "r0")
    thresholds = gap_thresholds(first["verdicts"])
    out = {}
    for device in ("cpu", "cuda"):
        (folder / device).mkdir()
        out[device] = run(write_config(folder, folder / device, thresholds, device), folder / device)
    yield out
    shm.cleanup()


def test_the_cuda_loop_reads_a_page_locked_ring(runs):
    assert runs["cuda"]["registered"] == [True] and runs["cpu"]["registered"] == [False]


def test_token_scores_on_cuda_equal_the_cpus(runs):
    cpu, gpu = runs["cpu"]["tokens"], runs["cuda"]["tokens"]
    assert set(cpu) == set(gpu) == {"sae:s", "probe:p"}
    n = REQUESTS * (PROMPT + DECODE)
    for head in cpu:
        assert cpu[head].shape[0] == n == gpu[head].shape[0]
        np.testing.assert_allclose(gpu[head], cpu[head], rtol=2e-3, atol=2e-3)


def test_verdicts_and_incidents_on_cuda_equal_the_cpus(runs):
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert set(cpu["verdicts"]) == set(gpu["verdicts"]) and len(cpu["verdicts"]) == REQUESTS * len(DETECTORS)
    fired = 0
    for key, (score, was_fired, at) in cpu["verdicts"].items():
        g_score, g_fired, g_at = gpu["verdicts"][key]
        assert (g_fired, g_at) == (was_fired, at), key
        assert g_score == pytest.approx(score, rel=2e-3, abs=2e-3), key
        fired += was_fired
    assert 0.25 * len(cpu["verdicts"]) <= fired <= 0.75 * len(cpu["verdicts"])
    assert set(cpu["incidents"]) == set(gpu["incidents"]) and cpu["incidents"]
    for req, inc in cpu["incidents"].items():
        other = gpu["incidents"][req]
        assert [c.position for c in inc.context] == [c.position for c in other.context]
        for a, b in zip(inc.context, other.context):  # the full SAE encode at the evidence tokens, on the GPU
            top_a, top_b = dict(a.features), dict(b.features)
            strongest = max(top_a, key=top_a.get)
            assert strongest in top_b and top_b[strongest] == pytest.approx(top_a[strongest], rel=1e-2)
