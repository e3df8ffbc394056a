"""Course key to id, cached in the process with a TTL (the API resolves it on every request)."""

from __future__ import annotations

import time

import msgspec

from rag.db import Database
from rag.errors import NotFound


class CourseRef(msgspec.Struct, frozen=True):
    id: int
    course_key: str
    title: str


class CourseCatalog:
    """Resolves course keys; a hit costs no round trip.

    Entries live ``ttl`` seconds. Import in this process calls :meth:`drop`;
    an import elsewhere is seen within ``ttl`` (a key's id never changes
    while the course exists, so a stale entry can only point at a deleted course,
    whose rows are gone, which every query then reports as not found).
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
