"""The fake OpenAI server's contract, over HTTP (raw httpx and the real openai client)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from devtools.fake_openai import split_pieces
from rag.platform.tokens import count_tokens
from tests.fixtures.fake_openai import FakeServer, start_fake_server

QUESTION = [{"role": "user", "content": "What is gradient descent?"}]


async def _post(server: FakeServer, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"{server.base_url}{path}", json=body)


def _events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [
        block.removeprefix("data: ") for block in text.split("\n\n") if block.startswith("data: ")
    ]


async def _stream(server: FakeServer, body: dict[str, Any]) -> list[str]:
    response = await _post(server, "/chat/completions", {"stream": True, **body})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    return _events(response.text)


def _vector(item: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    raw = item["embedding"]
    if isinstance(raw, str):
        return np.frombuffer(base64.b64decode(raw), dtype="<f4")
    return np.asarray(raw, dtype=np.float32)


# --- embeddings


async def test_embeddings_shape_usage_and_determinism(fake_openai: FakeServer) -> None:
    texts = ["Gradient descent follows the slope.", "Photosynthesis makes sugar.", "x"]
    first = await _post(fake_openai, "/embeddings", {"model": "m", "input": texts})
    second = await _post(fake_openai, "/embeddings", {"model": "m", "input": texts})
    assert first.status_code == 200
    body = first.json()
    assert body["object"] == "list"
    assert body["model"] == "m"
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in body["data"])
    vectors = np.vstack([_vector(item) for item in body["data"]])
    assert vectors.shape == (3, 1536)  # the server's --dimensions default
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert body == second.json()
    tokens = sum(count_tokens(t) for t in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


async def test_embeddings_semantics_and_single_string(fake_openai: FakeServer) -> None:
    texts = [
        "gradient descent minimizes the loss function",
        "the loss function is minimized by gradient descent",
        "plants turn sunlight into chemical energy",
    ]
    body = (await _post(fake_openai, "/embeddings", {"input": texts, "dimensions": 256})).json()
    a, b, c = (_vector(item) for item in body["data"])
    assert float(a @ b) > float(a @ c)
    single = await _post(fake_openai, "/embeddings", {"input": texts[0], "dimensions": 256})
    assert len(single.json()["data"]) == 1
    np.testing.assert_allclose(_vector(single.json()["data"][0]), a)


async def test_embeddings_dimensions_and_base64(fake_openai: FakeServer) -> None:
    body = {"input": ["one", "two"], "dimensions": 64}
    floats = (await _post(fake_openai, "/embeddings", {**body, "encoding_format": "float"})).json()
    b64 = (await _post(fake_openai, "/embeddings", {**body, "encoding_format": "base64"})).json()
    assert all(isinstance(item["embedding"], list) for item in floats["data"])
    assert all(isinstance(item["embedding"], str) for item in b64["data"])
    for f, b in zip(floats["data"], b64["data"], strict=True):
        assert _vector(b).shape == (64,)
        np.testing.assert_allclose(_vector(f), _vector(b), rtol=1e-6)


async def test_openai_client_default_base64_roundtrip(fake_openai: FakeServer) -> None:
    # The client asks for base64 when the caller names no format and decodes it itself.
    async with openai.AsyncOpenAI(api_key="k", base_url=fake_openai.base_url) as client:
        implicit = await client.embeddings.create(model="m", input=["hello"], dimensions=32)
        explicit = await client.embeddings.create(
            model="m", input=["hello"], dimensions=32, encoding_format="float"
        )
    assert len(implicit.data[0].embedding) == 32
    np.testing.assert_allclose(implicit.data[0].embedding, explicit.data[0].embedding, rtol=1e-6)


async def test_bad_requests_get_openai_shaped_errors(fake_openai: FakeServer) -> None:
    bad = await _post(fake_openai, "/embeddings", {"model": "m"})
    assert bad.status_code == 400
    assert set(bad.json()["error"]) >= {"message", "type", "code"}
    assert (
        await _post(fake_openai, "/embeddings", {"input": ["a"], "dimensions": 0})
    ).status_code == 400
    assert (await _post(fake_openai, "/nope", {})).status_code == 404
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{fake_openai.url}/_fake/health")).json() == {"status": "ok"}
        assert (await client.get(f"{fake_openai.url}/_fake/reset")).status_code == 405


# --- chat


async def test_stream_chunks_usage_and_done(fake_openai: FakeServer) -> None:
    answer = "Gradient descent takes small steps downhill.\nRepeat until flat. "
    fake_openai.configure(answer=answer)
    events = await _stream(
        fake_openai,
        {"model": "m", "messages": QUESTION, "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert contents == split_pieces(answer)
    assert "".join(contents) == answer
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": count_tokens(QUESTION[0]["content"]),
        "completion_tokens": count_tokens(answer),
        "total_tokens": count_tokens(QUESTION[0]["content"]) + count_tokens(answer),
    }
    assert fake_openai.stats()["chat_streams_completed"] == 1


async def test_stream_without_usage_and_default_answer(fake_openai: FakeServer) -> None:
    events = await _stream(fake_openai, {"model": "m", "messages": QUESTION})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)  # no usage chunk when not asked for
    assert "usage" not in chunks[0]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.startswith("Fake answer to: What is gradient descent?")


async def test_non_stream_completion(fake_openai: FakeServer) -> None:
    fake_openai.configure(answer="Short answer.")
    messages = [{"role": "system", "content": "Be brief."}, *QUESTION]
    response = await _post(fake_openai, "/chat/completions", {"model": "m", "messages": messages})
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Short answer.",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = count_tokens("Be brief.") + count_tokens(QUESTION[0]["content"])
    assert body["usage"]["prompt_tokens"] == prompt
    assert body["usage"]["completion_tokens"] == count_tokens("Short answer.")


async def test_max_tokens_truncates_with_finish_reason_length(fake_openai: FakeServer) -> None:
    fake_openai.configure(answer="one two three four five six seven eight")
    for limit in ("max_tokens", "max_completion_tokens"):
        body = {"model": "m", "messages": QUESTION, limit: 3}
        result = (await _post(fake_openai, "/chat/completions", body)).json()
        assert result["choices"][0]["message"]["content"] == "one two three"
        assert result["choices"][0]["finish_reason"] == "length"
        assert result["usage"]["completion_tokens"] == 3


async def test_openai_client_streams_from_fake(fake_openai: FakeServer) -> None:
    fake_openai.configure(answer="Hello from the fake.")
    async with openai.AsyncOpenAI(api_key="k", base_url=fake_openai.base_url) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake."
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == count_tokens("Hello from the fake.")


async def test_ttft_and_token_delay(fake_openai: FakeServer) -> None:
    fake_openai.configure(answer="a b c d e", ttft=0.2, token_delay=0.05)
    started = time.perf_counter()
    await _stream(fake_openai, {"messages": QUESTION})
    assert time.perf_counter() - started >= 0.2 + 4 * 0.05
    config = fake_openai.configure(ttft=0, token_delay=0, answer=None)
    assert config == {"ttft": 0.0, "token_delay": 0.0, "answer": None}


async def test_many_concurrent_streams(fake_openai: FakeServer) -> None:
    fake_openai.configure(answer="one two three four five", ttft=0.05, token_delay=0.02)
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int) -> str:
            body = {"messages": [{"role": "user", "content": f"q{i}"}], "stream": True}
            response = await client.post(f"{fake_openai.base_url}/chat/completions", json=body)
            return response.text

        started = time.perf_counter()
        bodies = await asyncio.gather(*(one(i) for i in range(150)))
        elapsed = time.perf_counter() - started
    assert all(_events(b)[-1] == "[DONE]" for b in bodies)
    # Concurrent, not serial: 150 x 0.13 s would take 20 s.
    assert elapsed < 5
    assert fake_openai.stats()["chat_streams_completed"] == 150


# --- control plane and faults


async def test_stats_count_every_request_and_reset(fake_openai: FakeServer) -> None:
    fake_openai.add_faults({"endpoint": "embeddings", "kind": "status", "status": 500})
    assert (await _post(fake_openai, "/embeddings", {"input": ["a", "b"]})).status_code == 500
    assert (await _post(fake_openai, "/embeddings", {"input": ["a", "b"]})).status_code == 200
    await _stream(fake_openai, {"messages": QUESTION})
    await _post(fake_openai, "/chat/completions", {"messages": QUESTION})
    assert await fake_openai.astats() == {
        "embeddings_calls": 2,
        "chat_calls": 2,
        "embedded_texts": 2,
        "chat_streams_completed": 1,
        "chat_in_flight_max": 1,  # one after the other
    }
    await fake_openai.aconfigure(answer="x", ttft=1)
    await fake_openai.aadd_faults({"kind": "status", "status": 500})
    await fake_openai.areset()
    assert set(fake_openai.stats().values()) == {0}
    response = await _post(fake_openai, "/chat/completions", {"messages": QUESTION})
    assert response.status_code == 200  # the fault is gone
    assert response.json()["choices"][0]["message"]["content"].startswith("Fake answer to:")


async def test_status_fault_with_retry_after_and_times(fake_openai: FakeServer) -> None:
    fake_openai.add_faults(
        {"endpoint": "chat", "kind": "status", "status": 429, "retry_after": 0.2, "times": 2},
        {"endpoint": "chat", "kind": "status", "status": 400, "message": "bad prompt"},
    )
    # A chat fault does not touch embeddings.
    assert (await _post(fake_openai, "/embeddings", {"input": ["a"]})).status_code == 200
    for _ in range(2):
        response = await _post(fake_openai, "/chat/completions", {"messages": QUESTION})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "0.2"
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
    response = await _post(fake_openai, "/chat/completions", {"stream": True, "messages": QUESTION})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "bad prompt",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_request",
    }
    ok = await _post(fake_openai, "/chat/completions", {"messages": QUESTION})
    assert ok.status_code == 200
    assert fake_openai.stats()["chat_calls"] == 4


async def test_hang_fault_delays_then_answers(fake_openai: FakeServer) -> None:
    fake_openai.add_faults({"endpoint": "any", "kind": "hang", "seconds": 0.3})
    started = time.perf_counter()
    response = await _post(fake_openai, "/embeddings", {"input": ["a"]})
    assert time.perf_counter() - started >= 0.3
    assert response.status_code == 200
    started = time.perf_counter()
    await _stream(fake_openai, {"messages": QUESTION})
    assert time.perf_counter() - started < 0.3  # consumed once


async def test_hang_fault_times_out_a_client(fake_openai: FakeServer) -> None:
    fake_openai.add_faults({"kind": "hang", "seconds": 30})
    async with httpx.AsyncClient(timeout=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                f"{fake_openai.base_url}/chat/completions", json={"messages": QUESTION}
            )
    # The server stays responsive (a hang sleeps without blocking the loop).
    assert (
        await _post(fake_openai, "/chat/completions", {"messages": QUESTION})
    ).status_code == 200


async def test_cut_fault_aborts_a_stream(fake_openai: FakeServer) -> None:
    fake_openai.configure(answer="one two three four five six")
    fake_openai.add_faults({"endpoint": "chat", "kind": "cut", "after_pieces": 3})
    received: list[str] = []
    async with httpx.AsyncClient(timeout=5) as client:
        body = {"messages": QUESTION, "stream": True}
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream(
                "POST", f"{fake_openai.base_url}/chat/completions", json=body
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        received.append(line.removeprefix("data: "))
    assert "[DONE]" not in received
    chunks = [json.loads(e) for e in received]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:]]
    assert contents == ["one", " two", " three"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    stats = fake_openai.stats()
    assert stats["chat_calls"] == 1
    assert stats["chat_streams_completed"] == 0


async def test_cut_fault_on_non_stream_is_a_500(fake_openai: FakeServer) -> None:
    fake_openai.add_faults({"kind": "cut"}, {"kind": "cut"})
    assert (
        await _post(fake_openai, "/chat/completions", {"messages": QUESTION})
    ).status_code == 500
    assert (await _post(fake_openai, "/embeddings", {"input": ["a"]})).status_code == 500


async def test_invalid_faults_and_config_are_rejected(fake_openai: FakeServer) -> None:
    async with httpx.AsyncClient() as client:
        url = fake_openai.url
        for fault in (
            {"kind": "explode"},
            {"kind": "status", "status": 200},
            {"kind": "hang", "times": 0},
        ):
            response = await client.post(f"{url}/_fake/faults", json={"faults": [fault]})
            assert response.status_code == 400
        assert (await client.post(f"{url}/_fake/config", json={"ttft": -1})).status_code == 400
        assert (await client.post(f"{url}/_fake/config", json={"tfft": 1})).status_code == 400


def test_cli_flags() -> None:
    with start_fake_server(dimensions=48, ttft=0.2, token_delay=0.01) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.base_url.endswith("/v1")
        response = httpx.post(f"{server.base_url}/embeddings", json={"input": ["a"]})
        assert len(response.json()["data"][0]["embedding"]) == 48
        started = time.perf_counter()
        httpx.post(
            f"{server.base_url}/chat/completions", json={"messages": QUESTION, "stream": True}
        )
        assert time.perf_counter() - started >= 0.2
        # reset restores the flags' values, not zero.
        server.configure(ttft=0)
        server.reset()
        assert server.configure()["ttft"] == 0.2
    assert server.process.returncode is not None
