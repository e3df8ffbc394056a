"""The operators' CLI as operators run it: real processes, exit codes and messages."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from devtools.processes import run_command
from rag.content.courses import load_course
from rag.platform.errors import CourseSourceError
from tests.rag.test_indexing import TOPICS, write_course


def run_cli(
    *args: str, database_url: str, redis_url: str, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "PROVIDER": "offline",
            "LOG_LEVEL": "warning",
        }
    )
    full_env.update(env)
    return run_command(full_env, *args)


def _count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - test constant
    assert row is not None
    return int(row[0])


def test_import_indexes_what_changed_then_reindex_has_nothing_to_do(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    folder = write_course(tmp_path / "course", TOPICS)
    urls = {"database_url": database_url, "redis_url": redis_url}
    done = run_cli("import-course", str(folder), **urls)
    assert done.returncode == 0, done.stderr
    assert "course test-course: 3 topics added, 0 updated, 0 unchanged, 0 removed" in done.stdout
    # Indexed by default: a course imported but not indexed would answer "not covered".
    chunks = _count(database_url, "course_chunks")
    assert chunks > 3
    assert "3 topics (3 changed)" in done.stdout and f"chunks {chunks} added, 0 kept" in done.stdout
    assert "content versions: test-course v2" in done.stdout  # one bump for the run
    again = run_cli("reindex", "--all", **urls)
    assert again.returncode == 0, again.stderr
    assert f"(0 changed), chunks 0 added, {chunks} kept, 0 deleted; 0 provider calls" in (
        again.stdout
    )
    assert "content versions: test-course v2" in again.stdout
    # --no-reindex imports only, and says what to run next.
    edited = dict(TOPICS)
    module, position, title, body = edited["b"]
    edited["b"] = (module, position, title, body + "\n\nOne more paragraph about it.")
    write_course(folder, edited)
    only = run_cli("import-course", "--no-reindex", str(folder), **urls)
    assert only.returncode == 0, only.stderr
    assert "1 updated" in only.stdout
    assert "`python -m workers reindex --course test-course`" in only.stdout
    assert "reindexed" not in only.stdout


def test_a_bad_source_exits_non_zero_naming_the_file_and_writes_nothing(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    folder = write_course(tmp_path / "course", TOPICS)
    (folder / "b.md").write_bytes(b"---\nmodule: 1\nposition: 2\ntitle: X\n---\nbad \xff byte\n")
    result = run_cli("import-course", str(folder), database_url=database_url, redis_url=redis_url)
    assert result.returncode == 1
    assert result.stderr.startswith("error: b.md: ") and "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    assert _count(database_url, "courses") == 0 and _count(database_url, "topics") == 0


BAD_SOURCES = {
    "missing field": (b"---\nmodule: 1\ntitle: X\n---\nbody text\n", "position"),
    "invalid UTF-8": (b"---\nmodule: 1\nposition: 2\ntitle: X\n---\n\xc3\x28 text\n", "UTF-8"),
    "NUL byte": (b"---\nmodule: 1\nposition: 2\ntitle: X\n---\nnul\x00 here\n", "NUL"),
    "duplicate position": (b"---\nmodule: 1\nposition: 1\ntitle: X\n---\ntext\n", "a.md"),
    "empty topic": (b"---\nmodule: 1\nposition: 2\ntitle: X\n---\n   \n\n", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
async def test_every_bad_source_case_is_refused_before_anything_is_written(
    case: str, tmp_path: Path, database_url: str, redis_url: str
) -> None:
    folder = write_course(tmp_path / "course", TOPICS)
    # A first good import, so "nothing written" also means "nothing changed".
    ok = run_cli("import-course", str(folder), database_url=database_url, redis_url=redis_url)
    assert ok.returncode == 0, ok.stderr
    content, fragment = BAD_SOURCES[case]
    (folder / "b.md").write_bytes(content)
    with pytest.raises(CourseSourceError) as err:
        load_course(folder)
    assert fragment.lower() in str(err.value).lower()
    with psycopg.connect(database_url) as conn:
        before = conn.execute("SELECT topic_key, content_hash FROM topics ORDER BY 1").fetchall()
    result = run_cli("import-course", str(folder), database_url=database_url, redis_url=redis_url)
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    with psycopg.connect(database_url) as conn:
        after = conn.execute("SELECT topic_key, content_hash FROM topics ORDER BY 1").fetchall()
    assert after == before


def test_reindex_of_an_unknown_course_fails_clearly(database_url: str, redis_url: str) -> None:
    result = run_cli(
        "reindex", "--course", "no-such-course", database_url=database_url, redis_url=redis_url
    )
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        "error: no course with key 'no-such-course': import it first"
    )


def test_a_bad_setting_stops_start_up_naming_it(database_url: str, redis_url: str) -> None:
    result = run_cli("migrate", database_url=database_url, redis_url=redis_url, DB_POOL_MAX="many")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: DB_POOL_MAX='many': expected a whole number from 1 to 1000"
    )


def test_a_dimension_mismatch_is_refused_until_a_full_reindex(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    folder = write_course(tmp_path / "course", TOPICS)
    assert (
        run_cli(
            "import-course", str(folder), database_url=database_url, redis_url=redis_url
        ).returncode
        == 0
    )
    small = {"EMBEDDING_DIMENSIONS": "256"}
    refused = run_cli(
        "reindex",
        "--course",
        "test-course",
        database_url=database_url,
        redis_url=redis_url,
        **small,
    )
    assert refused.returncode == 1
    assert "holds 1536-dimension vectors but EMBEDDING_DIMENSIONS=256" in refused.stderr
    fixed = run_cli(
        "reindex", "--all", "--full", database_url=database_url, redis_url=redis_url, **small
    )
    assert fixed.returncode == 0, fixed.stderr
    with psycopg.connect(database_url) as conn:
        dims = conn.execute("SELECT DISTINCT vector_dims(embedding) FROM course_chunks").fetchall()
    assert dims == [(256,)]
    assert (
        run_cli("migrate", database_url=database_url, redis_url=redis_url, **small).stdout.strip()
        == "schema is up to date"
    )


def test_a_fresh_database_gets_the_configured_size_and_every_process_refuses_another(
    empty_database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """At EMBEDDING_DIMENSIONS=384, migrate used to create 1536-dimension columns, and
    the import then failed; the API started on a mismatch the worker refused."""
    urls = {"database_url": empty_database_url, "redis_url": redis_url}
    small = {"EMBEDDING_DIMENSIONS": "384"}
    assert run_cli("migrate", **urls, **small).returncode == 0
    folder = write_course(tmp_path / "course", TOPICS)
    imported = run_cli("import-course", str(folder), **urls, **small)
    assert imported.returncode == 0, imported.stderr
    with psycopg.connect(empty_database_url) as conn:
        dims = conn.execute("SELECT DISTINCT vector_dims(embedding) FROM course_chunks").fetchall()
        kinds = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attname ="
            " 'embedding' AND attrelid IN ('course_chunks'::regclass, 'semantic_cache'::regclass)"
        ).fetchall()
    assert dims == [(384,)] and kinds == [("vector(384)",), ("vector(384)",)]
    # At another size every process refuses, with the same words.
    worker = run_cli("run", **urls)
    env = {**os.environ, "DATABASE_URL": empty_database_url, "REDIS_URL": redis_url}
    api = run_command(env, module="api", timeout=60)
    expected = (
        "error: course_chunks.embedding holds 384-dimension vectors but EMBEDDING_DIMENSIONS=1536"
    )
    assert worker.returncode != 0 and expected in worker.stderr, worker.stderr
    assert api.returncode == 2 and api.stderr.startswith(expected), api.stderr
    assert worker.stderr.strip().splitlines()[-1] == api.stderr.strip().splitlines()[-1]
    # A column that holds vectors is never resized by migrate.
    assert run_cli("migrate", **urls).returncode == 0
    with psycopg.connect(empty_database_url) as conn:
        again = conn.execute("SELECT DISTINCT vector_dims(embedding) FROM course_chunks").fetchall()
    assert again == [(384,)]


def test_dev_token_prints_a_token_the_service_accepts(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    from rag.protection.auth import Authenticator, dev_secret
    from tests.fixtures.services import make_settings

    env = {"AUTH_JWT_SECRET": "x" * 40, "AUTH_JWT_AUDIENCE": "ca"}
    done = run_cli(
        "dev-token",
        "--user",
        "ops",
        "--admin",
        database_url=database_url,
        redis_url=redis_url,
        **env,
    )
    assert done.returncode == 0, done.stderr
    identity = Authenticator(make_settings(**env)).verify(done.stdout.strip())
    assert (identity.user_id, identity.admin) == ("ops", True)
    data = str(tmp_path / "data")
    urls = {"database_url": database_url, "redis_url": redis_url, "DATA_DIR": data}
    unsigned = run_cli("dev-token", "--user", "ops", **urls)
    assert unsigned.returncode == 2
    assert unsigned.stderr.startswith(
        "error: set AUTH_JWT_SECRET (the API's), or start `make dev` once"
    ), unsigned.stderr
    # The development secret `make dev` keeps in DATA_DIR signs it when nothing else does.
    secret = dev_secret(tmp_path / "data", create=True)
    assert secret is not None and dev_secret(tmp_path / "data") == secret
    signed = run_cli("dev-token", "--user", "ops", **urls)
    assert signed.returncode == 0, signed.stderr
    settings = make_settings(AUTH_JWT_SECRET=secret)
    assert Authenticator(settings).verify(signed.stdout.strip()).user_id == "ops"


def test_enroll_and_unenroll(database_url: str, redis_url: str, tmp_path: Path) -> None:
    folder = write_course(tmp_path / "course", TOPICS)
    assert (
        run_cli(
            "import-course", str(folder), database_url=database_url, redis_url=redis_url
        ).returncode
        == 0
    )
    added = run_cli(
        "enroll",
        "--user",
        "dana",
        "--course",
        "test-course",
        database_url=database_url,
        redis_url=redis_url,
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "dana enrolled in test-course as learner"
    assert _count(database_url, "enrollments") == 1
    removed = run_cli(
        "enroll",
        "--user",
        "dana",
        "--course",
        "test-course",
        "--remove",
        database_url=database_url,
        redis_url=redis_url,
    )
    assert removed.stdout.strip() == "dana unenrolled from test-course"
    assert _count(database_url, "enrollments") == 0
    missing = run_cli(
        "enroll",
        "--user",
        "dana",
        "--course",
        "nope",
        database_url=database_url,
        redis_url=redis_url,
    )
    assert missing.returncode == 1 and missing.stderr.strip() == "error: no course 'nope'"


def test_refresh_insights_recomputes_courses_with_new_activity(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    root = write_course(tmp_path / "c", TOPICS)
    imported = run_cli(
        "import-course", str(root), "--no-reindex", database_url=database_url, redis_url=redis_url
    )
    assert imported.returncode == 0, imported.stderr
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO learner_activity_events (user_id, course_id, event_type, payload)"
            " SELECT 'ann', id, 'answered', '{\"question\": \"Why?\"}' FROM courses"
        )
    done = run_cli("refresh-insights", database_url=database_url, redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refreshed the insight summaries of 1 course(s)"
    assert _count(database_url, "insight_summaries") == 3  # the question, in each window
    again = run_cli("refresh-insights", database_url=database_url, redis_url=redis_url)
    assert again.stdout.strip() == "refreshed the insight summaries of 0 course(s)"
