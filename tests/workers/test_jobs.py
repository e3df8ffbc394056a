from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from devtools.processes import run_command, start_worker
from rag.answering.queue import ANSWER_QUESTION, QUEUE_NAME, REINDEX_COURSE, UPDATE_CHAT_SUMMARY
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.platform.redis import create_pool
from rag.platform.resources import Resources
from tests.fixtures.worker import drain_queue
from tests.rag.test_indexing import TOPICS, write_course


async def test_reindex_course_runs_as_an_arq_job(
    resources: Resources, redis_url: str, tmp_path: Path
) -> None:
    await import_course(resources.db, load_course(write_course(tmp_path / "c", TOPICS)))
    redis = ArqRedis(create_pool(resources.settings, redis_url))
    try:
        job = await redis.enqueue_job("reindex_course", "test-course", _queue_name=QUEUE_NAME)
        assert job is not None
        await drain_queue(resources, redis)
        result = await Job(job.job_id, redis, _queue_name=QUEUE_NAME).result(timeout=5)
        assert await job.status() == JobStatus.complete
        assert result["courses"] == ["test-course"]
        assert result["chunks_added"] > 3 and result["chunks_kept"] == 0
        chunks = await resources.db.fetch_value("SELECT count(*) FROM course_chunks")
        assert chunks == result["chunks_added"]
    finally:
        await redis.aclose(close_connection_pool=True)


def test_a_quiet_worker_logs_no_reconciler_pass_at_info(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """arq logs every job at INFO: a pass every second would be two lines a second.
    A pass that does nothing is not logged; a CLI command warns about nothing either."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env |= {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "PROVIDER": "offline",
        "LOG_LEVEL": "info",
        "RECONCILE_INTERVAL": "1",
    }
    worker = start_worker(env, stderr=subprocess.PIPE)
    try:
        time.sleep(4)  # start-up, then a pass every second
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    log = err.decode()
    assert "Starting worker" in log, log  # arq's own INFO lines still come through
    assert "→ reconcile" not in log and "← reconcile" not in log, log
    # The embedded default's CLI does not warn about XDG_RUNTIME_DIR on every command.
    embedded = {k: v for k, v in env.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    done = run_command(embedded | {"DATA_DIR": str(tmp_path / "data")}, "migrate")
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_the_queue_contract_is_arqs_default_queue() -> None:
    from arq.constants import default_queue_name

    from workers.jobs import FUNCTIONS

    assert default_queue_name == QUEUE_NAME
    names = {f.name for f in FUNCTIONS}
    assert {ANSWER_QUESTION, REINDEX_COURSE, UPDATE_CHAT_SUMMARY} <= names
