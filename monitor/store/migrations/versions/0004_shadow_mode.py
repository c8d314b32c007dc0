"""Incidents that only detectors in shadow mode fired on are kept apart: `mode` on the incident, and
on its per-detector rows (which carry every filter of the list). Existing incidents were all live.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("incidents") as t:
        t.add_column(sa.Column("mode", sa.String(8), nullable=False, server_default="live"))
    with op.batch_alter_table("incident_detectors") as t:
        t.add_column(sa.Column("incident_mode", sa.String(8), nullable=False, server_default="live"))


def downgrade() -> None:
    with op.batch_alter_table("incident_detectors") as t:
        t.drop_column("incident_mode")
    with op.batch_alter_table("incidents") as t:
        t.drop_column("mode")
