from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import psycopg
import pytest

from rag.platform.db import Database, stored_dimensions
from rag.platform.errors import MigrationError, SchemaError
from sql.migrate import LOCK_KEY, MIGRATIONS_DIR, load_migrations, migrate
from tests.fixtures.services import make_settings

EXPECTED_TABLES = {
    "courses",
    "topics",
    "enrollments",
    "course_chunks",
    "chat_sessions",
    "chat_messages",
    "semantic_cache",
    "assistant_jobs",
    "learner_activity_events",
    "schema_migrations",
}


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


async def test_migrations_apply_on_an_empty_database(empty_database_url: str) -> None:
    applied = await migrate(empty_database_url)
    assert applied == [m.name for m in load_migrations()]
    assert _tables(empty_database_url) >= EXPECTED_TABLES
    with psycopg.connect(empty_database_url) as conn:
        indexes = {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            ).fetchall()
        }
    hnsw = indexes["course_chunks_embedding_hnsw"]
    assert "hnsw" in hnsw and "vector_cosine_ops" in hnsw and "m='16'" in hnsw
    assert "(session_id, role, id)" in indexes["chat_messages_session_role_idx"]
    assert "(event_type, created_at)" in indexes["learner_activity_events_type_time_idx"]
    with psycopg.connect(empty_database_url) as conn:
        options = conn.execute(
            "SELECT reloptions FROM pg_class WHERE oid = 'course_chunks'::regclass"
        ).fetchone()
    assert options == (["parallel_workers=8"],)  # parallel HNSW builds, see the migration


async def test_rerunning_is_a_no_op(empty_database_url: str) -> None:
    await migrate(empty_database_url)
    assert await migrate(empty_database_url) == []
    with psycopg.connect(empty_database_url) as conn:
        count = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert count == (len(load_migrations()),)


async def test_a_changed_applied_migration_is_refused(
    empty_database_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    await migrate(empty_database_url, directory)
    first = sorted(directory.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- an edit after the fact\n")
    with pytest.raises(MigrationError, match=f"{first.name} was changed after it was applied"):
        await migrate(empty_database_url, directory)


async def test_a_new_migration_is_applied_after_the_others(
    empty_database_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    await migrate(empty_database_url, directory)
    (directory / "9999_extra.sql").write_text("CREATE TABLE extra (id int);")
    assert await migrate(empty_database_url, directory) == ["9999_extra.sql"]
    assert "extra" in _tables(empty_database_url)


async def test_a_failing_migration_rolls_back_and_names_the_file(
    empty_database_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    (directory / "9999_broken.sql").write_text("CREATE TABLE half (id int); SELECT nonsense(;")
    with pytest.raises(MigrationError, match=r"9999_broken\.sql failed"):
        await migrate(empty_database_url, directory)
    assert "half" not in _tables(empty_database_url)
    assert "courses" in _tables(empty_database_url)  # the good ones stay applied


async def test_concurrent_runs_wait_for_the_lock(empty_database_url: str) -> None:
    # Hold the migration lock from another session: a runner must wait for it.
    holder = await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True)
    async with holder:
        await holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        first = asyncio.create_task(migrate(empty_database_url))
        second = asyncio.create_task(migrate(empty_database_url))
        await asyncio.sleep(0.5)
        assert not first.done() and not second.done()
        assert "courses" not in _tables(empty_database_url)
        await holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
        results = await asyncio.gather(first, second)
    # Exactly one runner applied everything; the other found nothing to do.
    assert sorted(len(r) for r in results) == [0, len(load_migrations())]


async def test_schema_check_reports_pending_migrations(empty_database_url: str) -> None:
    db = Database(make_settings(), empty_database_url)
    await db.open()
    try:
        with pytest.raises(SchemaError, match="python -m workers migrate"):
            await db.check_schema()
    finally:
        await db.close()


async def test_schema_check_reports_a_dimension_mismatch(database_url: str) -> None:
    db = Database(make_settings(EMBEDDING_DIMENSIONS="256"), database_url)
    await db.open()
    try:
        with pytest.raises(SchemaError) as err:
            await db.check_schema()
        assert "1536-dimension" in err.value.message
        assert "EMBEDDING_DIMENSIONS=256" in err.value.message
        assert "reindex --all --full" in err.value.message
        async with db.connection() as conn:
            assert await stored_dimensions(conn) == {"course_chunks": 1536, "semantic_cache": 1536}
    finally:
        await db.close()
