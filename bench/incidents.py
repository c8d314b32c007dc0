"""What incidents cost the sidecar: tracing on vs off, and the work done per incident.

    python bench/incidents.py [--rounds 5] [--slots 400] [--events 2000] [--json OUT]

1. The whole sidecar loop (demo SAE, probes and detectors, one thread) on decode-shaped slots (32
   requests x 1 row) and prefill-shaped slots (1 request x 128 rows), with `incidents.enabled` off
   and on, alternating within each round (this machine is noisy); reported as rows/s and as the
   on/off ratio of the medians. No request finishes while timed: this is the tracing itself.
2. Per incident: the feature context (full encode of the evidence rows: 5 evidence tokens with one
   token either side, for each of two fired detectors = up to 30 rows), for the demo SAE (576 x
   4096) and a random JumpReLU SAE of an 8B model's shape (4096 x 16384); and building the incident
   event for a 512-token trace.
3. The ingester: incident events (a 64-token trace each) produced to the test broker, consumed by
   `monitor incidents ingest`'s consumer group and stored, in events/s, into SQLite and into
   PostgreSQL (Debian's, started here with fsync off, as in the tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def loop_rate(enabled: bool, n_req: int, rows_per: int, slots: int) -> float:
    from capture_helpers import capture_config
    from monitor.config import load_config
    from monitor.sidecar.loop import Sidecar
    from monitor.transport.meta import Segment, SlotMeta
    from monitor.transport.ring import RingSpec, RingWriter

    with tempfile.TemporaryDirectory() as d:
        cfg = capture_config(Path(d), detectors=True)
        doc = yaml.safe_load(cfg.read_text())
        doc["incidents"] = {"enabled": enabled}
        cfg.write_text(yaml.safe_dump(doc))
        side = Sidecar(load_config(cfg), device="cpu")
        ring = RingWriter(Path(d) / "test-bench.ring", RingSpec(slots=slots + 1, slot_rows=128, d_model=576,
                                                                 layers=(15,), dtype=torch.bfloat16))
        side.discover()
        x = torch.randn(n_req * rows_per, 576, dtype=torch.bfloat16) * 3
        ids = np.arange(n_req * rows_per, dtype=np.int32)
        for step in range(slots):
            segs = tuple(Segment(f"r{i}", f"chatcmpl-r{i}", f"r{i}", 0, 1 + step * rows_per, rows_per, 10**6,
                                 i * rows_per) for i in range(n_req))
            ring.publish(step, SlotMeta(segs), [x], ids)
        t = time.perf_counter()
        while side.poll_once():
            pass
        dt = time.perf_counter() - t
        ring.close()
        side.close()
    return slots * n_req * rows_per / dt


def context_ms(d_in: int, d_sae: int, rows: int, repeat: int = 20) -> float:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    from monitor.scoring.context import ContextEncoder

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    enc = ContextEncoder("bench", 0, lambda: sae)
    x = torch.randn(rows, d_in)
    enc.top(x, 5)  # the first incident loads the SAE; time the steady state
    t = time.perf_counter()
    for _ in range(repeat):
        enc.top(x, 5)
    return (time.perf_counter() - t) / repeat * 1e3


def demo_context_ms(rows: int, repeat: int = 20) -> float:
    from sae_lens import SAE

    from monitor.scoring.context import ContextEncoder

    enc = ContextEncoder("demo", 15, lambda: SAE.load_from_disk(ROOT / "artifacts/demo/sae-l15"))
    x = torch.randn(rows, 576) * 3
    t = time.perf_counter()
    enc.top(x, 5)
    first = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    for _ in range(repeat):
        enc.top(x, 5)
    return first, (time.perf_counter() - t) / repeat * 1e3


def event_ms(tokens: int = 512, repeat: int = 10) -> tuple[float, int]:
    from monitor.config.models import DetectorSpec
    from monitor.detectors.trace import FeatureContext, Incident, TraceArrays
    from monitor.detectors.updates import DetectorUpdate
    from monitor.sinks.incidents import IncidentBuilder

    spec = DetectorSpec.model_validate({"name": "pii-probe", "concept": "pii", "inputs": [{"probe": "pii"}],
                                        "aggregation": {"kind": "mean"}, "threshold": 0.5})
    rng = np.random.default_rng(0)
    pos = np.arange(tokens)
    top = tuple((0.9, int(p), {"pii/score": 2.0}) for p in rng.choice(tokens, 5, replace=False))
    update = DetectorUpdate("r", "r", "chatcmpl-r", 0, spec, 0.8, True, "a-1", 40, top, False, True)
    evidence = update.evidence
    inputs = {f"demo-l15/{i}": rng.random(tokens) for i in range(3)} | {"pii/score": rng.normal(size=tokens)}
    trace = TraceArrays(pos, pos.astype(np.int32), inputs, {"pii-probe": (pos[1:], rng.random(tokens - 1))})
    context = tuple(FeatureContext(int(e.position), "demo-l15", tuple((i, 1.0) for i in range(5))) for e in evidence)
    inc = Incident("r", "r", "chatcmpl-r", 0, 40, (update,), trace, context, 0, 0, time.time())
    b = IncidentBuilder(model="m", deployment="bench")
    t = time.perf_counter()
    for _ in range(repeat):
        event = b.build(inc)
    return (time.perf_counter() - t) / repeat * 1e3, len(json.dumps(event, separators=(",", ":")))


def ingest_rate(url: str, n: int, tmp: Path) -> float:
    import threading
    import uuid

    from monitor.config.models import MonitorConfig
    from monitor.stack.kafka_broker import TansuBroker
    from monitor.store.db import Store
    from monitor.store.ingest import Ingester
    from test_store import encoded, events_for, produce

    with TansuBroker(log_path=tmp / "tansu.log") as broker:
        cfg = MonitorConfig.model_validate({
            "sinks": {"kafka": {"enabled": True, "bootstrap_servers": [broker.bootstrap]}},
            "store": {"consumer_group": f"bench-{uuid.uuid4().hex[:6]}", "max_poll_interval_ms": 3000,
                      "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}})
        for topic in (cfg.sinks.kafka.topic, cfg.sinks.kafka.incident_topic):
            broker.create_topic(topic)
        produce(broker, [m for m in encoded([events_for(f"b-{i}") for i in range(n)]) if "incidents" in m[0]])
        store = Store(url)
        ing = Ingester(cfg, store)
        stop = threading.Event()
        t = threading.Thread(target=ing.run, args=(stop,), daemon=True)
        t.start()
        while (first := store.counts()["incidents"]) == 0:  # the group join (seconds on the test broker) is not timed
            time.sleep(0.01)
        t0 = time.perf_counter()
        while store.counts()["incidents"] < n:
            time.sleep(0.05)
        dt = time.perf_counter() - t0
        stop.set()
        t.join(timeout=20)
        store.close()
    return (n - first) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slots", type=int, default=400)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: dict = {"loop_rows_per_s": {}, "ratio_on_off": {}}
    for shape, (n_req, rows_per) in {"decode": (32, 1), "prefill": (1, 128)}.items():
        runs = {False: [], True: []}
        for r in range(args.rounds):
            for enabled in ((False, True) if r % 2 == 0 else (True, False)):
                runs[enabled].append(loop_rate(enabled, n_req, rows_per, args.slots))
            print(f"[bench] {shape} round {r + 1}/{args.rounds}: off {runs[False][-1]:,.0f} rows/s, "
                  f"on {runs[True][-1]:,.0f} rows/s", flush=True)
        off, on = statistics.median(runs[False]), statistics.median(runs[True])
        out["loop_rows_per_s"][shape] = {"off": off, "on": on}
        out["ratio_on_off"][shape] = on / off
    first, steady = demo_context_ms(30)
    out["context_ms_demo_sae_30_rows"] = {"first_incident_incl_load": first, "steady": steady}
    out["context_ms_4096x16384_30_rows"] = context_ms(4096, 16384, 30)
    out["event_ms_512_tokens"], out["event_bytes_512_tokens"] = event_ms()
    from postgres_helpers import Postgres, binaries

    with tempfile.TemporaryDirectory() as d:
        out["ingest_events_per_s"] = {"sqlite": ingest_rate(f"sqlite:///{d}/bench.sqlite", args.events, Path(d))}
        if binaries() is not None:
            pg = Postgres(binaries())
            try:
                out["ingest_events_per_s"]["postgresql"] = ingest_rate(pg.create_database("bench"), args.events, Path(d))
            finally:
                pg.close()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
