"""The two labelled courses, imported and indexed in a throwaway PostgreSQL, for the
quality benchmarks (``bench.retrieval_quality``, ``bench.semantic_threshold``).

Each run starts its own embedded PostgreSQL and Redis in a temporary directory,
migrates, imports ``courses/demo`` and ``courses/networking`` and indexes them
with the chosen embedder, exactly as ``python -m workers import-course`` would:
the real chunker, the real embedding cache and the real retrieval query.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from devtools.embedded import EmbeddedPostgres, EmbeddedRedis
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.resources import Resources, open_resources
from rag.platform.settings import Settings
from sql.migrate import migrate

ROOT = Path(__file__).resolve().parent.parent
COURSES = {
    "bread-science": ROOT / "courses" / "demo",
    "home-networking": ROOT / "courses" / "networking",
}
RETRIEVAL_QUESTIONS = ROOT / "tests" / "data" / "retrieval_questions.json"
HELDOUT_RETRIEVAL_QUESTIONS = ROOT / "tests" / "data" / "retrieval_questions_heldout.json"

Embedder = Literal["offline", "local"]


def settings_for(embedder: Embedder, **overrides: str) -> Settings:
    """Offline chat and the chosen embedder (``local`` needs ``make local``)."""
    env = {"PROVIDER": "offline", "LOG_LEVEL": "warning", "DB_POOL_MAX": "4"}
    if embedder == "local":
        env |= {"EMBEDDER": "local", "EMBEDDING_DIMENSIONS": "384"}
    return Settings.from_env(env | overrides)


@contextlib.asynccontextmanager
async def indexed_courses(settings: Settings) -> AsyncIterator[tuple[Resources, dict[str, int]]]:
    """Resources on a fresh database holding both courses, indexed; and their ids."""
    with tempfile.TemporaryDirectory(prefix="bench-courses-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        rd = EmbeddedRedis(Path(tmp) / "redis", persist=False)
        database_url, redis_url = pg.start(), rd.start()
        try:
            await migrate(database_url, dimensions=settings.embedding_dimensions)
            async with courses_at(settings, database_url, redis_url) as indexed:
                yield indexed
        finally:
            rd.stop()
            pg.stop()


@contextlib.asynccontextmanager
async def courses_at(
    settings: Settings, database_url: str, redis_url: str
) -> AsyncIterator[tuple[Resources, dict[str, int]]]:
    """Both courses imported and indexed in a migrated database (the tests' own, or
    :func:`indexed_courses`'s); resources on it and the courses' ids."""
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        ids: dict[str, int] = {}
        for key, path in COURSES.items():
            source = load_course(path)
            if source.key != key:
                raise ValueError(f"{path} is course {source.key}, not {key}")
            await import_course(res.db, source)
            await reindex_course(res.db, res.embedding_cache(), settings, key)
            ids[key] = int(
                await res.db.fetch_value("SELECT id FROM courses WHERE course_key = %s", (key,))
            )
        yield res, ids


def load_retrieval_questions(path: Path = RETRIEVAL_QUESTIONS) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data
