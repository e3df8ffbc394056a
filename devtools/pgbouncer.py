"""PgBouncer (Debian's ``pgbouncer`` package) in front of a PostgreSQL, for tests.

Transaction pooling with a small server pool, as production runs it
(``docs/operations.md``): every database of the upstream server is reachable under
its own name (the ``*`` entry), and the admin console (database ``pgbouncer``)
answers ``SHOW CLIENTS`` and ``SHOW SERVERS`` (simple query protocol only).
PgBouncer refuses to run as root; as root it is started as the ``pgserver`` user
that runs the embedded PostgreSQL.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from devtools.embedded import free_port
from rag.platform.errors import ConfigError

#: Where Debian puts it (not on a non-root PATH).
CANDIDATES = ("pgbouncer", "/usr/sbin/pgbouncer")


def pgbouncer_binary() -> str | None:
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


@dataclass
class PgBouncer:
    """A PgBouncer on a free port in front of ``upstream_port`` (PostgreSQL, trust auth)."""

    upstream_port: int
    pool_size: int = 2
    max_client_conn: int = 500
    user: str = "postgres"
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise ConfigError("pgbouncer is not installed: `apt-get install pgbouncer`")
        run_as = "pgserver" if os.geteuid() == 0 else None
        (self._dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        config = self._dir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.upstream_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self._dir / 'userlist.txt'}\n"
            f"admin_users = {self.user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {self.max_client_conn}\n"
            f"logfile = {self._dir / 'pgbouncer.log'}\n"
            f"pidfile = {self._dir / 'pgbouncer.pid'}\n"
            + (f"user = {run_as}\n" if run_as else "")
        )
        if run_as:
            owner = pwd.getpwnam(run_as)
            for path in (self._dir, *self._dir.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        # Its own log file takes what it says: no pipe left to fill or to close.
        self._proc = subprocess.Popen(
            [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(f"pgbouncer exited at start: {self.log()}")
            try:
                import psycopg

                with psycopg.connect(self.url("pgbouncer"), autocommit=True, connect_timeout=1):
                    return
            except psycopg.OperationalError:
                time.sleep(0.05)
        raise ConfigError(f"pgbouncer did not answer within 15 s: {self.log()}")

    def log(self) -> str:
        path = self._dir / "pgbouncer.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
