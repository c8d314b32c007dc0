"""Alert latency under load, and the Kafka sink's sustained events/s.

    python bench/alerting.py [--concurrency 4] [--duration 60] [--sink-events 5000] [--json OUT]

1. Latency: vLLM (compiled, the plugin on) serves a steady closed-loop load of concurrent chat
   requests, half of them flagged (personal data, injections) and half benign; the real sidecar
   scores them and publishes alert events to the test broker (tansu); a consumer reads them. For
   every fired event (revision 0): from the end of the forward pass whose rows pushed the detector
   over its threshold (`data.forward_pass_time`, stamped by the plugin) to the event being read by
   the consumer, split into detection (forward pass -> event made) and delivery (made -> read).
   Wall clocks of one machine, so the differences are meaningful.
2. Sink: `KafkaSink` alone against the same broker: events submitted as fast as the queue takes
   them; sent/s while nothing spools (the rate it sustains before spooling).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOPIC = "misalignment-monitor.alerts"


def prompts() -> tuple[list[str], list[str]]:
    flagged, benign = [], []
    for concept in ("pii", "prompt_injection"):
        for line in (ROOT / f"data/concepts/{concept}/test.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["labels"].get(concept) == 1:
                flagged.append(rec["messages"][0]["content"])
    for line in (ROOT / "data/benign/test.jsonl").read_text().splitlines():
        benign.append(json.loads(line)["messages"][0]["content"])
    return flagged, benign


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def stats(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "p50_ms": round(pct(ms, 0.5), 1), "p90_ms": round(pct(ms, 0.9), 1),
            "p99_ms": round(pct(ms, 0.99), 1), "max_ms": round(max(ms), 1), "mean_ms": round(statistics.mean(ms), 1)}


def ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


class Reader:
    """Reads the topic from the start (assigned partition: no group join delay) and stamps arrival."""

    def __init__(self, bootstrap: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                      enable_auto_commit=False, fetch_max_wait_ms=10)
        self.consumer.assign([TopicPartition(TOPIC, 0)])
        self.got: list[tuple[float, dict]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for records in self.consumer.poll(timeout_ms=50).values():
                now = time.time()
                self.got.extend((now, json.loads(r.value)) for r in records)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.consumer.close()


def latency(concurrency: int, duration: float, work: Path) -> dict:
    from monitor.demo import demo_config, runtime_config
    from monitor.model_prep import prepare_model
    from monitor.stack.kafka_broker import TansuBroker
    from monitor.stack.sidecar_process import SidecarProcess
    from monitor.stack.vllm_server import VLLMServer, free_port

    flagged, benign = prompts()
    mix = list(itertools.chain.from_iterable(zip(flagged, benign)))
    model = prepare_model().path
    with TansuBroker(log_path=work / "kafka.log") as broker:
        broker.create_topic(TOPIC)
        metrics_port = free_port()
        cfg = runtime_config(demo_config(), work, broker.bootstrap, metrics_port)
        with SidecarProcess(cfg, metrics_port, work / "sidecar.log"), \
                VLLMServer(model, monitor_config=cfg, log_path=work / "vllm.log") as server:
            reader = Reader(broker.bootstrap)
            counter = itertools.count()
            stop_at = time.time() + duration
            sent = []

            def client(_: int) -> None:
                while time.time() < stop_at:
                    i = next(counter)
                    text = mix[i % len(mix)]
                    body, _ = server.chat([{"role": "user", "content": text}], max_tokens=32, request_id=f"bench-{i}")
                    sent.append(body["usage"]["completion_tokens"])

            print(f"[bench] {concurrency} concurrent clients for {duration:.0f}s ...", flush=True)
            t0 = time.time()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(client, range(concurrency)))
            elapsed = time.time() - t0
            time.sleep(3)  # the last events
            reader.close()
    fired = [(recv, e) for recv, e in reader.got if e["data"]["revision"] == 0 and e["data"]["forward_pass_time"]]
    end_to_end = [recv - ts(e["data"]["forward_pass_time"]) for recv, e in fired]
    detection = [ts(e["time"]) - ts(e["data"]["forward_pass_time"]) for _, e in fired]
    delivery = [recv - ts(e["time"]) for recv, e in fired]
    return {"concurrency": concurrency, "seconds": round(elapsed, 1), "requests": len(sent),
            "generated_tokens_per_s": round(sum(sent) / elapsed, 1), "events_read": len(reader.got),
            "fired_events": len(fired), "forward_pass_to_consumer": stats(end_to_end),
            "forward_pass_to_event": stats(detection), "event_to_consumer": stats(delivery)}


def sink(n: int, work: Path) -> dict:
    from monitor.config.models import Kafka
    from monitor.sinks.kafka import KafkaSink
    from monitor.stack.kafka_broker import TansuBroker

    # An alert-sized event: the sink only needs `subject` (the Kafka key) and serialises the rest.
    event = {"specversion": "1.0", "id": "x", "subject": "r",
             "data": {"tokens": [{"position": i, "score": 0.5, "inputs": []} for i in range(5)]}}
    with TansuBroker(log_path=work / "kafka-sink.log") as broker:
        broker.create_topic(TOPIC)
        s = KafkaSink(Kafka(enabled=True, bootstrap_servers=[broker.bootstrap], topic=TOPIC, queue_size=n + 1,
                            spool_dir=str(work / "spool")))
        s.submit(dict(event, id="warm-up", subject="warm"))
        while s.counters.sent < 1:
            time.sleep(0.01)
        t0 = time.perf_counter()
        for i in range(n):
            s.submit(dict(event, id=str(i), subject=f"req-{i % 64}"))
        submit_s = time.perf_counter() - t0
        while s.counters.sent < n + 1 and s.counters.spooled == 0:
            time.sleep(0.01)
        dt = time.perf_counter() - t0
        s.close()
        c = s.counters
    return {"events": n, "seconds": round(dt, 2), "sent_per_s": round(n / dt, 1), "spooled": c.spooled,
            "send_errors": c.send_errors, "submit_us_per_event": round(submit_s / n * 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--sink-events", type=int, default=5000)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-alerting-"))
    out = {"sink": sink(args.sink_events, work)}
    print(json.dumps(out["sink"]), flush=True)
    if not args.skip_latency:
        out["latency"] = latency(args.concurrency, args.duration, work)
        print(json.dumps(out["latency"], indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
