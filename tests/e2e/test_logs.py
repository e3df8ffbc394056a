"""The processes' logs as an operator collects them: JSON lines, a request's id on the
API's lines and on the worker's lines of the question it asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.embedded import free_port
from devtools.processes import start_api, start_worker, stop, wait_http
from tests.e2e.test_service import ALICE, ask, poll
from tests.fixtures.fake_openai import FakeServer

pytestmark = pytest.mark.timeout(120)


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the file, each of which must be one JSON object."""
    lines = path.read_text().splitlines()
    assert lines, f"{path.name} is empty"
    return [json.loads(line) for line in lines]


async def test_api_uvicorn_arq_and_worker_lines_are_json_with_the_ids(
    demo_env: dict[str, str], fake_openai: FakeServer, tmp_path: Path
) -> None:
    port = free_port()
    env = {**demo_env, "LOG_FORMAT": "json", "LOG_LEVEL": "info",
           "API_HOST": "127.0.0.1", "API_PORT": str(port)}  # fmt: skip
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    with api_log.open("wb") as api_out, worker_log.open("wb") as worker_out:
        api = start_api(env, stderr=api_out)
        worker = start_worker(env, stderr=worker_out)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/ready", 60, api)
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                response = await http.post(
                    "/v1/courses/bread-science/questions",
                    json={"question": "Why does dough need salt?"},
                    headers={**ALICE, "X-Request-ID": "trace-me-1"},
                )
                assert response.status_code == 202, response.text
                assert response.headers["x-request-id"] == "trace-me-1"
                job_id = response.json()["job_id"]
                assert (await poll(http, job_id))["status"] == "succeeded"
                # A request without an id gets one, and says it.
                other = await ask(http, "And water?")
                assert other["job_id"]
        finally:
            assert stop([api, worker]) == [0, 0]

    api_lines = json_lines(api_log)
    assert any(line["logger"].startswith("uvicorn") for line in api_lines)  # uvicorn's too
    asked = [line for line in api_lines if line.get("request_id") == "trace-me-1"]
    assert asked == [line for line in asked if line["logger"] == "api.access"]
    assert [(a["method"], a["path"], a["status"]) for a in asked] == [
        ("POST", "/v1/courses/{course_key}/questions", 202)
    ]
    generated = {line.get("request_id") for line in api_lines if line["logger"] == "api.access"}
    assert len(generated - {None, "trace-me-1"}) >= 2  # the other requests got ids of their own

    worker_lines = json_lines(worker_log)
    assert any(line["logger"] == "arq.worker" for line in worker_lines)
    of_job = [line for line in worker_lines if line.get("job_id") == job_id]
    assert {line["logger"] for line in of_job} >= {"arq.worker", "workers.jobs"}
    done = next(line for line in of_job if line["logger"] == "workers.jobs")
    assert (done["message"], done["request_id"], done["status"]) == (
        "question succeeded", "trace-me-1", "succeeded"
    )
