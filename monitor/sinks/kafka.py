"""Alert events to Kafka without ever blocking scoring.

`submit()` only puts the event on a bounded in-memory queue. One background thread sends, one
event at a time and synchronously (`acks=all`, idempotent producer, key = request id), so the order
of one request's events is the order they were made. While the broker is unreachable, events go to
an on-disk spool (one file per event, FIFO, bounded in bytes) and are delivered from it, in order,
before anything newer once the broker is back. Events are dropped only when the queue or the spool
is full, and each drop is counted. Delivery is at least once: consumers dedupe on the event id.

Alerts are rare next to tokens, so one synchronous send at a time is affordable, and it makes order
and spooling simple to get right. (The sink's events/s is not benchmarked yet.)
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from monitor.config.models import Kafka

log = logging.getLogger("monitor.kafka")


@dataclass
class KafkaCounters:
    sent: int = 0
    spooled: int = 0
    dropped_queue_full: int = 0
    dropped_spool_full: int = 0
    send_errors: int = 0


@dataclass(frozen=True)
class KafkaStats:
    """The sink's counters and backlog at one moment (what the metrics sink exports)."""

    sent: int
    spooled: int
    dropped_queue_full: int
    dropped_spool_full: int
    send_errors: int
    spool_events: int
    spool_bytes: int
    queue_events: int


class Spool:
    """FIFO of events on disk: `<seq>.json` files, bounded by total bytes."""

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        files = self._files()
        self.bytes = sum(f.stat().st_size for f in files)
        self.count = len(files)
        self.next_seq = int(files[-1].stem) + 1 if files else 0

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("*.json"))

    def __len__(self) -> int:
        return self.count

    def push(self, payload: bytes) -> bool:
        if self.bytes + len(payload) > self.max_bytes:
            return False
        path = self.dir / f"{self.next_seq:020d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, path)  # a crash never leaves half an event under a .json name
        self.next_seq += 1
        self.count += 1
        self.bytes += len(payload)
        return True

    def head(self) -> tuple[Path, bytes] | None:
        files = self._files()
        return (files[0], files[0].read_bytes()) if files else None

    def pop(self, path: Path) -> None:
        self.bytes -= path.stat().st_size
        self.count -= 1
        path.unlink()


def producer_options(cfg: Kafka, base_dir: Path | None = None) -> dict:
    """kafka-python producer settings from the config; secrets come from a file or the environment."""
    return client_options(cfg, base_dir) | {
        "acks": "all", "enable_idempotence": True, "max_block_ms": 5000, "request_timeout_ms": 5000, "retries": 2,
        "retry_backoff_ms": 200,
    }


def client_options(cfg: Kafka, base_dir: Path | None = None) -> dict:
    """Where the brokers are and how to authenticate: what producers and consumers share."""
    opts = {"bootstrap_servers": cfg.bootstrap_servers, "client_id": cfg.client_id,
            "security_protocol": cfg.security_protocol}
    resolve = (lambda p: str((base_dir / p) if base_dir and not Path(p).is_absolute() else Path(p)))
    if cfg.sasl_mechanism:
        opts["sasl_mechanism"] = cfg.sasl_mechanism
        opts["sasl_plain_username"] = cfg.sasl_username
        if cfg.sasl_password_file:
            opts["sasl_plain_password"] = Path(resolve(cfg.sasl_password_file)).read_text().strip()
        elif cfg.sasl_password_env:
            opts["sasl_plain_password"] = os.environ[cfg.sasl_password_env]
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(cfg, key):
            opts[key] = resolve(getattr(cfg, key))
    return opts


class KafkaSink:
    def __init__(self, cfg: Kafka, base_dir: Path | None = None, retry_every: float = 1.0) -> None:
        self.cfg = cfg
        self.options = producer_options(cfg, base_dir)
        self.counters = KafkaCounters()
        self.queue: queue.Queue[tuple[str, bytes, float]] = queue.Queue(maxsize=cfg.queue_size)
        self.on_delivered: Callable[[float], None] | None = None  # seconds from submit() to the broker's ack
        self.spool = Spool(cfg.spool_dir, cfg.spool_max_bytes)
        self.retry_every = retry_every
        self._producer = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-sender", daemon=True)
        self._thread.start()

    # ---- called from the scoring thread: never blocks ----
    def submit(self, event: dict, topic: str | None = None) -> bool:
        """Queue a CloudEvent for `topic` (default: the alert topic), keyed by its subject (the request id)."""
        record = json.dumps({"key": event["subject"], "topic": topic or self.cfg.topic, "event": event},
                            separators=(",", ":")).encode()
        try:
            self.queue.put_nowait((event["subject"], record, time.monotonic()))
            return True
        except queue.Full:
            self.counters.dropped_queue_full += 1
            return False

    # ---- the sender thread ----
    def _connect(self):
        if self._producer is None:
            from kafka import KafkaProducer

            self._producer = KafkaProducer(**self.options)
        return self._producer

    def _send(self, topic: str, key: str, event_bytes: bytes) -> bool:
        try:
            producer = self._connect()
            producer.send(topic, key=key.encode(), value=event_bytes).get(timeout=10)
            self.counters.sent += 1
            return True
        except Exception as e:  # noqa: BLE001 - any failure means: spool and retry later
            self.counters.send_errors += 1
            log.warning("kafka send failed (%s); spooling", type(e).__name__)
            if self._producer is not None:
                try:
                    self._producer.close(timeout=1)
                except Exception:  # noqa: BLE001
                    pass
                self._producer = None
            return False

    def _spool(self, record: bytes) -> None:
        if self.spool.push(record):
            self.counters.spooled += 1
        else:
            self.counters.dropped_spool_full += 1

    def _drain_spool(self) -> bool:
        """Send spooled events in order; False when the broker is still unreachable."""
        while (item := self.spool.head()) is not None:
            path, record = item
            doc = json.loads(record)
            # Spool entries written before incidents existed carry no topic: they were alerts.
            if not self._send(doc.get("topic", self.cfg.topic), doc["key"],
                              json.dumps(doc["event"], separators=(",", ":")).encode()):
                return False
            self.spool.pop(path)
        return True

    def _run(self) -> None:
        healthy = self._drain_spool()
        last_try = time.monotonic()
        while not self._stop.is_set() or not self.queue.empty():
            if not healthy and time.monotonic() - last_try >= self.retry_every:
                last_try = time.monotonic()
                healthy = self._drain_spool()
            try:
                key, record, queued_at = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if healthy:
                doc = json.loads(record)
                healthy = self._send(doc["topic"], key, json.dumps(doc["event"], separators=(",", ":")).encode())
                if healthy and self.on_delivered is not None:
                    self.on_delivered(time.monotonic() - queued_at)
                if not healthy:
                    last_try = time.monotonic()
                    self._spool(record)
            else:
                self._spool(record)  # behind the spool: order is kept

    def stats(self) -> KafkaStats:
        c = self.counters
        return KafkaStats(c.sent, c.spooled, c.dropped_queue_full, c.dropped_spool_full, c.send_errors,
                          len(self.spool), self.spool.bytes, self.queue.qsize())

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._producer is not None:
            self._producer.close(timeout=2)
