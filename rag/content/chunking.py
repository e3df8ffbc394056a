"""Token-aware chunking of a topic's Markdown body.

A body is cut at ATX headings (``#`` to ``######``, not inside fenced code)
into sections, and each section into chunks of at most ``target_tokens``
cl100k tokens. Inside a section whole paragraphs (a fenced code block is one)
are packed greedily; a paragraph over the budget is cut at sentence ends and
line breaks, and a piece still over it at the last whitespace before the
budget, or between characters. Each chunk after a section's first repeats
about ``overlap_tokens`` tokens from the end of the one before, starting at a
word. Chunks never cross a heading, and their text never starts or ends with
whitespace.

Speed: each section is encoded once. cl100k splits text into pieces with a
regex before BPE, and some positions are piece boundaries in every string
that contains them (:data:`_BOUNDARY`); a chunk's exact token count is the
section's tokens between its first and last such boundary plus two small
encodes of the partial words at its ends. So no chunk is re-encoded, and
``token_count`` still equals ``count_tokens(text)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from bisect import bisect_right
from collections.abc import Iterator
from functools import cache
from itertools import accumulate

import msgspec

from rag.platform.tokens import count_tokens, encoding

#: Smallest ``target_tokens``: a chunk must hold an overlap of up to half of it,
#: a paragraph gap and one character (up to 4 tokens) of new text.
MIN_TARGET_TOKENS = 16


class Chunk(msgspec.Struct, frozen=True):
    """One chunk of a topic body; ``text`` is exactly ``body[start:end]``."""

    index: int
    text: str
    start: int
    end: int
    #: ``count_tokens(text)`` (of ``text``, not ``embed_text``).
    token_count: int
    #: Titles of the headings enclosing the chunk, outermost first; () before any heading.
    heading_path: tuple[str, ...]
    #: What gets embedded: topic title and heading path, a blank line, the text.
    embed_text: str
    #: sha256 hex of ``embed_text``, so a title or heading change re-embeds.
    content_hash: str


def chunk_topic(body: str, *, title: str, target_tokens: int, overlap_tokens: int) -> list[Chunk]:
    """Chunks of ``body`` in order, indexed from 0; ``[]`` for a blank body."""
    if target_tokens < MIN_TARGET_TOKENS:
        raise ValueError(f"target_tokens must be at least {MIN_TARGET_TOKENS}, got {target_tokens}")
    if not 0 <= overlap_tokens <= target_tokens // 2:
        raise ValueError(
            f"overlap_tokens must be between 0 and target_tokens // 2, got {overlap_tokens}"
        )
    chunks: list[Chunk] = []
    for path, units in _sections(body):
        prefix = f"{title} › {' › '.join(path)}\n\n" if path else f"{title}\n\n"
        for start, end, tokens in _chunk_section(body, units, target_tokens, overlap_tokens):
            text = body[start:end]
            embed_text = prefix + text
            # surrogatepass: a lone surrogate (from a JSON escape) must not make hashing fail.
            digest = hashlib.sha256(embed_text.encode("utf-8", "surrogatepass")).hexdigest()
            chunks.append(
                Chunk(
                    index=len(chunks),
                    text=text,
                    start=start,
                    end=end,
                    token_count=tokens,
                    heading_path=path,
                    embed_text=embed_text,
                    content_hash=digest,
                )
            )
    return chunks


# --- Markdown structure ---------------------------------------------------------------

_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*))?")
#: An optional closing sequence: ``## Title ##`` is titled "Title" (CommonMark).
_CLOSING_HASHES = re.compile(r"(?:^|[ \t]+)#+$")
_FENCE_OPEN = re.compile(r" {0,3}(`{3,}|~{3,})(.*)")
_FENCE_CLOSE = re.compile(r" {0,3}(`{3,}|~{3,})[ \t]*")

_HEADING_UNIT, _PROSE, _CODE = 0, 1, 2

#: A unit is a trimmed span: (start, end, kind).
_Unit = tuple[int, int, int]


def _sections(body: str) -> Iterator[tuple[tuple[str, ...], list[_Unit]]]:
    """(heading path, units) per section that has any non-whitespace text.

    Units are the heading line, paragraphs (blank-line separated) and fenced
    code blocks (to the closing fence, or the end of the body if none).
    """
    path: list[tuple[int, str]] = []
    units: list[_Unit] = []
    para: list[int] = []  # [start, end] of the paragraph being read
    fence: tuple[str, int, int] | None = None  # (char, length, start) of an open fence
    pos = 0
    for raw in body.split("\n"):
        line_start, pos = pos, pos + len(raw) + 1
        line_end = line_start + len(raw)
        line = raw.rstrip("\r")
        if fence is not None:
            close = _FENCE_CLOSE.fullmatch(line)
            if close and close[1][0] == fence[0] and len(close[1]) >= fence[1]:
                units.append(_trim(body, fence[2], line_end, _CODE))
                fence = None
            continue
        heading = _HEADING.fullmatch(line)
        opening = None if heading else _FENCE_OPEN.fullmatch(line)
        if opening and opening[1][0] == "`" and "`" in opening[2]:
            opening = None  # ```foo``` is inline code, not a fence (CommonMark)
        if para and (heading or opening or not line or line.isspace()):
            units.append(_trim(body, para[0], para[1], _PROSE))
            para = []
        if heading:
            if units:
                yield tuple(title for _, title in path), units
            level = len(heading[1])
            while path and path[-1][0] >= level:
                path.pop()
            path.append((level, _CLOSING_HASHES.sub("", (heading[2] or "").strip()).strip()))
            units = [_trim(body, line_start, line_end, _HEADING_UNIT)]
        elif opening:
            fence = (opening[1][0], len(opening[1]), line_start)
        elif line and not line.isspace():
            if para:
                para[1] = line_end
            else:
                para = [line_start, line_end]
    if fence is not None:
        units.append(_trim(body, fence[2], len(body), _CODE))
    elif para:
        units.append(_trim(body, para[0], para[1], _PROSE))
    if units:
        yield tuple(title for _, title in path), units


def _trim(body: str, start: int, end: int, kind: int) -> _Unit:
    """The span without leading and trailing whitespace (callers pass non-blank spans)."""
    while body[start].isspace():
        start += 1
    while body[end - 1].isspace():
        end -= 1
    return start, end, kind


# --- token positions ------------------------------------------------------------------

#: Positions that are a cl100k pre-token boundary in any string containing the
#: characters either side, so token counts add up across them:
#: a line start before non-whitespace; a space or tab after non-whitespace; a
#: line break after an ASCII letter or digit (after punctuation it is not:
#: ``.\n\n`` is one piece). Python's whitespace includes every character the
#: tokenizer's ``\s`` does, so these tests err towards "no boundary".
_BOUNDARY = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?=[ \t])|(?<=[A-Za-z0-9])(?=[\r\n])")
#: The pre-tokenizer pattern :data:`_BOUNDARY` was derived from; any other
#: encoding gets a plain ``count_tokens`` per count.
_CL100K_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"
    r"|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
)
_WORD_START = re.compile(r"(?<=\s)\S")
_NON_SPACE = re.compile(r"\S")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s)|\n")
_LINE_END = re.compile(r"\n")


@cache
def _token_chars() -> list[int]:
    """Characters begun in each token id's bytes (its UTF-8 lead bytes); 0 for unused ids."""
    enc = encoding()
    continuation = bytes(range(0x80, 0xC0))
    chars = [0] * (enc.max_token_value + 1)
    for token in range(enc.max_token_value + 1):
        with contextlib.suppress(KeyError):  # ids between the ranks and the special tokens
            chars[token] = len(enc.decode_single_token_bytes(token).translate(None, continuation))
    return chars


@cache
def _additive() -> bool:
    return getattr(encoding(), "_pat_str", None) == _CL100K_PATTERN


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_boundary(body: str, pos: int) -> bool:
    """Whether ``pos`` (0 < pos < len(body)) matches :data:`_BOUNDARY`."""
    before, after = body[pos - 1], body[pos]
    if after == " " or after == "\t":
        return not before.isspace()
    if after == "\n" or after == "\r":
        return before.isascii() and before.isalnum()
    return before == "\n" and not after.isspace()


class _Tokens:
    """Token positions in ``body[lo:hi]`` from one encode, and exact counts of its spans."""

    def __init__(self, body: str, lo: int, hi: int) -> None:
        self.body, self.lo, self.hi = body, lo, hi
        text = body[lo:hi]
        # Lone surrogates are replaced before encoding, so positions would drift.
        self.exact_ok = _additive() and (text.isascii() or _encodable(text))
        #: Character position where each token starts, then where the last one ends
        #: (a token ending inside a character, such as part of an emoji, ends after it).
        self.bounds = list(
            accumulate(
                map(_token_chars().__getitem__, encoding().encode_ordinary(text)), initial=lo
            )
        )

    def index(self, pos: int) -> int:
        """Tokens ending at or before character ``pos``."""
        return bisect_right(self.bounds, pos) - 1

    def count(self, start: int, end: int) -> int:
        """Exactly ``count_tokens(body[start:end])`` for ``lo <= start < end <= hi``."""
        body = self.body
        if not self.exact_ok:
            return count_tokens(body[start:end])
        first = start
        if start != self.lo and not (body[start - 1] == "\n" and not body[start].isspace()):
            found = _BOUNDARY.search(body, start + 1, end)
            if found is None:
                return count_tokens(body[start:end])
            first = found.start()
        last = end
        if end != self.hi and not _is_boundary(body, end):
            # Chunks end in a word, so the boundary is usually the space before
            # it; else look a little further back, else encode from ``first``.
            last = body.rfind(" ", first + 1, end)
            if last < 0 or body[last - 1].isspace():
                last = first
                for pos in range(end - 1, max(first, end - 256), -1):
                    if _is_boundary(body, pos):
                        last = pos
                        break
        total = self.index(last) - self.index(first)
        if first > start:
            total += count_tokens(body[start:first])
        if last < end:
            total += count_tokens(body[last:end])
        return total


# --- packing --------------------------------------------------------------------------


def _chunk_section(
    body: str, units: list[_Unit], target: int, overlap: int
) -> list[tuple[int, int, int]]:
    """(start, end, token count) of each chunk of one section."""
    tokens = _Tokens(body, units[0][0], units[-1][1])
    starts, ends = _pieces(body, units, tokens, target - overlap)
    # Tokens up to each piece's end: a run of pieces fits while its difference does.
    reach = [tokens.index(end) for end in ends]
    spans: list[tuple[int, int, int]] = []
    i = 0
    while i < len(starts):
        piece_start = starts[i]
        if spans and overlap:
            start = _overlap_start(body, tokens, spans[-1][0], spans[-1][1], overlap, piece_start)
        else:
            start = piece_start
        j = max(i + 1, bisect_right(reach, tokens.index(start) + target, i))
        count = tokens.count(start, ends[j - 1])
        # The estimate misses a token or two where pieces meet; back off a piece at a time.
        while count > target and j > i + 1:
            j -= 1
            count = tokens.count(start, ends[j - 1])
        if count > target:
            start, end, count, rest = _fit_one(
                body, tokens, spans, start, piece_start, ends[i], target, overlap
            )
            if rest is not None:
                starts.insert(i + 1, rest)
                ends.insert(i + 1, ends[i])
                reach.insert(i + 1, reach[i])
                ends[i], reach[i] = end, tokens.index(end)
            j = i + 1
        spans.append((start, ends[j - 1], count))
        i = j
    return spans


def _pieces(
    body: str, units: list[_Unit], tokens: _Tokens, budget: int
) -> tuple[list[int], list[int]]:
    """Starts and ends of the section's packing pieces, each about ``budget`` tokens at most.

    A heading line is one unit with what follows it, so it is packed with that
    text rather than left alone when the text is long.
    """
    starts: list[int] = []
    ends: list[int] = []
    previous = units[0][0]
    i = 0
    while i < len(units):
        start, end, kind = units[i]
        if kind == _HEADING_UNIT and i + 1 < len(units):
            i += 1
            end, kind = units[i][1], units[i][2]
        i += 1
        if tokens.index(end) - tokens.index(previous) <= budget:
            starts.append(start)
            ends.append(end)
            previous = end
            continue
        splitter = _LINE_END if kind == _CODE else _SENTENCE_END
        cuts = [m.end() if m[0] != "\n" else m.start() for m in splitter.finditer(body, start, end)]
        cuts.append(end)
        piece_start = start
        for cut in cuts:
            piece_end = cut
            while piece_end > piece_start and body[piece_end - 1].isspace():
                piece_end -= 1
            if piece_end <= piece_start:
                continue
            _hard_cut(body, tokens, piece_start, piece_end, previous, budget, starts, ends)
            previous = piece_end
            found = _NON_SPACE.search(body, cut, end)
            if found is None:
                break
            piece_start = found.start()
    return starts, ends


def _hard_cut(
    body: str,
    tokens: _Tokens,
    start: int,
    end: int,
    previous: int,
    budget: int,
    starts: list[int],
    ends: list[int],
) -> None:
    """Append ``[start, end)`` as pieces of about ``budget`` tokens, cut at whitespace if any."""
    base = tokens.index(previous)
    stop = tokens.index(end)
    while stop - base > budget:
        cut = tokens.bounds[base + budget]
        if cut <= start:
            cut = start + 1
        space = max(
            body.rfind(" ", start + 1, cut + 1),
            body.rfind("\n", start + 1, cut + 1),
            body.rfind("\t", start + 1, cut + 1),
        )
        if space > start:
            cut = space
        while body[cut - 1].isspace():
            cut -= 1
        starts.append(start)
        ends.append(cut)
        found = _NON_SPACE.search(body, cut, end)
        if found is None:  # the cut reached the end (tokens inside its last character)
            return
        start = found.start()
        base = tokens.index(cut)
    starts.append(start)
    ends.append(end)


def _overlap_start(
    body: str, tokens: _Tokens, prev_start: int, prev_end: int, overlap: int, fallback: int
) -> int:
    """Where a chunk repeating the tail of ``[prev_start, prev_end)`` starts.

    About ``overlap`` tokens back, moved forward to a word start, never more
    than ``overlap`` tokens; ``fallback`` (no overlap) if not even one
    character fits.
    """
    first = tokens.index(prev_end) - overlap
    if prev_end - prev_start < 2:  # nothing after the previous start to repeat
        return fallback
    # The token may start inside the last character (an emoji's second byte).
    start = min(max(tokens.bounds[max(first, 0)], prev_start + 1), prev_end - 1)
    found = _WORD_START.search(body, start, prev_end) or _NON_SPACE.search(body, start, prev_end)
    if found is None:  # unreachable: body[prev_end - 1] is not whitespace
        return fallback
    start = found.start()
    while tokens.count(start, prev_end) > overlap:
        found = _WORD_START.search(body, start + 1, prev_end)
        if found is None:
            # No word start left: move by characters, closing half the gap each time.
            if start >= prev_end - 1:
                return fallback
            found = _NON_SPACE.search(
                body, max(start + 1, prev_end - (prev_end - start) // 2), prev_end
            )
            if found is None:  # unreachable: body[prev_end - 1] is not whitespace
                return fallback
        start = found.start()
    return start


def _fit_one(
    body: str,
    tokens: _Tokens,
    spans: list[tuple[int, int, int]],
    start: int,
    piece_start: int,
    piece_end: int,
    target: int,
    overlap: int,
) -> tuple[int, int, int, int | None]:
    """The rare case where one piece does not fit after the overlap: cut the piece.

    Tries the chosen overlap, then the previous chunk's last word (or
    character), then no overlap; returns (start, end, count, start of the
    rest of the piece or None).
    """
    candidates = [start]
    if spans and overlap and start != piece_start:
        prev_start, prev_end, _ = spans[-1]
        last = _last_word_start(body, prev_start + 1, prev_end)
        if tokens.count(last, prev_end) > overlap:
            last = prev_end - 1
        if last > start and tokens.count(last, prev_end) <= overlap:
            candidates.append(last)
    candidates.append(piece_start)
    for chunk_start in candidates:
        if tokens.count(chunk_start, piece_start + 1) > target:
            continue
        # Largest end that fits: counts grow with the end, give or take a merge.
        lo, hi = piece_start + 1, piece_end
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tokens.count(chunk_start, mid) <= target:
                lo = mid
            else:
                hi = mid - 1
        end = lo
        space = max(
            body.rfind(" ", piece_start + 1, end),
            body.rfind("\n", piece_start + 1, end),
            body.rfind("\t", piece_start + 1, end),
        )
        options = (
            [space, end, piece_start + 1]
            if space > piece_start and end < piece_end
            else [end, piece_start + 1]
        )
        for option in options:
            while body[option - 1].isspace():
                option -= 1
            count = tokens.count(chunk_start, option)
            if count <= target:
                rest = _NON_SPACE.search(body, option, piece_end)
                return chunk_start, option, count, rest.start() if rest else None
    raise AssertionError("unreachable: one character always fits a chunk")  # pragma: no cover


def _last_word_start(body: str, lo: int, hi: int) -> int:
    """The last position in ``[lo, hi)`` after whitespace before non-whitespace, else ``hi - 1``."""
    for pos in range(hi - 1, lo - 1, -1):
        if body[pos - 1].isspace() and not body[pos].isspace():
            return pos
    return hi - 1
