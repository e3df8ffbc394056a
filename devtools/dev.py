"""``python -m devtools.dev`` (``make dev``): the whole service on the embedded default.

A small supervisor for development: it starts the embedded PostgreSQL and Redis
(``devtools.embedded``) unless ``DATABASE_URL`` / ``REDIS_URL`` are set, applies
the migrations, imports and indexes the demo course (or ``--course PATH``), then
runs the API and one worker as child processes (``devtools.processes``) until
Ctrl-C or SIGTERM, and stops them in order. It is not how production runs the
service (the ``Procfile``: ``python -m api`` and ``python -m workers run``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from devtools.embedded import child_env, service_urls
from devtools.processes import start_api, start_worker, wait_http
from devtools.processes import stop as stop_children
from rag.platform import loops
from rag.platform.errors import AssistantError
from rag.platform.settings import Settings
from rag.protection.auth import dev_secret
from sql.migrate import migrate
from workers.cli import format_report, import_and_summarize, run_reindex, setup_logging

log = logging.getLogger("devtools.dev")
DEMO_COURSE = Path(__file__).resolve().parent.parent / "courses" / "demo"


def dev(settings: Settings, course: Path) -> int:
    """Services, schema, the course, then the API and a worker until told to stop."""
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with service_urls(settings) as (database_url, redis_url):
        applied = loops.run(
            settings, migrate(database_url, dimensions=settings.embedding_dimensions)
        )
        if applied:
            print("migrations applied: " + ", ".join(applied), flush=True)
        summary, key = loops.run(
            settings, import_and_summarize(settings, database_url, redis_url, course)
        )
        print(summary, flush=True)
        report = loops.run(
            settings, run_reindex(settings, database_url, redis_url, course=key, full=False)
        )
        print(format_report(report), flush=True)
        env = child_env(database_url, redis_url)
        # The demo page identifies users by a development header (no login page)
        env.setdefault("DEV_IDENTITY_HEADER", "true")
        # ...and bearer tokens work too, signed with a secret kept in DATA_DIR, which
        # `python -m workers dev-token` finds there (unless a key is configured).
        if not (settings.auth_jwt_secret or settings.auth_jwt_public_key):
            secret = dev_secret(settings.data_dir, create=True)
            assert secret is not None
            env["AUTH_JWT_SECRET"] = secret
        # ...and every such user may ask about the demo course.
        env.setdefault("DEV_AUTO_ENROLL", "true")
        # Own sessions: Ctrl-C reaches only this supervisor, which stops the
        # children in order (API first, so no new work arrives, then the worker).
        procs = [start_api(env), start_worker(env)]
        try:
            base = f"http://{settings.api_host}:{settings.api_port}"
            wait_http(base + "/health", 60, procs[0])
            print(
                f"\nCourse Assistant is running: open {base}/  (API docs: {base}/schema)\n"
                "Press Ctrl-C to stop.",
                flush=True,
            )
            while not stop:
                if any(p.poll() is not None for p in procs):
                    log.error("a child process exited; stopping")
                    break
                time.sleep(0.2)
        finally:
            stop_children(procs)
            print("stopped.", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.dev",
        description="Start PostgreSQL, Redis, the API and a worker on the embedded default, "
        "with the demo course imported and indexed (make dev).",
    )
    parser.add_argument("--course", help="course folder to import instead of the demo course")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        setup_logging(settings)
        return dev(settings, Path(args.course) if args.course else DEMO_COURSE)
    except AssistantError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "config_error" else 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
