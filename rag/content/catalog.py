"""Course key to id, cached in the process with a TTL (the API resolves it on every request)."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import redis.exceptions

from rag.content.courses import KEY_PATTERN
from rag.platform.db import Database
from rag.platform.errors import NotFound
from rag.platform.redis import Redis

log = logging.getLogger("rag.content.catalog")

#: Redis pub/sub channel on which an import names the course it changed.
CHANGES_CHANNEL = "courses:changed"
#: Redis pub/sub channel on which an enrollment change names the user.
ENROLLMENTS_CHANNEL = "enrollments:changed"
_MAX_ENTRIES = 10_000


class CourseRef(msgspec.Struct, frozen=True):
    id: int
    course_key: str
    title: str
    #: How its modules unlock, and its ``updated_at`` as a timestamp (the version of
    #: its module rules, ``rag/learners/progress.py``).
    unlock: str = "open"
    rules_version: float = 0.0


class CourseCatalog:
    """Resolves course keys; a hit costs no round trip.

    Entries live ``ttl`` seconds. An import announces the course on
    :data:`CHANGES_CHANNEL` and :func:`follow_changes` drops its entry in every
    API process at once; if that message is lost (Redis down), the TTL still
    bounds staleness (a key's id never changes while the course exists, so a
    stale entry can only point at a deleted course, whose rows are gone, which
    every query then reports as not found).
    """

    def __init__(self, db: Database, ttl: float) -> None:
        self.db = db
        self.ttl = ttl
        self._entries: dict[str, tuple[float, CourseRef]] = {}

    async def resolve(self, course_key: str) -> CourseRef:
        if not KEY_PATTERN.fullmatch(course_key):
            # No such key can exist (the table's CHECK has the same pattern), and a
            # NUL in it would fail in PostgreSQL: not found, without a round trip.
            shown = course_key if len(course_key) <= 80 else f"{course_key[:80]}…"
            raise NotFound(f"no course {shown!r}")
        now = time.monotonic()
        entry = self._entries.get(course_key)
        if entry is not None and entry[0] > now:
            return entry[1]
        ref = await self.db.fetch_one(
            CourseRef,
            "SELECT id, course_key, title, unlock,"
            " extract(epoch FROM updated_at)::float8 AS rules_version"
            " FROM courses WHERE course_key = %s",
            (course_key,),
        )
        if ref is None:
            raise NotFound(f"no course {course_key!r}")
        if self.ttl > 0:
            if len(self._entries) > _MAX_ENTRIES:  # bounded: drop everything, refill on demand
                self._entries.clear()
            self._entries[course_key] = (now + self.ttl, ref)
        return ref

    def drop(self, course_key: str | None = None) -> None:
        if course_key is None:
            self._entries.clear()
        else:
            self._entries.pop(course_key, None)


class Enrollments:
    """Whether a user may ask about a course, cached like :class:`CourseCatalog`.

    An enrollment change (``python -m workers enroll``) announces the user on
    :data:`ENROLLMENTS_CHANNEL`, which drops that user's entries everywhere;
    the TTL bounds staleness if the announcement is lost.
    """

    def __init__(self, db: Database, ttl: float) -> None:
        self.db = db
        self.ttl = ttl
        self._entries: dict[tuple[str, int], tuple[float, bool]] = {}

    async def enrolled(self, user_id: str, course_id: int) -> bool:
        now = time.monotonic()
        entry = self._entries.get((user_id, course_id))
        if entry is not None and entry[0] > now:
            return entry[1]
        found = await self.db.fetch_value(
            "SELECT 1 FROM enrollments WHERE user_id = %s AND course_id = %s",
            (user_id, course_id),
        )
        if self.ttl > 0:
            if len(self._entries) > _MAX_ENTRIES:
                self._entries.clear()
            self._entries[(user_id, course_id)] = (now + self.ttl, found is not None)
        return found is not None

    async def enroll(self, user_id: str, course_id: int, role: str = "learner") -> None:
        await self.db.execute(
            "INSERT INTO enrollments (user_id, course_id, role) VALUES (%s, %s, %s)"
            " ON CONFLICT (user_id, course_id) DO NOTHING",
            (user_id, course_id, role),
        )
        self.drop(user_id)

    def drop(self, user_id: str | None = None) -> None:
        if user_id is None:
            self._entries.clear()
        else:
            for key in [k for k in self._entries if k[0] == user_id]:
                del self._entries[key]


async def set_enrollment(
    db: Database, client: Redis, user_id: str, course_key: str, *, enrolled: bool, role: str
) -> bool:
    """Enroll or unenroll a user (the ``enroll`` command); True if anything changed.
    Announced so that every API process drops its cached answer for the user."""
    if enrolled:
        changed = await db.fetch_value(
            "INSERT INTO enrollments (user_id, course_id, role)"
            " SELECT %s, id, %s FROM courses WHERE course_key = %s"
            " ON CONFLICT (user_id, course_id) DO UPDATE SET role = excluded.role"
            " RETURNING 1",
            (user_id, role, course_key),
        )
    else:
        changed = await db.fetch_value(
            "DELETE FROM enrollments e USING courses c"
            " WHERE e.course_id = c.id AND c.course_key = %s AND e.user_id = %s RETURNING 1",
            (course_key, user_id),
        )
    await announce_change(client, user_id, channel=ENROLLMENTS_CHANNEL)
    return changed is not None


async def announce_change(client: Redis, name: str, *, channel: str = CHANGES_CHANNEL) -> None:
    """Tell every API process that ``name`` (a course key, or a user on
    :data:`ENROLLMENTS_CHANNEL`) changed; best effort, as caches expire anyway."""
    try:
        await client.publish(channel, name)
    except redis.exceptions.RedisError as exc:
        log.warning("could not announce a change of %s on %s: %s", name, channel, exc)


async def follow_changes(
    catalog: CourseCatalog,
    enrollments: Enrollments,
    client: Redis,
    *,
    retry_seconds: float = 1.0,
    subscribed: asyncio.Event | None = None,
) -> None:
    """Drop cache entries as changes are announced; runs until cancelled.

    Each (re)subscription first drops everything: announcements made while this
    process was not subscribed are lost, as pub/sub keeps nothing. ``subscribed``
    is set once the first subscription stands (the API waits for it at start-up,
    so that no entry it caches is dropped by that first sweep).
    """
    while True:
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(CHANGES_CHANNEL, ENROLLMENTS_CHANNEL)
                catalog.drop()
                enrollments.drop()
                if subscribed is not None:
                    subscribed.set()
                async for message in pubsub.listen():
                    if message["type"] != "message":
                        continue
                    name = bytes(message["data"]).decode()
                    if bytes(message["channel"]).decode() == ENROLLMENTS_CHANNEL:
                        enrollments.drop(name)
                    else:
                        catalog.drop(name)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("cache change feed lost (%s); resubscribing", exc)
            await asyncio.sleep(retry_seconds)
