"""A throwaway PostgreSQL server for the tests: a cluster of its own, on a free loopback port.

`start_server()` runs `initdb` in a fresh temporary directory, starts `postgres` with
`pg_ctl` on 127.0.0.1 and a free port (trust authentication, loopback only), and
`PostgresServer.stop()` stops it and deletes the directory. PostgreSQL refuses to run as
root, so under root (CI) the cluster belongs to the `postgres` user (or `nobody`) and its
commands run as that user. Each test gets a database of its own (`new_database()`).

Where the server binaries are: `$MICROTE_PG_BINDIR`, else `initdb` on `PATH`, else the
newest `/usr/lib/postgresql/*/bin` (Debian, Ubuntu), else `pg_config --bindir`. If none
has them, the tests fail (CI installs them: .ci/run).

`MICROTE_TEST_POSTGRES_URL=postgresql+psycopg://user@host:port/postgres` uses an existing
server instead (the user needs CREATEDB); the test databases are dropped at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.conninfo import make_conninfo

BINDIR_ENV = "MICROTE_PG_BINDIR"
URL_ENV = "MICROTE_TEST_POSTGRES_URL"
SUPERUSER = "microte"
# Test databases collate like a typical production server (en_US), not in byte order, so a
# result that depends on the collation differs from SQLite here and is caught.
ICU_LOCALE = "en-US"
INSTALL_HINT = (
    "install them (Debian/Ubuntu: apt-get install postgresql; .ci/run does it in CI), "
    f"or set {BINDIR_ENV} to the directory with initdb, pg_ctl and postgres, "
    f"or {URL_ENV} to an existing server's admin URL"
)


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started."""


def find_bindir() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""

    def complete(d: Path) -> bool:
        return all((d / exe).is_file() and os.access(d / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres"))

    candidates: list[Path] = []
    if os.environ.get(BINDIR_ENV):
        candidates.append(Path(os.environ[BINDIR_ENV]))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
    return next((d for d in candidates if complete(d)), None)


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A plain psycopg connection to the database of a SQLAlchemy `postgresql[+driver]://` URL:
    independent of the code under test."""
    u = sa.make_url(url)
    params: dict[str, Any] = {"host": u.host, "port": u.port, "user": u.username, "password": u.password}
    params |= {str(k): str(v) for k, v in u.query.items()}  # libpq options (sslmode, host=...)
    conninfo = make_conninfo(dbname=u.database or "postgres", connect_timeout=10, **params)
    return psycopg.connect(conninfo, autocommit=autocommit)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account that owns the cluster when we are root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


@dataclass
class PostgresServer:
    """A running server: `admin_url` reaches its maintenance database as a superuser."""

    admin_url: str
    version: str = ""
    icu: bool = False  # test databases use the ICU en-US collation
    root: Path | None = None  # the cluster's temporary directory (None: an existing server)
    pg_ctl: list[str] = field(default_factory=list)  # pg_ctl and its -D, as the cluster's owner
    _run: Any = None
    _created: list[str] = field(default_factory=list)
    _names: Any = field(default_factory=itertools.count)

    def url(self, database: str) -> str:
        return sa.make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def _admin(self) -> psycopg.Connection[Any]:
        return connect(self.admin_url, autocommit=True)

    def new_database(self, prefix: str = "t") -> str:
        """Create an empty database; returns its SQLAlchemy URL (driver psycopg 3)."""
        name = f"microte_{prefix}_{next(self._names)}_{uuid.uuid4().hex[:8]}"
        # template0: a clean copy that may take another collation than the cluster's.
        options = "TEMPLATE template0 ENCODING 'UTF8'"
        if self.icu:
            options += f" LOCALE_PROVIDER icu ICU_LOCALE '{ICU_LOCALE}' LOCALE 'C'"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" {options}')
        self._created.append(name)
        return self.url(name)

    def stop(self) -> None:
        if self.root is None:  # an existing server: drop what we created
            with contextlib.suppress(psycopg.Error), self._admin() as conn:
                for name in self._created:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        try:
            self._run([*self.pg_ctl, "stop", "-m", "fast", "-w", "-t", "60"], check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _probe(server: PostgresServer) -> PostgresServer:
    with server._admin() as conn:
        row = conn.execute(  # ICU collations exist when the server was built with ICU
            "SELECT current_setting('server_version'), EXISTS (SELECT 1 FROM pg_collation WHERE collprovider = 'i')"
        ).fetchone()
        assert row is not None
        server.version = str(row[0])
        major = int(re.match(r"\d+", server.version).group())  # type: ignore[union-attr]
        server.icu = bool(row[1]) and major >= 15  # per-database ICU locales: PostgreSQL 15+
    return server


def start_server(timeout: float = 60.0) -> PostgresServer:
    """Start a throwaway cluster (or use $MICROTE_TEST_POSTGRES_URL); raises PostgresUnavailable."""
    if os.environ.get(URL_ENV):
        try:
            return _probe(PostgresServer(admin_url=os.environ[URL_ENV]))
        except psycopg.Error as exc:
            raise PostgresUnavailable(f"cannot reach the PostgreSQL server at ${URL_ENV}: {exc}") from exc
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: {INSTALL_HINT}")
    owner = _run_as()
    root = Path(tempfile.mkdtemp(prefix="microte-pg-"))
    data, log = root / "data", root / "server.log"

    def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if owner is not None:
            kwargs = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        proc = subprocess.run(
            cmd, cwd=root, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs
        )
        if check and proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise PostgresUnavailable(
                f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{tail}".rstrip()
            )
        return proc

    try:
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        # --no-sync: initdb's own files only; the server runs with its defaults (fsync on).
        run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]
        for attempt in itertools.count():
            port = free_port()
            options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
            started = run(
                [*pg_ctl, "start", "-w", "-t", str(int(timeout)), "-l", str(log), "-o", options], check=attempt >= 4
            )
            if started.returncode == 0:
                break
            time.sleep(0.2)  # the free port was taken meanwhile: try another
        server = PostgresServer(
            admin_url=f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/postgres", root=root, pg_ctl=pg_ctl, _run=run
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        return _probe(server)
    except BaseException:
        server.stop()
        raise
