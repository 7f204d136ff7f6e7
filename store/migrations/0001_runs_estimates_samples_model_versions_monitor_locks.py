"""runs, estimates, samples, model_versions, monitor_locks

Schema version 1 of the release before Alembic.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

# Plain types, frozen here: sa.DateTime(timezone=True) is the DDL of the store's UTCDateTime, and
# sa.JSON that of its JSON columns; the conversions those types add happen on reads and writes only.


def upgrade() -> None:
    # op.create_table never checks first: a database that already has a `runs` table of some other
    # program fails loudly here instead of being adopted.
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("monitor", sa.String, nullable=False),
        sa.Column("model_ref", sa.String, nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("config_hash", sa.String, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("owner_instance", sa.String, nullable=False),
        sa.Column("owner_token", sa.String, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("duration_s", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("settings", sa.JSON),
        sa.Column("timings", sa.JSON),
        sa.Column("report", sa.JSON),
        sa.Column("method", sa.String),
        sa.Column("n_prompts", sa.Integer),
        sa.Column("n_samples", sa.Integer),
        sa.Column("n_harmful", sa.Integer),
        *(sa.Column(name, sa.Float) for name in ("p_hat", "ci_low", "ci_high", "std_error", "ess", "khat")),
        sa.Column("reliable", sa.Boolean),
        sa.Column("volume", sa.Float),
        sa.Column("window", sa.String),
        *(sa.Column(name, sa.Float) for name in ("expected_per_window", "expected_ci_low", "expected_ci_high",
                                                 "p_any_per_window", "p_any_ci_low", "p_any_ci_high",
                                                 "worst_query_p")),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'interrupted')", name="ck_runs_status"),
    )
    op.create_index("ix_runs_monitor_started", "runs", ["monitor", "started_at"])
    op.create_index("ix_runs_status", "runs", ["status"])

    op.create_table(
        "estimates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prompt_index", sa.Integer, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("category", sa.String),
        sa.Column("method", sa.String),
        sa.Column("n_samples", sa.Integer),
        *(sa.Column(name, sa.Float) for name in ("p_hat", "ci_low", "ci_high")),
        sa.Column("n_harmful", sa.Integer),
        *(sa.Column(name, sa.Float) for name in ("ess", "ess_wh", "khat", "kl")),
        sa.Column("reliable", sa.Boolean),
        sa.Column("upper_bound_only", sa.Boolean),
        sa.Column("warnings", sa.JSON),
        sa.UniqueConstraint("run_id", "prompt_index", name="uq_estimates_run_prompt"),
    )

    op.create_table(
        "samples",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prompt_index", sa.Integer, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("log_weight", sa.Float),
        sa.Column("component", sa.Integer),
        sa.CheckConstraint("score >= 0 AND score <= 1", name="ck_samples_score"),
    )
    op.create_index("ix_samples_run", "samples", ["run_id"])

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("monitor", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("model_ref", sa.String, nullable=False),
        sa.Column("fingerprint", sa.String, nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("monitor", "version", name="uq_model_versions_monitor_version"),
    )

    op.create_table(
        "monitor_locks",
        sa.Column("monitor", sa.String, primary_key=True),
        sa.Column("owner_instance", sa.String, nullable=False),
        sa.Column("owner_token", sa.String, nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    )
