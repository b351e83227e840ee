"""Initial schema: jobs, signals, versions, snapshots.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("strategy", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("source_job", sa.String(128), nullable=True),
    )
    op.create_table(
        "signals",
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(256), nullable=False),
        sa.Column("source_seq", sa.BigInteger, nullable=False),
        sa.Column("applied_version", sa.BigInteger, nullable=False),
        sa.Column("num_samples", sa.Integer, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("job_id", "step", "source", "source_seq", name="uq_signals_key"),
    )
    op.create_table(
        "versions",
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("effective_step", sa.BigInteger, nullable=False),
        sa.Column("trigger_step", sa.BigInteger, nullable=False),
        sa.Column("log_seq", sa.BigInteger, nullable=False),
        sa.Column("weights", sa.LargeBinary, nullable=False),
        sa.Column("params_json", sa.Text, nullable=False),
        sa.Column("blob", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_versions_effective_step", "versions", ["effective_step"])
    op.create_table(
        "snapshots",
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("log_seq", sa.BigInteger, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("snapshots")
    op.drop_index("ix_versions_effective_step", "versions")
    op.drop_table("versions")
    op.drop_table("signals")
    op.drop_table("jobs")
