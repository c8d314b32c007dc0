"""The incident list's queries: typed filters, keyset pages, counts per detector.

Filters come from people (the console's query string, the CLI), so every field is validated here
with a message naming it. Pages are keyset pages on (event_time, event_id), newest first: the cost of
a page does not grow with how deep it is, which an OFFSET would.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STATUSES = ("open", "acknowledged", "resolved")
VERDICTS = ("true_positive", "false_positive", "unsure")
_RELATIVE = re.compile(r"^(\d+)\s*([mhdw])$")
_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 604800}


_MAX_TIME_CHARS = 40
_EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)  # margin below what datetime and the databases hold


def parse_time(value: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (`2026-11-30T12:00:00Z`), epoch milliseconds (Grafana's `${__from}`), an age (`15m`,
    `24h`, `7d`, `2w`: that long before now), or Grafana's `now` / `now-6h`. Always a UTC time from 1970
    to 9999, or a ValueError that says what is wrong: a value from a query string never becomes a 500."""
    value = value.strip()
    if len(value) > _MAX_TIME_CHARS:
        raise ValueError(f"{value[:_MAX_TIME_CHARS]!r}… is not a time: at most {_MAX_TIME_CHARS} characters")
    now = now or datetime.now(timezone.utc)
    if value == "now":  # Grafana's time syntax, from the dashboard's links: now, now-6h
        return now
    if value.startswith("now-"):
        value = value[4:]
    try:
        if value.isdigit():
            t = _EARLIEST + timedelta(milliseconds=int(value))
        elif m := _RELATIVE.match(value):
            t = now - timedelta(seconds=int(m.group(1)) * _SECONDS[m.group(2)])
        else:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
            t = t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
    except OverflowError:  # an age or epoch past what a date holds, a date pushed off the calendar by its offset
        raise ValueError(f"{value!r} is outside the times the console can show (1970 to 9999)") from None
    except ValueError:
        raise ValueError(f"{value!r} is not a time: use ISO 8601 (2026-11-30T12:00:00Z), epoch milliseconds, "
                         "or an age such as 15m, 24h, 7d") from None
    if not _EARLIEST <= t <= _LATEST:
        raise ValueError(f"{value!r} is outside the times the console can show (1970 to 9999)")
    return t


class IncidentFilter(BaseModel):
    """Which incidents to list. Empty fields do not filter."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    detector: str | None = Field(None, max_length=128, description="A detector that fired on the incident.")
    concept: str | None = Field(None, max_length=128, description="The concept of a detector that fired.")
    severity: Literal["critical", "warning", "info"] | None = None
    model: str | None = Field(None, max_length=256)
    deployment: str | None = Field(None, max_length=256)
    status: Literal["open", "acknowledged", "resolved"] | None = None
    verdict: Literal["true_positive", "false_positive", "unsure", "none"] | None = Field(
        None, description="`none`: no verdict yet.")
    since: datetime | None = Field(None, description="ISO 8601, epoch milliseconds, or an age (24h).")
    until: datetime | None = None
    mode: Literal["live", "shadow", "all"] = Field(
        "live", description="`live`: incidents a live detector fired on (what pages); `shadow`: those only detectors "
        "in shadow mode fired on (watched, never paged), listed apart; `all`: both.")
    tier: Literal["page", "record"] | None = Field(
        None, description="`page`: incidents a detector paged on; `record`: those recorded at a detector's lower "
        "tier only (never paged). Empty: both.")

    @model_validator(mode="before")
    @classmethod
    def _blank_is_unset(cls, data):
        if isinstance(data, dict):  # an HTML form sends every field, empty ones as ""
            return {k: v for k, v in data.items() if not (isinstance(v, str) and not v.strip())}
        return data

    @field_validator("since", "until", mode="before")
    @classmethod
    def _time(cls, v):
        return parse_time(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _order(self) -> "IncidentFilter":
        if self.since and self.until and self.since > self.until:
            raise ValueError(f"since ({self.since:%Y-%m-%d %H:%M}) is after until ({self.until:%Y-%m-%d %H:%M})")
        return self

    def query(self) -> dict[str, str]:
        """The filter as query-string parameters (for links)."""
        out = {}
        for k, v in self.model_dump(exclude_none=True, exclude_defaults=True).items():
            out[k] = v.isoformat() if isinstance(v, datetime) else str(v)
        return out


@dataclass(frozen=True)
class Cursor:
    event_time: datetime
    event_id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.event_time.isoformat()}|{self.event_id}".encode()).decode()

    @classmethod
    def decode(cls, token: str) -> "Cursor":
        try:
            when, event_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
            t = datetime.fromisoformat(when)
            return cls(t if t.tzinfo else t.replace(tzinfo=timezone.utc), event_id)
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"cursor {token[:40]!r} is not one this console made; start from the first page") from None


@dataclass
class IncidentPage:
    rows: list  # schema.Incident (their events not loaded)
    total: int  # incidents matching the filter
    counts: dict[str, int]  # per detector, under every filter but `detector` (see count_incidents)
    next_cursor: str | None


def _where(f: IncidentFilter, time=None, verdict=None, mode=None, **columns) -> list:
    """`f` as conditions on the given columns (filter name -> column); filters without a column are
    not applied here."""
    cond = [col == getattr(f, name) for name, col in columns.items() if getattr(f, name) is not None]
    if mode is not None and f.mode != "all":
        cond.append(mode == f.mode)
    if verdict is not None and f.verdict is not None:
        cond.append(verdict.is_(None) if f.verdict == "none" else verdict == f.verdict)
    if time is not None and f.since is not None:
        cond.append(time >= f.since)
    if time is not None and f.until is not None:
        cond.append(time <= f.until)
    return cond


def _conditions(f: IncidentFilter) -> list:
    """`f` on the incidents table; detector and concept through the per-detector rows."""
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    from monitor.store.schema import Incident, IncidentDetector

    cond = _where(f, time=Incident.event_time, verdict=Incident.verdict, mode=Incident.mode, tier=Incident.tier,
                  severity=Incident.severity, model=Incident.model, deployment=Incident.deployment, status=Incident.status)
    if f.detector is not None or f.concept is not None:
        # An uncorrelated IN: the matching incidents are found once through the (detector|concept, time)
        # index, not looked up again for every candidate row.
        d = aliased(IncidentDetector)
        sub = _where(f, time=d.event_time, detector=d.detector, concept=d.concept)
        cond.append(Incident.event_id.in_(select(d.incident_event_id).where(*sub)))
    return cond


def _per_detector(f: IncidentFilter, with_detector: bool = True) -> list:
    """`f` on the per-detector rows, which carry every filter column."""
    from monitor.store.schema import IncidentDetector as D

    return _where(f, time=D.event_time, verdict=D.verdict, mode=D.incident_mode, tier=D.incident_tier,
                  concept=D.concept,
                  severity=D.incident_severity,
                  model=D.model, deployment=D.deployment, status=D.status,
                  **({"detector": D.detector} if with_detector else {}))


def count_incidents(session, f: IncidentFilter) -> tuple[int, dict[str, int]]:
    """(incidents matching `f`, incidents per detector under every filter but `detector`). Under a
    `concept` filter the counts are of that concept's detectors."""
    from sqlalchemy import distinct, func, select

    from monitor.store.schema import Incident
    from monitor.store.schema import IncidentDetector as D

    if f.detector is not None:  # one row per incident and detector
        total = session.scalar(select(func.count()).select_from(D).where(*_per_detector(f)))
    elif f.concept is not None:  # an incident may have several detectors of one concept
        total = session.scalar(select(func.count(distinct(D.incident_event_id))).where(*_per_detector(f)))
    else:
        total = session.scalar(select(func.count()).select_from(Incident).where(*_conditions(f)))
    counts_q = select(D.detector, func.count()).where(*_per_detector(f, with_detector=False)).group_by(D.detector)
    counts = dict(sorted(session.execute(counts_q).all(), key=lambda kv: (-kv[1], kv[0])))
    return total, counts


def list_incidents(session, f: IncidentFilter, limit: int = 50, cursor: str | None = None,
                   counted: tuple[int, dict[str, int]] | None = None) -> IncidentPage:
    """One page of incidents matching `f`, newest first, with the total and the counts per detector
    (`counted`: those, when the caller already has them)."""
    from sqlalchemy import and_, or_, select

    from monitor.store.schema import Incident
    from monitor.store.schema import IncidentDetector as D

    if f.detector is not None:  # walk that detector's rows down its (detector, time, id) index
        when, key = D.event_time, D.incident_event_id
        q = select(Incident).join(D, D.incident_event_id == Incident.event_id).where(*_per_detector(f))
    else:
        when, key = Incident.event_time, Incident.event_id
        q = select(Incident).where(*_conditions(f))
    if cursor:
        c = Cursor.decode(cursor)
        q = q.where(or_(when < c.event_time, and_(when == c.event_time, key < c.event_id)))
    rows = list(session.scalars(q.order_by(when.desc(), key.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    total, counts = counted if counted is not None else count_incidents(session, f)
    nxt = Cursor(rows[-1].event_time, rows[-1].event_id).encode() if more and rows else None
    return IncidentPage(rows=rows, total=total, counts=counts, next_cursor=nxt)


def facets(session) -> dict[str, list[str]]:
    """The values each filter can take (for the console's drop-downs)."""
    from sqlalchemy import select

    from monitor.store.schema import Incident, IncidentDetector

    def values(col) -> list[str]:
        return list(session.scalars(select(col).distinct().order_by(col)))

    return {"detector": values(IncidentDetector.detector), "concept": values(IncidentDetector.concept),
            "model": values(Incident.model), "deployment": values(Incident.deployment)}


def events_of(session, event_ids: list[str]) -> dict[str, dict]:
    """The stored events of some incidents (a page's worth: each is up to a megabyte)."""
    from sqlalchemy import select

    from monitor.store.schema import IncidentBody

    if not event_ids:
        return {}
    return {b.event_id: b.event for b in session.scalars(select(IncidentBody).where(IncidentBody.event_id.in_(event_ids)))}


def verdict_counts(session, detector: str) -> dict[str, int]:
    """How the incidents of one detector were judged so far: verdict (or "none") -> incidents."""
    from sqlalchemy import func, select

    from monitor.store.schema import IncidentDetector as D

    rows = session.execute(select(D.verdict, func.count()).where(D.detector == detector).group_by(D.verdict)).all()
    return {(v or "none"): n for v, n in rows}


def verdicts_of_alerts(session, alert_ids: list[str]) -> dict[str, str]:
    """Alert id -> the verdict a person gave its incident (alert ids without one are left out)."""
    from sqlalchemy import select

    from monitor.store.schema import Incident, IncidentAlert

    out: dict[str, str] = {}
    ids = sorted(set(alert_ids))
    for k in range(0, len(ids), 500):  # bounded IN lists
        q = (select(IncidentAlert.alert_id, Incident.verdict)
             .join(Incident, Incident.event_id == IncidentAlert.incident_event_id)
             .where(IncidentAlert.alert_id.in_(ids[k:k + 500]), Incident.verdict.is_not(None)))
        out.update({a: v for a, v in session.execute(q).all()})
    return out


@dataclass(frozen=True)
class ScoredAlert:
    """One fire of a detector, with its final score and what a person said about its incident."""

    alert_id: str
    score: float
    event_time: datetime
    verdict: str | None
    mode: str | None  # the incident's (live | shadow); None until its incident is stored


def detector_fires(session, detector: str, limit: int = 5000) -> list[ScoredAlert]:
    """The detector's newest fires (one per alert id: its last revision's score, the final one once the
    request ended), with their incidents' verdicts. Reads the narrow alert rows, never the events."""
    from sqlalchemy import func, select

    from monitor.store.schema import Alert, Incident, IncidentAlert

    last = (select(Alert.alert_id, func.max(Alert.revision).label("rev")).where(Alert.detector == detector)
            .group_by(Alert.alert_id).subquery())
    q = (select(Alert.alert_id, Alert.score, Alert.event_time, Incident.verdict, Incident.mode)
         .join(last, (Alert.alert_id == last.c.alert_id) & (Alert.revision == last.c.rev))
         .outerjoin(IncidentAlert, IncidentAlert.alert_id == Alert.alert_id)
         .outerjoin(Incident, Incident.event_id == IncidentAlert.incident_event_id)
         .order_by(Alert.event_time.desc()).limit(limit))
    return [ScoredAlert(a, float(s), t, v, m) for a, s, t, v, m in session.execute(q).all()]


def detector_threshold(session, detector: str) -> float | None:
    """The threshold the detector's newest alert was judged against (its definition as it runs now)."""
    from sqlalchemy import select

    from monitor.store.schema import Alert

    row = session.scalars(select(Alert).where(Alert.detector == detector).order_by(Alert.event_time.desc()).limit(1)).first()
    return None if row is None else float(row.event["data"]["threshold"])
