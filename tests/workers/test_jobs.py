from __future__ import annotations

from pathlib import Path

from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from rag.courses import load_course
from rag.indexing import import_course
from rag.redis import create_pool
from rag.resources import Resources
from tests.fixtures.worker import drain_queue
from tests.rag.test_indexing import TOPICS, write_course
from workers.jobs import QUEUE_NAME


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
