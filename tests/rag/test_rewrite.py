"""Follow-ups rewritten into standalone questions: the rules, the model call through
the real openai client and the fake server, and what happens when the model fails."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rag.answering.rewrite import (
    REWRITE_RULES,
    History,
    canonical_question,
    leans_on_context,
    rewrite_messages,
    rule_rewrite,
    standalone_question,
)
from rag.providers.offline import OfflineProvider
from rag.providers.openai import OpenAIProvider
from tests.fixtures.fake_openai import FakeServer

BULK = History(
    summary="The learner asked about bulk fermentation.",
    turns=[("user", "What is bulk fermentation?"), ("assistant", "It is the first rise.")],
    questions=["What is bulk fermentation?"],
)


@pytest.mark.parametrize(
    "question",
    [
        "And how long?",
        "What about rye?",
        "Why is that?",
        "How do I fix it?",
        "what does it stand for",
        "and if I skip them",
        "Why?",
    ],
)
def test_a_follow_up_that_leans_on_the_conversation_is_recognized(question: str) -> None:
    assert leans_on_context(question)


@pytest.mark.parametrize(
    "question",
    [
        "How long should I knead bread dough by hand?",
        "What is the poke test?",
        "Which port does WireGuard use by default?",
    ],
)
def test_a_question_that_stands_alone_is_kept(question: str) -> None:
    assert not leans_on_context(question)
    assert rule_rewrite(question, BULK).text == question
    assert rule_rewrite(question, BULK).method == "unchanged"


def test_the_rules_append_the_previous_questions_subject() -> None:
    rewrite = rule_rewrite("And how long?", BULK)
    assert rewrite.method == "rules"
    assert rewrite.text == "How long? (regarding: What is bulk fermentation)"
    # The newest earlier question is the one referred to.
    two = History(questions=["What is salt for?", "What is DHCP?"])
    assert rule_rewrite("what about its ports?", two).text.endswith("(regarding: What is DHCP)")


def test_a_first_question_is_never_rewritten() -> None:
    assert rule_rewrite("And how long?", History()).method == "unchanged"


@pytest.mark.parametrize(
    ("asked", "canonical"),
    [
        ("Hi! What is an autolyse?", "What is an autolyse"),
        (
            "Can you tell me how long to knead bread dough by hand?",
            "How long to knead bread dough by hand",
        ),
        (
            "Thanks. How do I know when bread is fully baked?",
            "How do I know when bread is fully baked",
        ),
        ("why is my crust soft??", "Why is my crust soft"),
        ("I was wondering, what is DNS?", "What is DNS"),
        ("Hello", "Hello"),
    ],
)
def test_the_canonical_question_drops_greetings_and_politeness(asked: str, canonical: str) -> None:
    assert canonical_question(asked) == canonical


def test_the_rewrite_prompt_holds_the_rules_the_turns_and_the_follow_up() -> None:
    messages = rewrite_messages("And how long?", BULK)
    assert messages[0].role == "system" and messages[0].content == REWRITE_RULES
    user = messages[1].content
    assert "Learner: What is bulk fermentation?" in user
    assert "Tutor: It is the first rise." in user
    assert user.endswith("Follow-up: And how long?")


@pytest.fixture
async def provider(fake_openai: FakeServer) -> AsyncIterator[OpenAIProvider]:
    made = OpenAIProvider(fake_openai.settings(PROVIDER_MAX_ATTEMPTS="1"))
    yield made
    await made.aclose()


async def test_the_model_rewrites_a_follow_up_in_one_short_call(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    fake_openai.configure(answer="How long does bulk fermentation take?")
    rewrite = await standalone_question(provider, "And how long?", BULK, mode="model", time_limit=5)
    assert rewrite.method == "model"
    assert rewrite.text == "How long does bulk fermentation take?"
    assert fake_openai.stats()["chat_calls"] == 1


async def test_a_standalone_follow_up_costs_no_model_call(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    rewrite = await standalone_question(
        provider, "What is the poke test?", BULK, mode="model", time_limit=5
    )
    assert rewrite.method == "unchanged" and fake_openai.stats()["chat_calls"] == 0


@pytest.mark.parametrize("reply", ["", "How long?\nAnd also: the answer is two hours.", "x" * 600])
async def test_an_unusable_model_reply_falls_back_to_the_rules(
    provider: OpenAIProvider, fake_openai: FakeServer, reply: str
) -> None:
    fake_openai.configure(answer=reply)
    rewrite = await standalone_question(provider, "And how long?", BULK, mode="model", time_limit=5)
    assert rewrite.method == "rules"
    assert rewrite.text == "How long? (regarding: What is bulk fermentation)"


async def test_a_failing_or_slow_model_falls_back_to_the_rules(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    fake_openai.add_faults({"endpoint": "chat", "kind": "status", "status": 503, "times": 1})
    failed = await standalone_question(provider, "And how long?", BULK, mode="model", time_limit=5)
    assert failed.method == "rules"
    fake_openai.add_faults({"endpoint": "chat", "kind": "hang", "seconds": 30, "times": 1})
    slow = await standalone_question(provider, "And how long?", BULK, mode="model", time_limit=0.3)
    assert slow.method == "rules"


async def test_the_offline_provider_and_the_off_mode_make_no_call() -> None:
    offline = OfflineProvider(16)
    by_rules = await standalone_question(offline, "And how long?", BULK, mode="model", time_limit=5)
    assert by_rules.method == "rules"
    off = await standalone_question(offline, "And how long?", BULK, mode="off", time_limit=5)
    assert off.method == "unchanged" and off.text == "And how long?"
