"""Which event loop the API and the workers run on (``EVENT_LOOP``).

uvloop (libuv underneath) makes every socket operation cheaper than asyncio's
selector loop, and this service is mostly socket operations: each question is
a handful of PostgreSQL and Redis round trips on both sides of the queue. In
``bench.service`` it took the API from 932 to 1,087 questions/s and the
``/health`` p99 with 1,000 questions in flight from 29 to 17 ms (see
``docs/benchmarks.md``). ``asyncio`` stays selectable to rule the loop out
when debugging, and is what ``auto`` falls back to where uvloop is not
installed (it has no Windows build).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from rag.platform.errors import ConfigError
from rag.platform.settings import Settings

_T = TypeVar("_T")


def loop_name(settings: Settings) -> Literal["uvloop", "asyncio"]:
    """``uvloop`` or ``asyncio``: what ``EVENT_LOOP`` resolves to on this machine."""
    installed = importlib.util.find_spec("uvloop") is not None
    if settings.event_loop == "uvloop" and not installed:
        raise ConfigError("EVENT_LOOP=uvloop but uvloop is not installed")
    if settings.event_loop == "asyncio" or not installed:
        return "asyncio"
    return "uvloop"


def _factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop_name(settings) == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def run(settings: Settings, main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` on the configured loop (Python 3.11's ``asyncio.run`` takes no
    loop factory; ``asyncio.Runner`` does)."""
    with asyncio.Runner(loop_factory=_factory(settings)) as runner:
        return runner.run(main)
