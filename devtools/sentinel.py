"""A Redis primary, a replica and three sentinels on this machine, for failover tests.

Debian's ``redis-server`` and ``redis-sentinel`` (``apt-get install redis-sentinel``),
each on a free port in a temporary directory. The sentinels watch the primary under
``name`` with a quorum of 2 and call it down after ``down_after_ms`` without an
answer, so :meth:`SentinelCluster.kill_primary` is followed by the replica's
promotion within a few seconds.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devtools.embedded import free_port
from rag.platform.errors import ConfigError


def sentinel_binary() -> str | None:
    return shutil.which("redis-sentinel")


@dataclass
class SentinelCluster:
    name: str = "course-assistant"
    down_after_ms: int = 1000
    failover_timeout_ms: int = 5000
    primary_port: int = field(default_factory=free_port)
    replica_port: int = field(default_factory=free_port)
    sentinel_ports: tuple[int, ...] = field(
        default_factory=lambda: tuple(free_port() for _ in range(3))
    )

    def __post_init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="sentinel-"))
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> str:
        """``REDIS_SENTINELS`` for these sentinels."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def _server(self, key: str, port: int, *extra: str) -> None:
        data = self._dir / key
        data.mkdir()
        self._procs[key] = subprocess.Popen(
            [
                "redis-server",
                "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                "--save", "", "--appendonly", "no", "--daemonize", "no", *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self) -> None:
        if sentinel_binary() is None:
            raise ConfigError("redis-sentinel is not installed: `apt-get install redis-sentinel`")
        self._server("primary", self.primary_port)
        self._wait(self.primary_port)
        primary = str(self.primary_port)
        self._server("replica", self.replica_port, "--replicaof", "127.0.0.1", primary)
        self._wait(self.replica_port)
        for i, port in enumerate(self.sentinel_ports):
            conf = self._dir / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            self._procs[f"sentinel-{i}"] = subprocess.Popen(
                ["redis-sentinel", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        for port in self.sentinel_ports:
            self._wait(port)
        # Ready once every sentinel knows the replica (it is what they promote).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(self._replicas_known(port) for port in self.sentinel_ports):
                return
            time.sleep(0.1)
        raise ConfigError("the sentinels did not see the replica within 20 s")

    def _replicas_known(self, port: int) -> bool:
        client = redis.Redis(port=port, socket_timeout=1)
        try:
            return bool(client.sentinel_slaves(self.name))  # type: ignore[no-untyped-call]
        except redis.RedisError:
            return False
        finally:
            client.close()

    @staticmethod
    def _wait(port: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            client = redis.Redis(port=port, socket_timeout=0.5)
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
            finally:
                client.close()
        raise ConfigError(f"redis on port {port} did not answer within 10 s")

    def primary(self) -> tuple[str, int] | None:
        """The primary the first sentinel that answers names now."""
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                host, primary_port = client.sentinel_get_master_addr_by_name(  # type: ignore[no-untyped-call]
                    self.name
                )
                return host.decode() if isinstance(host, bytes) else str(host), int(primary_port)
            except (redis.RedisError, TypeError):
                continue
            finally:
                client.close()
        return None

    def kill_primary(self) -> None:
        """SIGKILL the primary's process, as a machine lost would."""
        proc = self._procs["primary"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
