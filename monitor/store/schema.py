"""The store's tables. Changes to them go through a migration in `migrations/versions/`."""

from __future__ import annotations

from datetime import datetime, timezone


from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTC(TypeDecorator):
    """A point in time, written in UTC and read back with its zone. PostgreSQL keeps zones; SQLite keeps
    the wall time only, so everything goes in as UTC (comparisons stay right) and UTC is put back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(timezone.utc) if value is not None and value.tzinfo is not None else value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    pass


class Incident(Base):
    """One incident: what the list shows and filters on. The event itself (its trace and evidence, up
    to a megabyte) is in `incident_bodies`, so that scanning and counting incidents never reads it."""

    __tablename__ = "incidents"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # idempotency: at-least-once delivery
    request_id: Mapped[str] = mapped_column(String(512), index=True)
    model: Mapped[str] = mapped_column(String(256))
    deployment: Mapped[str] = mapped_column(String(256))
    namespace: Mapped[str | None] = mapped_column(String(256))
    detectors: Mapped[list] = mapped_column(JSON)  # names of the detectors that fired
    severity: Mapped[str] = mapped_column(String(16))  # the highest severity among them
    alert_ids: Mapped[list] = mapped_column(JSON)
    text_policy: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(8), default="live", server_default="live")  # live | shadow (never paged)
    tier: Mapped[str] = mapped_column(String(8), default="page", server_default="page")  # page | record (never paged)
    event_time: Mapped[datetime] = mapped_column(UTC(), index=True)
    received_at: Mapped[datetime] = mapped_column(UTC())
    # Loaded only where asked for (`selectinload(Incident.body)`); touching it otherwise raises.
    body: Mapped["IncidentBody"] = relationship(lazy="raise", uselist=False)
    # Triage: the current state (the history is in `triage_events`).
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")  # open | acknowledged | resolved
    verdict: Mapped[str | None] = mapped_column(String(16))  # true_positive | false_positive | unsure
    verdict_note: Mapped[str | None] = mapped_column(Text)
    triaged_by: Mapped[str | None] = mapped_column(String(256))
    triaged_at: Mapped[datetime | None] = mapped_column(UTC())

    # The console's filters, each newest first.
    __table_args__ = tuple(Index(f"ix_incidents_{c}_time", c, "event_time")
                           for c in ("model", "deployment", "severity", "status", "verdict"))


    @property
    def event(self) -> dict:
        """The incident event as received."""
        return self.body.event


class IncidentBody(Base):
    """The incident event as received (a CloudEvent, schema incident.v1.json)."""

    __tablename__ = "incident_bodies"

    event_id: Mapped[str] = mapped_column(String(64), ForeignKey("incidents.event_id", ondelete="CASCADE"),
                                          primary_key=True)
    event: Mapped[dict] = mapped_column(JSON)


class IncidentDetector(Base):
    """One row per detector that fired on an incident, carrying every filter of the incident list (the
    incident's model, deployment, severity and triage state beside the detector's name, concept and
    time): the list's totals, per-detector counts and detector-filtered pages read only this narrow
    table. Triage updates it with the incident, in one transaction."""

    __tablename__ = "incident_detectors"

    incident_event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    detector: Mapped[str] = mapped_column(String(128), primary_key=True)
    concept: Mapped[str] = mapped_column(String(128))
    severity: Mapped[str] = mapped_column(String(16))  # the detector's
    event_time: Mapped[datetime] = mapped_column(UTC())
    model: Mapped[str] = mapped_column(String(256))
    deployment: Mapped[str] = mapped_column(String(256))
    incident_severity: Mapped[str] = mapped_column(String(16))  # the incident's (its highest)
    incident_mode: Mapped[str] = mapped_column(String(8), default="live", server_default="live")  # the incident's
    incident_tier: Mapped[str] = mapped_column(String(8), default="page", server_default="page")  # the incident's
    status: Mapped[str] = mapped_column(String(16), default="open", server_default="open")
    verdict: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (Index("ix_incident_detectors_detector_time", "detector", "event_time", "incident_event_id"),
                      Index("ix_incident_detectors_concept_time", "concept", "event_time"))


class TriageEvent(Base):
    """Who did what to an incident, and when (acknowledge, resolve, reopen, verdict)."""

    __tablename__ = "triage_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    incident_event_id: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(256))
    at: Mapped[datetime] = mapped_column(UTC())


class AuditEntry(Base):
    """Who opened which incident's text, exported, or triaged; kept apart from the incident so retention
    of events never erases the record of access."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTC(), index=True)
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(32))  # view_text | export | triage | login | login_failed
    target: Mapped[str | None] = mapped_column(String(512))  # an alert id, or an export's filter
    client: Mapped[str | None] = mapped_column(String(64))


class IncidentAlert(Base):
    """Which incident an alert id belongs to: a page names an alert id, a person wants its incident."""

    __tablename__ = "incident_alerts"

    alert_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    incident_event_id: Mapped[str] = mapped_column(String(64), index=True)


class Alert(Base):
    """One alert event (a detector firing, or its final verdict): several per alert id."""

    __tablename__ = "alerts"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    alert_id: Mapped[str] = mapped_column(String(64), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(512), index=True)
    detector: Mapped[str] = mapped_column(String(128))
    severity: Mapped[str] = mapped_column(String(16))
    score: Mapped[float] = mapped_column(Float)
    event_time: Mapped[datetime] = mapped_column(UTC(), index=True)
    received_at: Mapped[datetime] = mapped_column(UTC())
    event: Mapped[dict] = mapped_column(JSON)


class DeadLetter(Base):
    """A message the ingester could not store, with the reason; kept for a person to look at."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(256))
    partition: Mapped[int] = mapped_column(Integer)
    offset: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[str] = mapped_column(Text)  # the first 64 KiB of the message
    received_at: Mapped[datetime] = mapped_column(UTC())

    __table_args__ = (Index("ix_dead_letters_source", "topic", "partition", "offset", unique=True),)
