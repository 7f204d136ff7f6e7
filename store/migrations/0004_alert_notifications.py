"""alert_notifications; alert_deliveries.notification_id and outcome 'abandoned'

Delivery is tracked per sink: each notification to each sink is a row of alert_notifications,
pending until that sink takes it (retried with backoff meanwhile), and every attempt is a row of
alert_deliveries that names it. An attempt cut short by a stop is recorded as 'abandoned'.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def _deliveries_at_0003() -> sa.Table:
    """alert_deliveries as revision 0003 created it: SQLite cannot alter a CHECK constraint, so
    Alembic's batch mode rebuilds the table from this definition (and copies the rows)."""
    return sa.Table(
        "alert_deliveries", sa.MetaData(),
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
        sa.Column("event_id", sa.Integer),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("outcome IN ('delivered', 'failed', 'dropped')", name="ck_alert_deliveries_outcome"),
        sa.Index("ix_alert_deliveries_monitor_at", "monitor", "at"),
    )


def upgrade() -> None:
    op.create_table(
        "alert_notifications",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("monitor", sa.String, nullable=False),
        sa.Column("rule", sa.String, nullable=False),
        sa.Column("sink", sa.String, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("repeat", sa.Boolean, nullable=False),
        # No foreign key, like alert_deliveries.event_id.
        sa.Column("event_id", sa.Integer),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("state IN ('pending', 'delivered', 'failed', 'superseded')",
                           name="ck_alert_notifications_state"),
    )
    op.create_index("ix_alert_notifications_state_next", "alert_notifications", ["state", "next_attempt_at"])
    op.create_index("ix_alert_notifications_monitor_rule", "alert_notifications", ["monitor", "rule", "sink"])

    with op.batch_alter_table("alert_deliveries", copy_from=_deliveries_at_0003()) as batch:
        batch.add_column(sa.Column("notification_id", sa.Integer))
        batch.drop_constraint("ck_alert_deliveries_outcome", type_="check")
        batch.create_check_constraint("ck_alert_deliveries_outcome",
                                      "outcome IN ('delivered', 'failed', 'dropped', 'abandoned')")
