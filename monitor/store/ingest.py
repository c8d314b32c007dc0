"""`monitor incidents ingest`: alert and incident events from Kafka into the store.

A consumer group (`store.consumer_group`), so any number of ingesters, fed by any number of
sidecars, share the topics and each event is stored once. Delivery is at least once: offsets are
committed only after the database commit, and the store ignores an event id it already has, so a
crash between the two re-delivers and the retry changes nothing.

A message that is not a valid alert.v1 or incident.v1 event (not JSON, truncated, another type or
version, over `store.max_event_bytes`) goes to the dead-letter table with the reason, and is
counted; it never stops the consumer. When the database is unreachable, the batch is rolled back,
the consumer rewinds to it and waits (backing off to 5 s) until the database is back: nothing is
lost. Every minute, events older than `store.retention_days` are deleted (counted).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError

from monitor.config.models import MonitorConfig
from monitor.sinks.events import EVENT_TYPE as ALERT_TYPE, AlertEvent
from monitor.sinks.incidents import EVENT_TYPE as INCIDENT_TYPE, IncidentEvent
from monitor.sinks.kafka import client_options
from monitor.store.db import BadRow, Store

log = logging.getLogger("monitor.store")
MODELS = {ALERT_TYPE: AlertEvent, INCIDENT_TYPE: IncidentEvent}


class BadEvent(ValueError):
    """Why a message cannot be stored (the dead letter's reason)."""


def parse(raw: bytes, max_bytes: int) -> dict:
    if len(raw) > max_bytes:
        raise BadEvent(f"oversized: {len(raw)} bytes > store.max_event_bytes {max_bytes}")
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadEvent(f"not valid JSON (truncated?): {e}") from e
    except RecursionError:
        raise BadEvent("not storable JSON: nested too deep") from None
    if not isinstance(doc, dict):
        raise BadEvent("not a CloudEvent: the message is not a JSON object")
    kind = doc.get("type")
    model = MODELS.get(kind)
    if model is None:
        raise BadEvent(f"unknown event type {kind!r}: this store reads {sorted(MODELS)}")
    try:
        model.model_validate(doc)
    except ValidationError as e:
        first = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:3])
        raise BadEvent(f"does not match the {kind} schema ({e.error_count()} error(s)): {first}") from e
    return doc


def _no_constant(name: str):
    raise BadEvent(f"not JSON: {name} is no number in RFC 8259 (a sidecar writes null)")


def _row_is_bad(e: Exception) -> bool:
    """A database error about this row (a value it refuses, a constraint) rather than about the database
    (down, restarting, the connection lost): only the latter is worth retrying. SQLSTATE classes 22 (data
    exception) and 23 (integrity) on PostgreSQL; SQLite's own data and integrity errors."""
    from sqlalchemy.exc import DataError, IntegrityError

    if isinstance(e, (DataError, IntegrityError)):
        return True
    code = getattr(getattr(e, "orig", None), "sqlstate", None) or ""
    return code[:2] in ("22", "23")


@dataclass
class IngestStats:
    stored: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    db_outages: int = 0
    expired: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)  # short reason -> dead letters
    last_success: float = 0.0  # wall-clock time of the last batch committed
    last_poll: float = 0.0  # wall-clock time of the last poll of Kafka
    lag: int = 0  # messages on its partitions not yet consumed


class Ingester:
    def __init__(self, cfg: MonitorConfig, store: Store, base_dir=None, expire_every: float = 60.0) -> None:
        self.cfg, self.store, self.base_dir = cfg, store, base_dir
        self.stats = IngestStats()
        self.expire_every = expire_every

    def consumer(self):
        from kafka import KafkaConsumer

        k, s = self.cfg.sinks.kafka, self.cfg.store
        return KafkaConsumer(k.topic, k.incident_topic, group_id=s.consumer_group, enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_interval_ms=s.max_poll_interval_ms,
                             session_timeout_ms=s.session_timeout_ms, heartbeat_interval_ms=s.heartbeat_interval_ms,
                             **client_options(k, self.base_dir))

    def run(self, stop: threading.Event) -> IngestStats:
        from sqlalchemy.exc import DBAPIError

        consumer = self.consumer()
        backoff, last_expire, last_lag = 0.5, 0.0, 0.0
        log.info("ingesting %s and %s into %s", self.cfg.sinks.kafka.topic, self.cfg.sinks.kafka.incident_topic,
                 self.store.name, extra={"store": self.store.name, "group": self.cfg.store.consumer_group})
        try:
            while not stop.is_set():
                if time.monotonic() - last_expire > self.expire_every:
                    last_expire = time.monotonic()
                    self._expire()
                batch = consumer.poll(timeout_ms=500, max_records=500)
                self.stats.last_poll = time.time()
                if time.monotonic() - last_lag > 5.0:
                    last_lag = time.monotonic()
                    lag = _lag(consumer)
                    self.stats.lag = self.stats.lag if lag is None else lag
                if not batch:
                    continue
                try:
                    self._store(batch)
                except DBAPIError as e:
                    # Nothing of the batch is committed, in the database or in Kafka: read it again once back.
                    self.stats.db_outages += 1
                    log.warning("database unreachable (%s): retrying the batch in %.1f s", type(e.orig).__name__,
                                backoff, extra={"store": self.store.name})
                    for tp, records in batch.items():
                        consumer.seek(tp, records[0].offset)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                consumer.commit()  # only after the database commit
                backoff = 0.5
        finally:
            consumer.close()
        log.info("ingester stopped", extra={"stats": self.stats.__dict__})
        return self.stats

    def _store(self, batch) -> None:
        """One transaction for the batch; each record in a savepoint of its own, so a record the database
        refuses is dead-lettered alone. An error about the database (not the row) propagates: the caller
        rolls the batch back and reads it again later."""
        from sqlalchemy.exc import DBAPIError

        max_bytes = self.cfg.store.max_event_bytes
        stored = duplicates = 0
        dead: list[str] = []
        with self.store.session() as s:
            for tp, records in batch.items():
                for r in records:
                    try:
                        event = parse(r.value, max_bytes)
                        add = self.store.add_alert if event["type"] == ALERT_TYPE else self.store.add_incident
                        with s.begin_nested():
                            new = add(s, event)
                    except (BadEvent, BadRow) as e:
                        why = str(e)
                    except DBAPIError as e:
                        if not _row_is_bad(e):
                            raise
                        why = f"refused by the database: {str(e.orig).splitlines()[0][:300]}"
                    except (ValueError, TypeError, KeyError, UnicodeError) as e:  # a value no check foresaw
                        why = f"cannot be stored: {type(e).__name__}: {e}"
                    else:
                        stored += new
                        duplicates += not new
                        continue
                    try:
                        with s.begin_nested():
                            if self.store.dead_letter(s, tp.topic, tp.partition, r.offset, why, r.value):
                                dead.append(why)
                    except DBAPIError as e:
                        if not _row_is_bad(e):
                            raise
                        # Not even its dead letter can be stored: the log is its only record, and it is counted.
                        log.error("dead letter %s[%d]@%d could not be stored either (%s)", tp.topic, tp.partition,
                                  r.offset, str(e.orig).splitlines()[0][:200])
                        dead.append(why)
                    log.warning("dead letter %s[%d]@%d: %s", tp.topic, tp.partition, r.offset, why,
                                extra={"topic": tp.topic, "partition": tp.partition, "offset": r.offset})
            s.commit()
        self.stats.stored += stored
        self.stats.duplicates += duplicates
        self.stats.dead_letters += len(dead)
        for why in dead:
            key = _reason_key(why)
            self.stats.dead_by_reason[key] = self.stats.dead_by_reason.get(key, 0) + 1
        self.stats.last_success = time.time()

    def _expire(self) -> None:
        from sqlalchemy.exc import DBAPIError

        before = datetime.now(timezone.utc) - timedelta(days=self.cfg.store.retention_days)
        try:
            n = self.store.expire(before)
        except DBAPIError:
            return  # the outage is reported by the batch that meets it
        if n:
            self.stats.expired += n
            log.info("deleted %d event(s) older than %s (retention)", n, before.isoformat(), extra={"deleted": n})


def _lag(consumer) -> int | None:
    """End offsets minus positions over the assigned partitions (0 when nothing is assigned yet; None when
    it cannot be measured now)."""
    try:
        parts = consumer.assignment()
        if not parts:
            return 0
        ends = consumer.end_offsets(list(parts))
        return int(sum(max(0, ends[tp] - consumer.position(tp)) for tp in parts))
    except Exception:  # noqa: BLE001 - a metric must never stop the consumer; the last value stays
        log.debug("could not measure the consumer's lag", exc_info=True)
        return None


_REASONS = (("oversized", "oversized"), ("not valid JSON", "not_json"), ("not JSON:", "not_json"),
            ("not a CloudEvent", "not_cloudevent"), ("unknown event type", "unknown_type"),
            ("does not match", "schema"), ("characters, the column holds", "too_long"), ("NUL", "unstorable_text"),
            ("lone surrogate", "unstorable_text"), ("non-finite", "non_finite"), ("refused by the database", "refused"))


def _reason_key(why: str) -> str:
    """A dead letter's reason as a bounded label value (the full reason is in the dead-letter table)."""
    return next((key for needle, key in _REASONS if needle in why), "other")
