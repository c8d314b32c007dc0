"""A detector may record at a lower tier before it pages: `tier` on the incident (`page` or `record`), and on
its per-detector rows (which carry every filter of the list). Existing incidents were all paging-tier.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("incidents") as t:
        t.add_column(sa.Column("tier", sa.String(8), nullable=False, server_default="page"))
    with op.batch_alter_table("incident_detectors") as t:
        t.add_column(sa.Column("incident_tier", sa.String(8), nullable=False, server_default="page"))


def downgrade() -> None:
    with op.batch_alter_table("incident_detectors") as t:
        t.drop_column("incident_tier")
    with op.batch_alter_table("incidents") as t:
        t.drop_column("tier")
