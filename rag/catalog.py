"""Course key to id, cached in the process with a TTL (the API resolves it on every request)."""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import redis.exceptions

from rag.db import Database
from rag.errors import NotFound
from rag.redis import Redis

log = logging.getLogger("rag.catalog")

#: Redis pub/sub channel on which an import names the course it changed.
CHANGES_CHANNEL = "courses:changed"


class CourseRef(msgspec.Struct, frozen=True):
    id: int
    course_key: str
    title: str


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
        now = time.monotonic()
        entry = self._entries.get(course_key)
        if entry is not None and entry[0] > now:
            return entry[1]
        ref = await self.db.fetch_one(
            CourseRef,
            "SELECT id, course_key, title FROM courses WHERE course_key = %s",
            (course_key,),
        )
        if ref is None:
            raise NotFound(f"no course {course_key!r}")
        if self.ttl > 0:
            if len(self._entries) > 10_000:  # bounded: drop everything, refill on demand
                self._entries.clear()
            self._entries[course_key] = (now + self.ttl, ref)
        return ref

    def drop(self, course_key: str | None = None) -> None:
        if course_key is None:
            self._entries.clear()
        else:
            self._entries.pop(course_key, None)


async def announce_change(client: Redis, course_key: str) -> None:
    """Tell every API process that ``course_key`` was imported (best effort)."""
    try:
        await client.publish(CHANGES_CHANNEL, course_key)
    except redis.exceptions.RedisError as exc:
        log.warning(
            "could not announce the import of %s (caches expire anyway): %s", course_key, exc
        )


async def follow_changes(
    catalog: CourseCatalog, client: Redis, *, retry_seconds: float = 1.0
) -> None:
    """Drop catalog entries as imports announce them; runs until cancelled.

    Each (re)subscription first drops everything: announcements made while this
    process was not subscribed are lost, as pub/sub keeps nothing.
    """
    while True:
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(CHANGES_CHANNEL)
                catalog.drop()
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        catalog.drop(bytes(message["data"]).decode())
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("course change feed lost (%s); resubscribing", exc)
            await asyncio.sleep(retry_seconds)
