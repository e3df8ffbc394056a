"""Progress and module state: the platform reports what learners completed; a learner
reads which modules of a course they have unlocked (``rag/learners/progress.py``)."""

from __future__ import annotations

import msgspec
from litestar import get, put
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody

from api.bodies import require_json
from api.errors import error_responses
from api.identity import current_identity, require_enrollment
from api.limits import reading
from rag.learners.progress import ModuleView, ProgressItem, record_progress
from rag.platform.errors import Forbidden, InvalidInput
from rag.platform.redis import translated
from rag.protection.auth import USER_ID, Identity


class ProgressUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """A batch of learners' topic states, up to 1000 items."""

    items: list[ProgressItem]


class ProgressRecorded(msgspec.Struct):
    #: Items in the request.
    received: int
    #: Rows whose state changed (a repeated or older report changes none).
    changed: int
    #: The learners whose state changed (their cached module state was dropped).
    users: list[str]


class ModuleList(msgspec.Struct):
    course_key: str
    #: ``open`` or ``sequential``.
    unlock: str
    items: list[ModuleView]


@put(
    "/v1/courses/{course_key:str}/progress",
    status_code=200,
    dependencies={"identity": Provide(current_identity)},
    before_request=require_json,
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503),
    summary="Report learners' topic progress (the course platform's credential); idempotent",
)
async def report_progress(
    course_key: FromPath[str],
    data: JSONBody[ProgressUpdate],
    identity: NamedDependency[Identity],
    state: State,
) -> ProgressRecorded:
    if not (identity.platform or identity.admin):
        raise Forbidden(
            "reporting progress needs the course platform's credential (the "
            f"{state.settings.auth_platform_role!r} role) or an administrator"
        )
    bad = next((i.user_id for i in data.items if not USER_ID.match(i.user_id)), None)
    if bad is not None:
        raise InvalidInput(f"user_id {bad[:140]!r}: 1 to 128 letters, digits or _.@:-")
    course = await state.catalog.resolve(course_key)
    report = await record_progress(state.res.db, course.id, data.items)
    if report.users:
        # Dropped at once: the learners' next question or module read recomputes it.
        async with translated():
            await state.res.module_states().forget(course.id, report.users)
    return ProgressRecorded(report.received, report.changed, report.users)


@get(
    "/v1/courses/{course_key:str}/modules",
    dependencies=reading(current_identity),
    responses=error_responses(400, 401, 403, 404, 422, 429, 503),
    summary="The caller's modules in a course: unlocked or not, topics done of total",
)
async def my_modules(
    course_key: FromPath[str], user: NamedDependency[Identity], state: State
) -> ModuleList:
    course = await state.catalog.resolve(course_key)
    await require_enrollment(state, user, course)
    async with translated():
        learner = await state.res.module_states().get(course.id, course.rules_version, user.user_id)
    return ModuleList(course_key, course.unlock, learner.modules)


ROUTES = [report_progress, my_modules]
