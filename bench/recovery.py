"""Kill-to-requeue: how long a question waits after its worker is killed (``SIGKILL``)
mid-answer, at the default settings (``RECONCILE_INTERVAL``, ``WORKER_HEARTBEAT_TTL``,
``RECONCILE_RUNNING_AFTER``), until another worker runs it again.

Each run: the API and one worker as real processes on embedded PostgreSQL and
Redis, the fake OpenAI server streaming a slow answer; at the first token the
worker is killed and a second one started. Measured from the kill to the rerun's
``reset`` event (the new run starting), and to ``done``. Prints a table and
writes ``bench/results/recovery.json``.

    python -m bench.recovery [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import write_result
from bench.service import COURSE, _base_env, _cli, _enroll, _machine
from devtools.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from devtools.processes import ROOT, Service, running_service
from rag.platform.settings import Settings
from sql.migrate import migrate
from tests.fixtures.fake_openai import start_fake_server
from tests.fixtures.sse import stream_sse

ANSWER = " ".join(f"word{i}" for i in range(200))


async def one_run(service: Service, n: int) -> dict[str, float]:
    user = {"X-User-Id": f"recovery-{n}"}
    async with httpx.AsyncClient(base_url=service.base_url, timeout=900) as http:
        response = await http.post(
            f"/v1/courses/{COURSE}/questions",
            json={"question": f"Why does crust brown? ({n})"},
            headers=user,
        )
        response.raise_for_status()
        accepted = response.json()
        victim = service.workers[-1]
        killed = reset = done = 0.0
        async for message in stream_sse(http, accepted["events_url"], user):
            now = time.monotonic()
            if message.event == "token" and not killed:
                victim.send_signal(signal.SIGKILL)
                killed = now
                await asyncio.to_thread(victim.wait, 15)
                service.workers.remove(victim)
                service.add_worker()
            elif message.event == "reset" and not reset:
                reset = now
            elif message.event in {"done", "error"}:
                done = now
                break
    if not (killed and reset and done):
        raise RuntimeError(f"run {n}: kill {killed}, reset {reset}, done {done}")
    return {"kill_to_rerun_s": reset - killed, "kill_to_done_s": done - killed}


def run(runs: int) -> dict[str, Any]:
    defaults = Settings.from_env({})
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp, contextlib.ExitStack() as st:
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        database_url = pg.start()
        st.callback(pg.stop)
        rd = EmbeddedRedis(Path(tmp) / "redis", persist=False)
        redis_url = rd.start()
        st.callback(rd.stop)
        asyncio.run(migrate(database_url))
        fake = st.enter_context(start_fake_server())
        env = _base_env(database_url, redis_url, fake)
        _cli(env, "import-course", str(ROOT / "courses" / "demo"))
        _enroll(database_url, [f"recovery-{n}" for n in range(runs)])
        fake.configure(token_delay=0.05, answer=ANSWER)
        service = st.enter_context(running_service(env, port=free_port(), workers=1))
        results = []
        for n in range(runs):
            results.append(asyncio.run(one_run(service, n)))
            print(f"run {n + 1}: {results[-1]}", flush=True)
    rerun = [r["kill_to_rerun_s"] for r in results]
    return {
        "machine": _machine(),
        "settings": {
            "RECONCILE_INTERVAL": defaults.reconcile_interval,
            "WORKER_HEARTBEAT_TTL": defaults.worker_heartbeat_ttl,
            "RECONCILE_RUNNING_AFTER": defaults.reconcile_running_after,
        },
        "runs": results,
        "kill_to_rerun_median_s": round(statistics.median(rerun), 1),
        "kill_to_rerun_max_s": round(max(rerun), 1),
        "bound_s": defaults.worker_heartbeat_ttl + defaults.reconcile_interval,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="kills to measure (default 3)")
    args = parser.parse_args(argv)
    result = run(args.runs)
    print()
    print("| settings | kill to rerun, median (max) | bound: heartbeat TTL + interval |")
    print("|---|---|---|")
    s = result["settings"]
    print(
        f"| interval {s['RECONCILE_INTERVAL']} s, heartbeat {s['WORKER_HEARTBEAT_TTL']} s, "
        f"running-after {s['RECONCILE_RUNNING_AFTER']} s "
        f"| {result['kill_to_rerun_median_s']} s ({result['kill_to_rerun_max_s']} s) "
        f"| {result['bound_s']} s |"
    )
    write_result("recovery", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
