"""A throw-away PostgreSQL cluster in a temporary folder (initdb + pg_ctl), never the shared one."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mixer.bench.launch import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    return found[-1]


class PgCluster:
    def __init__(self):
        # Not under pytest's tmp_path: that is private to root, and initdb runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="mixer-pg-"))
        self.dir = self.root / "pgdata"
        self.port = free_port()
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            shutil.chown(self.root, "postgres")
        subprocess.run([*self.run_as, _bin("initdb"), "-D", str(self.dir), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/mixer"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run([*self.run_as, _bin("pg_ctl"), "-D", str(self.dir), "-o", opts, "-l", str(self.dir / "log"), "-w", "start"], check=True, capture_output=True)

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run([*self.run_as, _bin("pg_ctl"), "-D", str(self.dir), "-m", mode, "-w", "stop"], check=False, capture_output=True)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> None:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mixer")
