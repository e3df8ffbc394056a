"""Follow-ups rewritten into standalone questions, before retrieval and the cache.

"And how long?" retrieves nothing useful and means something else in every
conversation. Before retrieval a follow-up is rewritten, with the running summary
and the recent turns, into a question that stands alone ("How long does bulk
fermentation take?"). The rewrite is what retrieval searches and what the
semantic cache compares, and the model answers it; it is stored with the job's
outcome (``assistant_jobs.standalone_question``) for the record and for later turns
(a follow-up to a follow-up starts from its rewrite).

* With a chat model (``REWRITE_FOLLOWUPS=model`` and the OpenAI-compatible
  provider) it is a short completion: :data:`REWRITE_RULES`, at most
  :data:`REWRITE_MAX_TOKENS` tokens, within ``REWRITE_TIMEOUT`` seconds, through
  the provider's retries and circuit breaker. An error, a timeout or an
  unusable reply (empty, several lines, far too long) falls back to the rules.
* By rule (the offline provider, ``REWRITE_FOLLOWUPS=rules``, or the fallback):
  a question that already stands alone is kept; one that leans on the
  conversation (a pronoun, "and ...", "what about ...", one content word or
  none) gets the previous question's subject appended, which is what
  retrieval and the cache need even if it reads less well than a model's.

The first question of a session is never rewritten.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Literal

import msgspec

from rag.content.embeddings import normalize_text
from rag.platform.errors import ProviderError
from rag.providers.base import ChatMessage, Provider

log = logging.getLogger("rag.answering.rewrite")

RewriteMode = Literal["model", "rules", "off"]

#: The rewrite prompt's rules; the fake OpenAI server recognizes its first line.
REWRITE_RULES = """\
You rewrite a learner's follow-up message into one standalone question.
Use the conversation only to resolve what the message refers to (pronouns, \
"and...", "what about...", an omitted subject). Keep the learner's intent, \
numbers, names and wording otherwise. Do not answer the question. If the message \
already stands alone, return it unchanged. Reply with the question only, on one line."""
REWRITE_MAX_TOKENS = 80
#: A reply longer than this many characters is not a rewritten question.
REWRITE_MAX_CHARS = 500
#: Turns and summary characters the rewrite prompt shows.
REWRITE_TURNS = 4
REWRITE_SUMMARY_CHARS = 1200

_WORD = re.compile(r"[^\W_]+(?:['\u2019.-][^\W_]+)*")
#: Words that point back into the conversation.
_REFERRING = frozenset(
    [
        *("it", "its", "itself", "that", "this", "these", "those", "they", "them", "their"),
        *("there", "then", "one", "ones", "other", "others", "same", "such", "former"),
        *("latter", "he", "she", "him", "her", "instead", "else", "also", "too", "either"),
    ]
)
#: Openings that continue the previous question ("and how long?", "what about rye?").
_CONTINUATION = re.compile(
    r"^\s*(?:and what about|and how about|what about|how about|and if|what if|why not|"
    r"is that|does that|and|but|so|also|then|or|ok(?:ay)?)\b[\s,]*",
    re.IGNORECASE,
)
_FILLER = frozenset(
    [
        *("a", "an", "the", "i", "my", "me", "we", "you", "your", "is", "are", "was", "be"),
        *("do", "does", "did", "can", "could", "should", "would", "will", "how", "what"),
        *("why", "when", "where", "which", "who", "of", "in", "on", "at", "for", "to", "by"),
        *("with", "and", "or", "if", "so", "about", "please", "thanks", "thank", "ok", "okay"),
        *("much", "many", "long", "get", "make", "happens", "happen", "mean", "means", "hmm"),
    ]
)


class Rewrite(msgspec.Struct, frozen=True):
    """The question retrieval and the cache use, and how it was obtained."""

    text: str
    #: "unchanged" (standalone already, or a first turn), "model" or "rules".
    method: Literal["unchanged", "model", "rules"]


class History(msgspec.Struct, frozen=True):
    """What a rewrite reads of the conversation: summary and recent turns, oldest first.
    ``questions`` are the learner's earlier questions in their standalone form."""

    summary: str = ""
    turns: Sequence[tuple[str, str]] = ()
    questions: Sequence[str] = ()


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.casefold()) if w not in _FILLER]


def leans_on_context(question: str) -> bool:
    """Whether ``question`` needs the conversation to be understood."""
    words = [w.casefold() for w in _WORD.findall(question)]
    if _CONTINUATION.match(question) or _REFERRING.intersection(words):
        return True
    return len(_content_words(question)) <= 1


def rule_rewrite(question: str, history: History) -> Rewrite:
    """The rule-based rewrite: the question, with the subject of the previous question
    appended when it leans on the conversation (see the module docstring)."""
    text = normalize_text(question)
    if not history.questions or not leans_on_context(text):
        return Rewrite(text, "unchanged")
    previous = normalize_text(history.questions[-1]).rstrip(" ?.!")
    body = _CONTINUATION.sub("", text, count=1).strip() or text
    body = body[:1].upper() + body[1:]
    return Rewrite(f"{body} (regarding: {previous})", "rules")


def rewrite_messages(question: str, history: History) -> list[ChatMessage]:
    """The chat messages of a model rewrite."""
    lines: list[str] = []
    summary = history.summary.strip()
    if summary:
        lines.append(f"Conversation summary: {summary[:REWRITE_SUMMARY_CHARS]}")
    for role, content in list(history.turns)[-REWRITE_TURNS:]:
        who = "Learner" if role == "user" else "Tutor"
        lines.append(f"{who}: {' '.join(content.split())[:600]}")
    lines.append(f"Follow-up: {' '.join(question.split())}")
    return [
        ChatMessage(role="system", content=REWRITE_RULES),
        ChatMessage(role="user", content="\n".join(lines)),
    ]


def _usable(reply: str) -> str | None:
    text = reply.strip().strip('"\u201c\u201d').strip()
    text = re.sub(r"^(?:standalone question|question)\s*:\s*", "", text, flags=re.IGNORECASE)
    if not text or "\n" in text or len(text) > REWRITE_MAX_CHARS:
        return None
    return normalize_text(text)


async def model_rewrite(
    provider: Provider, question: str, history: History, *, time_limit: float
) -> str | None:
    """The chat model's rewrite, or None (an error, a timeout, an unusable reply)."""
    messages = rewrite_messages(question, history)
    try:
        reply = await provider.short_reply(
            messages, max_tokens=REWRITE_MAX_TOKENS, time_limit=time_limit
        )
    except (ProviderError, TimeoutError) as exc:
        log.warning("follow-up rewrite failed, using the rules: %s", exc)
        return None
    return _usable(reply)


async def standalone_question(
    provider: Provider,
    question: str,
    history: History,
    *,
    mode: RewriteMode,
    time_limit: float,
) -> Rewrite:
    """The standalone form of ``question`` (unchanged on a session's first turn)."""
    if mode == "off" or not history.questions:
        return Rewrite(normalize_text(question), "unchanged")
    if mode == "model" and provider.name != "offline" and leans_on_context(question):
        text = await model_rewrite(provider, question, history, time_limit=time_limit)
        if text is not None:
            changed = text.casefold() != normalize_text(question).casefold()
            return Rewrite(text, "model" if changed else "unchanged")
    return rule_rewrite(question, history)


_GREETING = re.compile(
    r"^(?:(?:hi|hello|hey|thanks|thank you|ok|okay|great|cool|sorry|(?:a |one )?quick question"
    r"|question|good (?:morning|afternoon|evening))(?:\s+there)?\b[\s!,.:;-]*)+",
    re.IGNORECASE,
)
_ASKING = re.compile(
    r"^(?:please\s+)?(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?)?"
    r"(?:(?:tell|show|teach)\s+me|explain(?:\s+to\s+me)?|help\s+me\s+understand|"
    r"i\s+(?:was|am)\s+wondering|i(?:'d|\s+would)\s+like\s+to\s+know|do\s+you\s+know|"
    r"i\s+want\s+to\s+know)\b[\s,:]*",
    re.IGNORECASE,
)
_TRAILING = re.compile(
    r"(?:[\s,]+(?:please|thanks|thank you|(?:can|could) you (?:please )?(?:tell me|explain)))?"
    r"[\s?!.]*$",
    re.IGNORECASE,
)


def canonical_question(question: str) -> str:
    """The question without what carries no meaning for its answer: greetings,
    politeness ("Could you please tell me ...", "Please explain ..."), trailing
    punctuation. Retrieval embeds it and the semantic cache compares it, so "Hi!
    Can you tell me how long to knead?" and "how long to knead" are one question.
    Only whole leading or trailing phrases go; a question made only of them is kept."""
    text = normalize_text(question)
    stripped = _GREETING.sub("", text)
    stripped = _ASKING.sub("", stripped)
    stripped = _TRAILING.sub("", stripped).strip()
    if len(_WORD.findall(stripped)) == 0:
        return text
    return stripped[:1].upper() + stripped[1:]
