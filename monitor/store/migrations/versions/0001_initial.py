"""Alert and incident events, and dead letters.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(512), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("deployment", sa.String(256), nullable=False),
        sa.Column("namespace", sa.String(256), nullable=True),
        sa.Column("detectors", sa.JSON, nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("alert_ids", sa.JSON, nullable=False),
        sa.Column("text_policy", sa.String(16), nullable=False),
        sa.Column("event_time", TZ, nullable=False),
        sa.Column("received_at", TZ, nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
    )
    op.create_index("ix_incidents_request_id", "incidents", ["request_id"])
    op.create_index("ix_incidents_event_time", "incidents", ["event_time"])
    op.create_table(
        "incident_alerts",
        sa.Column("alert_id", sa.String(64), primary_key=True),
        sa.Column("incident_event_id", sa.String(64), nullable=False),
    )
    op.create_index("ix_incident_alerts_incident_event_id", "incident_alerts", ["incident_event_id"])
    op.create_table(
        "alerts",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("alert_id", sa.String(64), nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("request_id", sa.String(512), nullable=False),
        sa.Column("detector", sa.String(128), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("event_time", TZ, nullable=False),
        sa.Column("received_at", TZ, nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
    )
    op.create_index("ix_alerts_alert_id", "alerts", ["alert_id"])
    op.create_index("ix_alerts_request_id", "alerts", ["request_id"])
    op.create_index("ix_alerts_event_time", "alerts", ["event_time"])
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("topic", sa.String(256), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("raw", sa.Text, nullable=False),
        sa.Column("received_at", TZ, nullable=False),
    )
    op.create_index("ix_dead_letters_source", "dead_letters", ["topic", "partition", "offset"], unique=True)


def downgrade() -> None:
    op.drop_table("dead_letters")
    op.drop_table("alerts")
    op.drop_table("incident_alerts")
    op.drop_table("incidents")
