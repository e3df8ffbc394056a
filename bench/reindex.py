"""Reindex benchmark: a generated ~10,000-chunk course through the fake OpenAI server.

Run: ``make bench`` or ``python -m bench.reindex [--topics 500] [--paragraphs 14]``.

Starts its own embedded PostgreSQL and Redis (temporary directories) and the
fake OpenAI-compatible server with no latency, so embedding costs next to
nothing and the figures measure our side: chunking, the cache, the database
writes and the HNSW index. Prints a table and writes ``bench/results/reindex.json``.

Measured: a full reindex (chunks/s), an incremental run with nothing changed,
an incremental run with one topic edited, and the process's peak memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import tempfile
from pathlib import Path
from typing import Any

from bench import write_result
from devtools.embedded import EmbeddedPostgres, EmbeddedRedis
from rag.content.courses import CourseSource, TopicSource, content_hash
from rag.content.indexing import ReindexReport, import_course
from rag.platform import loops
from rag.platform.resources import open_resources
from rag.platform.settings import Settings
from sql.migrate import migrate
from tests.fixtures.fake_openai import start_fake_server
from workers.cli import run_reindex

_WORDS = [
    "flour",
    "water",
    "salt",
    "yeast",
    "gluten",
    "starch",
    "protein",
    "dough",
    "crumb",
    "crust",
    "oven",
    "steam",
    "heat",
    "time",
    "ferment",
    "acid",
    "sugar",
    "enzyme",
    "loaf",
    "shape",
    "proof",
    "bake",
    "rise",
    "gas",
    "bubble",
    "network",
    "stretch",
    "fold",
    "temperature",
    "hydration",
    "starter",
    "culture",
    "bacteria",
    "flavour",
    "aroma",
    "colour",
    "texture",
    "moisture",
    "knead",
    "rest",
    "bench",
    "tension",
    "surface",
    "scoring",
    "blade",
    "vent",
    "expansion",
    "spring",
    "browning",
    "reaction",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(8, 22))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + "."


def _topic_body(rng: random.Random, paragraphs: int) -> str:
    parts: list[str] = []
    for p in range(paragraphs):
        if p % 4 == 0:
            parts.append(f"## Section {p // 4 + 1}: {rng.choice(_WORDS)} and {rng.choice(_WORDS)}")
        parts.append(" ".join(_sentence(rng) for _ in range(rng.randint(10, 16))))
    return "\n\n".join(parts)


def generate_course(topics: int, paragraphs: int, seed: int = 7) -> CourseSource:
    rng = random.Random(seed)
    items = []
    for i in range(topics):
        body = _topic_body(rng, paragraphs)
        items.append(_topic(i, body))
    return CourseSource(
        key="bench-course",
        title="Benchmark course",
        description="generated",
        modules={1: "Generated"},
        topics=items,
    )


def _topic(i: int, body: str) -> TopicSource:
    module, position = i // 100 + 1, i % 100 + 1
    title = f"Generated topic {i}"
    digest = content_hash(module, position, title, body)
    return TopicSource(
        key=f"topic-{i:04d}",
        module=module,
        position=position,
        title=title,
        body=body,
        content_hash=digest,
        source_file=f"topic-{i:04d}.md",
    )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pg = EmbeddedPostgres(workdir / "pg")
    rd = EmbeddedRedis(workdir / "redis", persist=False)
    database_url, redis_url = pg.start(), rd.start()
    try:
        await migrate(database_url)
        with start_fake_server(embeddings=args.embeddings) as fake:
            settings = Settings.from_env(
                {
                    "OPENAI_API_KEY": "bench",
                    "OPENAI_BASE_URL": fake.base_url,
                    "EMBED_BATCH_SIZE": str(args.batch_size),
                    "DB_POOL_MAX": "4",
                    "LOG_LEVEL": "warning",
                }
            )
            course = generate_course(args.topics, args.paragraphs)
            async with open_resources(
                settings, database_url=database_url, redis_url=redis_url
            ) as res:
                await import_course(res.db, course)

            async def reindex(full: bool = False) -> ReindexReport:
                return await run_reindex(
                    settings, database_url, redis_url, course=course.key, full=full
                )

            rss_before = _peak_rss_mib()
            full = await reindex()
            unchanged = await reindex()
            # Edit one paragraph of one topic, then reindex incrementally.
            edited = course.topics[len(course.topics) // 2]
            new_body = edited.body.replace(".", ". An edited sentence here.", 1)
            topics = list(course.topics)
            topics[len(topics) // 2] = _topic(len(topics) // 2, new_body)
            async with open_resources(
                settings, database_url=database_url, redis_url=redis_url
            ) as res:
                await import_course(
                    res.db,
                    CourseSource(
                        key=course.key,
                        title=course.title,
                        description=course.description,
                        modules=course.modules,
                        topics=topics,
                    ),
                )
            one_edit = await reindex()
            fake_stats = fake.stats()
    finally:
        rd.stop()
        pg.stop()
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "corpus": {
            "embeddings": args.embeddings,
            "topics": args.topics,
            "chunks": full.chunks_added,
            "batch_size": args.batch_size,
        },
        "full": {
            "seconds": round(full.seconds, 3),
            "chunks_per_second": round(full.chunks_per_second, 1),
            "index_build_seconds": round(full.index_build_seconds, 3),
            "load_chunks_per_second": round(
                full.chunks_added / (full.seconds - full.index_build_seconds), 1
            ),
            "provider_calls": full.provider_calls,
        },
        "incremental_unchanged": {
            "seconds": round(unchanged.seconds, 3),
            "provider_calls": unchanged.provider_calls,
            "chunks_added": unchanged.chunks_added,
        },
        "incremental_one_topic_edited": {
            "seconds": round(one_edit.seconds, 3),
            "chunks_added": one_edit.chunks_added,
            "chunks_kept": one_edit.chunks_kept,
            "chunks_deleted": one_edit.chunks_deleted,
            "provider_calls": one_edit.provider_calls,
        },
        "peak_rss_mib": {
            "before_reindex": round(rss_before, 1),
            "after": round(_peak_rss_mib(), 1),
        },
        "fake_server_embedding_calls": fake_stats.get("embeddings_calls"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topics", type=int, default=700)
    parser.add_argument("--paragraphs", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--embeddings",
        choices=["hashed", "seeded"],
        default="hashed",
        help="the fake server's vectors: hashed n-grams (clustered like real embeddings, "
        "costs the fake ~0.3 ms a text on the same 2 cores) or seeded random unit vectors "
        "(nearly free to make, but uniformly spread: the hardest case for an HNSW build)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reindex-") as tmp:
        # On the loop the service's reindex runs on (the CLI and the worker: EVENT_LOOP).
        result = loops.run(Settings.from_env(), _run(args, Path(tmp)))
    rows = [
        ("chunks in corpus", f"{result['corpus']['chunks']}"),
        (
            "full reindex",
            f"{result['full']['seconds']:.2f} s, of which HNSW build "
            f"{result['full']['index_build_seconds']:.2f} s",
        ),
        (
            "  chunk + embed + write",
            f"{result['full']['load_chunks_per_second']:.0f} chunks/s",
        ),
        (
            "full reindex throughput",
            f"{result['full']['chunks_per_second']:.0f} chunks/s  (goal >= 1,500)",
        ),
        (
            "incremental, nothing changed",
            f"{result['incremental_unchanged']['seconds']:.3f} s, "
            f"{result['incremental_unchanged']['provider_calls']} "
            "provider calls  (goal < 2 s, 0 calls)",
        ),
        (
            "incremental, one topic edited",
            f"{result['incremental_one_topic_edited']['seconds']:.3f} s, "
            f"{result['incremental_one_topic_edited']['chunks_added']} chunks embedded, "
            f"{result['incremental_one_topic_edited']['chunks_kept']} kept",
        ),
        ("peak RSS", f"{result['peak_rss_mib']['after']:.0f} MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        f"\nReindex benchmark, {args.embeddings} embeddings "
        f"({result['machine']['cpus']} CPUs, Python {result['machine']['python']})"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    write_result(f"reindex-{args.embeddings}", result)


if __name__ == "__main__":
    main()
