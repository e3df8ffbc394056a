"""The README's first command, end to end: ``python -m devtools.dev`` in a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from devtools.embedded import free_port
from devtools.processes import run_command

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, json.loads(resp.read())


@pytest.mark.timeout(240)
def test_dev_brings_everything_up_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "API_PORT": str(port),
            "LOG_LEVEL": "warning",
            "PROVIDER": "offline",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.dev"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Course Assistant is running" in line:
                break
        text = "".join(output)
        assert f"open http://127.0.0.1:{port}/" in text, text
        assert "course bread-science:" in text
        assert "chunks" in text and "added" in text
        assert _get(f"http://127.0.0.1:{port}/health") == (200, {"status": "ok"})
        status, ready = _get(f"http://127.0.0.1:{port}/ready")
        assert status == 200, ready
        # The README's dev-token line works as written beside it: the token is signed
        # with the development secret `dev` keeps in DATA_DIR, which the API accepts.
        secret_file = tmp_path / "data" / "dev-jwt-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        issued = run_command(env, "dev-token", "--user", "reader")
        assert issued.returncode == 0, issued.stderr
        token = issued.stdout.strip()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/sessions?course_key=bread-science",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
            assert json.loads(resp.read()) == {"items": [], "next_cursor": None}
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        signalled = time.monotonic()
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, text + rest
        assert "stopped." in rest
        # Children stop on their own SIGTERM well before the supervisor's 20 s kill.
        assert time.monotonic() - signalled < 15, rest
        assert "did not stop" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # Everything it started is gone: the API port is closed, PostgreSQL is stopped.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    assert not (tmp_path / "data" / "postgres" / "postmaster.pid").exists()
    assert not (tmp_path / "data" / "redis" / "redis.port").exists()


def test_dev_help_prints_usage_and_starts_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    done = run_command(env, "--help", module="devtools.dev", timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m devtools.dev")
    assert "--course" in done.stdout
    assert not (tmp_path / "data").exists()  # no embedded server was started
    # The operators' command line no longer carries development tooling.
    gone = run_command(env, "dev", timeout=30)
    assert gone.returncode == 2 and not (tmp_path / "data").exists()
