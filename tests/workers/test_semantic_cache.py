"""The semantic answer cache, end to end through the pipeline and the fake provider."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY

from rag.answering import answers, flight, semantic_cache
from rag.answering.events import EventLog
from rag.answering.jobs import create_job
from rag.answering.rewrite import canonical_question
from rag.content.courses import load_course
from rag.content.indexing import import_course, reindex_course
from rag.platform.resources import Resources, open_resources
from tests.fixtures.fake_openai import FakeServer
from tests.fixtures.sse import text_after_reset
from tests.rag.test_indexing import TOPICS, write_course


@pytest.fixture
async def res(
    fake_openai: FakeServer, database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[Resources]:
    settings = fake_openai.settings()
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
        await reindex_course(res.db, res.embedding_cache(), settings, "test-course")
        yield res


async def _ask(res: Resources, question: str, session: uuid.UUID | None = None) -> uuid.UUID:
    course_id = await res.db.fetch_value("SELECT id FROM courses")
    job = await create_job(
        res.db, user_id="alice", course_id=course_id, question=question, session_id=session
    )
    assert await answers.answer_question(res, EventLog(res.redis), job.id) == "succeeded"
    return job.id


class _JobRow(msgspec.Struct):
    cached: bool
    answer: str
    session_id: uuid.UUID


async def _job(res: Resources, job_id: uuid.UUID) -> tuple[bool, str, uuid.UUID]:
    row = await res.db.fetch_one(
        _JobRow, "SELECT cached, answer, session_id FROM assistant_jobs WHERE id = %s", (job_id,)
    )
    assert row is not None
    return row.cached, row.answer, row.session_id


async def test_the_same_standalone_question_is_answered_from_the_cache(
    res: Resources, fake_openai: FakeServer
) -> None:
    first = await _ask(res, "What happens during bulk fermentation?")
    assert fake_openai.stats()["chat_calls"] == 1
    second = await _ask(res, "what happens during  bulk fermentation")
    assert fake_openai.stats()["chat_calls"] == 1  # no provider call
    cached, answer, _ = await _job(res, second)
    assert cached and answer == (await _job(res, first))[1]
    events = await EventLog(res.redis).read(str(second))
    assert "".join(str(e.data["text"]) for e in events if e.type == "token") == answer
    assert events[-1].type == "done" and events[-1].data["cached"] is True
    hits = await res.db.fetch_value("SELECT sum(hits) FROM semantic_cache")
    assert hits == 1
    # The job says how it was served, and from what.
    assert await _served(res, first) == ("generated", None)
    served_by, source = await _served(res, second)
    cached_id = await res.db.fetch_value("SELECT id FROM semantic_cache")
    assert served_by == "semantic_cache" and source["cached_question_id"] == cached_id
    assert res.settings.semantic_cache_threshold <= source["similarity"] <= 1.0001
    assert events[-1].data["served_by"] == "semantic_cache"
    assert events[-1].data["served_from"] == source


async def _served(res: Resources, job_id: uuid.UUID) -> tuple[str, Any]:
    row = await res.db.fetch_value(
        "SELECT row(served_by, served_from) FROM assistant_jobs WHERE id = %s", (job_id,)
    )
    assert row is not None
    # jsonb inside a row comes back as its text
    return row[0], None if row[1] is None else json.loads(row[1])


async def test_a_near_miss_does_not_use_the_cache_and_a_follow_up_uses_its_rewrite(
    res: Resources, fake_openai: FakeServer
) -> None:
    first = await _ask(res, "How long should I knead the dough?")
    near_miss = await _ask(res, "How long should I proof the dough?")
    assert not (await _job(res, near_miss))[0]
    assert fake_openai.stats()["chat_calls"] == 2
    # A follow-up that stands alone is compared as it is: served from the cache.
    session = (await _job(res, first))[2]
    follow_up = await _ask(res, "How long should I knead the dough?", session)
    assert (await _job(res, follow_up))[0]
    assert fake_openai.stats()["chat_calls"] == 2
    # One that leans on the conversation is rewritten by the model first (one short
    # chat call), then answered; its rewrite is stored with the job.
    leaning = await _ask(res, "And what about proofing it?", session)
    assert not (await _job(res, leaning))[0]
    standalone = await res.db.fetch_value(
        "SELECT standalone_question FROM assistant_jobs WHERE id = %s", (leaning,)
    )
    assert standalone == "Proofing it? (regarding: How long should I knead the dough)"
    assert fake_openai.stats()["chat_calls"] == 4
    # Follow-up answers, whose prompts hold the learner's history, are not cached.
    assert await res.db.fetch_value("SELECT count(*) FROM semantic_cache") == 2


async def _timings(res: Resources, job_id: uuid.UUID) -> dict[str, Any]:
    row = await res.db.fetch_value("SELECT timings FROM assistant_jobs WHERE id = %s", (job_id,))
    assert isinstance(row, dict)
    return row


async def test_a_grey_zone_candidate_is_served_only_on_the_verifiers_yes(
    res: Resources, fake_openai: FakeServer
) -> None:
    """Below SEMANTIC_CACHE_VERIFY_BELOW (0.95) a candidate that passed every rule
    check also needs the chat model's yes: one short call, and no verdict is a miss.
    (Cosines with the fake's hashed embeddings, after canonical form: 1.0 for the
    repeat, 0.81 and 0.86 for the paraphrases.)"""
    counted = {labels: _lookups(*labels) for labels in _LOOKUP_LABELS}
    first = await _ask(res, "What happens during bulk fermentation?")
    assert fake_openai.stats()["chat_calls"] == 1
    # An exact repeat is above the grey zone: served with no call at all.
    repeat = await _ask(res, "So what happens during the bulk fermentation?")
    assert fake_openai.stats()["chat_calls"] == 1
    served_by, source = await _served(res, repeat)
    assert served_by == "semantic_cache" and source["verified"] is False
    assert "verify_ms" not in await _timings(res, repeat)
    # A paraphrase in the grey zone: one verification call, "yes", served from the cache.
    paraphrase = await _ask(res, "What happens to dough during bulk fermentation?")
    assert fake_openai.stats()["chat_calls"] == 2
    served_by, source = await _served(res, paraphrase)
    assert served_by == "semantic_cache" and source["verified"] is True
    assert source["similarity"] < res.settings.semantic_cache_verify_below
    assert (await _job(res, paraphrase))[1] == (await _job(res, first))[1]
    assert "verify_ms" in await _timings(res, paraphrase)
    # The model says no: a miss, answered by generation (the verification, then the answer).
    fake_openai.configure(answer="no")
    refused = await _ask(res, "What really happens during bulk fermentation?")
    assert fake_openai.stats()["chat_calls"] == 4
    assert (await _served(res, refused))[0] == "generated"
    assert "verify_ms" in await _timings(res, refused)
    # The verification fails (a provider error): no verdict, so a miss as well.
    fake_openai.configure(answer=None)
    fake_openai.add_faults({"endpoint": "chat", "kind": "status", "status": 400})
    failed = await _ask(res, "What exactly happens during bulk fermentation?")
    assert fake_openai.stats()["chat_calls"] == 6
    assert (await _served(res, failed))[0] == "generated"
    hits = await res.db.fetch_value("SELECT sum(hits) FROM semantic_cache")
    assert hits == 2  # the repeat and the verified paraphrase
    # The metrics say the same, by the check that decided (rag/platform/metrics.py).
    moved = {labels: _lookups(*labels) - before for labels, before in counted.items()}
    assert moved == {("miss", "threshold"): 1, ("hit", ""): 1, ("hit", "verified"): 1,
                     ("refused", "verifier"): 2}  # fmt: skip


_LOOKUP_LABELS = [("miss", "threshold"), ("hit", ""), ("hit", "verified"), ("refused", "verifier")]


def _lookups(result: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "course_assistant_semantic_cache_lookups_total", {"result": result, "reason": reason}
    )
    return value or 0.0


async def test_a_reindex_evicts_exactly_the_answers_whose_chunks_changed(
    res: Resources, fake_openai: FakeServer, tmp_path: Path
) -> None:
    """Invalidation by evidence: an entry records the chunks its prompt held; a change
    elsewhere in the course keeps it, a change to one of its chunks evicts it."""
    first = await _ask(res, "What is mixing?")
    evidence = await res.db.fetch_value("SELECT evidence FROM semantic_cache")
    citations = await res.db.fetch_value(
        "SELECT citations FROM assistant_jobs WHERE id = %s", (first,)
    )
    # Every chunk of the prompt is evidence; the answer cites some of them.
    assert citations and {c["chunk_id"] for c in citations} <= set(evidence)
    assert evidence == sorted(evidence)

    async def reindex(topics: dict[str, tuple[int, int, str, str]], name: str) -> None:
        await import_course(res.db, load_course(write_course(tmp_path / name, topics)))
        await reindex_course(res.db, res.embedding_cache(), res.settings, "test-course")

    # A new topic changes the course (its version moves) but none of the entry's chunks.
    grown = dict(TOPICS) | {"d": (3, 1, "Storing bread", "Keep bread in a cloth bag.")}
    await reindex(grown, "c2")
    kept = await _ask(res, "What is mixing?")
    served_by, source = await _served(res, kept)
    cached_id = await res.db.fetch_value("SELECT id FROM semantic_cache")
    assert served_by == "semantic_cache" and source["cached_question_id"] == cached_id
    assert fake_openai.stats()["chat_calls"] == 1
    # Rewriting the topics the entry cited replaces its chunks: evicted, answered anew.
    cited = {c["topic_key"] for c in citations}
    rewritten = {
        k: (*v[:3], v[3].replace("paragraph", "passage")) if k in cited else v
        for k, v in grown.items()
    }
    await reindex(rewritten, "c3")
    assert await res.db.fetch_value("SELECT count(*) FROM semantic_cache") == 0
    again = await _ask(res, "What is mixing?")
    assert (await _served(res, again))[0] == "generated"
    assert fake_openai.stats()["chat_calls"] == 2


async def test_an_import_that_removes_a_cited_topic_evicts_its_answers(
    res: Resources, tmp_path: Path
) -> None:
    first = await _ask(res, "What is mixing?")
    citations = await res.db.fetch_value(
        "SELECT citations FROM assistant_jobs WHERE id = %s", (first,)
    )
    cited = {c["topic_key"] for c in citations}
    remaining = {k: v for k, v in TOPICS.items() if k not in cited} or {
        "z": (1, 9, "Another", "Something else entirely.")
    }
    await import_course(res.db, load_course(write_course(tmp_path / "c2", remaining)))
    assert await res.db.fetch_value("SELECT count(*) FROM semantic_cache") == 0


async def test_identical_questions_in_flight_share_one_generation(
    res: Resources, fake_openai: FakeServer
) -> None:
    fake_openai.configure(token_delay=0.01)
    course_id = await res.db.fetch_value("SELECT id FROM courses")
    jobs = [
        await create_job(
            res.db,
            user_id=f"user-{n}",
            course_id=course_id,
            question="How long should the bulk fermentation take?",
        )
        for n in range(20)
    ]
    log = EventLog(res.redis)
    statuses = await asyncio.gather(*(answers.answer_question(res, log, j.id) for j in jobs))
    assert statuses == ["succeeded"] * 20
    assert fake_openai.stats()["chat_calls"] == 1  # one leader, nineteen followers
    stored = {(await _job(res, j.id))[1] for j in jobs}
    assert len(stored) == 1
    answer = stored.pop()
    for j in jobs:  # every job's own stream carries the whole answer
        events = await log.read(str(j.id))
        assert "".join(str(e.data["text"]) for e in events if e.type == "token") == answer
        assert events[-1].type == "done"
    # The leader keeps its key a little while, pointing at its finished job.
    (held,) = await res.redis.keys("flight:*")
    assert 0 < await res.redis.ttl(held) <= flight.FLIGHT_LINGER
    holder = await res.redis.get(held)
    assert holder is not None and holder.decode() in {str(j.id) for j in jobs}
    # The leader generated; the others say they followed it (or, for a job that
    # looked after the leader stored, that the semantic cache served it).
    served = {str(j.id): await _served(res, j.id) for j in jobs}
    assert served.pop(holder.decode()) == ("generated", None)
    followed = [s for s in served.values() if s[0] == "followed"]
    assert followed and all(s == ("followed", {"job_id": holder.decode()}) for s in followed)
    assert all(s[0] in {"followed", "semantic_cache"} for s in served.values())


def _miss_first_lookups(monkeypatch: pytest.MonkeyPatch, misses: int) -> list[str]:
    """Make the first ``misses`` semantic-cache lookups miss, as if they ran just
    before another job stored its answer; return the questions looked up."""
    real = semantic_cache.lookup
    looked_up: list[str] = []

    async def lookup(*args: Any, **kwargs: Any) -> semantic_cache.CachedAnswer | None:
        looked_up.append(kwargs["question"])
        if len(looked_up) <= misses:
            return None
        return await real(*args, **kwargs)

    monkeypatch.setattr(semantic_cache, "lookup", lookup)
    return looked_up


async def test_a_miss_costs_one_cache_lookup(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up = _miss_first_lookups(monkeypatch, 0)
    await _ask(res, "How long should the bulk fermentation take?")
    # The canonical form is what the cache compares (no question mark, no "please").
    assert looked_up == ["How long should the bulk fermentation take"]


async def test_a_job_that_missed_just_before_the_leader_stored_follows_it(
    res: Resources, fake_openai: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    question = "How long should the bulk fermentation take?"
    leader = await _ask(res, question)
    # The second job's lookup "ran before the store": it misses, then finds the
    # leader's lingering flight key and follows the finished leader's stream.
    _miss_first_lookups(monkeypatch, 1)
    follower = await _ask(res, question)
    assert fake_openai.stats()["chat_calls"] == 1
    answer = (await _job(res, leader))[1]
    assert (await _job(res, follower))[1] == answer
    events = await EventLog(res.redis).read(str(follower))
    assert "".join(str(e.data["text"]) for e in events if e.type == "token") == answer
    assert events[-1].type == "done"


async def test_a_follower_passes_on_its_leaders_reset(
    res: Resources, fake_openai: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A leader on its second attempt: the first one's partial text, a reset, the answer.
    question = "What is oven spring?"
    course_id = await res.db.fetch_value("SELECT id FROM courses")
    version = await res.db.fetch_value("SELECT content_version FROM courses")
    leader = str(uuid.uuid4())
    log = EventLog(res.redis)
    await log.publish_many(
        leader,
        [
            ("token", {"text": "Half an ans"}),
            ("reset", {"attempt": 2}),
            ("citations", {"citations": []}),
            ("token", {"text": "The whole "}),
            ("token", {"text": "answer."}),
            ("done", {"answer": "The whole answer.", "citations": []}),
        ],
    )
    scope = semantic_cache.Scope(course_id, version, res.provider.embedding_model)
    await res.redis.set(flight.flight_key(scope, canonical_question(question)), leader, ex=60)
    _miss_first_lookups(monkeypatch, 1)
    follower = await _ask(res, question)
    assert fake_openai.stats()["chat_calls"] == 0
    events = await log.read(str(follower))
    text = text_after_reset((e.type, e.data) for e in events)
    assert text == "The whole answer." == (await _job(res, follower))[1]


async def test_a_follower_answers_itself_when_the_leader_fails(
    res: Resources, fake_openai: FakeServer
) -> None:
    fake_openai.configure(token_delay=0.01)
    fake_openai.add_faults({"endpoint": "chat", "kind": "status", "status": 400})
    course_id = await res.db.fetch_value("SELECT id FROM courses")
    jobs = [
        await create_job(
            res.db, user_id=f"user-{n}", course_id=course_id, question="What is oven spring?"
        )
        for n in range(2)
    ]
    log = EventLog(res.redis)
    statuses = await asyncio.gather(*(answers.answer_question(res, log, j.id) for j in jobs))
    assert sorted(statuses) == ["failed", "succeeded"]
    assert fake_openai.stats()["chat_calls"] == 2


async def test_the_cache_row_exists_before_done_is_published(res: Resources) -> None:
    """A client that reads `done` and at once asks a paraphrase must find the answer
    cached: the row is written before `done`, not after."""

    cached_at_done: list[int] = []

    class Watching(EventLog):
        async def publish_many(self, job_id: str, events: Any) -> list[str]:
            if any(type_ == "done" for type_, _ in events):
                count = await res.db.fetch_value("SELECT count(*) FROM semantic_cache")
                cached_at_done.append(int(count))
            return await super().publish_many(job_id, events)

    course_id = await res.db.fetch_value("SELECT id FROM courses")
    job = await create_job(
        res.db, user_id="alice", course_id=course_id, question="Why does dough need salt?"
    )
    log = Watching(res.redis)
    assert await answers.answer_question(res, log, job.id) == "succeeded"
    assert cached_at_done == [1]


async def test_a_question_the_course_does_not_cover_gets_no_sources_and_no_model_call(
    fake_openai: FakeServer, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """RELEVANCE_FLOOR: an off-topic question used to be answered citing the least bad
    chunks (four sources for a question about taxes). Here the floor is set above
    every chunk's similarity to an off-topic question, below an on-topic one's."""
    settings = fake_openai.settings(RELEVANCE_FLOOR="0.3")
    async with open_resources(settings, database_url=database_url, redis_url=redis_url) as res:
        await import_course(res.db, load_course(write_course(tmp_path / "c", TOPICS)))
        await reindex_course(res.db, res.embedding_cache(), settings, "test-course")
        off = await _ask(res, "How do I file my income tax return?")
        job = await res.db.fetch_value(
            "SELECT row(answer, citations::text) FROM assistant_jobs WHERE id = %s", (off,)
        )
        assert job[0] == answers.NOT_COVERED.format(course="Test course")
        assert job[1] == "[]"
        assert fake_openai.stats()["chat_calls"] == 0
        events = await EventLog(res.redis).read(str(off))
        assert [e.data for e in events if e.type == "citations"] == [{"citations": []}]
        assert "".join(str(e.data["text"]) for e in events if e.type == "token") == job[0]
        # A question the course covers is answered from its sources as before.
        on = await _ask(res, "Mixing part 1: what does the Mixing paragraph say?")
        cited = await res.db.fetch_value(
            "SELECT jsonb_array_length(citations) FROM assistant_jobs WHERE id = %s", (on,)
        )
        assert cited > 0 and fake_openai.stats()["chat_calls"] == 1
