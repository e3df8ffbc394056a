"""Insight queries at scale: p50 per page on a million activity events.

Run: ``python -m bench.insights [--events 1000000] [--courses 5] [--progress 100000]
[--runs 30]``.

Starts its own embedded PostgreSQL (temporary directory), migrates, and loads
``--courses`` courses of 16 topics, ``--events`` activity events spread over 60
days (a third ``answered`` with payloads as the worker writes them: a nearest
topic, a best similarity, a cache entry for some; the rest ``asked``, ``failed``
and ``feedback``), 20,000 answered jobs with feedback on a quarter of them, and
``--progress`` ``topic_progress`` rows. Then, for one course: the worker's refresh
of its insight summaries (``rag/learners/insights.py``, every window); each page
read from them, first and next (20 items); the feedback pages; the module-state
query (``rag/learners/progress.py``) for random learners; and, for comparison,
the month's question groups aggregated from the events per request, as the first
version did. ``--runs`` times each (a tenth of that for the slow ones); prints p50
and p99. JSON in ``bench/results/insights.json``. The goal (issue 11): under 20 ms
per page.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench import write_result
from devtools.embedded import EmbeddedPostgres
from rag.learners.insights import (
    FEEDBACK_SQL,
    PAGE_AFTER_SQL,
    QUESTIONS_SQL,
    feedback,
    refresh_summaries,
    summary_page,
)
from rag.learners.progress import STATE_SQL
from rag.platform.db import Database
from rag.platform.settings import Settings
from sql.migrate import migrate

TOPICS = 16
PAGE = 20


class _Any(msgspec.Struct):
    neg_count: int
    key: str
    item: dict[str, object]


async def _load(db: Database, args: argparse.Namespace) -> None:
    await db.execute(
        "INSERT INTO courses (course_key, title, unlock)"
        " SELECT 'course-' || c, 'Course ' || c, 'sequential' FROM generate_series(1, %s) c",
        (args.courses,),
    )
    await db.execute(
        "INSERT INTO topics (course_id, topic_key, module_number, position, title, body,"
        " content_hash) SELECT c.id, 't-' || t, (t - 1) / 4 + 1, (t - 1) %% 4 + 1,"
        " 'Topic ' || t, 'body', 'h' FROM courses c, generate_series(1, %s) t",
        (TOPICS,),
    )
    # Events over 60 days, courses and types interleaved; answered ones carry payloads.
    await db.execute(
        """
        INSERT INTO learner_activity_events (user_id, course_id, event_type, payload, created_at)
        SELECT 'u' || (n %% 5000), (SELECT min(id) FROM courses) + n %% %(courses)s,
               (ARRAY['answered', 'asked', 'answered', 'failed', 'answered', 'feedback'])
                   [n %% 6 + 1],
               CASE WHEN n %% 2 = 0 THEN jsonb_build_object(
                   'job_id', md5(n::text)::uuid, 'question', 'question ' || (n %% 997),
                   'topic_key', 't-' || (n %% 16 + 1), 'served_by',
                   CASE WHEN n %% 3 = 0 THEN 'semantic_cache' ELSE 'generated' END,
                   'cache_entry', CASE WHEN n %% 3 = 0 THEN n %% 400 END,
                   'best_similarity', (n %% 100) / 100.0,
                   'not_covered', n %% 37 = 0)
               ELSE '{}'::jsonb END,
               now() - make_interval(secs => n::float8 * 5184000 / %(events)s)
          FROM generate_series(1, %(events)s) n
        """,
        {"courses": args.courses, "events": args.events},
    )
    await db.execute(
        "INSERT INTO chat_sessions (id, user_id, course_id)"
        " SELECT md5('s' || n)::uuid, 'u' || n % 5000, (SELECT min(id) FROM courses)"
        " FROM generate_series(1, 20000) n"
    )
    await db.execute(
        "INSERT INTO assistant_jobs (id, user_id, course_id, session_id, question, status,"
        " answer) SELECT md5('j' || n)::uuid, 'u' || n % 5000, (SELECT min(id) FROM courses),"
        " md5('s' || n)::uuid, 'question ' || n, 'succeeded', 'an answer'"
        " FROM generate_series(1, 20000) n"
    )
    await db.execute(
        "INSERT INTO job_feedback (job_id, user_id, course_id, rating, comment, updated_at)"
        " SELECT id, user_id, course_id, CASE WHEN random() < 0.3 THEN 'down' ELSE 'up' END,"
        " 'comment', now() - random() * interval '60 days'"
        " FROM assistant_jobs WHERE random() < 0.25"
    )
    await db.execute(
        "INSERT INTO topic_progress (course_id, user_id, topic_id, completed)"
        " SELECT t.course_id, 'u' || n, t.id, true"
        " FROM generate_series(1, %s) n"
        " JOIN topics t ON t.id = (SELECT min(id) FROM topics) + n %% (%s * %s)"
        " ON CONFLICT DO NOTHING",
        (args.progress, args.courses, TOPICS),
    )
    for table in ("learner_activity_events", "job_feedback", "topic_progress", "topics"):
        await db.execute(f"ANALYZE {table}")


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000, 2),
    }


async def _time(runs: int, call: Any) -> dict[str, float]:
    await call()  # warm
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    return _stats(samples)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-insights-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        url = pg.start()
        settings = Settings.from_env(
            {"PROVIDER": "offline", "LOG_LEVEL": "warning", "DB_STATEMENT_TIMEOUT_MS": "0"}
        )
        db = Database(settings, url)
        try:
            await migrate(url)
            await db.open()
            t0 = time.perf_counter()
            await _load(db, args)
            load_s = time.perf_counter() - t0
            course = int(await db.fetch_value("SELECT min(id) FROM courses"))
            counts = {
                "events": int(await db.fetch_value("SELECT count(*) FROM learner_activity_events")),
                "course_events_30_days": int(
                    await db.fetch_value(
                        "SELECT count(*) FROM learner_activity_events WHERE course_id = %s"
                        " AND event_type = 'answered' AND created_at > now() - interval '30 days'",
                        (course,),
                    )
                ),
                "progress_rows": int(await db.fetch_value("SELECT count(*) FROM topic_progress")),
                "feedback_rows": int(await db.fetch_value("SELECT count(*) FROM job_feedback")),
            }
            # The worker's refresh of one course (every window, both kinds), timed...
            refresh = await _time(
                max(3, args.runs // 10), lambda: refresh_summaries(db, course, below=0.2)
            )
            # ...and what a page costs once it is done.
            results: dict[str, Any] = {"refresh, one course (all windows)": refresh}
            for kind in ("questions", "gaps"):
                for window in (30, 7):
                    first = await summary_page(db, course, kind, window=window, limit=PAGE)

                    def page(k: Any = kind, w: Any = window) -> Any:
                        return summary_page(db, course, k, window=w, limit=PAGE)

                    def after(k: Any = kind, w: Any = window, c: Any = first.next_cursor) -> Any:
                        return summary_page(db, course, k, window=w, limit=PAGE, cursor=c)

                    results[f"{kind}, {window} days, first page"] = await _time(args.runs, page)
                    results[f"{kind}, {window} days, next page"] = await _time(args.runs, after)
            # For comparison: aggregating the events on each request, as the first
            # version did (the refresh's own statement for one window).
            results["questions, 30 days, aggregated per request"] = await _time(
                max(3, args.runs // 10),
                lambda: db.fetch_all(
                    _Any, QUESTIONS_SQL, {"course_id": course, "window": 30, "below": 0.2}
                ),
            )
            _, fb_cursor = await feedback(db, course, limit=PAGE)
            results["feedback, first page"] = await _time(
                args.runs, lambda: feedback(db, course, limit=PAGE)
            )
            results["feedback, next page"] = await _time(
                args.runs, lambda: feedback(db, course, limit=PAGE, cursor=fb_cursor)
            )
            users = iter(f"u{n}" for n in range(1, 10**6))
            results["module state (one learner)"] = await _time(
                args.runs,
                lambda: db.execute(STATE_SQL, {"course_id": course, "user_id": next(users)}),
            )
            plans = await _plans(db, course)
        finally:
            await db.close()
            pg.stop()
    return {
        "load_seconds": round(load_s, 1),
        "counts": counts,
        "page": PAGE,
        "results": results,
        "plans": plans,
    }


_SCAN = re.compile(r"((?:Index Only Scan|Index Scan|Bitmap Index Scan|Seq Scan)[^(]*)")


async def _plans(db: Database, course: int) -> dict[str, list[str]]:
    """What each page's statement reads (its scans, from EXPLAIN)."""
    statements: dict[str, tuple[str, dict[str, Any]]] = {
        "questions page (next)": (
            PAGE_AFTER_SQL,
            {"course_id": course, "kind": "questions", "window": 30, "limit": PAGE + 1}
            | {"neg_count": -10, "key": "entry:1"},
        ),
        "feedback page (first)": (FEEDBACK_SQL, {"course_id": course, "rating": None, "limit": 21}),
        "module state": (STATE_SQL, {"course_id": course, "user_id": "u7"}),
        "refresh: questions, 30 days": (
            QUESTIONS_SQL,
            {"course_id": course, "window": 30, "below": 0.2},
        ),
    }
    out: dict[str, list[str]] = {}
    for name, (sql, params) in statements.items():
        async with db.transaction() as conn:
            cur = await conn.execute(("EXPLAIN " + sql).encode(), params)
            plan = "\n".join(str(r[0]) for r in await cur.fetchall())
        out[name] = sorted({m.strip() for m in _SCAN.findall(plan)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--courses", type=int, default=5)
    parser.add_argument("--progress", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print(f"\nInsight queries (loaded in {result['load_seconds']} s): {result['counts']}")
    print(f"  {'query':<34} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in result["results"].items():
        print(f"  {name:<34} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}")
    print("  plans (the scans each statement makes):")
    for name, scans in result["plans"].items():
        print(f"    {name}: {'; '.join(scans)}")
    write_result("insights", result)


if __name__ == "__main__":
    main()
