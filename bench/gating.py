"""Module gating on the question path: what a learner's module state costs.

Run: ``python -m bench.gating [--learners 2000] [--topics 40] [--reads 2000]``.

Starts its own embedded PostgreSQL and Redis (temporary directory), migrates, and
imports a generated sequential course (``--topics`` topics over 4 modules) with
``topic_progress`` rows for ``--learners`` learners (each has completed a random
share of the topics), then measures, one call at a time as a worker makes it:

* **cached**: ``ModuleStates.get`` on a warm key (``MODULE_STATE_TTL`` > 0): one
  Redis ``GET`` and a decode;
* **not cached**: the same call with the TTL at 0: the one state query
  (``rag.learners.progress.STATE_SQL``) and the rules;
* **database round trips** per cached read, counted by PostgreSQL itself
  (``pg_stat_database.xact_commit`` before and after, less the reading query).

Prints medians and p99 in milliseconds; JSON in ``bench/results/gating.json``.
The goal (issue 11): cached adds under 1 ms and no database round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import write_result
from devtools.embedded import EmbeddedPostgres, EmbeddedRedis
from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.learners.progress import ModuleStates
from rag.platform.db import Database
from rag.platform.redis import create_redis
from rag.platform.settings import Settings
from sql.migrate import migrate

MODULES = 4
#: Seconds for PostgreSQL's per-backend statistics to be published (idle > 1 s).
STATS_FLUSH = 2.5


def _write_course(root: Path, topics: int) -> Path:
    root.mkdir(parents=True)
    titles = "\n".join(f"  {m}: Module {m}" for m in range(1, MODULES + 1))
    (root / "course.yaml").write_text(
        f"key: gated-bench\ntitle: Gating benchmark\nunlock: sequential\nmodules:\n{titles}\n"
    )
    for t in range(topics):
        module, position = t % MODULES + 1, t // MODULES + 1
        (root / f"t{t:03d}.md").write_text(
            f"---\nmodule: {module}\nposition: {position}\ntitle: Topic {t}\n---\nText {t}.\n"
        )
    return root


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 3),
    }


async def _commits(db: Database) -> int:
    return int(
        await db.fetch_value(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    )


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-gating-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        rd = EmbeddedRedis(Path(tmp) / "redis", persist=False)
        database_url, redis_url = pg.start(), rd.start()
        settings = Settings.from_env({"PROVIDER": "offline", "LOG_LEVEL": "warning"})
        db = Database(settings, database_url)
        redis = create_redis(settings, redis_url)
        try:
            await migrate(database_url)
            await db.open()
            source = load_course(_write_course(Path(tmp) / "course", args.topics))
            course_id = (await import_course(db, source)).course_id
            rng = random.Random(args.seed)
            await db.execute(
                "INSERT INTO topic_progress (course_id, user_id, topic_id, completed)"
                " SELECT %s, 'learner-' || u, t.id, true"
                " FROM generate_series(1, %s) u JOIN topics t ON t.course_id = %s"
                " WHERE random() < 0.6",
                (course_id, args.learners, course_id),
            )
            await db.execute("ANALYZE topic_progress")
            rows = await db.fetch_value("SELECT count(*) FROM topic_progress")
            version = float(
                await db.fetch_value(
                    "SELECT extract(epoch FROM updated_at)::float8 FROM courses WHERE id = %s",
                    (course_id,),
                )
            )
            learners = [f"learner-{rng.randint(1, args.learners)}" for _ in range(args.reads)]
            cached = ModuleStates(db, redis, ttl=300)
            uncached = ModuleStates(db, redis, ttl=0)
            for user in set(learners):  # warm every key (and the pool)
                await cached.get(course_id, version, user)
            timings: dict[str, list[float]] = {"cached": [], "not cached": []}
            # Backends publish their counters when idle for a second: wait it out on
            # both sides, so only the cached reads fall between the two readings.
            await asyncio.sleep(STATS_FLUSH)
            before = await _commits(db)
            for user in learners:
                t0 = time.perf_counter()
                await cached.get(course_id, version, user)
                timings["cached"].append(time.perf_counter() - t0)
            await asyncio.sleep(STATS_FLUSH)
            round_trips = await _commits(db) - before - 1  # the reading query's own
            for user in learners:
                t0 = time.perf_counter()
                await uncached.get(course_id, version, user)
                timings["not cached"].append(time.perf_counter() - t0)
        finally:
            await redis.aclose(close_connection_pool=True)
            await db.close()
            rd.stop()
            pg.stop()
    return {
        "course": {"topics": args.topics, "modules": MODULES, "unlock": "sequential"},
        "learners": args.learners,
        "progress_rows": int(rows),
        "reads": args.reads,
        "results": {name: _ms(samples) for name, samples in timings.items()},
        "database_commits_during_cached_reads": round_trips,
        "database_round_trips_per_cached_read": round_trips / args.reads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learners", type=int, default=2000)
    parser.add_argument("--topics", type=int, default=40)
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    print(
        f"\nModule state ({result['course']['topics']} topics, {result['learners']} learners,"
        f" {result['progress_rows']} progress rows; {result['reads']} reads, one at a time)"
    )
    print(f"  {'':<12} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in result["results"].items():
        print(f"  {name:<12} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f}")
    print(
        "  database transactions while the cached reads ran:"
        f" {result['database_commits_during_cached_reads']} in {result['reads']} reads"
        " (any background work of PostgreSQL's own included)"
    )
    write_result("gating", result)


if __name__ == "__main__":
    main()
