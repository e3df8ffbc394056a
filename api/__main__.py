"""``python -m api``: serve the API with uvicorn (the Procfile's ``web``)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from api.app import create_app
from rag.embedded import service_urls
from rag.errors import AssistantError
from rag.loops import loop_name
from rag.settings import Settings


def main() -> int:
    try:
        settings = Settings.from_env()
        loop = loop_name(settings)
    except AssistantError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with service_urls(settings) as (database_url, redis_url):
        app = create_app(settings, database_url=database_url, redis_url=redis_url)
        uvicorn.run(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
            loop=loop,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
