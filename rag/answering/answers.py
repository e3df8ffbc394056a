"""The answer pipeline a worker runs for one job (DESIGN.md, "The answer pipeline").

This first version does the durable core: load the job (finish at once if its
answer is already stored), embed the question through the exact cache,
retrieve with HNSW, build the prompt within its token budget, stream the
generation into the job's event log, and store question, answer, citations,
usage and timings in one transaction. Follow-up rewriting, hybrid retrieval,
the semantic answer cache, single flight and summaries arrived since; see
docs/architecture.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import psycopg

from rag.answering import jobs, semantic_cache
from rag.answering.events import CITATIONS, DONE, ERROR, RESET, STATUS, TOKEN, EventLog
from rag.answering.flight import FLIGHT_IDLE_SECONDS, claim, flight_key, release
from rag.answering.jobs import JOB_COLUMNS, Job, ServedBy, final_event
from rag.answering.prompts import Mode, Turn, build_prompt, cited_only
from rag.answering.queue import cancel_key
from rag.answering.rewrite import History, canonical_question, standalone_question
from rag.answering.search import RetrievedChunk, search_chunks
from rag.learners import activity
from rag.learners import usage as usage_daily
from rag.learners.activity import Event
from rag.learners.progress import ModuleState, gated
from rag.platform import metrics, tracing
from rag.platform.db import fetch_dicts, fetch_one
from rag.platform.errors import AssistantError, ProviderError
from rag.platform.resources import Resources

log = logging.getLogger("rag.answering.answers")

#: Chunks retrieved per question, and turns of history offered to the prompt.
TOP_K = 6
RECENT_TURNS = 6
#: The model's pieces are published coalesced: one ``token`` event carries the text
#: of up to TOKEN_BATCH pieces, or what came within TOKEN_FLUSH_SECONDS of the last
#: publish, in one round trip. One XADD per piece cost each stream a round trip and
#: an SSE write per word in the worker, Redis and the API (bench.service, benchmark 4,
#: store_work_per_question). The first piece goes out alone, at once: the time to
#: the first visible word is the model's. A piece waits for the next one or the end
#: of the stream at most (a model that pauses mid-answer shows its text at its next
#: piece).
TOKEN_BATCH = 8
TOKEN_FLUSH_SECONDS = 0.2


class _Context(msgspec.Struct):
    course_title: str
    content_version: int
    summary: str
    #: How the course unlocks its modules and its pedagogy mode (rag/learners/progress.py).
    unlock: str = "open"
    mode: str = "answer"
    rules: dict[str, Any] = {}
    #: The course's updated_at as a timestamp: the version of its module rules.
    rules_version: float = 0.0


class _TurnRow(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: str
    #: A user turn's standalone rewrite, when it had one.
    standalone: str | None


class _Run:
    """One run of one job: what every step of the pipeline reads and adds to."""

    def __init__(self, res: Resources, events: EventLog, job: Job, started: float) -> None:
        self.res = res
        self.events = events
        self.job = job
        self.key = str(job.id)
        self.started = started
        self.timings: dict[str, float] = {}
        #: The rewrite of a follow-up (None for a question asked standalone).
        self.standalone: str | None = None
        #: What the activity record says of the answer (rag/learners/activity.py): the question
        #: as retrieval read it, the nearest topic, the best similarity, not_covered.
        self.insight: dict[str, Any] = {}

    def mark(self, name: str, since: float) -> float:
        """Record the milliseconds since ``since`` as ``name`` (and as a span of the
        stage, when traced); return now."""
        now = time.perf_counter()
        self.timings[name] = round((now - since) * 1000, 1)
        tracing.record_stage(name.removesuffix("_ms"), since, now)
        return now


async def answer_question(
    res: Resources, events: EventLog, job_id: uuid.UUID, *, worker: str | None = None
) -> str:
    """Run the job; return its final status. Safe to run twice (at-least-once queues).

    ``worker`` names the worker process (its heartbeat key, ``workers/liveness.py``)
    on the job row, so the reconciler sees at once when that process is gone."""
    started = time.perf_counter()
    async with res.db.connection() as conn:
        begun = await _begin(conn, job_id, worker)
        if begun is None:
            stored = await conn.execute(
                "SELECT 1 FROM chat_messages WHERE job_id = %s AND role = 'assistant'", (job_id,)
            )
            if await stored.fetchone() is None:
                return "skipped"  # unknown, finished or cancelled
            # The answer exists (a redelivery after a crash between commit and
            # acknowledgement): no side effect but making sure the row says so.
            await jobs.repair_succeeded(conn, job_id)
            await _announce_stored(events, await get_stored(conn, job_id))
            return "succeeded"
    job, context, rows = begun
    tracing.record_span("queue_wait", int(job.created_at.timestamp() * 1e9), time.time_ns())
    run = _Run(res, events, job, started)
    key = run.key
    turns = [Turn(r.role, r.content) for r in rows]
    if job.attempts > 1:
        # An earlier run died or was stopped midway and may have streamed part of
        # an answer: followers drop it, and the tokens after this one add up.
        await events.publish_many(
            key, [(RESET, {"attempt": job.attempts}), (STATUS, {"status": "running"})]
        )
    else:
        await events.publish(key, STATUS, {"status": "running"})
    try:
        settings = res.settings
        history = History(
            summary=context.summary if context else "",
            turns=[(t.role, t.content) for t in turns],
            questions=[r.standalone or r.content for r in rows if r.role == "user"],
        )
        rewrite = await standalone_question(
            res.provider,
            job.question,
            history,
            mode=settings.rewrite_followups,
            time_limit=settings.rewrite_timeout,
        )
        if rewrite.method != "unchanged":
            run.standalone = rewrite.text
        now = run.mark("rewrite_ms", started) if turns else started
        # What retrieval embeds and searches and the cache compares: the standalone
        # question without greetings and politeness.
        question = canonical_question(rewrite.text)
        vector = (await res.embedding_cache().embed([question]))[0]
        now = run.mark("embed_ms", now)
        await events.publish(key, STATUS, {"status": "retrieving"})
        # Module gating: retrieval, the cache and single flight see only what this
        # learner has unlocked (an open course skips the lookup).
        gate = await _module_state(run, context)
        if gate is not None:
            now = run.mark("modules_ms", now)
        chunks = await search_chunks(
            res.db,
            job.course_id,
            vector,
            k=TOP_K,
            ef_search=settings.hnsw_ef_search,
            text=question,
            fusion=settings.fusion,
            modules=None if gate is None or gate.all_unlocked else gate.unlocked,
        )
        run.mark("retrieve_ms", now)
        run.insight = {
            "question": question,
            "topic_key": chunks[0].topic_key if chunks else None,
            "best_similarity": round(max((c.similarity for c in chunks), default=0.0), 4),
        }
        mode = answer_mode(context, chunks)
        # Answers are shared only between questions that could see the same modules
        # and are answered in the same mode.
        scope_gate = gate.gate if gate is not None else ""
        cache_scope = semantic_cache.Scope(
            job.course_id,
            context.content_version if context else 0,
            res.provider.embedding_model,
            f"{scope_gate}+hint" if mode == "hint" else scope_gate,
        )
        # A follow-up is compared by its rewrite; without one it is not standalone.
        comparable = not turns or settings.rewrite_followups != "off"
        # Answers whose prompts hold a learner's history are neither cached nor shared.
        shareable = not turns or settings.semantic_cache_all_turns
        probe = _Probe(cache_scope, question, vector, [c.id for c in chunks])
        if comparable and await _served_from_cache(run, probe):
            return "succeeded"
        flight = flight_key(cache_scope, question) if shareable else None
        leader = await claim(res.redis, flight, key) if flight is not None else None
        if leader is not None and await _thumbed_down(res, leader):
            # Its answer was rated down: not to be handed on (rag/learners/feedback.py).
            leader = None
        if leader is not None and await _follow_leader(run, leader):
            return "succeeded"
        # Leading, or the leader failed or went silent: answer this one ourselves.
        outcome: str | None = None
        try:
            outcome = await _answer(
                run,
                chunks,
                context=context,
                turns=turns,
                cache=probe if shareable else None,
                mode=mode,
            )
            return outcome
        finally:
            if flight is not None:
                await release(res.redis, flight, key, answered=outcome == "succeeded")
    except ProviderError as exc:
        await _fail(res, events, job, exc)
        return "failed"


async def _begin(
    conn: Any, job_id: uuid.UUID, worker: str | None
) -> tuple[Job, _Context | None, list[_TurnRow]] | None:
    """Start the job and read what answering it needs, in one statement: the job
    (``jobs.START_SQL``, which refuses a job whose answer is stored), its course and
    session, and the session's recent turns. None when the job was not started.

    One statement instead of four (the stored-answer check, the start, the context,
    the turns): each was a round trip and a transaction (autocommit), on every
    question (docs/benchmarks.md, CPU per question)."""
    rows = await fetch_dicts(conn, _BEGIN_SQL, (worker, job_id, RECENT_TURNS))
    if not rows:
        return None
    row = rows[0]
    job = Job(**{name: row.pop(name) for name in jobs.STARTED_COLUMNS})
    turns = msgspec.convert(row.pop("turns"), list[_TurnRow])
    context = None if row["course_title"] is None else _Context(**row)
    return job, context, turns


# LEFT JOINs: a started job is returned even if its session or course were gone
# (the pipeline answers without context then) rather than left running unseen.
_BEGIN_SQL = f"""
WITH job AS ({jobs.START_SQL})
SELECT job.*, c.title AS course_title, c.content_version, s.summary, c.unlock, c.mode,
       c.module_rules AS rules, extract(epoch FROM c.updated_at)::float8 AS rules_version,
       (SELECT coalesce(json_agg(json_build_object(
                   'role', t.role, 'content', t.content, 'standalone', t.standalone)
                   ORDER BY t.id), '[]')
          FROM (SELECT m.id, m.role, m.content, j.standalone_question AS standalone
                  FROM chat_messages m
                  LEFT JOIN assistant_jobs j ON j.id = m.job_id AND m.role = 'user'
                 WHERE m.session_id = job.session_id
                 ORDER BY m.id DESC
                 LIMIT %s) t) AS turns
  FROM job
  LEFT JOIN chat_sessions s ON s.id = job.session_id
  LEFT JOIN courses c ON c.id = s.course_id
"""  # noqa: S608 (no input in the text: the job statement is our constant)


async def _module_state(run: _Run, context: _Context | None) -> ModuleState | None:
    """The learner's module state when the course can lock modules; None when it cannot."""
    if context is None or not gated(context.unlock, context.rules):
        return None
    return await run.res.module_states().get(
        run.job.course_id, context.rules_version, run.job.user_id
    )


def answer_mode(context: _Context | None, chunks: Sequence[RetrievedChunk]) -> Mode:
    """``hint`` when any retrieved chunk is of a module in hint mode (its own ``mode``,
    else the course's), so graded material is never answered outright; with no
    chunk, the course's mode."""
    if context is None:
        return "answer"

    def mode_of(module: int | None) -> str:
        rule = context.rules.get(str(module)) or {} if module is not None else {}
        return str(rule.get("mode") or context.mode)

    modes = {mode_of(c.module_number) for c in chunks} or {context.mode}
    return "hint" if "hint" in modes else "answer"


class _Probe(msgspec.Struct, frozen=True):
    """A question as the semantic cache compares and stores it: its canonical
    standalone text, its embedding and the chunk ids it retrieved, best first."""

    scope: semantic_cache.Scope
    question: str
    vector: Any
    retrieved: list[int]


async def _answer(
    run: _Run,
    chunks: list[RetrievedChunk],
    *,
    context: _Context | None,
    turns: list[Turn],
    cache: _Probe | None,
    mode: Mode = "answer",
) -> str:
    """Prompt, generate, store: the path when nothing is cached or in flight."""
    res, events, job, key = run.res, run.events, run.job, run.key
    floor = res.settings.relevance_floor
    if floor > 0 and not any(chunk.similarity >= floor for chunk in chunks):
        # Nothing in the course is close enough: say so, cite nothing, call no model
        # (citing the least bad chunks would suggest the course answers it).
        title = context.course_title if context else "this course"
        answer = NOT_COVERED.format(course=title)
        await events.publish_many(
            key,
            [(CITATIONS, {"citations": []}), (TOKEN, {"text": answer})],
        )
        run.timings["best_similarity"] = round(max((c.similarity for c in chunks), default=0.0), 4)
        run.insight["not_covered"] = True
        # Cached with no evidence: evicted by the course's next content change.
        await _finish(run, answer, [], _no_usage(), cache=cache, evidence=[])
        return "succeeded"
    prompt = build_prompt(
        course_title=context.course_title if context else "",
        # A follow-up's rewrite: retrieval found the sources for it, and the model
        # answers the question they are about (the turns are still in the prompt).
        question=run.standalone or job.question,
        chunks=chunks,
        summary=context.summary if context else "",
        recent_turns=turns,
        mode=mode,
    )
    await events.publish(key, STATUS, {"status": "generating"})
    generating = time.perf_counter()
    async with res.model_slots.slot():
        generated = await _generate(res, events, key, prompt.messages, run.timings)
    run.mark("generate_ms", generating)
    if generated is None:
        await _cancelled(res, events, job)
        return "cancelled"
    answer, usage = generated
    # Only the sources the answer's [n] markers name, in the order it names them.
    citations = msgspec.to_builtins(cited_only(answer, prompt.citations))
    await events.publish(key, CITATIONS, {"citations": citations})
    evidence = [c.chunk_id for c in prompt.citations]
    await _finish(run, answer, citations, usage, cache=cache, evidence=evidence)
    return "succeeded"


#: The answer when no chunk reaches ``RELEVANCE_FLOOR`` (``bench/relevance.py``).
NOT_COVERED = (
    "The course {course} does not cover this question, so I can't answer it from its "
    "material. Try asking about a topic of the course."
)


def _no_usage() -> dict[str, int]:
    """Zero token usage: a cached or followed answer, or a stream that sent none."""
    return {"prompt_tokens": 0, "completion_tokens": 0}


async def _finish(
    run: _Run,
    answer: str,
    citations: Any,
    usage: dict[str, int],
    *,
    served_by: ServedBy = "generated",
    served_from: dict[str, Any] | None = None,
    cache: _Probe | None = None,
    evidence: list[int] | None = None,
) -> None:
    """Store the outcome (one transaction), then publish ``done``: every path ends here.

    With ``cache`` (a shareable question's generated answer, with the chunk ids of its
    prompt as ``evidence``) the answer goes into the semantic cache first: before
    ``done``, so that a client that asks a paraphrase the moment it reads ``done``
    finds it (an outside test missed 2 to 5 in 100 when it came after)."""
    res = run.res
    if cache is not None:
        await semantic_cache.store(
            res.db,
            cache.scope,
            question=cache.question,
            embedding=cache.vector,
            answer=answer,
            citations=citations,
            usage=usage,
            evidence=evidence or [],
            retrieved=cache.retrieved,
            job_id=run.job.id,
        )
    run.timings["total_ms"] = _ms(run.started)
    served = Served(served_by, served_from)
    if not await _store(run, answer, citations, usage, served):
        log.info("job %s had already finished in another run: its outcome stands", run.key)
        return
    metrics.job_finished("succeeded", served_by)
    metrics.stage_timings(run.timings)
    await usage_daily.charge_budgets(
        res.redis, res.settings, user_id=run.job.user_id, course_id=run.job.course_id, usage=usage
    )
    await run.events.publish(
        run.key,
        DONE,
        {
            "answer": answer,
            "citations": citations,
            "usage": usage,
            "cached": served.cached,
            "served_by": served_by,
            "served_from": served_from,
        },
    )


class Served(msgspec.Struct, frozen=True):
    """How an answer was served, and from what (``assistant_jobs.served_by/_from``)."""

    by: ServedBy
    source: dict[str, Any] | None = None

    @property
    def cached(self) -> bool:
        return self.by == "semantic_cache"


async def get_stored(conn: Any, job_id: uuid.UUID) -> Job | None:
    return await fetch_one(conn, Job, _STORED_SQL, (job_id,))


_STORED_SQL = f"SELECT {JOB_COLUMNS} FROM assistant_jobs WHERE id = %s"  # noqa: S608


async def _announce_stored(events: EventLog, job: Job | None) -> None:
    """A run that crashed after storing its answer but before ``done``: publish it
    now, so followers of the stream end instead of waiting for their idle timeout."""
    if job is None:
        return
    last = await events.last(str(job.id))
    if last is not None and last.terminal:
        return
    await events.publish(str(job.id), *final_event(job))


async def _thumbed_down(res: Resources, job_id: str) -> bool:
    """Whether the job's answer got a thumbs-down, on itself or on a job served its
    cached copy (only a finished leader can have one; the flight key outlives it)."""
    return bool(
        await res.db.fetch_value(
            "SELECT EXISTS (SELECT 1 FROM job_feedback WHERE job_id = %(job)s"
            " AND rating = 'down') OR EXISTS (SELECT 1 FROM semantic_cache"
            " WHERE job_id = %(job)s AND flagged_at IS NOT NULL)",
            {"job": uuid.UUID(job_id)},
        )
    )


async def _follow_leader(run: _Run, leader: str) -> bool:
    """Single flight: relay the leader's generation into this job's stream and store
    it as this job's answer. False when the leader fails or goes silent."""
    async for batch in run.events.follow_batches(
        leader, block_ms=1000, idle_timeout=FLIGHT_IDLE_SECONDS
    ):
        if batch is None:
            continue
        # What one read returned goes on in one round trip. RESET too: a leader on its
        # second attempt has the first one's partial text in its stream, and this
        # job's clients must drop it as well.
        relayed = [(e.type, e.data) for e in batch if e.type in (CITATIONS, TOKEN, RESET)]
        await run.events.publish_many(run.key, relayed)
        last = batch[-1]
        if last.type == DONE:
            await _finish(
                run,
                str(last.data["answer"]),
                last.data["citations"],
                _no_usage(),
                served_by="followed",
                served_from={"job_id": leader},
            )
            return True
        if last.type == ERROR:
            return False
    return False


async def _served_from_cache(run: _Run, probe: _Probe) -> bool:
    """Answer from the semantic cache if it holds the same question (close enough,
    same slots, same evidence; the cache is off at a threshold of 1); False on a miss."""
    res = run.res
    settings = res.settings
    if settings.semantic_cache_threshold >= 1:
        return False
    verify: semantic_cache.Verifier | None = None
    if settings.semantic_cache_verify == "model" and res.provider.name != "offline":

        async def verify(cached: str) -> bool | None:
            started = time.perf_counter()
            verdict = await semantic_cache.verify_same_answer(
                res.provider,
                cached,
                probe.question,
                time_limit=settings.semantic_cache_verify_timeout,
            )
            # A job with verify_ms that was not served from the cache was refused.
            run.mark("verify_ms", started)
            log.info("job %s: the verifier said %s", run.key, verdict)
            return verdict

    hit = await semantic_cache.lookup(
        res.db,
        probe.scope,
        question=probe.question,
        embedding=probe.vector,
        retrieved=probe.retrieved,
        threshold=settings.semantic_cache_threshold,
        evidence_shared=settings.semantic_cache_evidence,
        ef_search=settings.hnsw_ef_search,
        verify=verify,
        verify_below=settings.semantic_cache_verify_below,
    )
    if hit is None:
        return False
    # The cached answer as the same events a generated one makes (its text in one
    # token event: it is all here), no provider call.
    await run.events.publish_many(
        run.key, [(TOKEN, {"text": hit.answer}), (CITATIONS, {"citations": hit.citations})]
    )
    similarity = round(hit.similarity, 4)
    run.timings["cache_similarity"] = similarity
    await _finish(
        run,
        hit.answer,
        hit.citations,
        _no_usage(),
        served_by="semantic_cache",
        served_from={
            "cached_question_id": hit.id,
            "similarity": similarity,
            "verified": hit.verified,
        },
    )
    return True


async def _generate(
    res: Resources, events: EventLog, key: str, messages: Any, timings: dict[str, float]
) -> tuple[str, dict[str, int]] | None:
    """The answer and usage, or None when the job was cancelled mid-stream; the
    milliseconds to the first token go into ``timings`` as ``first_token_ms``."""
    started = time.perf_counter()
    parts: list[str] = []
    pending = 0  # the last pieces of ``parts``, not yet published
    flushed = started
    usage = _no_usage()
    stream = res.provider.stream_chat(messages)
    try:
        async for delta in stream:
            if delta.text:
                if not parts:
                    timings["first_token_ms"] = _ms(started)
                parts.append(delta.text)
                pending += 1
                now = time.perf_counter()
                if (
                    len(parts) == 1
                    or pending >= TOKEN_BATCH
                    or now - flushed >= TOKEN_FLUSH_SECONDS
                ):
                    text = "".join(parts[-pending:])
                    pending, flushed = 0, now
                    # A cancel request is seen with each publish, in its round trip.
                    if await events.publish_watching(key, TOKEN, {"text": text}, cancel_key(key)):
                        return None
            if delta.usage is not None:
                usage = {
                    "prompt_tokens": delta.usage.prompt_tokens,
                    "completion_tokens": delta.usage.completion_tokens,
                }
    finally:
        # Stops the provider's stream (and its HTTP response) when we leave early.
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    if pending:
        await events.publish(key, TOKEN, {"text": "".join(parts[-pending:])})
    return "".join(parts), usage


async def _store(
    run: _Run, answer: str, citations: Any, usage: dict[str, int], served: Served
) -> bool:
    """Question, answer and the job's outcome in one transaction. False, with nothing
    written, when the job is no longer running: another run finished it first."""
    res, job, timings = run.res, run.job, run.timings
    cached = served.cached
    enc = msgspec.json.encode
    outcome = jobs.Outcome(
        answer=answer,
        citations=enc(citations).decode(),
        usage=enc(usage).decode(),
        timings=enc(timings).decode(),
        cached=cached,
        served_by=served.by,
        served_from=None if served.source is None else enc(served.source).decode(),
        standalone_question=run.standalone,
    )
    # One transaction, pipelined: the statements go out together and are answered
    # together (two round trips with BEGIN and COMMIT instead of seven), and a job
    # another run finished first is rolled back whole once the sync says so.
    async with res.db.connection() as conn, conn.pipeline() as pipeline, conn.transaction():
        succeeded = await jobs.succeed(conn, job.id, outcome)
        await usage_daily.record(
            conn,
            course_id=job.course_id,
            user_id=job.user_id,
            model=usage_daily.model_of(res.settings, res.provider.name),
            usage=usage,
        )
        await activity.record(
            conn,
            [
                Event(job.user_id, job.course_id, "asked", {"job_id": run.key}, job.created_at),
                Event(
                    job.user_id,
                    job.course_id,
                    "answered",
                    {
                        "job_id": run.key,
                        "served_by": served.by,
                        "not_covered": False,
                        # What the insights group it by: the cache entry it was
                        # served from, or the job whose answer it followed.
                        "cache_entry": (served.source or {}).get("cached_question_id"),
                        "source_job": (served.source or {}).get("job_id"),
                        **run.insight,
                    },
                ),
            ],
        )
        await conn.execute(
            _MESSAGES_SQL,
            {
                "session": job.session_id,
                "job": job.id,
                "question": job.question,
                "answer": answer,
                "citations": outcome.citations,
                "usage": outcome.usage,
                "timings": outcome.timings,
                "cached": cached,
            },
        )
        await pipeline.sync()
        stored = bool(succeeded.rowcount)
        if not stored:
            # Ends the transaction block quietly, with nothing kept.
            raise psycopg.Rollback
    return stored


# The question and the answer, and the session's count of them: one statement, so
# that it needs no result of the insert before the update (a pipeline sends both
# before either is answered).
_MESSAGES_SQL = """
WITH inserted AS (
    INSERT INTO chat_messages (session_id, job_id, role, content, citations, usage,
                               timings, cached)
    VALUES (%(session)s, %(job)s, 'user', %(question)s, '[]', NULL, NULL, false),
           (%(session)s, %(job)s, 'assistant', %(answer)s, %(citations)s, %(usage)s,
            %(timings)s, %(cached)s)
    ON CONFLICT (job_id, role) DO NOTHING
    RETURNING 1
)
UPDATE chat_sessions
   SET message_count = message_count + (SELECT count(*) FROM inserted), updated_at = now()
 WHERE id = %(session)s AND EXISTS (SELECT 1 FROM inserted)
"""


async def _cancelled(res: Resources, events: EventLog, job: Job) -> None:
    if not await jobs.cancel_running(res.db, job.id):
        return  # another run finished it first; its events stand
    metrics.job_finished("cancelled", error="cancelled")
    await events.publish(
        str(job.id),
        ERROR,
        {"code": "cancelled", "message": "the question was cancelled", "retryable": False},
    )


async def _fail(res: Resources, events: EventLog, job: Job, exc: AssistantError) -> None:
    # The job's error is read by the learner: our words only. The log keeps what the
    # provider said (a quota notice, an account id) for the operator.
    error = {"code": exc.code, "message": exc.public_text, "retryable": exc.retryable}
    log.warning("job %s failed: %s", job.id, exc.message)
    if not await jobs.fail_running(res.db, job.id, error):
        log.info("job %s had already finished in another run: its outcome stands", job.id)
        return
    metrics.job_finished("failed", error=exc.code)
    await events.publish(str(job.id), ERROR, error)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
