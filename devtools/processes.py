"""Start and stop the service's own processes (API, workers) as children.

``python -m workers dev``, the real-process tests and the service benchmarks all
run the API and the workers exactly as the Procfile does (``python -m api``,
``python -m workers run``); this module is the one place that knows how.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rag.platform.errors import AssistantError

log = logging.getLogger("devtools.processes")
ROOT = Path(__file__).resolve().parent.parent

#: How long a child has to stop after SIGTERM before it is killed. A worker
#: finishing its running answers needs a few seconds; 20 s is the common
#: default of process supervisors (systemd's is 90 s, Kubernetes' 30 s).
STOP_TIMEOUT = 20.0


def start_api(env: Mapping[str, str], **popen: object) -> subprocess.Popen[bytes]:
    """``python -m api`` (the Procfile's ``web``) in its own session."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "api"], env=dict(env), cwd=ROOT, start_new_session=True, **popen
    )


def start_worker(env: Mapping[str, str], **popen: object) -> subprocess.Popen[bytes]:
    """``python -m workers run`` (the Procfile's ``worker``) in its own session."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "workers", "run"],
        env=dict(env),
        cwd=ROOT,
        start_new_session=True,
        **popen,
    )


def run_command(
    env: Mapping[str, str], *args: str, timeout: float = 120, module: str = "workers"
) -> subprocess.CompletedProcess[str]:
    """``python -m workers ARGS`` (or another ``module``) to completion, output captured
    (tests, benchmarks)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``url`` answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssistantError(
                f"{_name(proc)} exited with code {proc.returncode} during start-up"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssistantError(f"{url} did not answer within {timeout:.0f}s")


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> list[int]:
    """SIGTERM each running child in order, wait, kill what does not stop; the exit codes."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s of SIGTERM; killed", _name(proc), timeout)
            proc.kill()
            proc.wait()
    return [proc.returncode for proc in procs]


@dataclass
class Service:
    """A running API and its workers (see :func:`running_service`)."""

    base_url: str
    env: dict[str, str]
    api: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def add_worker(self) -> subprocess.Popen[bytes]:
        proc = start_worker(self.env)
        self.workers.append(proc)
        return proc


@contextmanager
def running_service(
    env: Mapping[str, str], *, host: str = "127.0.0.1", port: int, workers: int = 1
) -> Iterator[Service]:
    """The API on ``host:port`` and ``workers`` worker processes, ready to serve;
    stopped in order (API first, so no new work arrives, then the workers) on exit."""
    child = {**env, "API_HOST": host, "API_PORT": str(port)}
    service = Service(f"http://{host}:{port}", child, start_api(child))
    try:
        for _ in range(workers):
            service.add_worker()
        wait_http(service.base_url + "/ready", 60, service.api)
        yield service
    finally:
        stop([service.api, *service.workers])


def _name(proc: subprocess.Popen[bytes]) -> str:
    args = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    return "python " + " ".join(str(a) for a in args[1:])
