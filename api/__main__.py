"""``python -m api``: serve the API with uvicorn (the Procfile's ``web``)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import psycopg
import uvicorn

from api.app import create_app
from devtools.embedded import service_urls
from rag.platform.db import check_schema
from rag.platform.errors import AssistantError, DimensionMismatch
from rag.platform.logs import configure_logging
from rag.platform.loops import loop_name
from rag.platform.settings import Settings
from rag.platform.tracing import configure_tracing


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m api",
        description="Serve the Course Assistant API (uvicorn). Configuration comes from "
        "the environment (the README's table; `python -m workers settings-table`); with "
        "DATABASE_URL or REDIS_URL unset it starts embedded servers in DATA_DIR and stops "
        "them when it stops (SIGTERM or Ctrl-C).",
    )
    parser.add_argument("--host", help="address to listen on (default: API_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (default: API_PORT)")
    return parser.parse_args(argv)


def _stop(signum: int, frame: FrameType | None) -> None:
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again
    # for the handler that was there before it. The default one would end the
    # process on the spot, leaving the embedded PostgreSQL and Redis running;
    # this one unwinds, so `service_urls` stops them.
    raise SystemExit(0)


async def _refuse_a_dimension_mismatch(settings: Settings, database_url: str) -> None:
    """Raise :class:`DimensionMismatch` as the worker does, before serving: the app's
    start-up would too, but through uvicorn's traceback. A database that is down or
    not migrated is let through: the API serves, and /ready says what is wrong."""
    try:
        conn = await psycopg.AsyncConnection.connect(database_url, connect_timeout=5)
    except psycopg.Error:
        return
    async with conn:
        try:
            await check_schema(conn, settings)
        except DimensionMismatch:
            raise
        except (AssistantError, psycopg.Error):
            pass  # down or not migrated: served, and /ready says so


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
        loop = loop_name(settings)
    except AssistantError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    provider = configure_tracing(settings, "api")
    try:
        with service_urls(settings) as (database_url, redis_url):
            try:
                asyncio.run(_refuse_a_dimension_mismatch(settings, database_url))
            except DimensionMismatch as exc:
                print(f"error: {exc.message}", file=sys.stderr)
                return 2
            app = create_app(settings, database_url=database_url, redis_url=redis_url)
            uvicorn.run(
                app,
                host=args.host or settings.api_host,
                port=args.port or settings.api_port,
                log_level=settings.log_level,
                # Our handler on the root logger formats uvicorn's lines too
                # (rag/platform/logs.py); the access log is the API's own request line,
                # which carries the request id.
                log_config=None,
                access_log=False,
                lifespan="on",
                loop=loop,
            )
    finally:
        # SIGTERM ends uvicorn, then _stop's SystemExit unwinds through here.
        if provider is not None:
            provider.shutdown()  # flushes the spans still batched
    return 0


if __name__ == "__main__":
    sys.exit(main())
