from __future__ import annotations

import msgspec
import numpy as np
import psycopg
import pytest

from rag.platform.db import Database, fetch_value
from rag.platform.errors import DatabaseError, DatabaseUnavailable
from tests.fixtures.services import make_settings


class Row(msgspec.Struct):
    n: int
    label: str


async def test_rows_become_structs_and_vectors_numpy(db: Database) -> None:
    rows = await db.fetch_all(Row, "SELECT g AS n, 'x' || g AS label FROM generate_series(1, 3) g")
    assert rows == [Row(1, "x1"), Row(2, "x2"), Row(3, "x3")]
    assert await db.fetch_one(Row, "SELECT 1 AS n, 'a' AS label WHERE false") is None
    vector = await db.fetch_value("SELECT '[1,2,3]'::vector")
    np.testing.assert_array_equal(vector.to_numpy(), np.array([1, 2, 3], dtype=np.float32))


async def test_driver_errors_become_project_errors(db: Database) -> None:
    with pytest.raises(DatabaseError, match="database error"):
        await db.execute("SELECT * FROM no_such_table")
    unreachable = Database(make_settings(DB_POOL_TIMEOUT="0.5"), "postgresql://u@127.0.0.1:1/x")
    await unreachable.open()  # min size 0: nothing to connect yet
    try:
        with pytest.raises(DatabaseUnavailable, match="no database connection available"):
            await unreachable.fetch_value("SELECT 1")
    finally:
        await unreachable.close()


@pytest.mark.parametrize("pgbouncer", [False, True])
async def test_prepared_statements_only_without_pgbouncer(
    database_url: str, pgbouncer: bool
) -> None:
    settings = make_settings(DB_PGBOUNCER=str(pgbouncer).lower(), DB_POOL_MAX="1")
    database = Database(settings, database_url)
    await database.open()
    try:
        async with database.connection() as conn:
            for _ in range(8):  # psycopg prepares a query after 5 executions by default
                await fetch_value(conn, "SELECT count(*) FROM courses WHERE id > %s", (0,))
            prepared = await fetch_value(conn, "SELECT count(*) FROM pg_prepared_statements")
        assert (prepared == 0) is pgbouncer
        timeout = await database.fetch_value("SHOW statement_timeout")
        # Startup options are not sent through PgBouncer, so the timeout is only set directly.
        assert timeout == ("0" if pgbouncer else "30s")
    finally:
        await database.close()


async def test_the_pool_replaces_connections_killed_by_a_restart(database_url: str) -> None:
    database = Database(make_settings(DB_POOL_MIN="2", DB_POOL_MAX="2"), database_url)
    await database.open()
    try:
        pids = {await database.fetch_value("SELECT pg_backend_pid()") for _ in range(4)}
        # What a PostgreSQL restart does to pooled connections: the server ends them.
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)",
                (list(pids),),
            )
        # Checked on checkout: the dead connections are replaced, no error reaches us.
        for _ in range(4):
            assert await database.fetch_value("SELECT 1") == 1
    finally:
        await database.close()
