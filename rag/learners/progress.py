"""Progress and module gating: which modules of a course a learner has unlocked.

A course unlocks its modules ``open`` (all of them, the default) or
``sequential`` (a module once every module before it is complete), and a module
may instead name the modules it ``requires`` (``rag/content/courses.py``). A module is
complete when the learner has completed every one of its topics. Progress comes
from the course platform (``PUT /v1/courses/{course_key}/progress``, a platform
credential): :func:`record_progress` upserts it, idempotently, in one statement.

A learner's module state is computed in one query (:data:`STATE_SQL`: the course's
rules, and per module its topics and how many the learner completed, through the
``topic_progress`` primary key) and cached in Redis for ``MODULE_STATE_TTL``
seconds, so a question costs one Redis read for it on a hit. The cached value
carries the course's ``updated_at`` (every import bumps it): a state cached under
other rules or topics is recomputed, not served. A progress update deletes the
learner's key at once (:func:`ModuleStates.forget`).

What gating changes downstream (``rag/answering/answers.py``): retrieval reads only chunks
of unlocked modules (``rag/answering/search.py``), and the semantic cache and single
flight are scoped by :attr:`ModuleState.gate`, the unlocked modules when they are
not all of them, so an answer built from a module never reaches a learner who
has not unlocked it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec
import redis.exceptions

from rag.platform.db import Database
from rag.platform.errors import InvalidInput
from rag.platform.redis import Redis

log = logging.getLogger("rag.learners.progress")

#: Most progress items one request may carry.
MAX_ITEMS = 1000


class ModuleView(msgspec.Struct, frozen=True):
    """One module as a learner sees it (``GET /v1/courses/{course_key}/modules``)."""

    number: int
    title: str
    unlocked: bool
    topics_done: int
    topics_total: int
    #: How the assistant helps in this module: ``answer`` or ``hint``.
    mode: str
    #: The modules this one waits for (empty when it is unlocked or open).
    waiting_for: list[int] = []


class ModuleState(msgspec.Struct, frozen=True):
    """A learner's modules in one course, in module order."""

    modules: list[ModuleView]
    #: The course's ``updated_at`` (as a timestamp) the state was computed under.
    version: float = 0.0

    @property
    def unlocked(self) -> list[int]:
        return [m.number for m in self.modules if m.unlocked]

    @property
    def all_unlocked(self) -> bool:
        return all(m.unlocked for m in self.modules)

    @property
    def gate(self) -> str:
        """'' when every module is unlocked, else the unlocked modules ("1,2"): the
        scope of what this learner's questions may read, retrieve and share."""
        return "" if self.all_unlocked else ",".join(map(str, self.unlocked))

    def mode_of(self, module: int) -> str:
        return next((m.mode for m in self.modules if m.number == module), "answer")


class _ModuleRow(msgspec.Struct, frozen=True):
    number: int
    title: str | None
    total: int
    done: int


class _StateRow(msgspec.Struct, frozen=True):
    unlock: str
    mode: str
    rules: dict[str, Any]
    version: float
    #: jsonb: [{number, title, total, done}], converted by :meth:`ModuleStates.compute`.
    modules: list[dict[str, Any]]


# One round trip: the course's rules and, per module, its topic count and how many of
# them this learner completed (topic_progress read by its primary key).
STATE_SQL = """
SELECT c.unlock, c.mode, c.module_rules AS rules,
       extract(epoch FROM c.updated_at)::float8 AS version,
       coalesce((
           SELECT jsonb_agg(jsonb_build_object(
                      'number', m.module_number, 'title', c.modules ->> m.module_number::text,
                      'total', m.total, 'done', m.done) ORDER BY m.module_number)
             FROM (SELECT t.module_number, count(*) AS total,
                          count(*) FILTER (WHERE p.completed) AS done
                     FROM topics t
                     LEFT JOIN topic_progress p
                       ON p.course_id = t.course_id AND p.user_id = %(user_id)s
                      AND p.topic_id = t.id
                    WHERE t.course_id = c.id
                    GROUP BY t.module_number) m
       ), '[]'::jsonb) AS modules
  FROM courses c
 WHERE c.id = %(course_id)s
"""


def module_state(
    unlock: str,
    course_mode: str,
    rules: dict[str, Any],
    modules: Sequence[_ModuleRow],
    version: float = 0.0,
) -> ModuleState:
    """Which modules are unlocked, from the rules and the per-module counts (pure)."""
    complete = {m.number for m in modules if m.total > 0 and m.done >= m.total}
    views: list[ModuleView] = []
    earlier: list[int] = []
    for m in modules:
        rule = rules.get(str(m.number)) or {}
        requires = rule.get("requires")
        if requires is not None:
            needed = [n for n in requires if n not in complete]
        elif unlock == "sequential":
            needed = [n for n in earlier if n not in complete]
        else:
            needed = []
        views.append(
            ModuleView(
                number=m.number,
                title=m.title or f"Module {m.number}",
                unlocked=not needed,
                topics_done=m.done,
                topics_total=m.total,
                mode=rule.get("mode") or course_mode,
                waiting_for=needed,
            )
        )
        earlier.append(m.number)
    return ModuleState(views, version)


def gated(unlock: str, rules: dict[str, Any]) -> bool:
    """Whether a course can lock anything (an open course with no ``requires`` cannot:
    its questions skip the module state altogether)."""
    return unlock != "open" or any((r or {}).get("requires") is not None for r in rules.values())


def state_key(course_id: int, user_id: str) -> str:
    """The Redis key of a learner's cached module state in a course."""
    return f"modules:{course_id}:{user_id}"


class ModuleStates:
    """Learners' module states, cached in Redis (a miss costs one query)."""

    def __init__(self, db: Database, redis: Redis, ttl: float) -> None:
        self.db = db
        self.redis = redis
        self.ttl = ttl

    async def get(self, course_id: int, version: float, user_id: str) -> ModuleState:
        """The state under the course's rules as of ``version`` (its ``updated_at``)."""
        key = state_key(course_id, user_id)
        if self.ttl > 0:
            try:
                cached = await self.redis.get(key)
            except redis.exceptions.RedisError as exc:
                log.warning("module state cache unavailable, reading the database: %s", exc)
                cached = None
            if cached is not None:
                state = msgspec.json.decode(cached, type=ModuleState)
                if state.version == version:
                    return state
        state = await self.compute(course_id, user_id)
        if self.ttl > 0:
            try:
                await self.redis.set(key, msgspec.json.encode(state), ex=max(1, int(self.ttl)))
            except redis.exceptions.RedisError as exc:
                log.warning("module state not cached: %s", exc)
        return state

    async def compute(self, course_id: int, user_id: str) -> ModuleState:
        row = await self.db.fetch_one(
            _StateRow, STATE_SQL, {"course_id": course_id, "user_id": user_id}
        )
        if row is None:
            return ModuleState([])
        modules = msgspec.convert(row.modules, list[_ModuleRow])
        return module_state(row.unlock, row.mode, row.rules, modules, row.version)

    async def forget(self, course_id: int, user_ids: Iterable[str]) -> None:
        """Drop these learners' cached states now (their progress changed)."""
        keys = [state_key(course_id, u) for u in set(user_ids)]
        if keys:
            await self.redis.delete(*keys)


class ProgressItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One learner's state of one topic, as the platform reports it."""

    user_id: str
    topic_key: str
    completed: bool
    #: When it was completed (or un-completed); absent: now. An item older than the
    #: stored one is ignored, so a late retry of an old report changes nothing.
    completed_at: datetime | None = None


class ProgressReport(msgspec.Struct, frozen=True):
    """What :func:`record_progress` did: rows changed and the learners they belong to."""

    received: int
    changed: int
    users: list[str]


# One statement for the whole batch: resolve the topic keys of this course, refuse
# none silently (the caller checked them), and upsert; a row changes only when the
# report is at least as new as what is stored and says something different.
_UPSERT_SQL = """
WITH items AS (
    SELECT * FROM unnest(%(users)s::text[], %(topics)s::text[], %(completed)s::bool[],
                         %(at)s::timestamptz[]) AS i(user_id, topic_key, completed, at)
), resolved AS (
    SELECT DISTINCT ON (i.user_id, t.id) i.user_id, t.id AS topic_id, i.completed,
           coalesce(i.at, now()) AS at
      FROM items i JOIN topics t ON t.course_id = %(course_id)s AND t.topic_key = i.topic_key
     ORDER BY i.user_id, t.id, coalesce(i.at, now()) DESC
), upserted AS (
    INSERT INTO topic_progress AS p (course_id, user_id, topic_id, completed, completed_at)
    SELECT %(course_id)s, user_id, topic_id, completed, at FROM resolved
    ON CONFLICT (course_id, user_id, topic_id) DO UPDATE
       SET completed = excluded.completed, completed_at = excluded.completed_at,
           updated_at = now()
     WHERE p.completed IS DISTINCT FROM excluded.completed
       AND (p.completed_at IS NULL OR excluded.completed_at >= p.completed_at)
    RETURNING p.user_id
)
SELECT coalesce(array_agg(DISTINCT user_id), '{}') AS users, count(*) AS changed FROM upserted
"""


class _Upserted(msgspec.Struct, frozen=True):
    users: list[str]
    changed: int


async def record_progress(
    db: Database, course_id: int, items: Sequence[ProgressItem]
) -> ProgressReport:
    """Store the platform's report for one course; unknown topic keys are a 422 naming
    them, and nothing is written then."""
    if len(items) > MAX_ITEMS:
        raise InvalidInput(f"at most {MAX_ITEMS} progress items per request, got {len(items)}")
    keys = sorted({i.topic_key for i in items})
    known = set(
        await db.fetch_value(
            "SELECT coalesce(array_agg(topic_key), '{}') FROM topics"
            " WHERE course_id = %s AND topic_key = ANY(%s)",
            (course_id, keys),
        )
        or []
    )
    unknown = [k for k in keys if k not in known]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidInput(
            f"unknown topic key(s) in this course: {shown}{more}; nothing was recorded",
            details={"unknown_topics": unknown[:100]},
        )
    if not items:
        return ProgressReport(0, 0, [])
    row = await db.fetch_one(
        _Upserted,
        _UPSERT_SQL,
        {
            "course_id": course_id,
            "users": [i.user_id for i in items],
            "topics": [i.topic_key for i in items],
            "completed": [i.completed for i in items],
            "at": [i.completed_at for i in items],
        },
    )
    assert row is not None
    return ProgressReport(len(items), row.changed, sorted(row.users))
