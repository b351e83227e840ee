"""The store: jobs, the signal log, versions and snapshots in SQLite or PostgreSQL.

Synchronous SQLAlchemy 2.0; the server calls it from one writer thread (group commit) and
from reader threads. Hot inserts use Core bulk statements. Migrations (Alembic) run at open; on
PostgreSQL under an advisory lock, so servers starting at once on a fresh database take turns.

Servers sharing a database (high availability) own jobs through lease rows and announce themselves
through heartbeat rows (`servers`). A job that no live server holds is placed by rendezvous
(highest-random-weight) hashing: D. G. Thaler and C. V. Ravishankar, "Using name-based mappings to
increase hit rates", IEEE/ACM Transactions on Networking 6(1), 1998 -- each server i gets the weight
W(job, S_i) and the job goes to the server of highest weight; when that server leaves, only its
jobs move, each to its next server in weight order. Choices of ours: W is the first 8 bytes of
BLAKE2b over "server id, NUL, job name" read as an unsigned big-endian integer (ties, which would
need equal digests, go to the smaller server id); the server id, not the address, names a server,
so a restarted server keeps its jobs' places; a server always counts itself as live.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mixer.store.models import JobRow, LeaseRow, ServerRow, SignalRow, SnapshotRow, TokenRow, VersionRow
from mixer.store.records import Append, Fence, JobRecord, LeaseLost, LogEntry, SignalRecord
from mixer.types import Version

MIGRATIONS = Path(__file__).parent / "migrations"


_SIGNAL_COLUMNS = ("job_id", *LogEntry._fields, "received_at")
_VERSION_COLUMNS = ("job_id", "version", "effective_step", "trigger_step", "log_seq", "weights", "params_json", "blob", "created_at")
_SNAPSHOT_COLUMNS = ("job_id", "version", "log_seq", "state", "created_at")
_MAX_ROWS_PER_INSERT = 256
"""Rows per multi-row INSERT (x 9 columns: well inside SQLite's and PostgreSQL's parameter limits)."""
_SQLITE_STATEMENTS = 1024
"""Prepared statements SQLite's driver keeps per connection (its default, 128, is fewer than the
INSERT texts of every row count of both hot tables)."""
MIGRATION_LOCK = int.from_bytes(
    hashlib.blake2b(b"mixer.store.migrate", digest_size=8).digest(), "big", signed=True
)
"""The PostgreSQL advisory lock key (a signed 64-bit integer) held while the schema is migrated."""
DEAD_SERVER_KEPT_S = 86_400.0
"""A server's heartbeat row is deleted this long after it ran out (a server killed, never restarted)."""


def rendezvous_weight(server_id: str, job: str) -> int:
    """W(job, S_i) of highest-random-weight hashing: 64 bits of BLAKE2b over server id and job name."""
    return int.from_bytes(hashlib.blake2b(f"{server_id}\0{job}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(job: str, server_ids: list[str]) -> list[str]:
    """The servers in the order they would take `job`: highest weight first (ties: smaller id first)."""
    return sorted(set(server_ids), key=lambda sid: (-rendezvous_weight(sid, job), sid))


def normalize_url(url: str) -> str:
    """Accept a SQLAlchemy URL, a PostgreSQL URL without a driver, or a plain SQLite path."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}" if ":" in creds else url
    return url


SQLITE_SYNCHRONOUS = ("normal", "full")
"""SQLite's durability settings we offer (PRAGMA synchronous, in WAL mode). "normal": a commit
survives the process crashing, but the last commits may roll back if the OS crashes or power
fails (the WAL is synced at checkpoints only); "full": the WAL is synced at every commit, so a
commit also survives an OS crash or power loss, for a sync per commit."""
_SQLITE_SYNCHRONOUS_NAMES = {0: "off", 1: "normal", 2: "full", 3: "extra"}


def _sqlite_pragmas(synchronous: str):
    def on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return on_connect


class Store:
    """Repository over one database URL."""

    def __init__(
        self, url: str, *, migrate: bool = True, sqlite_synchronous: str = "normal", max_transaction_idle: float | None = None
    ):
        """`max_transaction_idle` (PostgreSQL; seconds): the database ends a transaction of ours that
        waits on us longer than this (idle_in_transaction_session_timeout). A lease holder sets it to
        its lease's TTL: paused inside a commit (SIGSTOP, a VM frozen), it would otherwise keep the
        lease row locked, and so the job, from every other server for as long as it is paused."""
        if sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"sqlite_synchronous: must be one of {', '.join(SQLITE_SYNCHRONOUS)}, got {sqlite_synchronous!r}")
        if max_transaction_idle is not None and not 0.001 <= max_transaction_idle <= 86_400:
            raise ValueError(f"max_transaction_idle: must be in [0.001, 86400] seconds, got {max_transaction_idle}")
        self.url = normalize_url(url)
        kwargs: dict[str, Any] = {}
        if self.url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10, "cached_statements": _SQLITE_STATEMENTS}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=8, max_overflow=8)
            if max_transaction_idle is not None:
                kwargs["connect_args"] = {"options": f"-c idle_in_transaction_session_timeout={round(max_transaction_idle * 1000)}"}
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas(sqlite_synchronous))
        self._sqlite = self.url.startswith("sqlite")
        self._mark = "?" if self._sqlite else "%s"
        self._inserts: dict[tuple[str, int], str] = {}
        if migrate:
            self.migrate()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> None:
        """Bring the schema to the newest revision. On PostgreSQL the migration's transaction first
        takes an advisory lock (released at its commit): of servers starting at once, one migrates
        and the others, let in after its commit, find the schema current."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("select pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    def durability(self) -> dict[str, str]:
        """What a commit promises, read back from a live connection: SQLite's journal mode and
        `synchronous`, or PostgreSQL's `synchronous_commit` (and `fsync`)."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                level = conn.exec_driver_sql("PRAGMA synchronous").scalar()
                return {"backend": "sqlite", "journal_mode": str(mode).lower(), "synchronous": _SQLITE_SYNCHRONOUS_NAMES.get(level, str(level))}
            return {
                "backend": self.dialect,
                "synchronous_commit": str(conn.exec_driver_sql("SHOW synchronous_commit").scalar()),
                "fsync": str(conn.exec_driver_sql("SHOW fsync").scalar()),
            }

    # -- jobs ---------------------------------------------------------------------------

    def create_job(self, name: str, spec_json: str, fingerprint: str, strategy: str, source_job: str | None = None) -> tuple[JobRecord, bool]:
        """Insert a job; return (record, created). An existing name returns the stored record."""
        existing = self.get_job(name)
        if existing is not None:
            return existing, False
        with Session(self.engine) as s, s.begin():
            row = JobRow(name=name, spec_json=spec_json, fingerprint=fingerprint, strategy=strategy, created_at=time.time(), source_job=source_job)
            s.add(row)
            s.flush()
            rec = _job(row)
        return rec, True

    def get_job(self, name: str) -> JobRecord | None:
        with Session(self.engine) as s:
            row = s.scalar(select(JobRow).where(JobRow.name == name))
            return _job(row) if row else None

    def list_jobs(self) -> list[JobRecord]:
        with Session(self.engine) as s:
            return [_job(r) for r in s.scalars(select(JobRow).order_by(JobRow.id))]

    def set_job_status(self, name: str, status: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(JobRow).where(JobRow.name == name).values(status=status))

    # -- the log ------------------------------------------------------------------------

    def append(self, batch: list[Append], fence: Fence | None = None) -> None:
        """Commit many jobs' log entries, versions and snapshots in one transaction."""
        now = time.time()
        signals, versions, snaps = [], [], []
        for a in batch:
            job_id = a.job_id
            signals += [(job_id, *entry, now) for entry in a.signals]  # rows in _SIGNAL_COLUMNS order
            for v in a.versions:
                versions.append(_version_row(job_id, v, now))
            if a.snapshot is not None:
                version, log_seq, state = a.snapshot
                snaps.append((job_id, version, log_seq, state, now))
        _check_ints("signals", _SIGNAL_COLUMNS, signals)
        _check_ints("versions", _VERSION_COLUMNS, versions)
        _check_ints("snapshots", _SNAPSHOT_COLUMNS, snaps)
        with self.engine.begin() as conn:
            if fence is not None:
                # Extending our own lease locks its row: a takeover cannot interleave, and a
                # server that lost the job cannot write to its log. Rows are locked in job order,
                # as lease renewal locks them (no deadlock between the two); the clock is read once.
                expires = self._now(conn) + fence.ttl
                for job_id in sorted({a.job_id for a in batch}):
                    res = conn.execute(
                        update(LeaseRow)
                        .where(LeaseRow.job_id == job_id, LeaseRow.owner == fence.owner)
                        .values(expires_at=expires)
                    )
                    if res.rowcount != 1:
                        raise LeaseLost(f"server {fence.owner} no longer owns job id {job_id}")
            # The hot inserts go straight to the driver: SQLAlchemy's per-row work would cost
            # more than the database's on small reports. Each is one statement, never an
            # executemany: PostgreSQL's driver pipelines an executemany, and a backend inside a
            # pipeline stays "active" while it waits for the rest, out of reach of
            # idle_in_transaction_session_timeout; a lease holder paused there would keep its
            # lease rows locked for as long as it is paused.
            self._insert_rows(conn, "signals", _SIGNAL_COLUMNS, signals)
            self._insert_rows(conn, "versions", _VERSION_COLUMNS, versions)
            self._insert_rows(conn, "snapshots", _SNAPSHOT_COLUMNS, snaps)

    def _insert_rows(self, conn, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        """Insert rows with multi-row INSERTs of at most 256 rows (the text for each row count is
        built once). Against a per-row executemany, 2.4 instead of 3.6 us of writer CPU per row at
        130 rows per commit.

        SQLite: one statement per 256 rows (its driver keeps the prepared statements,
        `_SQLITE_STATEMENTS`). The driver lets go of the interpreter lock for every statement, and
        under load each time costs the writer about a millisecond to get it back from the event
        loop (`bench load`: a commit of ~15 batches took 7.4 ms in chunks of powers of two, 5.0 ms
        this way). PostgreSQL: chunks of powers of two, a handful of texts, which its driver keeps
        prepared on the server (it keeps 100; one text per row count would keep replacing them)."""
        i = 0
        while i < len(rows):
            left = len(rows) - i
            n = min(_MAX_ROWS_PER_INSERT, left if self._sqlite else 1 << (left.bit_length() - 1))
            sql = self._inserts.get((table, n))
            if sql is None:
                one = f"({', '.join([self._mark] * len(columns))})"
                sql = self._inserts[table, n] = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * n)}"
            conn.exec_driver_sql(sql, tuple(chain.from_iterable(rows[i : i + n])))
            i += n

    def signals(self, job_id: int, after_seq: int = -1, batch: int = 2000) -> Iterator[SignalRecord]:
        """The log of a job in order, from after `after_seq`, read in pages."""
        last = after_seq
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(SignalRow.__table__).where(SignalRow.job_id == job_id, SignalRow.seq > last).order_by(SignalRow.seq).limit(batch)
                ).all()
            for r in rows:
                yield SignalRecord(r.seq, r.step, r.source, r.source_seq, r.applied_version, r.num_samples, r.received_at, r.payload)
            if len(rows) < batch:
                return
            last = rows[-1].seq

    def has_signal(self, job_id: int, step: int, source: str, source_seq: int) -> int | None:
        """The log position of a report with this key, or None."""
        with self.engine.connect() as conn:
            return conn.scalar(
                select(SignalRow.seq).where(
                    SignalRow.job_id == job_id, SignalRow.step == step, SignalRow.source == source, SignalRow.source_seq == source_seq
                )
            )

    def find_signals(self, job_id: int, source: str, keys: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
        """The log positions of a source's reports with these (step, seq) keys; keys not in the log
        are left out. One query per 500 distinct steps."""
        out: dict[tuple[int, int], int] = {}
        steps = sorted({step for step, _ in keys})
        with self.engine.connect() as conn:
            for i in range(0, len(steps), 500):
                rows = conn.execute(
                    select(SignalRow.step, SignalRow.source_seq, SignalRow.seq).where(
                        SignalRow.job_id == job_id, SignalRow.source == source, SignalRow.step.in_(steps[i : i + 500])
                    )
                ).all()
                for step, source_seq, seq in rows:
                    out[step, source_seq] = seq
        wanted = set(keys)
        return {k: v for k, v in out.items() if k in wanted}

    def max_seq(self, job_id: int) -> int:
        """The newest log position of a job; -1 when its log is empty."""
        with self.engine.connect() as conn:
            seq = conn.scalar(select(func.max(SignalRow.seq)).where(SignalRow.job_id == job_id))
        return -1 if seq is None else seq

    def first_applied_steps(self, job_id: int, after_seq: int, upto_seq: int) -> dict[int, int]:
        """Per weight version, the first step at which a report in (after_seq, upto_seq] of the log
        says it was applied."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(SignalRow.applied_version, func.min(SignalRow.step))
                .where(
                    SignalRow.job_id == job_id,
                    SignalRow.seq > after_seq,
                    SignalRow.seq <= upto_seq,
                    SignalRow.applied_version >= 0,
                )
                .group_by(SignalRow.applied_version)
            ).all()
        return {int(v): int(step) for v, step in rows}

    def log_stats(self, job_id: int) -> tuple[int, int, int]:
        """(report count, max seq, max step) of a job's log; -1 where empty."""
        with self.engine.connect() as conn:
            n, seq, step = conn.execute(
                select(func.count(), func.max(SignalRow.seq), func.max(SignalRow.step)).where(SignalRow.job_id == job_id)
            ).one()
        return n, -1 if seq is None else seq, -1 if step is None else step

    def source_marks(self, job_id: int) -> dict[str, tuple[int, int]]:
        """Per source, the highest (step, seq) in the log: where a resumed session continues."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(SignalRow.source, func.max(SignalRow.step)).where(SignalRow.job_id == job_id).group_by(SignalRow.source)
            ).all()
            marks = {}
            for source, step in rows:
                seq = conn.scalar(
                    select(func.max(SignalRow.source_seq)).where(SignalRow.job_id == job_id, SignalRow.source == source, SignalRow.step == step)
                )
                marks[source] = (step, seq)
        return marks

    # -- versions and snapshots -----------------------------------------------------------

    def versions(self, job_id: int, after: int = -1, limit: int = 0) -> list[tuple[Version, float]]:
        q = select(VersionRow.__table__).where(VersionRow.job_id == job_id, VersionRow.version > after).order_by(VersionRow.version)
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [(_version(r), r.created_at) for r in conn.execute(q)]

    def version(self, job_id: int, *, number: int | None = None, step: int | None = None) -> tuple[Version, float] | None:
        """The newest version, a given number, or the one in force at `step`."""
        q = select(VersionRow.__table__).where(VersionRow.job_id == job_id)
        if number is not None:
            q = q.where(VersionRow.version == number)
        if step is not None:
            q = q.where(VersionRow.effective_step <= step)
        q = q.order_by(VersionRow.version.desc()).limit(1)
        with self.engine.connect() as conn:
            r = conn.execute(q).first()
        return (_version(r), r.created_at) if r else None

    def latest_snapshot(self, job_id: int) -> tuple[int, int, bytes] | None:
        with self.engine.connect() as conn:
            r = conn.execute(
                select(SnapshotRow.version, SnapshotRow.log_seq, SnapshotRow.state)
                .where(SnapshotRow.job_id == job_id)
                .order_by(SnapshotRow.version.desc())
                .limit(1)
            ).first()
        return (r.version, r.log_seq, r.state) if r else None

    # -- leases (high availability) -------------------------------------------------------------

    def _now(self, conn) -> float:
        """The database's clock, so that servers on different hosts agree on lease expiry."""
        if self.dialect == "postgresql":
            return float(conn.scalar(text("select extract(epoch from clock_timestamp())")))
        return time.time()

    def acquire_lease(
        self, job_id: int, owner: str, address: str, ttl: float, *, place: str | None = None
    ) -> tuple[bool, str]:
        """Take or extend the lease of a job; returns (ours, the owner's address).

        With `place` (the job's name), a job that no live server holds is taken only if this server
        comes first in the job's rendezvous order over the live servers; otherwise the answer is
        (False, the address of the server that comes first), and nothing is written."""
        with self.engine.begin() as conn:
            row = conn.execute(select(LeaseRow).where(LeaseRow.job_id == job_id).with_for_update()).first()
            # The clock is read once the row is ours: waiting for the lock can take as long as the
            # holder's transaction, and the expiry is judged against the time we got it.
            now = self._now(conn)
            if row is not None and row.owner != owner and row.expires_at >= now:
                return False, row.address
            if place is not None and (row is None or row.owner != owner):
                first, first_address = self._placement(conn, place, owner, address, now)
                if first != owner:
                    return False, first_address
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(LeaseRow).values(job_id=job_id, owner=owner, address=address, expires_at=now + ttl, epoch=1))
                    return True, address
                except IntegrityError:
                    row = conn.execute(select(LeaseRow).where(LeaseRow.job_id == job_id).with_for_update()).first()
            if row.owner == owner or row.expires_at < now:
                conn.execute(
                    update(LeaseRow)
                    .where(LeaseRow.job_id == job_id)
                    .values(owner=owner, address=address, expires_at=now + ttl, epoch=row.epoch + (row.owner != owner))
                )
                return True, address
            return False, row.address

    def _placement(self, conn, job: str, me: str, my_address: str, now: float) -> tuple[str, str]:
        """(server id, address) of the live server that comes first in `job`'s rendezvous order."""
        live = self._live(conn, now)
        live[me] = my_address
        first = rendezvous_order(job, list(live))[0]
        return first, live[first]

    def placement(self, job: str, me: str, my_address: str) -> tuple[str, str]:
        """(server id, address) of the live server a new job named `job` belongs to."""
        with self.engine.connect() as conn:
            return self._placement(conn, job, me, my_address, self._now(conn))

    def live_servers(self) -> dict[str, str]:
        """Server id -> address of every server whose heartbeat has not run out."""
        with self.engine.connect() as conn:
            return self._live(conn, self._now(conn))

    def _live(self, conn, now: float) -> dict[str, str]:
        q = select(ServerRow.server_id, ServerRow.address).where(ServerRow.expires_at >= now)
        return dict(conn.execute(q).all())

    def heartbeat(self, server_id: str, address: str, ttl: float, job_ids: list[int]) -> list[int]:
        """Announce this server as live for `ttl` seconds and extend its leases of `job_ids`, in one
        transaction (so its heartbeat never outlives its leases); returns the job ids whose lease
        it no longer holds."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            beat = (
                update(ServerRow)
                .where(ServerRow.server_id == server_id)
                .values(address=address, expires_at=now + ttl)
            )
            if conn.execute(beat).rowcount != 1:
                try:
                    with conn.begin_nested():
                        row = {"server_id": server_id, "address": address, "expires_at": now + ttl}
                        conn.execute(insert(ServerRow).values(**row))
                except IntegrityError:
                    conn.execute(beat)
            conn.execute(delete(ServerRow).where(ServerRow.expires_at < now - DEAD_SERVER_KEPT_S))
            return self._renew(conn, job_ids, server_id, ttl, now)

    def renew_leases(self, job_ids: list[int], owner: str, ttl: float) -> list[int]:
        """Extend our leases; returns the job ids whose lease we no longer hold."""
        with self.engine.begin() as conn:
            return self._renew(conn, job_ids, owner, ttl, self._now(conn))

    def _renew(self, conn, job_ids: list[int], owner: str, ttl: float, now: float) -> list[int]:
        lost = []
        for job_id in sorted(job_ids):  # in job order, as a group commit locks them
            res = conn.execute(
                update(LeaseRow)
                .where(LeaseRow.job_id == job_id, LeaseRow.owner == owner)
                .values(expires_at=now + ttl)
            )
            if res.rowcount != 1:
                lost.append(job_id)
        return lost

    def release_leases(self, owner: str) -> None:
        """Hand this server's jobs over at once and leave the live set (a graceful stop)."""
        with self.engine.begin() as conn:
            conn.execute(update(LeaseRow).where(LeaseRow.owner == owner).values(expires_at=0.0))
            conn.execute(delete(ServerRow).where(ServerRow.server_id == owner))

    # -- tokens ---------------------------------------------------------------------------

    def add_token(self, token_id: str, job: str, role: str, secret_hash: str) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(TokenRow(id=token_id, job=job, role=role, secret_hash=secret_hash, created_at=time.time(), revoked=False))

    def get_token(self, token_id: str) -> tuple[str, str, str, bool] | None:
        """(job, role, secret hash, revoked) of a token id."""
        with self.engine.connect() as conn:
            r = conn.execute(select(TokenRow.job, TokenRow.role, TokenRow.secret_hash, TokenRow.revoked).where(TokenRow.id == token_id)).first()
        return (r.job, r.role, r.secret_hash, bool(r.revoked)) if r else None

    def revoke_token(self, token_id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(update(TokenRow).where(TokenRow.id == token_id).values(revoked=True)).rowcount == 1

    def overwrite_version_weights(self, job_id: int, version: int, weights: np.ndarray) -> None:
        """Change a stored version in place. Only for tests of `replay --verify` on a corrupted record."""
        with self.engine.begin() as conn:
            conn.execute(
                update(VersionRow)
                .where(VersionRow.job_id == job_id, VersionRow.version == version)
                .values(weights=np.asarray(weights, dtype="<f8").tobytes())
            )


_INT64 = (-(1 << 63), (1 << 63) - 1)
_INT32 = (-(1 << 31), (1 << 31) - 1)
_RANGES = {
    "signals": {"seq": _INT64, "step": _INT64, "source_seq": _INT64, "applied_version": _INT64, "num_samples": _INT32},
    "versions": {"version": _INT64, "effective_step": _INT64, "trigger_step": _INT64, "log_seq": _INT64},
    "snapshots": {"version": _INT64, "log_seq": _INT64},
}


class RowOutOfRange(ValueError):
    """An integer of a row does not fit its column; nothing of the commit is written."""


def _check_ints(table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """Refuse, before any SQL, an integer that would not fit its column (the ingest path bounds
    them; this is the last line: a database error would come later and less clearly). Each
    column's least and greatest value first; row by row only to name one out of range."""
    if not rows:
        return
    values = list(zip(*rows))
    for column, (lo, hi) in _RANGES[table].items():
        i = columns.index(column)
        if lo <= min(values[i]) and max(values[i]) <= hi:
            continue
        for r in rows:
            if not lo <= r[i] <= hi:
                raise RowOutOfRange(f"{table}.{column} = {r[i]} of job id {r[0]} is outside [{lo}, {hi}]")


def _job(row: JobRow) -> JobRecord:
    return JobRecord(row.id, row.name, row.spec_json, row.fingerprint, row.strategy, row.created_at, row.source_job, row.status)


def _version_row(job_id: int, v: Version, now: float) -> tuple:
    """A version's row, in _VERSION_COLUMNS order."""
    return (
        job_id,
        v.version,
        v.effective_step,
        v.trigger_step,
        v.log_seq,
        np.asarray(v.weights, dtype="<f8").tobytes(),
        json.dumps(v.params, sort_keys=True),
        v.blob,
        now,
    )


def _version(r: Any) -> Version:
    return Version(
        version=r.version,
        effective_step=r.effective_step,
        weights=np.frombuffer(r.weights, dtype="<f8").astype(np.float64),
        params=json.loads(r.params_json),
        blob=bytes(r.blob),
        trigger_step=r.trigger_step,
        log_seq=r.log_seq,
    )
