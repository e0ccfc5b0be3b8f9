"""A throwaway PostgreSQL server for the ledger's tests and benchmarks (tests/_ledger_stores.py,
``bench_ledger.py --store postgres``): Debian's ``postgresql`` package, installed by
``deploy/setup.sh``; never a server that happens to run on the machine.

:class:`PostgresServer` runs ``initdb`` into a temporary directory (as the ``postgres`` user when
run as root: PostgreSQL refuses to run as root), starts the server on a Unix socket in that
directory with no TCP listener, and removes everything when stopped.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgresServer", "postgres_bindir"]


def postgres_bindir() -> Path:
    """Where the server's programs are: ``$TOKENWEIR_PG_BINDIR``, Debian's newest
    ``/usr/lib/postgresql/N/bin``, or ``initdb`` on the PATH."""
    if env := os.environ.get("TOKENWEIR_PG_BINDIR"):
        return Path(env)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if found:
        return Path(found[-1]).parent
    if initdb := shutil.which("initdb"):
        return Path(initdb).parent
    raise RuntimeError(
        "PostgreSQL's server programs (initdb, pg_ctl) are not installed: run `bash deploy/setup.sh`, "
        "which installs Debian's postgresql package"
    )


class PostgresServer:
    """A throwaway PostgreSQL server on a Unix socket in a temporary directory."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="tw-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user: str | None = None
        self._names = itertools.count(1)
        if os.geteuid() == 0:  # initdb and postgres refuse root: run them as the package's user
            self._user = "postgres"
            pw = pwd.getpwnam(self._user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                  "-E", "UTF8", "--locale=C")  # fmt: skip
        options = (
            f"-k {self.root} -c listen_addresses='' -p 5432 -c max_connections=200"
            f" -c fsync={'on' if fsync else 'off'} -c full_page_writes={'on' if fsync else 'off'}"
        )
        try:
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options,
                      "start")  # fmt: skip
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, program: str, *args: str) -> None:
        cmd = [str(self.bindir / program), *args]
        p = subprocess.run(cmd, user=self._user, capture_output=True, text=True, timeout=120, cwd=self.root)
        if p.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}{log}")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.root} port=5432 user=postgres dbname={dbname}"

    def create_database(self) -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"ledger_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return self.dsn(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
