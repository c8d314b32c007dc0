"""Incident events move to their own table, so listing, filtering and counting never read them; the
per-detector rows carry every filter of the list, so totals and counts need no join.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incident_bodies",
        sa.Column("event_id", sa.String(64), sa.ForeignKey("incidents.event_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("event", sa.JSON, nullable=False),
    )
    op.execute("INSERT INTO incident_bodies (event_id, event) SELECT event_id, event FROM incidents")
    with op.batch_alter_table("incidents") as t:
        t.drop_column("event")
    with op.batch_alter_table("incident_detectors") as t:
        for name, length in (("model", 256), ("deployment", 256), ("incident_severity", 16)):
            t.add_column(sa.Column(name, sa.String(length), nullable=False, server_default=""))
        t.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="open"))
        t.add_column(sa.Column("verdict", sa.String(16), nullable=True))
        t.drop_index("ix_incident_detectors_detector_time")
        t.create_index("ix_incident_detectors_detector_time", ["detector", "event_time", "incident_event_id"])
    for col in ("model", "deployment", "status", "verdict"):
        op.execute(f"UPDATE incident_detectors SET {col} = (SELECT i.{col} FROM incidents i "
                   "WHERE i.event_id = incident_detectors.incident_event_id)")
    op.execute("UPDATE incident_detectors SET incident_severity = (SELECT i.severity FROM incidents i "
               "WHERE i.event_id = incident_detectors.incident_event_id)")


def downgrade() -> None:
    with op.batch_alter_table("incident_detectors") as t:
        t.drop_index("ix_incident_detectors_detector_time")
        t.create_index("ix_incident_detectors_detector_time", ["detector", "event_time"])
        for name in ("verdict", "status", "incident_severity", "deployment", "model"):
            t.drop_column(name)
    with op.batch_alter_table("incidents") as t:
        t.add_column(sa.Column("event", sa.JSON, nullable=True))
    op.execute("UPDATE incidents SET event = (SELECT event FROM incident_bodies b WHERE b.event_id = incidents.event_id)")
    op.drop_table("incident_bodies")
