"""The Kafka sink's disk spool: is draining linear, and what does a backlog cost on disk?

    python bench/spool.py [--sizes 10000 100000] [--json OUT]

For each size N: the sink spools N alert events (~1 KiB each, the size of a real alert event) with
the broker down (its write rate: events/s with an fsync per batch), then the real test broker
(tansu) comes up and the same sink drains the backlog (events/s until Kafka acknowledged the last
one, timed from its first acknowledgement). Linear draining shows as the same events/s at every size; the previous format (a file per
event, the folder listed before every send) fell with N. Disk use is the spool's allocated blocks
at its peak, per event.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from monitor.config.models import Kafka
from monitor.sinks.kafka import KafkaSink
from monitor.stack.kafka_broker import TansuBroker
from monitor.stack.vllm_server import free_port

TOPIC = "misalignment-monitor.alerts"


def one(n: int, root: Path) -> dict:
    port = free_port()
    cfg = Kafka(enabled=True, bootstrap_servers=[f"127.0.0.1:{port}"], topic=TOPIC, spool_dir=str(root / f"spool-{n}"),
                queue_size=n, spool_max_bytes=8 << 30)
    sink = KafkaSink(cfg, retry_every=0.5)
    sink._healthy = False  # the broker is down from the start: skip the first (5 s) try
    pad = "x" * 800
    t0 = time.perf_counter()
    for i in range(n):
        while not sink.submit({"id": f"ev-{i}", "subject": f"req-{i % 97}", "data": {"seq": i, "pad": pad}}):
            time.sleep(0.001)  # the memory queue is full: the spool is behind
    while len(sink.spool) < n:
        time.sleep(0.01)
    spool_s = time.perf_counter() - t0
    disk = sink.stats().spool_bytes
    broker = TansuBroker(port=port).start()
    broker.create_topic(TOPIC)
    while not sink.counters.sent:  # the sink retries on its own back-off: timed from its first acknowledgement
        time.sleep(0.001)
    t0, first = time.perf_counter(), sink.counters.sent
    while sink.counters.sent < n:
        time.sleep(0.01)
    drain_s = time.perf_counter() - t0
    n_timed = n - first
    sink.close()
    broker.stop()
    return {"events": n, "spool_events_per_s": round(n / spool_s), "drain_events_per_s": round(n_timed / drain_s),
            "drain_s": round(drain_s, 2), "disk_bytes_per_event": round(disk / n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.sizes:
            rows.append(one(n, Path(d)))
            print(json.dumps(rows[-1]), flush=True)
    small, large = rows[0], rows[-1]
    ratio = large["drain_s"] / small["drain_s"]
    print(f"drain time x{ratio:.1f} for x{large['events'] / small['events']:.0f} the events "
          f"(linear: equal; quadratic: the square)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "drain_time_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
