from __future__ import annotations

import math
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rag.content.courses import load_course
from rag.content.indexing import ReindexReport, import_course, reindex_course
from rag.platform.db import Database
from rag.platform.resources import Resources, open_resources
from rag.platform.settings import Settings
from tests.fixtures.fake_openai import FakeServer

PARAGRAPH = (
    "Bulk fermentation is the long rest after mixing when yeast turns sugars into gas and "
    "acids. The dough grows, softens and gains flavour. Warm dough ferments faster than cool "
    "dough, so the clock matters less than the dough's look and feel. "
)


def write_course(root: Path, topics: dict[str, tuple[int, int, str, str]]) -> Path:
    """A course folder: ``topics`` maps file stem to (module, position, title, body)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "course.yaml").write_text("key: test-course\ntitle: Test course\n")
    for old in root.glob("*.md"):
        old.unlink()
    for stem, (module, position, title, body) in topics.items():
        (root / f"{stem}.md").write_text(
            f"---\nmodule: {module}\nposition: {position}\ntitle: {title}\n---\n{body}\n"
        )
    return root


def long_body(topic: str, sections: int = 3) -> str:
    parts = []
    for s in range(sections):
        parts.append(f"## {topic} part {s + 1}")
        parts.extend(f"{topic} paragraph {s}.{p}. " + PARAGRAPH * 2 for p in range(4))
    return "\n\n".join(parts)


TOPICS = {
    "a": (1, 1, "Mixing", long_body("Mixing")),
    "b": (1, 2, "Fermentation", long_body("Fermentation")),
    "c": (2, 1, "Baking", long_body("Baking")),
}


@pytest.fixture
def fake_settings(fake_openai: FakeServer) -> Settings:
    return fake_openai.settings(
        EMBED_BATCH_SIZE="16",
        CHUNK_TARGET_TOKENS="120",
        CHUNK_OVERLAP_TOKENS="20",
    )


@pytest.fixture
async def res(
    fake_settings: Settings, database_url: str, redis_url: str
) -> AsyncIterator[Resources]:
    async with open_resources(
        fake_settings, database_url=database_url, redis_url=redis_url
    ) as resources:
        yield resources


async def _reindex(res: Resources, full: bool = False) -> ReindexReport:
    return await reindex_course(
        res.db, res.embedding_cache(), res.settings, "test-course", full=full
    )


async def _chunks(db: Database) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    async with db.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT t.topic_key, c.chunk_index, c.content_hash FROM course_chunks c "
                "JOIN topics t ON t.id = c.topic_id ORDER BY t.topic_key, c.chunk_index"
            )
        ).fetchall()
    for key, index, digest in rows:
        out.setdefault(key, []).append((index, digest))
    return out


async def _version(db: Database) -> int:
    return int(
        await db.fetch_value("SELECT content_version FROM courses WHERE course_key = 'test-course'")
    )


async def test_first_run_embeds_every_chunk_in_batches(
    res: Resources, fake_openai: FakeServer, tmp_path: Path
) -> None:
    await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
    version = await _version(res.db)
    report = await _reindex(res)
    chunks = await _chunks(res.db)
    total = sum(len(v) for v in chunks.values())
    assert set(chunks) == {"a", "b", "c"} and total == report.chunks_added > 3
    assert report.provider_calls == math.ceil(total / 16)
    assert fake_openai.stats()["embeddings_calls"] == report.provider_calls
    assert fake_openai.stats()["embedded_texts"] == total
    # One bump for the run, not one per topic (three topics here).
    assert await _version(res.db) == version + 1
    # Chunks keep their place: indexes 0..n-1 per topic, heading paths stored.
    for rows in chunks.values():
        assert [i for i, _ in rows] == list(range(len(rows)))
    headings = await res.db.fetch_value(
        "SELECT array_agg(DISTINCT heading_path[1]) FROM course_chunks"
    )
    assert "Mixing part 1" in headings


async def test_second_run_on_unchanged_content_makes_no_provider_call(
    res: Resources, fake_openai: FakeServer, tmp_path: Path
) -> None:
    await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
    await _reindex(res)
    before_chunks, before_version = await _chunks(res.db), await _version(res.db)
    calls = fake_openai.stats()["embeddings_calls"]
    await res.redis.flushall()  # not even the cache is needed: nothing is embedded
    report = await _reindex(res)
    assert fake_openai.stats()["embeddings_calls"] == calls
    assert report.provider_calls == 0 and report.chunks_added == 0
    assert report.chunks_deleted == 0 and report.topics_changed == 0
    # Every chunk of the unchanged course is counted as kept.
    assert report.chunks_kept == sum(len(v) for v in before_chunks.values())
    assert await _version(res.db) == before_version
    assert await _chunks(res.db) == before_chunks


async def test_one_edited_topic_embeds_only_its_changed_chunks(
    res: Resources, fake_openai: FakeServer, tmp_path: Path
) -> None:
    folder = write_course(tmp_path / "c", TOPICS)
    await import_course(res.db, load_course(folder))
    await _reindex(res)
    before, version = await _chunks(res.db), await _version(res.db)
    texts = fake_openai.stats()["embedded_texts"]
    # Edit one paragraph in the last section of topic b.
    edited = dict(TOPICS)
    body = TOPICS["b"][3].replace(
        "Fermentation paragraph 2.3.",
        "Fermentation paragraph 2.3 now explains the poke test in detail.",
    )
    assert body != TOPICS["b"][3]
    edited["b"] = (*TOPICS["b"][:3], body)
    report_import = await import_course(res.db, load_course(write_course(folder, edited)))
    assert (report_import.updated, report_import.unchanged) == (1, 2)
    report = await _reindex(res)
    after = await _chunks(res.db)
    assert after["a"] == before["a"] and after["c"] == before["c"]
    changed = {h for _, h in after["b"]} - {h for _, h in before["b"]}
    assert 1 <= report.chunks_added == len(changed) < len(after["b"])
    # Kept: the edited topic's unchanged chunks, and every chunk of the other topics.
    assert report.chunks_kept == sum(len(v) for v in after.values()) - len(changed)
    assert report.topics_changed == 1
    assert fake_openai.stats()["embedded_texts"] - texts == len(changed)
    assert await _version(res.db) == version + 1


async def test_a_deleted_topic_loses_its_chunks(
    res: Resources, fake_openai: FakeServer, tmp_path: Path
) -> None:
    folder = write_course(tmp_path / "c", TOPICS)
    await import_course(res.db, load_course(folder))
    await _reindex(res)
    version = await _version(res.db)
    remaining = {k: v for k, v in TOPICS.items() if k != "c"}
    report_import = await import_course(res.db, load_course(write_course(folder, remaining)))
    assert report_import.removed == 1
    assert set(await _chunks(res.db)) == {"a", "b"}
    assert await _version(res.db) > version  # answers built on "c" are no longer current
    report = await _reindex(res)
    assert report.chunks_added == report.chunks_deleted == 0


async def test_full_reindex_reembeds_through_the_cache(
    res: Resources, fake_openai: FakeServer, tmp_path: Path
) -> None:
    await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
    first = await _reindex(res)
    calls = fake_openai.stats()["embeddings_calls"]
    full = await _reindex(res, full=True)
    assert full.chunks_added == full.chunks_deleted == first.chunks_added
    assert full.cache_hits == first.chunks_added
    assert fake_openai.stats()["embeddings_calls"] == calls  # all from Redis


async def test_moving_a_topic_keeps_its_chunks(res: Resources, tmp_path: Path) -> None:
    folder = write_course(tmp_path / "c", TOPICS)
    await import_course(res.db, load_course(folder))
    await _reindex(res)
    before = await _chunks(res.db)
    swapped = dict(TOPICS)
    swapped["a"], swapped["b"] = (1, 2, *TOPICS["a"][2:]), (1, 1, *TOPICS["b"][2:])
    await import_course(res.db, load_course(write_course(folder, swapped)))
    report = await _reindex(res)
    assert report.chunks_added == 0 and await _chunks(res.db) == before


async def test_the_demo_course_imports_and_indexes(
    settings: Settings,
    database_url: str,
    redis_url: str,
    demo_course_path: Path,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "demo"
    shutil.copytree(demo_course_path, folder)
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        first = await import_course(res.db, load_course(folder))
        assert first.added >= 10
        report = await reindex_course(res.db, res.embedding_cache(), settings, first.course_key)
        assert report.topics == first.added and report.chunks_added >= first.added
        again = await import_course(res.db, load_course(folder))
        assert again.unchanged == first.added and again.added == again.updated == 0
