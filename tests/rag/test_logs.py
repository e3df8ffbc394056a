"""One log format: JSON lines with the request and job ids, for our loggers and others'."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from rag.platform.logs import REQUEST_ID, configure_logging, logged_job

JOB = "0b7c43d2-8e1f-4a55-9d36-3f0f1f7f2a10"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Logging configured into a buffer; the test session's handlers put back after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    foreign = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
               for n in ("uvicorn.error", "arq.worker")}  # fmt: skip
    out = io.StringIO()
    configure_logging("info", "json", out)
    try:
        yield out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, (handlers, propagate) in foreign.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_every_line_is_one_json_object_with_the_ids_of_its_context(
    captured: io.StringIO,
) -> None:
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler(io.StringIO()))
    configure_logging("info", "json", captured)  # drops uvicorn's own handler again
    logging.getLogger("workers.jobs").info("outside any job")
    token = REQUEST_ID.set("req-7")
    try:
        logging.getLogger("uvicorn.error").info(
            "a request's line", extra={"color_message": "\x1b[36ma request's line\x1b[0m"}
        )
        with logged_job(JOB, "req-1"):
            logging.getLogger("workers.jobs").info("question %s", "succeeded", extra={"n": 2})
    finally:
        REQUEST_ID.reset(token)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("rag.x").exception("failed")
    first, second, third, fourth = lines(captured)
    assert first["message"] == "outside any job" and "job_id" not in first
    assert {"ts", "level", "logger"} <= set(first) and first["level"] == "info"
    assert (second["logger"], second["request_id"]) == ("uvicorn.error", "req-7")
    assert "color_message" not in second
    assert third == {**third, "message": "question succeeded", "job_id": JOB,
                     "request_id": "req-1", "n": 2}  # fmt: skip
    assert fourth["level"] == "error" and "ValueError: boom" in str(fourth["exc"])


def test_arqs_lines_about_a_job_carry_its_id(captured: io.StringIO) -> None:
    arq = logging.getLogger("arq.worker")
    arq.info("%6.2fs → %s(%s)%s", 0.01, f"{JOB}:answer_question", "'x'", "")
    arq.info("%6.2fs → %s(%s)%s", 0.01, "cron:reconcile", "", "")
    with_id, cron = lines(captured)
    assert with_id["job_id"] == JOB and with_id["logger"] == "arq.worker"
    assert "job_id" not in cron


def test_text_for_a_terminal_keeps_the_ids() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        configure_logging("info", "text", out)
        with logged_job(JOB, "req-9"):
            logging.getLogger("workers.jobs").warning("slow")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    expected = f"WARNING workers.jobs: slow [request_id=req-9 job_id={JOB}]"
    assert out.getvalue().rstrip().endswith(expected)
