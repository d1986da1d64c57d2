"""A throw-away PostgreSQL cluster (Debian's `postgresql` package) on a free loopback port.

initdb and the server run as the `postgres` user (the server refuses root) in a data
directory under base; trust authentication on loopback only, fsync off (nothing here must
survive the machine). Each test asks for a database of its own with create_database().
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness.procs import HarnessError, Service, free_port, run, spawn

PG_USER = "postgres"


def postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin; HarnessError when the package is missing."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version)
    if not found:
        raise HarnessError(
            "PostgreSQL server not installed (Debian package `postgresql`; "
            "scripts/install-deps.sh installs it)"
        )
    return Path(found[-1]).parent


def _version(path: str) -> float:
    try:
        return float(Path(path).parts[-3])
    except ValueError:
        return 0.0


@dataclass
class Postgres:
    base: Path
    cluster: Path  # data directory and sockets (owned by the postgres user)
    port: int
    bin_dir: Path
    service: Service | None = None  # None before start()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn(database),
                "-c",
                sql,
            ],
            f"psql {sql[:40]!r}",
            timeout=60,
        )
        return result.stdout

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its connection URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def start(self, timeout: float = 60.0) -> None:
        """Start the server on the cluster (again, after stop_server: same port and data)."""
        as_postgres = ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups"]
        argv = [*as_postgres, str(self.bin_dir / "postgres"), "-D", str(self.cluster / "data")]
        argv += ["-p", str(self.port), "-k", str(self.cluster / "sockets")]
        for setting in ("listen_addresses=127.0.0.1", "fsync=off", "max_connections=200"):
            argv += ["-c", setting]
        service = self.service = spawn("postgres", argv, self.base / "postgres.log")
        port = self.port
        service.wait_until(lambda: _accepts(port), "accepting connections", timeout=timeout)
        # The port opens a moment before the server takes queries.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.psql("SELECT 1")
                return
            except HarnessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop_server(self) -> None:
        # SIGINT: PostgreSQL's "fast" shutdown (disconnects clients instead of waiting).
        if self.service is not None:
            self.service.stop(signum=signal.SIGINT, timeout=30)

    def stop(self) -> None:
        self.stop_server()
        shutil.rmtree(self.cluster, ignore_errors=True)


def start_postgres(base: Path, timeout: float = 60.0) -> Postgres:
    """initdb + postgres; its log goes to base/postgres.log. The cluster lives in a directory
    of its own under the temp dir: the postgres user cannot enter the callers' 0700 ones."""
    bin_dir = postgres_bin_dir()
    try:
        owner = pwd.getpwnam(PG_USER)
    except KeyError:
        raise HarnessError(f"no {PG_USER} user (Debian package `postgresql` creates it)") from None
    base.mkdir(parents=True, exist_ok=True)
    cluster = Path(tempfile.mkdtemp(prefix="lzs-pg-"))
    os.chown(cluster, owner.pw_uid, owner.pw_gid)
    data = cluster / "data"
    sockets = cluster / "sockets"
    sockets.mkdir()
    os.chown(sockets, owner.pw_uid, owner.pw_gid)
    # setpriv execs (no parent process in between): signals reach postgres itself.
    as_postgres = ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups"]
    run(
        [
            *as_postgres,
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            PG_USER,
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale",
            "C",
        ],
        "initdb",
        timeout=120,
    )
    postgres = Postgres(base, cluster, free_port(), bin_dir)
    postgres.start(timeout)
    return postgres


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
