"""Module gating: the unlock rules, the progress record and the cached module state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from rag.content.courses import load_course
from rag.content.indexing import import_course
from rag.learners.progress import (
    STATE_SQL,
    ModuleStates,
    ProgressItem,
    _ModuleRow,
    gated,
    module_state,
    record_progress,
    state_key,
)
from rag.platform.db import Database
from rag.platform.errors import InvalidInput

# --- the rules (pure) -----------------------------------------------------------------


def _rows(*counts: tuple[int, int]) -> list[_ModuleRow]:
    """Modules 1..n with (done, total) topics each."""
    return [_ModuleRow(n, f"M{n}", total, done) for n, (done, total) in enumerate(counts, 1)]


def test_an_open_course_unlocks_everything() -> None:
    state = module_state("open", "answer", {}, _rows((0, 2), (0, 3)))
    assert state.unlocked == [1, 2] and state.all_unlocked and state.gate == ""
    assert not gated("open", {}) and gated("sequential", {})
    assert gated("open", {"2": {"requires": [1]}}) and not gated("open", {"2": {"mode": "hint"}})


def test_sequential_unlocks_a_module_once_every_earlier_one_is_complete() -> None:
    assert module_state("sequential", "answer", {}, _rows((1, 2), (0, 1), (0, 1))).unlocked == [1]
    state = module_state("sequential", "answer", {}, _rows((2, 2), (0, 1), (0, 1)))
    assert state.unlocked == [1, 2] and state.gate == "1,2"
    assert state.modules[2].waiting_for == [2]
    # Completing a later module does not skip the one before it.
    assert module_state("sequential", "answer", {}, _rows((2, 2), (0, 1), (1, 1))).unlocked == [
        1,
        2,
    ]


def test_requires_overrides_the_course_rule_and_modes_follow_modules() -> None:
    rules: dict[str, Any] = {"3": {"requires": [1]}, "2": {"mode": "hint"}}
    state = module_state("sequential", "answer", rules, _rows((2, 2), (0, 1), (0, 1)))
    assert state.unlocked == [1, 2, 3]
    assert [m.mode for m in state.modules] == ["answer", "hint", "answer"]
    # In an open course, a module with requires waits for them, and only it.
    state = module_state("open", "hint", {"2": {"requires": [1]}}, _rows((1, 2), (0, 1), (0, 1)))
    assert state.unlocked == [1, 3] and state.modules[1].waiting_for == [1]
    assert state.mode_of(1) == "hint"


# --- the record -----------------------------------------------------------------------

GATED_YAML = """\
key: gated
title: Gated
unlock: sequential
modules:
  1: One
  2: Two
"""


def _course(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "course.yaml").write_text(GATED_YAML)
    for stem, module, position in (("a", 1, 1), ("b", 1, 2), ("c", 2, 1)):
        (root / f"{stem}.md").write_text(
            f"---\nmodule: {module}\nposition: {position}\ntitle: {stem}\n---\nText {stem}.\n"
        )
    return root


@pytest.fixture
async def course_id(db: Database, tmp_path: Path) -> int:
    return (await import_course(db, load_course(_course(tmp_path / "c")))).course_id


def _done(user: str, topic: str, at: datetime | None = None, done: bool = True) -> ProgressItem:
    return ProgressItem(user, topic, done, at)


async def test_progress_is_idempotent_and_an_older_report_changes_nothing(
    db: Database, course_id: int
) -> None:
    now = datetime.now(UTC)
    first = await record_progress(db, course_id, [_done("ann", "a", now), _done("bob", "a", now)])
    assert (first.received, first.changed, first.users) == (2, 2, ["ann", "bob"])
    again = await record_progress(db, course_id, [_done("ann", "a", now), _done("bob", "a", now)])
    assert (again.changed, again.users) == (0, [])
    # A late retry of an older "not completed" report is ignored; a newer one is kept.
    stale = await record_progress(db, course_id, [_done("ann", "a", now - timedelta(1), False)])
    assert stale.changed == 0
    newer = await record_progress(db, course_id, [_done("ann", "a", now + timedelta(1), False)])
    assert (newer.changed, newer.users) == (1, ["ann"])
    # In one batch the newest item for a learner and topic wins.
    batch = [_done("cy", "b", now), _done("cy", "b", now - timedelta(1), False)]
    assert (await record_progress(db, course_id, batch)).changed == 1
    assert await db.fetch_value(
        "SELECT completed FROM topic_progress p JOIN topics t ON t.id = p.topic_id"
        " WHERE p.user_id = 'cy' AND t.topic_key = 'b'"
    )


async def test_unknown_topic_keys_are_refused_and_nothing_is_written(
    db: Database, course_id: int
) -> None:
    with pytest.raises(InvalidInput) as info:
        await record_progress(db, course_id, [_done("ann", "a"), _done("ann", "zz")])
    assert info.value.details == {"unknown_topics": ["zz"]}
    assert "unknown topic key(s) in this course: 'zz'" in info.value.message
    assert await db.fetch_value("SELECT count(*) FROM topic_progress") == 0


async def test_the_state_query_reads_progress_by_its_primary_key(
    db: Database, course_id: int
) -> None:
    # Enough rows that a sequential scan would be the planner's choice if it could.
    await db.execute(
        "INSERT INTO topic_progress (course_id, user_id, topic_id, completed)"
        " SELECT %s, 'user-' || n, t.id, true FROM generate_series(1, 3000) n, topics t",
        (course_id,),
    )
    await db.execute("ANALYZE topic_progress")
    async with db.transaction() as conn:
        cur = await conn.execute(
            b"EXPLAIN " + STATE_SQL.encode(), {"course_id": course_id, "user_id": "user-7"}
        )
        plan = "\n".join(r[0] for r in await cur.fetchall())
    assert "topic_progress_pkey" in plan, plan
    assert "Seq Scan on topic_progress" not in plan, plan


async def test_the_cached_state_is_served_until_progress_or_the_rules_change(
    db: Database, course_id: int, redis_client: aioredis.Redis
) -> None:
    states = ModuleStates(db, redis_client, ttl=300)
    version = float(
        await db.fetch_value("SELECT extract(epoch FROM updated_at)::float8 FROM courses")
    )
    assert (await states.get(course_id, version, "ann")).unlocked == [1]
    assert await redis_client.get(state_key(course_id, "ann")) is not None
    # The database changes behind the cache: the cached state is what a hit returns...
    await record_progress(db, course_id, [_done("ann", "a"), _done("ann", "b")])
    assert (await states.get(course_id, version, "ann")).unlocked == [1]
    # ...until the progress update drops it, as the API does.
    await states.forget(course_id, ["ann"])
    assert (await states.get(course_id, version, "ann")).unlocked == [1, 2]
    # A state cached under other rules (an import bumped updated_at) is recomputed.
    await db.execute("UPDATE courses SET unlock = 'open', updated_at = now() + interval '1 s'")
    await db.execute("UPDATE topic_progress SET completed = false")
    newer = float(
        await db.fetch_value("SELECT extract(epoch FROM updated_at)::float8 FROM courses")
    )
    state = await states.get(course_id, newer, "ann")
    assert state.unlocked == [1, 2] and state.modules[0].topics_done == 0
