"""Triage state and history, the per-detector index behind the console's filters, and the audit log.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def upgrade() -> None:
    with op.batch_alter_table("incidents") as t:
        t.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="open"))
        t.add_column(sa.Column("verdict", sa.String(16), nullable=True))
        t.add_column(sa.Column("verdict_note", sa.Text, nullable=True))
        t.add_column(sa.Column("triaged_by", sa.String(256), nullable=True))
        t.add_column(sa.Column("triaged_at", TZ, nullable=True))
    for col in ("model", "deployment", "severity", "status", "verdict"):
        op.create_index(f"ix_incidents_{col}_time", "incidents", [col, "event_time"])
    op.create_table(
        "incident_detectors",
        sa.Column("incident_event_id", sa.String(64), primary_key=True),
        sa.Column("detector", sa.String(128), primary_key=True),
        sa.Column("concept", sa.String(128), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("event_time", TZ, nullable=False),
    )
    op.create_index("ix_incident_detectors_detector_time", "incident_detectors", ["detector", "event_time"])
    op.create_index("ix_incident_detectors_concept_time", "incident_detectors", ["concept", "event_time"])
    op.create_table(
        "triage_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("incident_event_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("at", TZ, nullable=False),
    )
    op.create_index("ix_triage_events_incident_event_id", "triage_events", ["incident_event_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(512), nullable=True),
        sa.Column("client", sa.String(64), nullable=True),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    # Incidents stored before this revision get their detector rows from their own events.
    bind = op.get_bind()
    incidents = sa.table("incidents", sa.column("event_id"), sa.column("event_time"), sa.column("event", sa.JSON))
    rows = []
    for event_id, event_time, event in bind.execute(sa.select(incidents.c.event_id, incidents.c.event_time,
                                                              incidents.c.event)):
        for d in event["data"]["detectors"]:
            if d["fired"]:
                rows.append(dict(incident_event_id=event_id, detector=d["name"], concept=d["concept"],
                                 severity=d["severity"], event_time=event_time))
    if rows:
        op.bulk_insert(sa.table("incident_detectors", *(sa.column(c) for c in
                                ("incident_event_id", "detector", "concept", "severity", "event_time"))), rows)


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("triage_events")
    op.drop_table("incident_detectors")
    for col in ("model", "deployment", "severity", "status", "verdict"):
        op.drop_index(f"ix_incidents_{col}_time", "incidents")
    with op.batch_alter_table("incidents") as t:
        for col in ("triaged_at", "triaged_by", "verdict_note", "verdict", "status"):
            t.drop_column(col)
