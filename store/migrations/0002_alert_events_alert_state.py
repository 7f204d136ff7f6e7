"""alert_events, alert_state

Schema version 2 of the release before Alembic.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "alert_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("monitor", sa.String, nullable=False),
        sa.Column("rule", sa.String, nullable=False),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("severity", sa.String),
        sa.Column("value", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("message", sa.Text),
        sa.Column("labels", sa.JSON),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        # No foreign key: alert history is kept when old runs are pruned.
        sa.Column("run_id", sa.Integer),
    )
    op.create_index("ix_alert_events_monitor_at", "alert_events", ["monitor", "at"])

    op.create_table(
        "alert_state",
        sa.Column("monitor", sa.String, primary_key=True),
        sa.Column("rule", sa.String, primary_key=True),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("consecutive", sa.Integer, nullable=False),
        sa.Column("since", sa.DateTime(timezone=True)),
        sa.Column("last_notified", sa.DateTime(timezone=True)),
        sa.Column("last_value", sa.Float),
        sa.Column("labels", sa.JSON),
        sa.CheckConstraint("state IN ('inactive', 'pending', 'firing', 'resolved')", name="ck_alert_state_state"),
    )
