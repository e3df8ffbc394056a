"""The database gateway: it owns the connection pool, and nothing else touches psycopg.

Rows become msgspec Structs here; psycopg and pool errors become
:class:`~rag.platform.errors.DatabaseUnavailable` (retry later) or
:class:`~rag.platform.errors.DatabaseError` (a bug or a constraint) here. SQL lives in
``sql/queries.sql`` under ``-- name: ...`` headers and is read through
:data:`sql.queries`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
import psycopg
import psycopg_pool
from pgvector.psycopg import register_vector_async
from psycopg.rows import class_row, dict_row

from rag.platform.errors import DatabaseError, DatabaseUnavailable, DimensionMismatch, SchemaError
from rag.platform.settings import Settings
from sql.migrate import pending

log = logging.getLogger("rag.platform.db")

T = TypeVar("T", bound=msgspec.Struct)
Params = Mapping[str, Any] | Sequence[Any] | None
Conn = psycopg.AsyncConnection[Any]


def translate(exc: BaseException) -> Exception:
    """The project's error for a driver error."""
    if isinstance(exc, psycopg_pool.PoolTimeout | psycopg_pool.TooManyRequests):
        return DatabaseUnavailable(f"no database connection available: {exc}")
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolClosed):
        return DatabaseUnavailable(f"database unreachable: {exc}")
    if isinstance(exc, psycopg.Error):
        return DatabaseError(f"database error: {exc}")
    return DatabaseError(str(exc))


class Database:
    """A ``psycopg_pool.AsyncConnectionPool`` and the few calls the project makes through it."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        kwargs: dict[str, Any] = {"autocommit": True}
        if settings.db_pgbouncer:
            # PgBouncer in transaction pooling hands each transaction to any server
            # connection: server-side prepared statements would not be there next time.
            kwargs["prepare_threshold"] = None
        elif settings.db_statement_timeout_ms:
            # Startup options are refused by PgBouncer, so only set them directly.
            kwargs["options"] = f"-c statement_timeout={settings.db_statement_timeout_ms}"
        self.pool: psycopg_pool.AsyncConnectionPool[Conn] = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_pool_timeout,
            max_waiting=settings.db_pool_max_waiting,
            kwargs=kwargs,
            configure=self._configure,
            # A connection is checked before it is handed out, so one that died
            # with a PostgreSQL restart is replaced instead of failing a request.
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            open=False,
            name="course-assistant",
        )

    @staticmethod
    async def _configure(conn: Conn) -> None:
        try:
            await register_vector_async(conn)
        except psycopg.ProgrammingError:
            # The vector extension is created by the first migration; until then
            # there is nothing to register and nothing that needs it.
            log.debug("vector type not found; migrations have not run yet")

    async def open(self, *, wait: bool = True) -> None:
        try:
            await self.pool.open(wait=wait, timeout=max(self.settings.db_pool_timeout, 10.0))
        except Exception as exc:
            raise translate(exc) from exc

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A pooled connection in autocommit mode; driver errors translated."""
        try:
            async with self.pool.connection() as conn:
                yield conn
        except (
            psycopg.Error,
            psycopg_pool.PoolTimeout,
            psycopg_pool.TooManyRequests,
            psycopg_pool.PoolClosed,
        ) as exc:
            raise translate(exc) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        """A pooled connection inside one transaction (committed on success)."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def execute(self, query: str, params: Params = None) -> int:
        """Run a statement; return the affected row count."""
        async with self.connection() as conn:
            cur = await conn.execute(query, params)
            return cur.rowcount

    async def fetch_one(self, row_type: type[T], query: str, params: Params = None) -> T | None:
        async with self.connection() as conn:
            return await fetch_one(conn, row_type, query, params)

    async def fetch_all(self, row_type: type[T], query: str, params: Params = None) -> list[T]:
        async with self.connection() as conn:
            return await fetch_all(conn, row_type, query, params)

    async def fetch_value(self, query: str, params: Params = None) -> Any:
        async with self.connection() as conn:
            return await fetch_value(conn, query, params)

    async def check_schema(self) -> None:
        """Raise :class:`SchemaError` unless migrations are current and dimensions match."""
        async with self.connection() as conn:
            await check_schema(conn, self.settings)


async def fetch_one(conn: Conn, row_type: type[T], query: str, params: Params = None) -> T | None:
    async with conn.cursor(row_factory=class_row(row_type)) as cur:
        await cur.execute(query, params)
        return await cur.fetchone()


async def fetch_all(conn: Conn, row_type: type[T], query: str, params: Params = None) -> list[T]:
    async with conn.cursor(row_factory=class_row(row_type)) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def fetch_value(conn: Conn, query: str, params: Params = None) -> Any:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return None if row is None else row[0]


async def fetch_dicts(conn: Conn, query: str, params: Params = None) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


_VECTOR_COLUMNS = (("course_chunks", "embedding"), ("semantic_cache", "embedding"))


async def stored_dimensions(conn: Conn) -> dict[str, int]:
    """The declared ``vector(N)`` size of each embedding column (pgvector keeps N in atttypmod)."""
    out: dict[str, int] = {}
    for table, column in _VECTOR_COLUMNS:
        value = await fetch_value(
            conn,
            "SELECT atttypmod FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped",
            (table, column),
        )
        if value is not None:
            out[table] = int(value)
    return out


async def check_schema(conn: Conn, settings: Settings) -> None:
    """Refuse to run on a database that this code cannot use, and say how to fix it."""
    try:
        missing = await pending(conn)
    except psycopg.Error as exc:
        raise translate(exc) from exc
    if missing:
        raise SchemaError(
            f"the database is missing migrations {', '.join(missing)}: "
            "run `python -m workers migrate`"
        )
    for table, dims in (await stored_dimensions(conn)).items():
        if dims != settings.embedding_dimensions:
            raise DimensionMismatch(
                f"{table}.embedding holds {dims}-dimension vectors but "
                f"EMBEDDING_DIMENSIONS={settings.embedding_dimensions}: either set "
                f"EMBEDDING_DIMENSIONS={dims}, or rebuild the index at the new size with "
                "`python -m workers reindex --all --full`"
            )
