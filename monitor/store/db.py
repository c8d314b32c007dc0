"""The store's repository: open (and migrate) a database, add events idempotently, query, expire."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from monitor.config.models import StoreSettings
from monitor.paths import cache_dir
from monitor.sinks.events import tier_of

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


class BadRow(ValueError):
    """A value the store will not hold (too long for its column, a NUL, a lone surrogate, a non-finite
    number); the message names the column."""


def check_row(table, row: dict) -> None:
    """The store's boundary, the same on SQLite and PostgreSQL: SQLite ignores a column's length and takes a
    NUL, PostgreSQL refuses both (and NaN in JSON, and lone surrogates anywhere) with an error the
    ingester would otherwise take for an outage."""
    columns = table.__table__.columns
    for name, value in row.items():
        length = getattr(columns[name].type, "length", None)
        if isinstance(value, str) and length is not None and len(value) > length:
            raise BadRow(f"{table.__tablename__}.{name}: {len(value)} characters, the column holds {length}")
        why = _unstorable(value)
        if why:
            raise BadRow(f"{table.__tablename__}.{name}: {why}")


def _storable(text: str, limit: int | None = None) -> str:
    """A dead letter's text made storable whatever the message held: NULs and lone surrogates replaced."""
    text = text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return text if limit is None else text[:limit]


def _unstorable(value, depth: int = 0) -> str | None:
    if isinstance(value, str):
        if "\x00" in value:
            return "holds a NUL character"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone surrogate (not UTF-8)"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"holds a non-finite number ({value})"
    if depth > 64:
        return "nested deeper than 64 levels"
    if isinstance(value, dict):
        return next((w for k, v in value.items() if (w := _unstorable(k, depth + 1) or _unstorable(v, depth + 1))), None)
    if isinstance(value, list):
        return next((w for v in value if (w := _unstorable(v, depth + 1))), None)
    return None


class StoreError(RuntimeError):
    """The store cannot be opened or used; the message says which database and why (never its password)."""


def store_url(settings: StoreSettings, base: Path | None = None) -> str:
    """The database URL: from `url_file`, else from the `url_env` variable, else an embedded SQLite file."""
    if settings.url_file:
        path = Path(os.path.expandvars(settings.url_file)).expanduser()
        path = path if path.is_absolute() or base is None else base / path
        try:
            return path.read_text().strip()
        except OSError as e:
            raise StoreError(f"store.url_file: cannot read {path} ({e.strerror})") from e
    if os.environ.get(settings.url_env):
        return os.environ[settings.url_env].strip()
    path = Path(settings.sqlite_path).expanduser() if settings.sqlite_path else cache_dir() / "incidents.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value)


class Store:
    def __init__(self, url: str, migrate: bool = True) -> None:
        try:
            from sqlalchemy import create_engine, event
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError, NoSuchModuleError
        except ModuleNotFoundError as e:
            raise StoreError("the incident store needs `pip install 'misalignment-monitor[store]'`") from e
        try:
            parsed = make_url(url)
            self.name = parsed.render_as_string(hide_password=True)
            self.engine = create_engine(parsed, pool_pre_ping=True)
        except (ArgumentError, NoSuchModuleError, ValueError) as e:
            raise StoreError(f"not a usable database URL ({e}); e.g. sqlite:///incidents.sqlite or "
                             "postgresql+psycopg://user:password@host:5432/db") from e
        except ModuleNotFoundError as e:
            raise StoreError(f"{self.name}: its driver is not installed ({e.name}); PostgreSQL needs psycopg") from e
        if self.engine.dialect.name == "sqlite":
            @event.listens_for(self.engine, "connect")
            def _wal(conn, _record):  # readers (the CLI, the console) never block the ingester
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=5000")
                # WAL's usual pairing: a commit survives a crash of the process, syncs wait for checkpoints
                # (a power loss may take the last commits; PostgreSQL is the store for that).
                conn.execute("PRAGMA synchronous=NORMAL")
                # SQLAlchemy's recipe for pysqlite: the driver's own implicit BEGIN breaks SAVEPOINTs, which the
                # ingester uses to dead-letter one refused record without losing its batch.
                conn.isolation_level = None

            @event.listens_for(self.engine, "begin")
            def _begin(conn):
                conn.exec_driver_sql("BEGIN")
        if migrate:
            self.migrate()

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        import logging

        logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines say nothing to an operator
        from alembic import command
        from alembic.config import Config
        from sqlalchemy.exc import OperationalError

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except OperationalError as e:
            raise StoreError(f"{self.name}: cannot reach the database ({e.orig})") from e

    @contextmanager
    def session(self) -> Iterator:
        from sqlalchemy.orm import Session

        with Session(self.engine) as s:
            yield s

    def _insert(self, session, table, values) -> bool:
        """INSERT, ignoring a row whose key is already there; True when this one was new. (RETURNING, not
        rowcount: psycopg's rowcount for ON CONFLICT DO NOTHING does not say.) Values are checked first
        (`check_row`): what one database refuses, both refuse, before anything is sent."""
        for row in values if isinstance(values, list) else [values]:
            check_row(table, row)
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        key = next(iter(table.__table__.primary_key.columns))
        stmt = insert(table).values(values).on_conflict_do_nothing().returning(key)
        return len(session.execute(stmt).all()) > 0

    def add_alert(self, session, event: dict) -> bool:
        """Store an alert event; False when it was already stored (a redelivery)."""
        from monitor.store.schema import Alert

        d = event["data"]
        row = dict(event_id=event["id"], alert_id=d["alert_id"], revision=d["revision"], request_id=d["request_id"],
                   detector=d["detector"], severity=d["severity"], score=d["score"], event_time=_when(event["time"]),
                   received_at=datetime.now(timezone.utc), event=event)
        return self._insert(session, Alert, row)

    def add_incident(self, session, event: dict) -> bool:
        from monitor.store.schema import Incident, IncidentAlert, IncidentBody, IncidentDetector

        d = event["data"]
        fired = [x for x in d["detectors"] if x["fired"]]
        row = dict(event_id=event["id"], request_id=d["request_id"], model=d["model"], deployment=d["deployment"],
                   namespace=d.get("namespace"), detectors=[x["name"] for x in fired],
                   severity=max((x["severity"] for x in fired), key=SEVERITY_RANK.get, default="info"),
                   alert_ids=d["alert_ids"], text_policy=d["text_policy"], mode=d.get("mode", "live"),
                   tier=tier_of(d), event_time=_when(event["time"]),
                   received_at=datetime.now(timezone.utc))
        new = self._insert(session, Incident, row)
        if new:
            self._insert(session, IncidentBody, {"event_id": event["id"], "event": event})
        if new and d["alert_ids"]:
            self._insert(session, IncidentAlert, [{"alert_id": a, "incident_event_id": event["id"]} for a in d["alert_ids"]])
        if new and fired:
            self._insert(session, IncidentDetector, [dict(
                incident_event_id=event["id"], detector=x["name"], concept=x["concept"], severity=x["severity"],
                event_time=row["event_time"], model=row["model"], deployment=row["deployment"],
                incident_severity=row["severity"], incident_mode=row["mode"], incident_tier=row["tier"], status="open", verdict=None)
                for x in fired])
        return new

    def dead_letter(self, session, topic: str, partition: int, offset: int, reason: str, raw: bytes) -> bool:
        from monitor.store.schema import DeadLetter

        row = dict(topic=_storable(topic, 256), partition=partition, offset=offset, reason=_storable(reason),
                   raw=_storable(raw[:65536].decode("utf-8", "replace")), received_at=datetime.now(timezone.utc))
        return self._insert(session, DeadLetter, row)

    def expire(self, before: datetime) -> int:
        """Delete alert and incident events older than `before` (text included); returns how many."""
        from sqlalchemy import delete, select

        from monitor.store.schema import Alert, Incident, IncidentAlert, IncidentBody, IncidentDetector, TriageEvent

        with self.session() as s:
            old = select(Incident.event_id).where(Incident.event_time < before)
            s.execute(delete(IncidentBody).where(IncidentBody.event_id.in_(old)))
            for table in (IncidentAlert, IncidentDetector, TriageEvent):  # the audit log outlives the events
                s.execute(delete(table).where(table.incident_event_id.in_(old)))
            n = s.execute(delete(Incident).where(Incident.event_time < before)).rowcount
            n += s.execute(delete(Alert).where(Alert.event_time < before)).rowcount
            s.commit()
        self.optimize()
        return n

    def optimize(self) -> None:
        """Refresh the query planner's statistics where the database does not itself (SQLite; PostgreSQL's
        autovacuum analyzes on its own). The ingester calls it with each retention pass."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA optimize")

    def incidents(self, f=None, limit: int = 50, cursor: str | None = None):
        """A page of incidents (`queries.list_incidents`), newest first."""
        from monitor.store.queries import IncidentFilter, list_incidents

        with self.session() as s:
            return list_incidents(s, f or IncidentFilter(), limit=limit, cursor=cursor)

    def incident_events(self, limit: int = 1000) -> list[dict]:
        """The newest stored incident events, as received."""
        from sqlalchemy import select

        from monitor.store.schema import Incident, IncidentBody

        with self.session() as s:
            return list(s.scalars(select(IncidentBody.event).join(Incident, Incident.event_id == IncidentBody.event_id)
                                  .order_by(Incident.event_time.desc()).limit(limit)))

    def incident(self, alert_id: str):
        """The incident an alert id belongs to (its event loaded), and that alert's events; (None, []) when unknown."""
        from sqlalchemy import select

        from monitor.store.schema import Alert

        with self.session() as s:
            alerts = s.scalars(select(Alert).where(Alert.alert_id == alert_id).order_by(Alert.revision)).all()
            return self.incident_by_alert(s, alert_id), list(alerts)

    @staticmethod
    def incident_by_alert(session, alert_id: str):
        """The incident (with its event) that an alert id belongs to, or None."""
        from sqlalchemy import select
        from sqlalchemy.orm import selectinload

        from monitor.store.schema import Incident, IncidentAlert

        return session.scalars(select(Incident).options(selectinload(Incident.body))
                               .join(IncidentAlert, IncidentAlert.incident_event_id == Incident.event_id)
                               .where(IncidentAlert.alert_id == alert_id)).first()

    def triage(self, alert_id: str, actor: str, action: str, verdict: str | None = None, note: str | None = None):
        """Acknowledge, resolve or reopen the incident an alert id belongs to, and/or give it a verdict.
        Recorded in `triage_events` with who and when. Returns the updated incident (None: unknown id)."""
        from sqlalchemy import select, update

        from monitor.store.queries import VERDICTS
        from monitor.store.schema import Incident, IncidentAlert, IncidentDetector, TriageEvent

        status = {"acknowledge": "acknowledged", "resolve": "resolved", "reopen": "open", "verdict": None}
        if action not in status:
            raise ValueError(f"action {action!r}: use one of {', '.join(status)}")
        if verdict is not None and verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
        if action == "verdict" and verdict is None:
            raise ValueError("action `verdict` needs a verdict")
        now = datetime.now(timezone.utc)
        with self.session() as s:
            inc = s.scalars(select(Incident).join(IncidentAlert, IncidentAlert.incident_event_id == Incident.event_id)
                            .where(IncidentAlert.alert_id == alert_id)).first()
            if inc is None:
                return None
            if status[action]:
                inc.status = status[action]
            if verdict is not None:
                inc.verdict, inc.verdict_note = verdict, note
            inc.triaged_by, inc.triaged_at = actor, now
            s.execute(update(IncidentDetector).where(IncidentDetector.incident_event_id == inc.event_id)
                      .values(status=inc.status, verdict=inc.verdict))
            s.add(TriageEvent(incident_event_id=inc.event_id, action=action, verdict=verdict, note=note, actor=actor,
                              at=now))
            s.commit()
            s.refresh(inc)
            s.expunge(inc)
            return inc

    def triage_history(self, event_id: str) -> list:
        from sqlalchemy import select

        from monitor.store.schema import TriageEvent

        with self.session() as s:
            return list(s.scalars(select(TriageEvent).where(TriageEvent.incident_event_id == event_id)
                                  .order_by(TriageEvent.id)))

    def audit(self, actor: str, action: str, target: str | None = None, client: str | None = None) -> None:
        from monitor.store.schema import AuditEntry

        with self.session() as s:
            s.add(AuditEntry(at=datetime.now(timezone.utc), actor=actor, action=action,
                             target=None if target is None else target[:512], client=client))
            s.commit()

    def audit_log(self, limit: int = 200) -> list:
        from sqlalchemy import select

        from monitor.store.schema import AuditEntry

        with self.session() as s:
            return list(s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)))

    def counts(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from monitor.store.schema import Alert, DeadLetter, Incident

        with self.session() as s:
            return {name: s.scalar(select(func.count()).select_from(t))
                    for name, t in (("incidents", Incident), ("alerts", Alert), ("dead_letters", DeadLetter))}

    def close(self) -> None:
        self.engine.dispose()
