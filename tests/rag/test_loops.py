"""EVENT_LOOP: the worker and the API run on uvloop unless told otherwise."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from rag.platform import loops
from rag.platform.errors import ConfigError
from rag.platform.settings import Settings


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_where_installed() -> None:
    settings = Settings.from_env({})
    assert settings.event_loop == "auto"
    assert loops.loop_name(settings) == "uvloop"
    assert loops.run(settings, _loop_module()).startswith("uvloop")


def test_asyncio_can_be_chosen() -> None:
    settings = Settings.from_env({"EVENT_LOOP": "asyncio"})
    assert loops.loop_name(settings) == "asyncio"
    assert loops.run(settings, _loop_module()).startswith("asyncio")


def test_uvloop_asked_for_but_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loops.loop_name(Settings.from_env({"EVENT_LOOP": "uvloop"}))
    assert loops.loop_name(Settings.from_env({})) == "asyncio"


def test_an_unknown_loop_is_refused() -> None:
    with pytest.raises(ConfigError, match="EVENT_LOOP"):
        Settings.from_env({"EVENT_LOOP": "trio"})
