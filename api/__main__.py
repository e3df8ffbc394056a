"""``python -m api``: serve the API with uvicorn (the Procfile's ``web``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from api.app import create_app
from rag.embedded import service_urls
from rag.errors import AssistantError
from rag.loops import loop_name
from rag.settings import Settings


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env()
        loop = loop_name(settings)
    except AssistantError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with service_urls(settings) as (database_url, redis_url):
        app = create_app(settings, database_url=database_url, redis_url=redis_url)
        uvicorn.run(
            app,
            host=args.host or settings.api_host,
            port=args.port or settings.api_port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
            loop=loop,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
