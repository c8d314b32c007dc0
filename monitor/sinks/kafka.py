"""Alert events to Kafka without ever blocking scoring, and without losing one silently.

`submit()` only puts the event on a bounded in-memory queue. One background thread takes what is
queued, writes it to the on-disk spool (`monitor.sinks.spool`: one transaction, fsynced) and then
sends from the spool's head, in order (`acks=all`, idempotent producer, key = request id), removing
events once Kafka acknowledged them. While the broker is unreachable the spool simply grows, and it
is retried every `retry_every` seconds; after a crash or a restart, the next sidecar sends what the
last one left. Delivery is at least once: consumers dedupe on the event id.

An event is lost only (and then counted, by reason) when the memory queue is full, when the spool is
full or the disk is (and a direct send failed too), or when the process is killed while the event was
still in the memory queue: `misalignment_monitor_kafka_queue_events` is that bound at any moment (the
sender empties the queue to disk at every turn, within milliseconds). The sender thread survives any
error of its own (counted, retried) and reports its last turn, which `/readyz` and
`misalignment_monitor_kafka_sender_up` read.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from monitor.config.load import credential_path
from monitor.config.models import Kafka
from monitor.sinks import strict_json
from monitor.sinks.spool import Spool

log = logging.getLogger("monitor.kafka")

SEND_BATCH = 500  # events sent before waiting for their acknowledgements
PERSIST_BATCH = 20_000  # events written to the spool in one transaction (one fsync)
STALE_AFTER = 30.0  # a sender whose last turn is older than this is reported down


@dataclass
class KafkaCounters:
    sent: int = 0
    spooled: int = 0  # events that waited on disk because the broker was unreachable
    dropped_queue_full: int = 0
    dropped_spool_full: int = 0
    dropped_disk_full: int = 0
    dropped_spool_error: int = 0  # the spool could not be written (an I/O error other than a full disk)
    send_errors: int = 0
    sender_errors: int = 0  # unexpected errors in the sender thread (it carries on)


@dataclass(frozen=True)
class KafkaStats:
    """The sink's counters and backlog at one moment (what the metrics sink exports)."""

    sent: int
    spooled: int
    dropped_queue_full: int
    dropped_spool_full: int
    dropped_disk_full: int
    dropped_spool_error: int
    send_errors: int
    sender_errors: int
    quarantined: int
    spool_events: int
    spool_bytes: int
    queue_events: int
    sender_up: bool
    sender_turn_age_s: float


def producer_options(cfg: Kafka, base_dir: Path | None = None) -> dict:
    """kafka-python producer settings from the config; secrets come from a file or the environment."""
    return client_options(cfg, base_dir) | {
        "acks": "all", "enable_idempotence": True, "max_block_ms": 5000, "request_timeout_ms": 5000, "retries": 2,
        "retry_backoff_ms": 200,
        # An unreachable broker costs the sender 5 s per try (kafka-python's default is 30 s of bootstrap).
        "bootstrap_timeout_ms": 5000,
    }


def client_options(cfg: Kafka, base_dir: Path | None = None) -> dict:
    """Where the brokers are and how to authenticate: what producers and consumers share."""
    opts = {"bootstrap_servers": cfg.bootstrap_servers, "client_id": cfg.client_id,
            "security_protocol": cfg.security_protocol}

    def resolve(p: str) -> str:
        p = credential_path(p)
        return str((base_dir / p) if base_dir and not Path(p).is_absolute() else Path(p))

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
        self.queue: queue.Queue[tuple[str, str, bytes, float]] = queue.Queue(maxsize=cfg.queue_size)
        self.on_delivered: Callable[[float], None] | None = None  # seconds from submit() to the broker's ack
        self.spool = Spool(cfg.spool_dir, cfg.spool_max_bytes, default_topic=cfg.topic)
        self.retry_every = retry_every
        self._retry_in = retry_every
        self._producer = None
        self._healthy = True
        self._last_try = 0.0
        self._counted_through = self.spool.last_seq  # spool entries already counted as `spooled`
        self._queued_at: dict[int, float] = {}  # spool seq -> when submit() took it (this process's events)
        self._turn_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kafka-sender", daemon=True)
        self._thread.start()

    # ---- called from the scoring thread: never blocks ----
    def submit(self, event: dict, topic: str | None = None) -> bool:
        """Queue a CloudEvent for `topic` (default: the alert topic), keyed by its subject (the request id)."""
        record = strict_json.dumps(event).encode()
        try:
            self.queue.put_nowait((topic or self.cfg.topic, event["subject"], record, time.monotonic()))
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

    def _reset_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.close(timeout=1)
            except Exception:  # noqa: BLE001 - a broken producer is being thrown away
                pass
            self._producer = None

    def _send_batch(self, batch: list[tuple[str, str, bytes]]) -> int:
        """Send in order; returns how many, from the first, Kafka acknowledged."""
        acked = 0
        try:
            producer = self._connect()
            futures = [producer.send(topic, key=key.encode(), value=event) for topic, key, event in batch]
            for f in futures:
                f.get(timeout=10)
                acked += 1
        except Exception as e:  # noqa: BLE001 - any failure means: keep it on disk and retry later
            self.counters.send_errors += 1
            log.warning("kafka send failed (%s); %d event(s) wait in the spool", type(e).__name__, len(batch) - acked)
            self._reset_producer()
        self.counters.sent += acked
        return acked

    def _take(self, wait: float) -> list[tuple[str, str, bytes, float]]:
        """Everything queued (waiting up to `wait` for a first event): a turn may block for seconds on an
        unreachable broker, so each one moves the whole queue to disk, not a batch of it."""
        try:
            items = [self.queue.get(timeout=wait)]
        except queue.Empty:
            return []
        while len(items) < PERSIST_BATCH:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _persist(self, items: list[tuple[str, str, bytes, float]]) -> None:
        try:
            n, refused = self.spool.append([(t, k, e) for t, k, e, _ in items])
        except Exception:  # noqa: BLE001 - an I/O error: these events are in memory only; try them directly
            log.exception("kafka spool write failed")
            n, refused = 0, "spool_error"
        first = self.spool.last_seq - n + 1
        for i, item in enumerate(items[:n]):
            self._queued_at[first + i] = item[3]
        if n and not self._healthy:
            self._count_waiting()
        if refused is None:
            return
        # Not on disk (spool or disk full): one direct try, after what is already spooled, then lost and counted.
        rest = items[n:]
        acked = self._send_batch([(t, k, e) for t, k, e, _ in rest]) if self._healthy and not len(self.spool) else 0
        lost = len(rest) - acked
        if refused == "spool_full":
            self.counters.dropped_spool_full += lost
        elif refused == "disk_full":
            self.counters.dropped_disk_full += lost
        else:
            self.counters.dropped_spool_error += lost
        if lost:
            why = {"spool_full": "sinks.kafka.spool_max_bytes reached", "disk_full": "disk full"}.get(refused, "I/O error")
            log.error("kafka spool could not take %d event(s) (%s) and they could not be sent: lost", lost, why,
                      extra={"lost": lost, "reason": refused})

    def _count_waiting(self) -> None:
        if self.spool.last_seq > self._counted_through:
            self.counters.spooled += self.spool.last_seq - self._counted_through
            self._counted_through = self.spool.last_seq

    def _drain(self) -> bool:
        """Send spooled events in order; False when the broker is still unreachable."""
        while entries := self.spool.head(SEND_BATCH):
            acked = self._send_batch([(e.topic, e.key, e.event) for e in entries])
            if acked:
                self.spool.remove_through(entries[acked - 1].seq)
                now = time.monotonic()
                for e in entries[:acked]:
                    queued_at = self._queued_at.pop(e.seq, None)
                    if queued_at is not None and self.on_delivered is not None:
                        self.on_delivered(now - queued_at)
            if acked < len(entries):
                self._count_waiting()
                return False
            # A long backlog: keep what arrives meanwhile on disk too, and say the sender is alive.
            self._turn_at = time.monotonic()
            if items := self._take(0):
                self._persist(items)
        return True

    def _turn(self) -> None:
        self._turn_at = time.monotonic()
        items = self._take(0.1)
        if items:
            self._persist(items)
        now = time.monotonic()
        if len(self.spool) and (self._healthy or now - self._last_try >= self._retry_in):
            self._last_try = now
            self._healthy = self._drain()
            # An unreachable broker blocks each try for seconds: try less often the longer it lasts.
            self._retry_in = self.retry_every if self._healthy else min(2 * self._retry_in, max(self.retry_every, 10.0))

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set() or not self.queue.empty():
            try:
                self._turn()
                backoff = 0.1
            except Exception:  # noqa: BLE001 - the sender must outlive any one error: events wait on disk
                self.counters.sender_errors += 1
                log.exception("kafka sender error; retrying in %.1f s", backoff)
                self._healthy = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        if self._healthy and len(self.spool):
            try:
                self._drain()  # a last try at what is on disk; what is left waits for the next start
            except Exception:  # noqa: BLE001
                log.exception("kafka sender: final send failed; events stay in the spool")

    def stats(self) -> KafkaStats:
        c = self.counters
        age = time.monotonic() - self._turn_at
        up = self._thread.is_alive() and age < STALE_AFTER
        return KafkaStats(c.sent, c.spooled, c.dropped_queue_full, c.dropped_spool_full, c.dropped_disk_full,
                          c.dropped_spool_error, c.send_errors, c.sender_errors, self.spool.quarantined, len(self.spool),
                          self.spool.disk_bytes(), self.queue.qsize(), up, age)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._reset_producer()
        if not self._thread.is_alive():
            self.spool.close()
