"""Chunking topic bodies: heading sections, token budgets, overlap, coverage and hashes."""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag.content.chunking import Chunk, chunk_topic
from rag.platform.tokens import count_tokens

TITLE = "Bread Basics"


def sentence(i: int, words: int = 12) -> str:
    """A distinct, plausible sentence (numbered so repeated text hashes differently)."""
    filler = ["the", "dough", "rises", "slowly", "while", "gluten", "strands", "align", "in",
              "warm", "kitchens"]
    return f"Step {i} says " + " ".join(filler[(i + k) % len(filler)] for k in range(words)) + "."


def paragraph(first: int, sentences: int = 5) -> str:
    return " ".join(sentence(first + k) for k in range(sentences))


def chunks_of(body: str, target: int = 120, overlap: int = 20, title: str = TITLE) -> list[Chunk]:
    chunks = chunk_topic(body, title=title, target_tokens=target, overlap_tokens=overlap)
    check(body, chunks, title=title, target=target, overlap=overlap)
    return chunks


def check(body: str, chunks: list[Chunk], *, title: str, target: int, overlap: int,
          headings: list[int] | None = None, paths: list[tuple[str, ...]] | None = None) -> None:
    """Every documented invariant; ``headings`` (offsets of heading lines, sorted) and
    their ``paths`` when the caller knows them."""
    covered = bytearray(len(body) + 1)
    for i, c in enumerate(chunks):
        assert c.index == i
        assert c.text == body[c.start:c.end]
        assert c.text and c.text == c.text.strip()
        assert c.token_count == count_tokens(c.text)
        assert c.token_count <= target
        prefix = f"{title} › {' › '.join(c.heading_path)}" if c.heading_path else title
        assert c.embed_text == f"{prefix}\n\n{c.text}"
        assert c.content_hash == hashlib.sha256(
            c.embed_text.encode("utf-8", "surrogatepass")).hexdigest()
        covered[c.start:c.end] = b"\x01" * (c.end - c.start)
    missed = [i for i, ch in enumerate(body) if not covered[i] and not ch.isspace()]
    assert not missed, f"uncovered characters at {missed[:10]}"
    for prev, nxt in pairwise(chunks):
        assert prev.start < nxt.start and prev.end < nxt.end
        if headings is not None and section(headings, prev.start) != section(headings, nxt.start):
            assert nxt.start >= prev.end  # never overlap across a heading
            continue
        if nxt.start < prev.end:
            assert overlap > 0
            assert 1 <= count_tokens(body[nxt.start:prev.end]) <= overlap
        elif overlap > 0 and headings is not None:
            # Allowed only when not even the previous chunk's last character fits.
            assert prev.end - prev.start == 1 or count_tokens(body[prev.end - 1:prev.end]) > overlap
    if headings is not None:
        assert paths is not None
        for h in headings:
            assert not any(c.start < h < c.end for c in chunks), f"a chunk crosses heading at {h}"
        for c in chunks:
            k = section(headings, c.start)
            assert c.heading_path == (paths[k - 1] if k else ())


def section(headings: list[int], pos: int) -> int:
    """How many headings start at or before ``pos``: equal for positions in one section."""
    return bisect_right(headings, pos)


# --- examples ---------------------------------------------------------------------------


def test_blank_bodies_have_no_chunks() -> None:
    for body in ("", "   ", "\n\n \t\n", "\u3000\n"):
        assert chunk_topic(body, title=TITLE, target_tokens=100, overlap_tokens=10) == []


@pytest.mark.parametrize(("target", "overlap"), [(15, 0), (100, 51), (100, -1)])
def test_rejects_budgets_it_cannot_keep(target: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="tokens"):
        chunk_topic("text", title=TITLE, target_tokens=target, overlap_tokens=overlap)


def test_short_body_is_one_chunk_with_trimmed_span() -> None:
    body = "\n\n  Flour is milled grain.  \n"
    [chunk] = chunks_of(body)
    assert (chunk.text, chunk.start, chunk.end) == ("Flour is milled grain.", 4, 26)
    assert chunk.heading_path == ()
    assert chunk.embed_text == f"{TITLE}\n\nFlour is milled grain."


def test_headings_split_sections_and_nest() -> None:
    body = (
        "Intro before any heading.\n\n"
        "# Kneading\n\nKneading develops gluten.\n\n"
        "## The windowpane test\n\nStretch a piece thin.\n"
        "### Reading the result\nIt should not tear.\n\n"
        "## Resting ##\n\nLet it relax.\n\n"
        "# Baking\n\nHot oven."
    )
    chunks = chunks_of(body)
    assert [(c.heading_path, c.text) for c in chunks] == [
        ((), "Intro before any heading."),
        (("Kneading",), "# Kneading\n\nKneading develops gluten."),
        (("Kneading", "The windowpane test"), "## The windowpane test\n\nStretch a piece thin."),
        (("Kneading", "The windowpane test", "Reading the result"),
         "### Reading the result\nIt should not tear."),
        (("Kneading", "Resting"), "## Resting ##\n\nLet it relax."),
        (("Baking",), "# Baking\n\nHot oven."),
    ]
    assert chunks[1].embed_text == f"{TITLE} › Kneading\n\n# Kneading\n\nKneading develops gluten."


def test_not_headings() -> None:
    body = "#hashtag is text\n    # indented four spaces is code\n####### seven is too many"
    [chunk] = chunks_of(body)
    assert chunk.heading_path == ()


def test_heading_only_section_is_a_chunk() -> None:
    chunks = chunks_of("# One\n\n## Two\n\nText.")
    assert [(c.heading_path, c.text) for c in chunks] == [
        (("One",), "# One"), (("One", "Two"), "## Two\n\nText.")]


def test_code_fences_are_not_split_at_headings() -> None:
    body = (
        "# Script\n\nRun this:\n\n"
        "```bash\n# install\npip install flour\n\n## still code\n```\n\n"
        "~~~\n# tilde fence\n```\nnot closed by backticks\n~~~\n\n"
        "After the code.\n\n"
        "## Next\n\nMore."
    )
    chunks = chunks_of(body, target=200)
    assert [c.heading_path for c in chunks] == [("Script",), ("Script", "Next")]
    assert "## still code" in chunks[0].text and chunks[0].text.endswith("After the code.")


def test_unclosed_fence_runs_to_the_end() -> None:
    body = "# A\n\n```\n# not a heading\n\n## nor this"
    [chunk] = chunks_of(body)
    assert chunk.heading_path == ("A",)
    assert chunk.text == body


def test_inline_triple_backticks_do_not_open_a_fence() -> None:
    body = "```code``` is inline\n\n# Real heading\n\nText."
    chunks = chunks_of(body)
    assert [c.heading_path for c in chunks] == [(), ("Real heading",)]


def test_long_section_packs_paragraphs_with_overlap() -> None:
    body = "## Methods\n\n" + "\n\n".join(paragraph(10 * p, 3) for p in range(8))
    chunks = chunks_of(body, target=150, overlap=25)
    assert len(chunks) > 2
    assert chunks[0].text.startswith("## Methods\n\n")
    for prev, nxt in pairwise(chunks):
        repeated = body[nxt.start:prev.end]
        assert repeated and prev.text.endswith(repeated)
        assert 1 <= count_tokens(repeated) <= 25
        # Overlap starts at a word.
        assert body[nxt.start - 1].isspace()
    # Paragraphs that fit are kept whole: every chunk ends at a paragraph's end.
    assert all(body[c.end:c.end + 2] in ("\n\n", "") for c in chunks)


def test_no_overlap_when_zero() -> None:
    body = "\n\n".join(paragraph(10 * p, 3) for p in range(8))
    chunks = chunks_of(body, target=150, overlap=0)
    assert all(nxt.start > prev.end for prev, nxt in pairwise(chunks))


def test_long_paragraph_splits_at_sentences_not_decimals() -> None:
    body = " ".join(f"Bake batch {i} for 3.5 hours at 2.25 times the heat." for i in range(60))
    chunks = chunks_of(body, target=64, overlap=8)
    assert len(chunks) > 5
    for c in chunks:
        assert c.text.endswith("heat.")


def test_long_sentence_is_cut_at_spaces() -> None:
    body = "word " * 2000
    chunks = chunks_of(body.strip(), target=50, overlap=10)
    assert len(chunks) > 30
    assert all(c.text.startswith("word") and c.text.endswith("word") for c in chunks)


@pytest.mark.parametrize("unbroken", [
    "abcdefghij" * 500,
    "パンを焼くのは楽しいです" * 200,
    "🍞🥖🥐" * 400,
    "e\u0301" * 700,  # combining accents
    "١٢٣٤٥٦٧٨٩" * 300,
])
def test_unbroken_text_is_hard_cut(unbroken: str) -> None:
    body = f"# Blob\n\nBefore it. {unbroken} after it."
    chunks = chunks_of(body, target=40, overlap=12)
    assert len(chunks) > 5
    assert all(c.heading_path == ("Blob",) for c in chunks)


def test_multibyte_prose() -> None:
    body = "\n\n".join(
        ["# 日本語の見出し", "パン生地をこねる。グルテンが育つ！ 発酵させる？" * 30,
         "## Émojis 🍞", "Les pains 🥖 sont dorés. " * 40, "Ünïcödé wörds ǅ Ⅻ ١٢٣ and\u00a0nbsp."]
    )
    chunks = chunks_of(body, target=60, overlap=15)
    heading = "日本語の見出し"
    assert {c.heading_path for c in chunks} == {(heading,), (heading, "Émojis 🍞")}


def test_crlf_line_endings() -> None:
    body = "Intro.\r\n\r\n# Title\r\n\r\nBody text.\r\n## Sub #\r\nMore.\r\n"
    chunks = chunks_of(body)
    assert [(c.heading_path, c.text) for c in chunks] == [
        ((), "Intro."), (("Title",), "# Title\r\n\r\nBody text."),
        (("Title", "Sub"), "## Sub #\r\nMore.")]


def test_lone_surrogate_does_not_fail() -> None:
    body = "# A\n\nSome \ud800 text. " + paragraph(0, 20)
    chunks_of(body, target=40, overlap=10)


def test_deterministic() -> None:
    body = "# A\n\n" + "\n\n".join(paragraph(7 * p) for p in range(10))
    assert chunks_of(body) == chunks_of(body)


def test_editing_one_paragraph_keeps_other_hashes() -> None:
    sections = [f"## Part {s}\n\n" + "\n\n".join(paragraph(100 * s + 10 * p) for p in range(6))
                for s in range(4)]
    body = "\n\n".join(sections)
    before = chunks_of(body)
    # Edit a word in the middle of part 2, keeping its token count.
    target_sentence = sentence(100 * 2 + 10 * 3 + 2)
    assert target_sentence in body
    edited = target_sentence.replace("dough", "bread")
    assert count_tokens(edited) == count_tokens(target_sentence)
    at = body.index(target_sentence)
    after = chunks_of(body.replace(target_sentence, edited))
    assert [(c.start, c.end) for c in after] == [(c.start, c.end) for c in before]
    changed = [i for i, (b, a) in enumerate(zip(before, after, strict=True))
               if b.content_hash != a.content_hash]
    assert changed  # the chunk holding the edit
    assert all(before[i].start <= at < before[i].end or
               at <= before[i].start < at + len(edited) for i in changed)
    assert all(before[i].heading_path == ("Part 2",) for i in changed)


def test_appending_to_a_section_keeps_earlier_chunks() -> None:
    body = "## Only\n\n" + "\n\n".join(paragraph(10 * p) for p in range(8))
    before = chunks_of(body)
    after = chunks_of(body + "\n\nA new closing paragraph.")
    kept = {c.content_hash for c in before} & {c.content_hash for c in after}
    assert len(kept) >= len(before) - 1


def test_title_change_changes_every_hash() -> None:
    body = "Intro.\n\n# A\n\n" + "\n\n".join(paragraph(10 * p) for p in range(6))
    old = chunks_of(body)
    new = chunks_of(body, title="Bread Basics, 2nd edition")
    assert [c.text for c in old] == [c.text for c in new]
    assert not {c.content_hash for c in old} & {c.content_hash for c in new}


def test_heading_rename_changes_only_its_section_and_subsections() -> None:
    body = "# A\n\nAlpha.\n\n## B\n\nBeta.\n\n### C\n\nGamma.\n\n## D\n\nDelta."
    old = chunks_of(body)
    new = chunks_of(body.replace("## B", "## Bee"))
    changed = [o.heading_path for o, n in zip(old, new, strict=True)
               if o.content_hash != n.content_hash]
    assert changed == [("A", "B"), ("A", "B", "C")]


def test_chunk_is_a_frozen_struct() -> None:
    [chunk] = chunks_of("Text.")
    with pytest.raises(AttributeError):
        chunk.text = "other"  # type: ignore[misc]


# --- properties -------------------------------------------------------------------------

_WORDS = st.sampled_from([
    "flour", "water", "Salt", "yeast", "3.5", "e.g.", "end.", "why?", "yes!", "(see", "this)",
    "don't", "it's", "naïve", "日本語", "パン", "🍞", "🥖🥐", "e\u0301", "١٢٣", "ǅ", "Ⅻ",
    "–", "—", "…", "\u00a0", "x\u200by", "'quoted'", '"q"', "a\tb", "12345678",
])
_RANDOM_WORDS = st.text(
    st.characters(codec="utf-8", exclude_characters="#`~\n\r"),
    min_size=1, max_size=10,
)
_UNBROKEN = st.tuples(
    st.text(st.sampled_from("abcXYZ0189.-_日本🍞é\u0301"), min_size=1, max_size=6),
    st.integers(10, 400),
).map(lambda t: t[0] * t[1])


@st.composite
def _paragraph(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        words = draw(st.lists(st.one_of(_WORDS, _WORDS, _RANDOM_WORDS), min_size=1, max_size=40))
        lines.append(draw(st.sampled_from([" ", "  ", " "])).join(words))
    return "\n".join(lines)


@st.composite
def _code(draw: st.DrawFn) -> str:
    fence = draw(st.sampled_from(["```", "~~~", "````"]))
    body = draw(st.lists(st.sampled_from(
        ["# comment", "## not a heading", "", "    indented()", "x = 3.5", "```inner"]
        if fence != "```" else ["# comment", "## not a heading", "", "    indented()", "x = 3.5"]
    ), max_size=8))
    return "\n".join([fence + draw(st.sampled_from(["", "python"])), *body, fence])


@st.composite
def markdown(draw: st.DrawFn) -> tuple[str, list[int], list[tuple[str, ...]]]:
    """A body, the offsets of its heading lines and each heading's path."""
    parts: list[str] = []
    headings: list[int] = []
    paths: list[tuple[str, ...]] = []
    stack: list[tuple[int, str]] = []
    pos = 0
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["heading", "para", "para", "para", "code", "unbroken",
                                     "blank"]))
        if kind == "heading":
            level = draw(st.integers(1, 6))
            title = " ".join(draw(st.lists(_WORDS, max_size=4))).strip()
            indent = draw(st.sampled_from(["", "", " ", "   "]))
            closing = draw(st.sampled_from(["", "", " ##"]))
            text = f"{indent}{'#' * level} {title}{closing}"
            headings.append(pos + len(indent))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, title))
            paths.append(tuple(t for _, t in stack))
        elif kind == "para":
            text = draw(_paragraph())
        elif kind == "code":
            text = draw(_code())
        elif kind == "unbroken":
            text = draw(_UNBROKEN)
        else:
            text = draw(st.sampled_from(["", "   ", "\t"]))
        # A heading ends its line; other blocks may follow directly on the next line.
        sep = draw(st.sampled_from(["\n\n", "\n", "\n\n\n", "\n \n"]))
        parts.append(text + sep)
        pos += len(text) + len(sep)
    return "".join(parts), headings, paths


_BUDGETS = st.integers(32, 400).flatmap(
    lambda target: st.tuples(st.just(target), st.integers(0, target // 2)))


@settings(max_examples=150, deadline=None)
@given(doc=markdown(), budgets=_BUDGETS)
def test_property_markdown(doc: tuple[str, list[int], list[tuple[str, ...]]],
                           budgets: tuple[int, int]) -> None:
    body, headings, paths = doc
    target, overlap = budgets
    chunks = chunk_topic(body, title="Prop", target_tokens=target, overlap_tokens=overlap)
    check(body, chunks, title="Prop", target=target, overlap=overlap, headings=headings,
          paths=paths)
    if body.strip():
        assert chunks


@settings(max_examples=100, deadline=None)
@given(body=st.text(st.characters(codec="utf-8"), max_size=600),
       budgets=st.integers(16, 64).flatmap(
           lambda target: st.tuples(st.just(target), st.integers(0, target // 2))))
def test_property_any_text(body: str, budgets: tuple[int, int]) -> None:
    """Arbitrary characters (any whitespace, marks, symbols) with small budgets."""
    target, overlap = budgets
    chunks = chunk_topic(body, title="Any", target_tokens=target, overlap_tokens=overlap)
    check(body, chunks, title="Any", target=target, overlap=overlap)
