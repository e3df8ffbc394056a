"""A hello-world Litestar app, served the way ``python -m api`` serves the API.

The baseline of the enqueue benchmark (``bench/service.py``): the same framework,
server and flags (uvicorn, ``access_log=False``, Litestar's logging config off),
with handlers that do no I/O. ``POST /hello`` decodes a msgspec body like the
question route does and answers ``202`` with a small JSON document.

Run: ``python -m bench.hello --port 8001``.
"""

from __future__ import annotations

import argparse
import sys
import uuid

import msgspec
import uvicorn
from litestar import Litestar, get, post
from litestar.params import JSONBody


class Greeting(msgspec.Struct, forbid_unknown_fields=True):
    question: str


class Hello(msgspec.Struct):
    id: uuid.UUID
    status: str
    echo: str


@get("/hello", sync_to_thread=False)
def hello_get() -> Hello:
    return Hello(uuid.uuid4(), "ok", "")


@post("/hello", status_code=202)
async def hello_post(data: JSONBody[Greeting]) -> Hello:
    return Hello(uuid.uuid4(), "queued", data.question[:20])


def create_app() -> Litestar:
    return Litestar(route_handlers=[hello_get, hello_post], debug=False, logging_config=None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
