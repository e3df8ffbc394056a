"""``python -m api`` as a process: its --help, and a stop that leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from devtools.embedded import free_port
from devtools.processes import run_command, start_api, start_worker, wait_http


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update({"DATA_DIR": str(tmp_path / "data"), "API_PORT": str(port), "LOG_LEVEL": "warning"})
    return env


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_using(path: Path) -> list[str]:
    """Command lines of running processes that name ``path`` (the embedded servers do)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(cmdline)
    return found


def test_help_prints_usage_and_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    done = run_command(_env(tmp_path, port), "--help", module="api", timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m api")
    assert "--port" in done.stdout and "DATA_DIR" in done.stdout
    assert not _listening(port)
    assert not (tmp_path / "data").exists()  # no embedded server was started


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("program", ["api", "worker"])
def test_a_signal_stops_the_embedded_servers_it_started(
    tmp_path: Path, signum: int, program: str
) -> None:
    """Before, uvicorn re-raised SIGTERM after its shutdown and the API died with 143
    before it could stop the PostgreSQL and Redis it had started. The worker is
    checked alike."""
    port = free_port()
    data = tmp_path / "data"
    env = _env(tmp_path, port)
    if program == "api":
        proc = start_api(env)
    else:
        migrated = run_command(env, "migrate")  # a worker refuses an unmigrated database
        assert migrated.returncode == 0, migrated.stderr
        proc = start_worker(env)
    try:
        if program == "api":
            # /health: a fresh data directory is not migrated, so /ready would say 503.
            wait_http(f"http://127.0.0.1:{port}/health", 90, proc)
        else:
            deadline = time.monotonic() + 90
            while not (data / "redis" / "redis.port").exists() and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            time.sleep(2)  # past start-up, taking jobs
        assert proc.poll() is None
        assert (data / "postgres" / "postmaster.pid").exists()
        assert _processes_using(data), "the embedded servers should be running"
        proc.send_signal(signum)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while _processes_using(data) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_using(data) == []
    assert not (data / "postgres" / "postmaster.pid").exists()
    assert not _listening(port)
