"""alert_deliveries

Schema version 3 of the release before Alembic.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("monitor", sa.String, nullable=False),
        sa.Column("rule", sa.String, nullable=False),
        sa.Column("sink", sa.String, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("repeat", sa.Boolean, nullable=False),
        sa.Column("outcome", sa.String, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("error", sa.Text),
        # No foreign key, like alert_events.run_id: a repeat notification has no event of its own.
        sa.Column("event_id", sa.Integer),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("outcome IN ('delivered', 'failed', 'dropped')", name="ck_alert_deliveries_outcome"),
    )
    op.create_index("ix_alert_deliveries_monitor_at", "alert_deliveries", ["monitor", "at"])
