from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.fake_openai",
    "tests.fixtures.processes",
]
