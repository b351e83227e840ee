"""Persistence: SQLAlchemy models, the repository, Alembic migrations, the group-commit writer."""

from mixer.store.records import Append, JobRecord, LogEntry, SignalRecord
from mixer.store.repository import Store, normalize_url, redact

__all__ = ["Append", "JobRecord", "LogEntry", "SignalRecord", "Store", "normalize_url", "redact"]
