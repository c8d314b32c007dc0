"""The store's tables. Changes to them go through a migration in `migrations/versions/`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Incident(Base):
    """One incident event: a fired request, with its trace and evidence (the event as received)."""

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
    event_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    event: Mapped[dict] = mapped_column(JSON)


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
    event_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
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
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_dead_letters_source", "topic", "partition", "offset", unique=True),)
