"""OpenAIProvider through the real openai client against the fake server over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import openai
import pytest

from rag.platform.errors import ProviderRejected, ProviderUnavailable
from rag.platform.settings import Settings
from rag.platform.tokens import count_tokens
from rag.providers import build_provider
from rag.providers.base import ChatDelta, ChatMessage, Usage
from rag.providers.openai import OpenAIProvider
from tests.fixtures.fake_openai import FakeServer

MESSAGES = [
    ChatMessage(role="system", content="Answer from the sources."),
    ChatMessage(role="user", content="What is gradient descent?"),
]
ANSWER = "Gradient descent walks downhill on the loss, one small step at a time."


@pytest.fixture(params=["aiohttp", "httpx"])
def fake_openai(
    fake_openai_server: FakeServer, request: pytest.FixtureRequest
) -> Iterator[FakeServer]:
    """The reset fake server, with every test here run on both HTTP transports under the
    SDK (``OPENAI_HTTP_CLIENT``): they differ in how they read and what they raise."""
    fake_openai_server.reset()
    fake_openai_server.env_defaults = {"OPENAI_HTTP_CLIENT": request.param}
    yield fake_openai_server
    fake_openai_server.env_defaults = {}


@pytest.fixture
async def make_provider(fake_openai: FakeServer) -> AsyncIterator[Callable[..., OpenAIProvider]]:
    """Providers on the fake server, with optional setting overrides; all closed after."""
    made: list[OpenAIProvider] = []

    def make(**env: str) -> OpenAIProvider:
        provider = OpenAIProvider(fake_openai.settings(**env))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


@pytest.fixture
def provider(make_provider: Callable[..., OpenAIProvider]) -> OpenAIProvider:
    return make_provider()


async def _collect(provider: OpenAIProvider) -> list[ChatDelta]:
    return [delta async for delta in provider.stream_chat(MESSAGES)]


# --- happy paths


async def test_embed_order_dimensions_and_norm(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(EMBEDDING_DIMENSIONS="256")
    texts = ["gradient descent", "photosynthesis in plants", "the chain rule", "gradient descent"]
    vectors = await provider.embed(texts)
    assert vectors.dtype == np.float32
    assert vectors.shape == (4, 256)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # Row i is text i: equal texts, equal rows; each row matches embedding that text alone.
    np.testing.assert_array_equal(vectors[0], vectors[3])
    for i, text in enumerate(texts[:3]):
        np.testing.assert_allclose((await provider.embed([text]))[0], vectors[i], rtol=1e-6)
    assert fake_openai.stats()["embeddings_calls"] == 4
    assert fake_openai.stats()["embedded_texts"] == 7


async def test_embed_empty_makes_no_call(provider: OpenAIProvider, fake_openai: FakeServer) -> None:
    vectors = await provider.embed([])
    assert vectors.shape == (0, provider.dimensions)
    assert vectors.dtype == np.float32
    assert fake_openai.stats()["embeddings_calls"] == 0


async def test_embed_dimension_mismatch_is_rejected() -> None:
    # A model that ignores `dimensions` (the fake always honours it: a canned reply).
    body = json.dumps(
        {
            "object": "list",
            "model": "m",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
    ).encode()
    async with _canned([body]) as (_, provider):
        with pytest.raises(ProviderRejected, match="EMBEDDING_DIMENSIONS") as info:
            await provider.embed(["x"])
    assert info.value.details["received"] == [2]


async def test_stream_chat_pieces_and_usage(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    fake_openai.configure(answer=ANSWER)
    deltas = await _collect(provider)
    assert len(deltas) > 3
    assert "".join(d.text for d in deltas) == ANSWER
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.text == ""
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert last.usage.completion_tokens == count_tokens(ANSWER)
    assert last.usage.prompt_tokens == sum(count_tokens(m.content) for m in MESSAGES)
    stats = fake_openai.stats()
    assert stats["chat_calls"] == 1
    assert stats["chat_streams_completed"] == 1


async def test_stream_chat_stopped_early_closes_the_stream(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    fake_openai.configure(answer=ANSWER, token_delay=0.01)
    stream = provider.stream_chat(MESSAGES)
    async with contextlib.aclosing(stream):
        async for _ in stream:
            break
    # The provider still works: the connection went back or was dropped cleanly.
    fake_openai.configure(token_delay=0)
    assert "".join(d.text for d in await _collect(provider)) == ANSWER


# --- retries


async def test_429_with_retry_after_is_retried(
    provider: OpenAIProvider, fake_openai: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    fake_openai.add_faults(
        {"endpoint": "embeddings", "kind": "status", "status": 429, "retry_after": 0.4}
    )
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="rag.providers"):
        vectors = await provider.embed(["a", "b"])
    assert time.perf_counter() - started >= 0.4
    assert vectors.shape == (2, provider.dimensions)
    assert fake_openai.stats()["embeddings_calls"] == 2
    [record] = [r for r in caplog.records if r.name == "rag.providers"]
    assert record.levelno == logging.WARNING
    assert "429" in record.getMessage()
    assert "attempt 1 of 3" in record.getMessage()


async def test_retry_after_is_capped(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(PROVIDER_RETRY_MAX_WAIT="0.1")
    fake_openai.add_faults({"kind": "status", "status": 429, "retry_after": 30})
    started = time.perf_counter()
    await provider.embed(["a"])
    assert time.perf_counter() - started < 5
    assert fake_openai.stats()["embeddings_calls"] == 2


async def test_500_is_retried(provider: OpenAIProvider, fake_openai: FakeServer) -> None:
    fake_openai.configure(answer=ANSWER)
    fake_openai.add_faults({"endpoint": "chat", "kind": "status", "status": 500, "times": 2})
    deltas = await _collect(provider)
    assert "".join(d.text for d in deltas) == ANSWER
    assert fake_openai.stats()["chat_calls"] == 3


async def test_cut_before_first_piece_is_retried(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    fake_openai.configure(answer=ANSWER)
    fake_openai.add_faults({"endpoint": "chat", "kind": "cut", "after_pieces": 0})
    deltas = await _collect(provider)
    assert "".join(d.text for d in deltas) == ANSWER
    assert fake_openai.stats()["chat_calls"] == 2


async def test_hang_is_a_timeout_retried_then_unavailable(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(PROVIDER_READ_TIMEOUT="0.3", PROVIDER_RETRY_MAX_WAIT="0.1")
    fake_openai.add_faults({"endpoint": "chat", "kind": "hang", "seconds": 30, "times": 10})
    with pytest.raises(ProviderUnavailable, match="3 attempts") as info:
        await _collect(provider)
    assert info.value.details["attempts"] == 3
    assert info.value.details["reason"] == "timeout"
    assert info.value.retryable
    assert fake_openai.stats()["chat_calls"] == 3


async def test_hang_on_embeddings_times_out(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(
        PROVIDER_READ_TIMEOUT="0.2", PROVIDER_MAX_ATTEMPTS="2", PROVIDER_RETRY_MAX_WAIT="0"
    )
    fake_openai.add_faults({"endpoint": "embeddings", "kind": "hang", "seconds": 30, "times": 2})
    with pytest.raises(ProviderUnavailable, match="timed out"):
        await provider.embed(["a"])
    assert fake_openai.stats()["embeddings_calls"] == 2


async def test_429_every_time_gives_up_after_max_attempts(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(PROVIDER_MAX_ATTEMPTS="4", PROVIDER_RETRY_MAX_WAIT="0.05")
    fake_openai.add_faults({"kind": "status", "status": 429, "times": 100})
    with pytest.raises(ProviderUnavailable, match="after 4 attempts") as info:
        await _collect(provider)
    assert info.value.details["status"] == 429
    assert info.value.details["attempts"] == 4
    assert fake_openai.stats()["chat_calls"] == 4


async def test_connection_refused_is_unavailable(fake_openai: FakeServer) -> None:
    # A port nobody listens on: one a throwaway socket had, now free again.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = fake_openai.settings(
        OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1", PROVIDER_RETRY_MAX_WAIT="0"
    )
    provider = OpenAIProvider(settings)
    try:
        with pytest.raises(ProviderUnavailable, match="connection error") as info:
            await provider.embed(["a"])
        assert info.value.details["attempts"] == 3
    finally:
        await provider.aclose()


# --- no retries


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_4xx_is_rejected_without_retry(
    provider: OpenAIProvider, fake_openai: FakeServer, status: int
) -> None:
    fake_openai.add_faults(
        {"kind": "status", "status": status, "message": "no such model", "times": 5}
    )
    with pytest.raises(ProviderRejected, match=f"HTTP {status}") as info:
        await _collect(provider)
    assert "no such model" in info.value.message
    assert info.value.details["status"] == status
    assert not info.value.retryable
    assert fake_openai.stats()["chat_calls"] == 1
    with pytest.raises(ProviderRejected):
        await provider.embed(["a"])
    assert fake_openai.stats()["embeddings_calls"] == 1


async def test_cut_after_first_pieces_is_not_retried(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    fake_openai.configure(answer=ANSWER)
    fake_openai.add_faults({"endpoint": "chat", "kind": "cut", "after_pieces": 3})
    received: list[str] = []
    with pytest.raises(ProviderUnavailable, match="stream interrupted after 3 pieces"):
        async for delta in provider.stream_chat(MESSAGES):
            received.append(delta.text)
    assert "".join(received) == "Gradient descent walks"
    assert fake_openai.stats()["chat_calls"] == 1


async def test_the_pieces_that_came_with_a_cut_are_read_before_the_error(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    """A busy reader (as the worker is, publishing each batch): by the time it reads
    again the other nine pieces and the cut are all waiting in the transport. Each is
    read before the error; aiohttp's own reader raises in place of what it holds."""
    fake_openai.configure(answer=ANSWER, token_delay=0.01)
    fake_openai.add_faults({"endpoint": "chat", "kind": "cut", "after_pieces": 10})
    received: list[str] = []
    with pytest.raises(ProviderUnavailable, match="stream interrupted after 10 pieces"):
        async for delta in provider.stream_chat(MESSAGES):
            if not received:
                await asyncio.sleep(0.5)  # the rest of the stream and the cut arrive
            received.append(delta.text)
    assert "".join(received) == " ".join(ANSWER.split()[:10])
    assert fake_openai.stats()["chat_calls"] == 1


async def test_read_timeout_mid_stream_is_not_retried(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(PROVIDER_READ_TIMEOUT="0.2")
    fake_openai.configure(answer="one two three", token_delay=1.0)
    received: list[str] = []
    with pytest.raises(ProviderUnavailable, match="interrupted after 1 pieces"):
        async for delta in provider.stream_chat(MESSAGES):
            received.append(delta.text)
    assert received == ["one"]
    assert fake_openai.stats()["chat_calls"] == 1


# --- factory


def test_build_provider_picks_openai(fake_openai: FakeServer) -> None:
    settings: Settings = fake_openai.settings()
    provider = build_provider(settings)
    assert isinstance(provider, OpenAIProvider)
    assert provider.name == "openai"
    assert provider.embedding_model == settings.embedding_model
    assert provider.dimensions == settings.embedding_dimensions


async def test_client_retries_are_off(provider: OpenAIProvider) -> None:
    assert provider._client.max_retries == 0
    assert isinstance(provider._client, openai.AsyncOpenAI)


async def test_the_http_client_setting_picks_the_transport(
    provider: OpenAIProvider, fake_openai: FakeServer
) -> None:
    # The SDK's own client classes (this module runs every test on both settings).
    aiohttp = fake_openai.env_defaults["OPENAI_HTTP_CLIENT"] == "aiohttp"
    http_client = provider._client._client
    assert isinstance(http_client, openai.DefaultAioHttpClient) == aiohttp
    assert isinstance(http_client, openai.DefaultAsyncHttpxClient) == (not aiohttp)


# --- timeouts (first token, gap between chunks, whole generation)


async def test_no_first_token_in_time_is_a_timeout_and_retried(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    # Headers come at once, then nothing: the read timeout (5 s) would wait much longer.
    provider = make_provider(PROVIDER_FIRST_TOKEN_TIMEOUT="0.3", PROVIDER_READ_TIMEOUT="5")
    fake_openai.configure(ttft=30)
    started = time.perf_counter()
    with pytest.raises(ProviderUnavailable, match=r"no answer text within 0\.3s") as info:
        await _collect(provider)
    assert time.perf_counter() - started < 4.5
    assert info.value.details["reason"] == "timeout"
    assert info.value.details["attempts"] == 3
    assert fake_openai.stats()["chat_calls"] == 3


async def test_a_slow_first_attempt_is_retried_before_any_text(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(PROVIDER_FIRST_TOKEN_TIMEOUT="0.3", PROVIDER_READ_TIMEOUT="5")
    fake_openai.configure(answer=ANSWER)
    fake_openai.add_faults({"endpoint": "chat", "kind": "hang", "seconds": 30})
    assert "".join(d.text for d in await _collect(provider)) == ANSWER
    assert fake_openai.stats()["chat_calls"] == 2


async def test_a_silent_gap_midway_fails_and_is_not_retried(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(PROVIDER_STREAM_GAP_TIMEOUT="0.3", PROVIDER_READ_TIMEOUT="5")
    fake_openai.configure(answer="one two three", token_delay=30)
    received: list[str] = []
    with pytest.raises(ProviderUnavailable, match=r"stalled: no chunk for 0\.3s") as info:
        async for delta in provider.stream_chat(MESSAGES):
            received.append(delta.text)
    assert received == ["one"]
    assert info.value.details == {
        "provider": "openai",
        "operation": "chat",
        "reason": "timeout",
        "pieces": 1,
    }
    assert info.value.retryable
    assert fake_openai.stats()["chat_calls"] == 1


async def test_the_whole_generation_has_a_limit(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    # Each gap is short, the answer is long: only the total limit stops it.
    provider = make_provider(PROVIDER_GENERATION_TIMEOUT="1", PROVIDER_STREAM_GAP_TIMEOUT="5")
    fake_openai.configure(answer=" ".join(f"w{i}" for i in range(40)), token_delay=0.1)
    received: list[str] = []
    with pytest.raises(ProviderUnavailable, match="took longer than 1s") as info:
        async for delta in provider.stream_chat(MESSAGES):
            received.append(delta.text)
    assert info.value.details["reason"] == "generation_timeout"
    assert 1 <= len(received) < 40
    assert fake_openai.stats()["chat_calls"] == 1


async def test_retries_stop_at_the_generation_limit(
    make_provider: Callable[..., OpenAIProvider], fake_openai: FakeServer
) -> None:
    provider = make_provider(
        PROVIDER_GENERATION_TIMEOUT="1",
        PROVIDER_FIRST_TOKEN_TIMEOUT="0.4",
        PROVIDER_MAX_ATTEMPTS="10",
        PROVIDER_RETRY_MAX_WAIT="0.05",
    )
    fake_openai.add_faults({"endpoint": "chat", "kind": "hang", "seconds": 30, "times": 20})
    started = time.perf_counter()
    with pytest.raises(ProviderUnavailable, match="timed out") as info:
        await _collect(provider)
    assert time.perf_counter() - started < 3
    assert info.value.details["reason"] == "timeout"
    assert 2 <= fake_openai.stats()["chat_calls"] <= 4


# --- the chat stream reader (msgspec instead of the SDK's per-chunk models)


class _CannedServer:
    """A one-route HTTP/1.1 keep-alive server that answers every request with the same
    chunked ``text/event-stream`` body, sent in the given parts (so a line can straddle
    two reads). It counts connections: the reader must leave them reusable."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.connections = 0
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> _CannedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        # Close the kept-alive connections so no handler is left waiting.
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                for part in self.parts:
                    writer.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()


def _chunk(content: str | None = None, finish: str | None = None, **extra: object) -> str:
    choice = {"index": 0, "delta": {} if content is None else {"content": content}}
    choice["finish_reason"] = finish
    return json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]} | extra)


@contextlib.asynccontextmanager
async def _canned(parts: list[bytes]) -> AsyncIterator[tuple[_CannedServer, OpenAIProvider]]:
    """A canned server and a provider pointed at it (one attempt per call)."""
    async with _CannedServer(parts) as server:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.url}
        provider = OpenAIProvider(Settings.from_env(env | {"PROVIDER_MAX_ATTEMPTS": "1"}))
        try:
            yield server, provider
        finally:
            await provider.aclose()


async def test_the_reader_follows_the_sse_format_not_just_openais_habits() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3}
    world = _chunk(" world")
    cut = world.index(', "object"') + 1  # between two members: a newline is whitespace there
    split = (world[:cut], world[cut:])
    body = (
        ": a comment, then an event name and an id, which chat streams do not use\r\n"
        "event: message\r\nid: 1\r\n"
        f"data: {_chunk('Hel')}\r\n\r\n"
        # No space after the colon; then one event's JSON split over two data lines.
        f"data:{_chunk('lo')}\n\n"
        f"data: {split[0]}\ndata: {split[1]}\n\n"
        # What some compatible servers send: nulls where OpenAI sends objects or lists.
        'data: {"choices": null, "usage": null}\n\n'
        'data: {"choices": [{"index": 0, "delta": null, "finish_reason": null}]}\n\n'
        f"retry: 1000\n\ndata: {_chunk(finish='stop')}\n\n"
        f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        "data: [DONE]\n\n"
    ).encode()
    # Split mid-line, mid-UTF-8 is not possible in ASCII, so mid-JSON will do.
    parts = [body[:37], body[37:90], body[90:]]
    async with _canned(parts) as (server, provider):
        deltas = [d async for d in provider.stream_chat(MESSAGES)]
        again = [d async for d in provider.stream_chat(MESSAGES)]
    assert "".join(d.text for d in deltas) == "Hel" + "lo" + " world"
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage == Usage(prompt_tokens=7, completion_tokens=3)
    assert again == deltas
    # After [DONE] the reader drained the body: the second stream reused the connection.
    assert (server.requests, server.connections) == (2, 1)


@pytest.mark.parametrize("newline", ["\r\n", "\r", "\n"])
async def test_the_reader_takes_any_line_end_and_blocks_cut_anywhere(newline: str) -> None:
    """One byte per block: CRLFs and UTF-8 characters are cut in two, and the last
    event comes without its blank line."""
    events = [_chunk("Grüße, "), _chunk("naïve"), _chunk(finish="stop")]
    events = [json.dumps(json.loads(event), ensure_ascii=False) for event in events]
    assert "ü" in events[0]
    cut = events[1].index(', "object"') + 1
    # The second event's JSON over two data lines: a CR then LF read as two line ends
    # would be a blank line between them, and end the event halfway.
    lines = [[events[0]], [events[1][:cut], events[1][cut:]], [events[2]]]
    body = "".join("".join(f"data: {line}{newline}" for line in event) + newline for event in lines)
    body += "data: [DONE]"
    raw = body.encode()
    async with _canned([raw[i : i + 1] for i in range(len(raw))]) as (_, provider):
        deltas = [d async for d in provider.stream_chat(MESSAGES)]
    assert "".join(d.text for d in deltas) == "Grüße, naïve"
    assert deltas[-1].finish_reason == "stop"


async def test_an_error_event_inside_the_stream_is_the_providers_error() -> None:
    error = {"error": {"message": "the model is overloaded", "type": "server_error"}}
    parts = [
        f"data: {_chunk('Partial')}\n\n".encode(),
        f"data: {json.dumps(error)}\n\n".encode(),
    ]
    texts: list[str] = []
    async with _canned(parts) as (_, provider):
        with pytest.raises(ProviderUnavailable, match="the model is overloaded") as info:
            async for delta in provider.stream_chat(MESSAGES):
                texts.append(delta.text)
    assert texts == ["Partial"]
    assert info.value.details["pieces"] == 1


async def test_an_error_event_before_any_text_is_a_rejection_not_a_retry() -> None:
    parts = [b'data: {"error": {"message": "context length exceeded"}}\n\n']
    async with _canned(parts) as (server, provider):
        with pytest.raises(ProviderRejected, match="context length exceeded"):
            _ = [d async for d in provider.stream_chat(MESSAGES)]
    assert server.requests == 1


async def test_an_unreadable_chunk_fails_the_stream_clearly() -> None:
    parts = [f"data: {_chunk('Fine')}\n\n".encode(), b"data: {not json\n\n"]
    async with _canned(parts) as (_, provider):
        with pytest.raises(ProviderUnavailable, match="unreadable chat stream chunk"):
            _ = [d async for d in provider.stream_chat(MESSAGES)]


async def test_a_stream_without_done_or_finish_is_incomplete() -> None:
    # The body ends (cleanly, chunked) after one piece: no finish_reason, no [DONE].
    async with _canned([f"data: {_chunk('Half an ans')}".encode()]) as (_, provider):
        with pytest.raises(ProviderUnavailable, match="without a finish_reason"):
            _ = [d async for d in provider.stream_chat(MESSAGES)]


@pytest.mark.parametrize("midway", [False, True])
async def test_an_unreadable_chunk_is_a_failure_for_the_breaker(
    redis_client: Any, midway: bool
) -> None:
    """Before the first piece or after it, a chunk that is not JSON is the provider's
    fault: it counts towards opening the breaker (a cut or stalled stream does too)."""
    parts = [f"data: {_chunk('Fine')}\n\n".encode()] if midway else []
    parts.append(b"data: {not json\n\n")
    async with _CannedServer(parts) as server:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.url}
        settings = Settings.from_env(env | {"PROVIDER_MAX_ATTEMPTS": "1", "BREAKER_FAILURES": "3"})
        provider = OpenAIProvider(settings, redis=redis_client)
        try:
            with pytest.raises((ProviderUnavailable, ProviderRejected)):
                _ = [d async for d in provider.stream_chat(MESSAGES)]
            assert (await provider.breakers["chat"].status()).failures == 1
        finally:
            await provider.aclose()


# --- the embeddings response (decoded from the raw body with msgspec)


async def test_embeddings_sent_as_floats_or_base64_decode_alike() -> None:
    """A compatible server may ignore ``encoding_format`` and send floats; rows come
    back in ``index`` order either way, normalized."""
    as_b64 = base64.b64encode(np.array([0.0, 3.0, 4.0], dtype="<f4").tobytes()).decode()
    body = json.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": 1, "embedding": as_b64},
                {"object": "embedding", "index": 0, "embedding": [1.0, 0.0, 0.0]},
            ],
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        }
    ).encode()
    async with _canned([body]) as (_, provider):
        provider.dimensions = 3
        vectors = await provider.embed(["a", "b"])
    assert np.allclose(vectors, [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])


async def test_an_unreadable_embeddings_body_is_a_clear_rejection() -> None:
    async with _canned([b'{"data": [{"index": 0, "embedding": 7}]}']) as (_, provider):
        with pytest.raises(ProviderRejected, match="unreadable OpenAI embeddings response"):
            await provider.embed(["a"])
