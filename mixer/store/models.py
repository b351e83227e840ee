"""Tables: jobs, the append-only signal log, weight versions, and strategy snapshots."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    spec_json: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    source_job: Mapped[str | None] = mapped_column(String(128), nullable=True, default=None)
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")


class SignalRow(Base):
    """One accepted report. `payload` is the wire `Signals` message, exact and compact."""

    __tablename__ = "signals"
    __table_args__ = (UniqueConstraint("job_id", "step", "source", "source_seq", name="uq_signals_key"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    step: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(256))
    source_seq: Mapped[int] = mapped_column(BigInteger)
    applied_version: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class VersionRow(Base):
    """A weight version; `weights` is little-endian float64 bytes (exact)."""

    __tablename__ = "versions"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    effective_step: Mapped[int] = mapped_column(BigInteger, index=True)
    trigger_step: Mapped[int] = mapped_column(BigInteger)
    log_seq: Mapped[int] = mapped_column(BigInteger)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    params_json: Mapped[str] = mapped_column(Text)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class SnapshotRow(Base):
    """Engine state right after a version; restart = newest snapshot + the log after `log_seq`."""

    __tablename__ = "snapshots"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    log_seq: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Float)


class TokenRow(Base):
    """A bearer token: `mx_<id>_<secret>`; only a SHA-256 of the secret is kept."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job: Mapped[str] = mapped_column(String(128))
    """The job it grants access to, or '*' for every job."""
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class LeaseRow(Base):
    """Which server owns a job (high availability); `epoch` grows with each hand-over."""

    __tablename__ = "leases"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    address: Mapped[str] = mapped_column(String(256))
    expires_at: Mapped[float] = mapped_column(Float)
    epoch: Mapped[int] = mapped_column(BigInteger)


class ServerRow(Base):
    """A live server of a shared database (high availability): its heartbeat, which places new jobs."""

    __tablename__ = "servers"

    server_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    address: Mapped[str] = mapped_column(String(256))
    expires_at: Mapped[float] = mapped_column(Float)
