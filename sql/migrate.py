"""Apply the numbered plain-SQL migrations in ``sql/migrations`` under an advisory lock.

Each file ``NNNN_name.sql`` runs once, in its own transaction, and is recorded
in ``schema_migrations`` with the sha256 of its text. Re-running is a no-op;
a recorded migration whose file has since changed is refused, since the
database no longer matches what the file says. Concurrent runners (several
processes starting at once) serialize on ``pg_advisory_lock``: the second one
waits, then finds nothing left to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from rag.platform.errors import MigrationError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Arbitrary constant: pg_advisory_lock key for "course assistant migrations".
LOCK_KEY = 0x6361_6D69_6772  # "camigr"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file, in version order; a misnamed or duplicate one is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is also {found[version].name}")
        found[version] = Migration(version, path.name, path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def _applied(
    conn: psycopg.AsyncConnection[tuple[int, str, str]],
) -> dict[int, tuple[str, str]]:
    exists = await (await conn.execute("SELECT to_regclass('schema_migrations')")).fetchone()
    if exists is None or exists[0] is None:
        return {}
    rows = await (
        await conn.execute("SELECT version, name, checksum FROM schema_migrations")
    ).fetchall()
    return {version: (name, checksum) for version, name, checksum in rows}


def _verify(migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> None:
    by_version = {m.version: m for m in migrations}
    for version, (name, checksum) in sorted(applied.items()):
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {name} which is not in sql/migrations: "
                "this code is older than the database"
            )
        if migration.checksum != checksum:
            raise MigrationError(
                f"{migration.name} was changed after it was applied "
                f"(recorded checksum {checksum[:12]}, file now {migration.checksum[:12]}): "
                "restore the file and put the change in a new migration"
            )


async def migrate(
    database_url: str, directory: Path = MIGRATIONS_DIR, *, dimensions: int | None = None
) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date).

    With ``dimensions`` (``EMBEDDING_DIMENSIONS``), embedding columns that hold no
    vector yet are given that size: the migrations declare ``vector(1536)``, and a
    fresh database for a 384-dimension model must not need a reindex to start. A
    column that holds vectors is left alone (``reindex --all --full`` resizes it)."""
    migrations = load_migrations(directory)
    done: list[str] = []
    try:
        conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect to the database: {exc}") from exc
    async with conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            await conn.execute(_CREATE_TABLE)
            applied = await _applied(conn)
            _verify(migrations, applied)
            for migration in migrations:
                if migration.version in applied:
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute(migration.sql.encode())
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) "
                            "VALUES (%s, %s, %s)",
                            (migration.version, migration.name, migration.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"{migration.name} failed: {exc}") from exc
                done.append(migration.name)
            if dimensions is not None:
                await _size_empty_columns(conn, dimensions)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return done


#: The embedding columns the migrations create, with the size they declare.
_VECTOR_TABLES = ("course_chunks", "semantic_cache")


async def _size_empty_columns(
    conn: psycopg.AsyncConnection[tuple[int, str, str]], dimensions: int
) -> None:
    for table in _VECTOR_TABLES:
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT atttypmod FROM pg_attribute"
                " WHERE attrelid = to_regclass(%s) AND attname = 'embedding' AND NOT attisdropped",
                (table,),
            )
            row = await cur.fetchone()
            if row is None or int(row[0]) == dimensions:
                continue
            # Locked, so no row can arrive between the check and the ALTER.
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            cur = await conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})")  # noqa: S608
            has_rows = await cur.fetchone()
            if has_rows is not None and has_rows[0]:
                continue
            await conn.execute(
                f"ALTER TABLE {table} ALTER COLUMN embedding TYPE vector({int(dimensions)})"
            )


async def pending(
    conn: psycopg.AsyncConnection[tuple[int, str, str]], directory: Path = MIGRATIONS_DIR
) -> list[str]:
    """Names of migrations not yet applied; raises if an applied one was changed."""
    migrations = load_migrations(directory)
    applied = await _applied(conn)
    _verify(migrations, applied)
    return [m.name for m in migrations if m.version not in applied]
