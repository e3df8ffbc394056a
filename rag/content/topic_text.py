"""A topic's text for a reader: its Markdown rendered to safe HTML, headings anchored.

A citation links to ``topic_key`` and ``anchor`` (``rag/answering/prompts.py``); the
page asks for the topic here and scrolls to the heading whose ``data-anchor`` is that
anchor. The HTML is rendered on the server by markdown-it-py (already locked, as a
dependency of rich), in its CommonMark preset with raw HTML off: a ``<script>`` or an
``<img onerror>`` in a course's source comes out as text, and its link validation
drops ``javascript:``, ``vbscript:``, ``file:`` and ``data:`` targets. Images are off
too (a course source's relative image paths point nowhere here, and a remote one
would be fetched by every reader's browser). The page sanitizes the HTML again
(DOMPurify) before it inserts it: two independent layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict

from rag.answering.prompts import anchor
from rag.platform.db import Database


class Heading(msgspec.Struct, frozen=True):
    level: int
    text: str
    #: What a citation's ``anchor`` names; the rendered heading's ``id`` and ``data-anchor``.
    anchor: str


class TopicText(msgspec.Struct, frozen=True):
    course_key: str
    topic_key: str
    title: str
    module_number: int
    module_title: str | None
    #: The topic's Markdown source, as imported.
    markdown: str
    #: ``markdown`` rendered: no raw HTML, no images, headings carrying their anchors.
    html: str
    #: The headings in order (a table of contents; the anchors citations use).
    headings: list[Heading]


def _heading_open(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    """Gives each heading the id a citation's anchor names (the first of equal
    headings keeps the plain slug; later ones get ``-2``, ``-3``, as citations of a
    repeated heading open its first occurrence)."""
    token = tokens[idx]
    inline = tokens[idx + 1]
    slug = anchor(inline.content)
    seen: dict[str, int] = env.setdefault("anchors", {})
    count = seen.get(slug, 0) + 1
    seen[slug] = count
    unique = slug if count == 1 else f"{slug}-{count}"
    if slug:
        token.attrSet("id", unique)
        token.attrSet("data-anchor", unique)
    env.setdefault("headings", []).append(
        Heading(level=int(token.tag[1]), text=inline.content, anchor=unique)
    )
    return self.renderToken(tokens, idx, options, env)


def _renderer() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    md.disable("image")
    md.add_render_rule("heading_open", _heading_open)
    return md


_MD = _renderer()


def render(markdown: str) -> tuple[str, list[Heading]]:
    """``markdown`` as safe HTML, and its headings."""
    env: dict[str, Any] = {}
    html = _MD.render(markdown, env)
    return html, list(env.get("headings", []))


class _TopicRow(msgspec.Struct, frozen=True):
    topic_key: str
    title: str
    module_number: int
    module_title: str | None
    body: str


TOPIC_SQL = """
SELECT t.topic_key, t.title, t.module_number,
       c.modules ->> t.module_number::text AS module_title, t.body
  FROM topics t JOIN courses c ON c.id = t.course_id
 WHERE t.course_id = %(course_id)s AND t.topic_key = %(topic_key)s
"""


async def read_topic(
    db: Database, *, course_id: int, course_key: str, topic_key: str
) -> TopicText | None:
    """The topic rendered, or None when the course has no such topic."""
    row = await db.fetch_one(
        _TopicRow, TOPIC_SQL, {"course_id": course_id, "topic_key": topic_key}
    )
    if row is None:
        return None
    html, headings = render(row.body)
    return TopicText(
        course_key=course_key,
        topic_key=row.topic_key,
        title=row.title,
        module_number=row.module_number,
        module_title=row.module_title,
        markdown=row.body,
        html=html,
        headings=headings,
    )
