"""Soak: mixed traffic through a real `monitor sidecar` process into a real Kafka-protocol broker, with a
broker bounce and a sidecar restart in the middle. Afterwards, is every fired alert in Kafka or counted?

    python bench/soak.py [--duration 600] [--rate 20] [--min-requests N] [--json OUT]

A producer writes finished requests into a real ring (the tiny monitor of the service tests: one SAE
feature, detector `feat` fires at 5); about one in four is made to fire. At 1/3 of the run the broker
(tansu, memory storage) stops for a tenth of the run; the events it had are read first, since a
restarted tansu starts empty. At 2/3 the sidecar is stopped (SIGTERM, as a rolling update does) and
started again. A consumer then reads every event; fired requests are matched, by request id, against
the alerts received (deduplicated by event id) and the sidecar's loss counters. The sidecar's RSS,
threads and open files are sampled every few seconds after its restart, to show they stay flat.

The bounce and the restart take their time out of the traffic's (on a slow machine, most of a short run);
`--min-requests` keeps the traffic going past `--duration` until that many requests were made.

`tests/chaos/test_soak.py` runs it for 60 s and asserts the outcome; here it prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny monitor of the service tests: one feature, one detector

from sidecar_helpers import publish_request, tiny_monitor  # noqa: E402

from monitor.config.models import Kafka  # noqa: E402
from monitor.stack.kafka_broker import TansuBroker  # noqa: E402
from monitor.stack.vllm_server import free_port  # noqa: E402
from monitor.transport.ring import RingSpec, RingWriter  # noqa: E402

TOPIC = Kafka().topic


def consume(bootstrap: str, settle: float = 3.0) -> list[dict]:
    """Every alert event on the broker now (read until nothing new comes for `settle` seconds)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    # Every partition: a topic auto-created by the sidecar's producer after the bounce may have several.
    tps = [TopicPartition(TOPIC, p) for p in sorted(c.partitions_for_topic(TOPIC) or {0})]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    out, quiet_since = [], time.time()
    while time.time() - quiet_since < settle:
        batch = [m for msgs in c.poll(timeout_ms=500).values() for m in msgs]
        if batch:
            quiet_since = time.time()
        out += [json.loads(m.value) for m in batch]
    c.close()
    return out


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[key] = s.value
    return out


def proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    field = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    field = {k: v.split()[0] for k, v in field.items() if v.split()}
    # RssFile / RssShmem hold the ring's pages this process has touched (a file or /dev/shm): they grow to the
    # ring's size while the producer first goes round it (~1.4 MB/s here), then stay. A leak is RssAnon.
    return {"rss_kib": int(field["VmRSS"]), "anon_kib": int(field["RssAnon"]), "file_kib": int(field["RssFile"]),
            "shmem_kib": int(field["RssShmem"]),
            "threads": int(field["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class SidecarProcess:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "sidecar", "--config", str(self.config)],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            try:
                if scrape(self.port).get("misalignment_monitor_rings_attached", 0) >= 1:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the sidecar did not come up: see {self.log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def wait_drained(port: int, ring: RingWriter, timeout: float = 60.0) -> dict[str, float]:
    """Until the sidecar has read every slot published so far and sent every event it made of them.

    The sidecar gives a slot back only after scoring it (and queueing its alerts), so the ring's read position
    says every alert was made. Queue and spool empty on two scrapes a beat apart, since an event the sender
    has just taken off its queue is, for an instant, in neither."""
    deadline, quiet = time.time() + timeout, 0
    while True:
        m = scrape(port)
        c = ring.counters()
        done = (c["reader_seq"] >= c["published_slots"] and m.get("misalignment_monitor_kafka_spool_events", 1) == 0
                and m.get("misalignment_monitor_kafka_queue_events", 1) == 0)
        quiet = quiet + 1 if done else 0
        if quiet >= 2 or time.time() > deadline:
            return m
        time.sleep(0.3)


def run(duration: float, rate: float, folder: Path, min_requests: int = 0) -> dict:
    port = free_port()
    broker = TansuBroker(log_path=folder / "tansu.log").start()
    broker.create_topic(TOPIC)
    cfg = tiny_monitor(folder, {"kafka": {"enabled": True, "bootstrap_servers": [broker.bootstrap],
                                          "spool_dir": str(folder / "spool")},
                                "prometheus": {"port": port}})
    doc = yaml.safe_load(cfg.read_text())
    doc["transport"]["slots"] = 512  # room for the requests made while the sidecar restarts
    cfg.write_text(yaml.safe_dump(doc))
    ring = RingWriter(folder / "rings/k-soak.ring", RingSpec(slots=512, slot_rows=8, d_model=16, layers=(2,),
                                                          dtype=torch.float32))
    sidecar = SidecarProcess(cfg, port, folder / "sidecar.log")
    try:
        return _traffic(duration, rate, port, broker, ring, sidecar, min_requests)
    finally:  # whatever happened, leave no sidecar or broker running behind
        if sidecar.proc is not None and sidecar.proc.poll() is None:
            sidecar.proc.kill()
            sidecar.proc.wait()
        broker.stop()
        ring.close()


def _traffic(duration: float, rate: float, port: int, broker: TansuBroker, ring: RingWriter,
             sidecar: SidecarProcess, min_requests: int) -> dict:
    sidecar.start()
    fired, made, received, samples, losses = set(), 0, [], [], {}
    t0 = time.time()
    events = {"bounce_at": duration / 3, "back_at": duration / 3 + duration / 10, "restart_at": 2 * duration / 3}
    bounced = back = restarted = False
    next_sample = 0.0
    while (now := time.time() - t0) < duration or made < min_requests:
        fire = made % 4 == 0
        rid = f"soak-{made}"
        publish_request(ring, [0.0, 9.0 if fire else 1.0, 0.5], req=rid)
        if fire:
            fired.add(rid)
        made += 1
        if not bounced and now >= events["bounce_at"]:
            wait_drained(port, ring)
            received += consume(broker.bootstrap)  # a restarted tansu starts empty: read what it had
            broker.stop()
            bounced = True
        if bounced and not back and now >= events["back_at"]:
            broker.start()
            try:
                broker.create_topic(TOPIC)
            except Exception as e:  # noqa: BLE001 - the sidecar's producer may have made it first
                if "TopicAlreadyExists" not in type(e).__name__:
                    raise
            back = True
        if not restarted and now >= events["restart_at"]:
            m = scrape(port)
            for k, v in m.items():  # what the first sidecar counted as lost (its counters end with it)
                if k.startswith("misalignment_monitor_kafka_events_dropped_total"):
                    losses[k] = losses.get(k, 0) + v
            # SIGTERM lets the loop finish the slots it holds and the sender spool what it has not sent; the
            # next sidecar sends the spool. Nothing needs draining first: a rolling update would not wait either.
            sidecar.stop()
            sidecar.start()
            restarted, next_sample = True, now + 2
        if restarted and now >= next_sample:
            samples.append({"t": round(now, 1), **proc_stats(sidecar.proc.pid)})
            next_sample = now + max(2.0, duration / 60)
        time.sleep(1.0 / rate)
    final = wait_drained(port, ring, timeout=120)
    for k, v in final.items():
        if k.startswith("misalignment_monitor_kafka_events_dropped_total"):
            losses[k] = losses.get(k, 0) + v
    received += consume(broker.bootstrap)
    ready = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read())
    counters = ring.counters()
    sidecar.stop()
    alerts = {e["id"]: e for e in received}
    alerted = {e["subject"] for e in alerts.values() if not e["data"].get("final")}
    return {"duration_s": duration, "ran_s": round(time.time() - t0, 1), "requests": made, "fired": len(fired),
            "alerted_requests": len(alerted & fired),
            "missing": sorted(fired - alerted), "unexpected": sorted(alerted - fired),
            "events_received": len(received), "events_unique": len(alerts), "kafka_lost": sum(losses.values()),
            "kafka_lost_by_reason": losses, "ring_dropped_slots": counters["dropped_slots"], "ring": counters,
            "readyz": ready, "process": samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=20.0, help="requests per second")
    ap.add_argument("--min-requests", type=int, default=0, help="go on past --duration until this many were made")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        result = run(args.duration, args.rate, Path(d), args.min_requests)
    print(json.dumps({k: v for k, v in result.items() if k != "process"}))
    for s in result["process"]:
        print(json.dumps(s))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
