"""Schemathesis against the app's own OpenAPI schema: no generated request is a 5xx.

The app runs in-process (ASGI) on real PostgreSQL and Redis, with the development
identity header on, a course imported and the caller enrolled, so requests get past
authentication and into the handlers. Most generated course keys are the real one
(a schemathesis dictionary), so bodies, limits and cursors reach the database, and
strings and integers that broke something before are mixed into generated ones.
Valid and invalid inputs are both generated (schemathesis' positive and negative
modes, after its coverage phase of boundary values), a bounded number per operation
and derandomized, so a run is repeatable and takes seconds, not minutes.

One test per operation. The schema is the one ``/schema/openapi.json`` serves, built
at import from an app that is never started (building it needs no I/O); requests go
to :data:`APP`, which forwards to the app a fixture starts on the test's database.
(``schemathesis.pytest.from_fixture`` would avoid that indirection, but as of
schemathesis 4.32 it uses ``Function._nodeid``, which pytest 9 no longer has.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from litestar import Litestar
from litestar.types import Receive, Scope, Send
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans

from api.app import create_app
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.platform.db import Database
from rag.platform.settings import Settings
from tests.fixtures.services import make_settings
from tests.rag.test_indexing import TOPICS, write_course

USER = "alice"
COURSE = "test-course"  # the key write_course() gives the course
ENV = {"DEV_IDENTITY_HEADER": "true"}


class AppUnderTest:
    """An ASGI app that forwards to the one the running test started."""

    def __init__(self) -> None:
        self.app: Litestar | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None, "the api fixture sets the app"
        await self.app(scope, receive, send)


APP = AppUnderTest()
NASTY_STRINGS = [
    "\x00",
    "a\x00b",
    "%00",
    "\x7f\x1b[0m",
    "\ufeff\u202e",
    "\U0010ffff",
    "\r\n\r\n",
    "../../etc/passwd",
    "'; SELECT pg_sleep(1); --",
    '"}\\',
    "0-0",
    "99999999999999999999999-0",
    "18446744073709551615-18446744073709551615",
    "00000000-0000-0000-0000-000000000000",
    "WyJ0IiwyMTQ3NDgzNjQ4LDFd",  # a topics cursor past int4
    "A" * 3000,
]
NASTY_INTEGERS = [0, -1, 101, 2**31, 2**63, -(2**63) - 1, 10**30]
CONFIG = schemathesis.Config.from_dict(
    {
        "headers": {"X-User-Id": USER},
        "generation": {
            "mode": "all",
            "max-examples": 30,
            "deterministic": True,
            # Values that broke (or could break) something, mixed into generated ones.
            "dictionaries": {
                "string": {"dictionary": "strings", "probability": 0.25},
                "integer": {"dictionary": "integers", "probability": 0.25},
            },
        },
        "dictionaries": {
            # Mostly the real course, so that requests reach the database, else odd keys.
            "courses": {"values": [COURSE] * 4 + ["a\x00b", "TEST-COURSE", "a" * 3000]},
            "strings": {"values": NASTY_STRINGS},
            "integers": {"values": NASTY_INTEGERS},
        },
        "parameters": {"course_key": {"dictionary": "courses", "probability": 0.7}},
    }
)
_unstarted = create_app(
    Settings.from_env(ENV), database_url="postgresql://unused", redis_url="redis://unused"
)
schema = schemathesis.openapi.from_dict(_unstarted.openapi_schema.to_schema(), config=CONFIG)
schema.app = APP


@pytest.fixture
async def course(db: Database, tmp_path: Path) -> None:
    await import_course(db, load_course(write_course(tmp_path / "c", TOPICS)))
    await db.execute(
        "INSERT INTO enrollments (user_id, course_id) SELECT %s, id FROM courses", (USER,)
    )


@pytest.fixture
def api(course: None, database_url: str, redis_url: str) -> Iterator[None]:
    """The app on this test's database. Schemathesis starts its lifespan on its own
    event-loop thread at the first request; it is shut down here, before the database
    goes."""
    APP.app = create_app(make_settings(**ENV), database_url=database_url, redis_url=redis_url)
    try:
        yield
    finally:
        shutdown_lifespans()
        APP.app = None


@schema.parametrize()
@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    database=None,
    # One app and database for all of an operation's examples, on purpose.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_no_generated_request_is_a_server_error(case: schemathesis.Case[Any], api: None) -> None:
    """No 5xx, and every response (errors included) is one the schema documents,
    in the documented shape and content type."""
    case.call_and_validate(
        headers={"X-User-Id": USER},
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )
