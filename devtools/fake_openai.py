"""A fake OpenAI-compatible HTTP server for tests, benchmarks and offline demos.

``python -m devtools.fake_openai --port 8089`` serves ``/v1/embeddings`` and
``/v1/chat/completions`` (streaming or not) the way the OpenAI API does, with
deterministic answers and vectors, plus a control plane under ``/_fake``:
counters (``GET /_fake/stats``), answer and latency settings
(``POST /_fake/config``), injected faults (``POST /_fake/faults``) and
``POST /_fake/reset``. It is a raw ASGI app on uvicorn: no framework between
the socket and the handlers, so benchmarks measure the pipeline, not the fake.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt
import uvicorn

from rag.answering.rewrite import REWRITE_RULES, History, rule_rewrite
from rag.answering.semantic_cache import VERIFY_RULES
from rag.platform.tokens import count_tokens, truncate_to_tokens
from rag.providers.offline import hashed_embeddings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
_T = TypeVar("_T")

#: Above this many characters an embeddings batch is computed in a thread, so
#: streams served at the same time are not held up by tokenizing and hashing.
_THREAD_CHARS = 8_000
_MAX_DIMENSIONS = 8_192
_PIECES = re.compile(r"\s*\S+(?:\s+$)?|\s+$")
_JSON = [(b"content-type", b"application/json")]
_SSE = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_ERROR_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("requests", "rate_limit_exceeded"),
}
_ABORT_LOG = "ASGI callable returned without completing response."


# --- request and control-plane bodies


class EmbeddingsRequest(msgspec.Struct):
    input: str | list[str]
    model: str = "text-embedding-3-small"
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] | None = None


class ChatMessageIn(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatRequest(msgspec.Struct):
    messages: list[ChatMessageIn]
    model: str = "gpt-4o-mini"
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class ConfigUpdate(msgspec.Struct, forbid_unknown_fields=True):
    ttft: float | msgspec.UnsetType = msgspec.UNSET
    token_delay: float | msgspec.UnsetType = msgspec.UNSET
    answer: str | msgspec.UnsetType | None = msgspec.UNSET


class Fault(msgspec.Struct, forbid_unknown_fields=True):
    """One injected failure; ``times`` requests matching ``endpoint`` consume it."""

    kind: Literal["status", "hang", "cut"]
    endpoint: Literal["chat", "embeddings", "any"] = "any"
    status: int = 500
    retry_after: float | None = None
    retry_after_ms: float | None = None
    message: str | None = None
    seconds: float = 30.0
    after_pieces: int = 3
    times: int = 1


class FaultList(msgspec.Struct, forbid_unknown_fields=True):
    faults: list[Fault]


class Stats(msgspec.Struct):
    embeddings_calls: int = 0
    chat_calls: int = 0
    embedded_texts: int = 0
    chat_streams_completed: int = 0
    #: The most chat requests the server was answering at the same moment.
    chat_in_flight_max: int = 0


class BadRequest(Exception):
    """The request body is not what the endpoint accepts (answered with a 400)."""


# --- state


class FakeState:
    """Counters, settings and the fault queue of one server process."""

    def __init__(
        self, *, ttft: float, token_delay: float, dimensions: int, embeddings: str = "hashed"
    ) -> None:
        self.embeddings = embeddings
        self.default_ttft = ttft
        self.default_token_delay = token_delay
        self.dimensions = dimensions
        self.stats = Stats()
        self.chat_in_flight = 0
        self.ttft = ttft
        self.token_delay = token_delay
        self.answer: str | None = None
        self.faults: collections.deque[Fault] = collections.deque()

    def reset(self) -> None:
        self.stats = Stats()
        self.ttft = self.default_ttft
        self.token_delay = self.default_token_delay
        self.answer = None
        self.faults.clear()

    def take_fault(self, endpoint: Literal["chat", "embeddings"]) -> Fault | None:
        """The first queued fault for ``endpoint``, consumed once (FIFO)."""
        for fault in self.faults:
            if fault.endpoint in (endpoint, "any"):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None


# --- helpers


def split_pieces(text: str) -> list[str]:
    """Words with their leading whitespace; the pieces concatenate back to ``text``."""
    return _PIECES.findall(text)


def default_answer(messages: Sequence[ChatMessageIn]) -> str:
    """What the fake model says: a follow-up rewritten as the service's rules would
    (for the rewrite prompt, ``rag/answering/rewrite.py``); "yes" to the semantic cache's
    verifier (the candidates it sees passed the rule checks already; ``answer`` in
    ``/_fake/config`` makes it say something else); else a fixed sentence naming
    the question."""
    if messages and messages[0].role == "system":
        system = _content_text(messages[0].content)
        if system.startswith(REWRITE_RULES.split("\n", 1)[0]) and len(messages) > 1:
            return _rewrite_reply(_content_text(messages[-1].content))
        if system.startswith(VERIFY_RULES.split("\n", 1)[0]):
            return "yes"
    question = ""
    for message in reversed(messages):
        if message.role == "user":
            question = _content_text(message.content)
            break
    # Cites the first two sources of the prompt, as a model following the rules would.
    cited = "".join(f"[{n}]" for n in _SOURCE_ID.findall(question)[:2])
    question = " ".join(_SOURCE_BLOCK.sub(" ", question).split())[:80]
    markers = f" {cited}" if cited else ""
    return f"Fake answer to: {question}. It draws on the sources provided{markers}."


_SOURCE_ID = re.compile(r'<source id="(\d+)"')
_SOURCE_BLOCK = re.compile(r"<source\b.*?</source>", re.DOTALL)


def _rewrite_reply(prompt: str) -> str:
    """The rule-based rewrite of the prompt's follow-up, given its earlier questions."""
    questions = [
        line[len("Learner: ") :] for line in prompt.splitlines() if line.startswith("Learner: ")
    ]
    follow_up = next(
        (
            line[len("Follow-up: ") :]
            for line in prompt.splitlines()
            if line.startswith("Follow-up: ")
        ),
        prompt,
    )
    return rule_rewrite(follow_up, History(questions=questions)).text


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def seeded_embeddings(texts: Sequence[str], dimensions: int) -> npt.NDArray[np.float32]:
    """Unit vectors drawn from a generator seeded by each text: deterministic and
    nearly free, but with no meaning (for benchmarks that must not measure the fake)."""
    out = np.empty((len(texts), dimensions), dtype=np.float32)
    for i, text in enumerate(texts):
        seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
        row = np.random.default_rng(seed).standard_normal(dimensions, dtype=np.float32)
        out[i] = row / np.linalg.norm(row)
    return out


def _embed(
    texts: list[str], dimensions: int, as_base64: bool, mode: str = "hashed"
) -> tuple[list[Any], int]:
    embed = seeded_embeddings if mode == "seeded" else hashed_embeddings
    vectors = np.asarray(embed(texts, dimensions), dtype="<f4")
    if as_base64:
        rows: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        rows = vectors.tolist()
    return rows, sum(count_tokens(text) for text in texts)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send_json(
    send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = msgspec.json.encode(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*_JSON, (b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(
    send: Send,
    status: int,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    kind, code = _ERROR_TYPES.get(status, ("server_error", "server_error"))
    error = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    await _send_json(send, status, error, headers)


class Disconnect:
    """Sleeps that end early when the client goes away (a hang must not outlive it)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watch: asyncio.Task[None] | None = None

    async def _wait(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def sleep(self, seconds: float) -> bool:
        """Sleep; False when the client disconnected meanwhile."""
        if seconds <= 0:
            return not (self._watch is not None and self._watch.done())
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._wait())
        done, _ = await asyncio.wait({self._watch}, timeout=seconds)
        return not done

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


# --- the app


class FakeOpenAI:
    """The ASGI application."""

    def __init__(self, state: FakeState) -> None:
        self.state = state
        self._ids = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"].rstrip("/")
        try:
            if path == "/v1/chat/completions" and method == "POST":
                await self._chat(receive, send)
            elif path == "/v1/embeddings" and method == "POST":
                await self._embeddings(receive, send)
            elif path.startswith("/_fake/"):
                await self._control(method, path, receive, send)
            else:
                await _send_error(send, 404, f"no route for {method} {path}")
        except BadRequest as exc:
            await _send_error(send, 400, str(exc))

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-fake-{self._ids}"

    @staticmethod
    def _decode(body: bytes, kind: type[_T]) -> _T:
        try:
            return msgspec.json.decode(body, type=kind)
        except msgspec.DecodeError as exc:
            raise BadRequest(f"invalid request body: {exc}") from None

    async def _fault_status(self, send: Send, fault: Fault) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if fault.retry_after is not None:
            headers.append((b"retry-after", f"{fault.retry_after:g}".encode()))
        if fault.retry_after_ms is not None:
            headers.append((b"retry-after-ms", f"{fault.retry_after_ms:g}".encode()))
        message = fault.message or f"injected fault: HTTP {fault.status}"
        await _send_error(send, fault.status, message, headers)

    # -- embeddings

    async def _embeddings(self, receive: Receive, send: Send) -> None:
        stats = self.state.stats
        stats.embeddings_calls += 1
        request = self._decode(await _read_body(receive), EmbeddingsRequest)
        fault = self.state.take_fault("embeddings")
        if fault is not None:
            if fault.kind == "status":
                await self._fault_status(send, fault)
                return
            if fault.kind == "cut":
                await _send_error(send, 500, "injected fault: cut (not a stream)")
                return
            disconnect = Disconnect(receive)
            try:
                if not await disconnect.sleep(fault.seconds):
                    return
            finally:
                disconnect.close()
        texts = [request.input] if isinstance(request.input, str) else request.input
        dimensions = self.state.dimensions if request.dimensions is None else request.dimensions
        if not 1 <= dimensions <= _MAX_DIMENSIONS:
            raise BadRequest(f"dimensions must be from 1 to {_MAX_DIMENSIONS}")
        if not texts or any(not text for text in texts):
            raise BadRequest("input must be a non-empty string or list of non-empty strings")
        as_base64 = request.encoding_format == "base64"
        if sum(map(len, texts)) > _THREAD_CHARS:
            rows, tokens = await asyncio.to_thread(
                _embed, texts, dimensions, as_base64, self.state.embeddings
            )
        else:
            rows, tokens = _embed(texts, dimensions, as_base64, self.state.embeddings)
        stats.embedded_texts += len(texts)
        await _send_json(
            send,
            200,
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": row}
                    for i, row in enumerate(rows)
                ],
                "model": request.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    # -- chat

    async def _chat(self, receive: Receive, send: Send) -> None:
        state = self.state
        state.stats.chat_calls += 1
        request = self._decode(await _read_body(receive), ChatRequest)
        fault = state.take_fault("chat")
        if fault is not None and fault.kind == "status":
            await self._fault_status(send, fault)
            return
        if fault is not None and fault.kind == "cut" and not request.stream:
            await _send_error(send, 500, "injected fault: cut (not a stream)")
            return
        if not request.messages:
            raise BadRequest("messages must not be empty")

        answer = state.answer if state.answer is not None else default_answer(request.messages)
        finish_reason = "stop"
        completion_tokens = count_tokens(answer)
        limit = request.max_completion_tokens or request.max_tokens
        if limit is not None and completion_tokens > limit:
            answer, completion_tokens, finish_reason = (
                truncate_to_tokens(answer, limit),
                limit,
                "length",
            )
        prompt_tokens = sum(count_tokens(_content_text(m.content)) for m in request.messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        pieces = split_pieces(answer)
        # Read once: a /_fake/config call during this request must not change it halfway.
        ttft, token_delay = state.ttft, state.token_delay
        disconnect = Disconnect(receive)
        state.chat_in_flight += 1
        state.stats.chat_in_flight_max = max(state.stats.chat_in_flight_max, state.chat_in_flight)
        try:
            hang = fault.seconds if fault is not None and fault.kind == "hang" else 0.0
            if hang and not await disconnect.sleep(hang):
                return
            if request.stream:
                include_usage = request.stream_options is not None and (
                    request.stream_options.include_usage
                )
                cut_after = (
                    fault.after_pieces if fault is not None and fault.kind == "cut" else None
                )
                await self._stream(
                    send,
                    disconnect,
                    request.model,
                    pieces,
                    finish_reason,
                    usage if include_usage else None,
                    ttft,
                    token_delay,
                    cut_after,
                )
                return
            if not await disconnect.sleep(ttft + token_delay * max(len(pieces) - 1, 0)):
                return
            await _send_json(
                send,
                200,
                {
                    "id": self._next_id("chatcmpl"),
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": request.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer, "refusal": None},
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    "usage": usage,
                },
            )
        finally:
            state.chat_in_flight -= 1
            disconnect.close()

    async def _stream(
        self,
        send: Send,
        disconnect: Disconnect,
        model: str,
        pieces: list[str],
        finish_reason: str,
        usage: dict[str, int] | None,
        ttft: float,
        token_delay: float,
        cut_after: int | None,
    ) -> None:
        # Every chunk is the same JSON but for the delta: encode the frame once,
        # then splice each piece in (the fake must cost little per token).
        head = msgspec.json.encode(
            {
                "id": self._next_id("chatcmpl"),
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "system_fingerprint": None,
            }
        )[:-1]
        tail = b',"usage":null}\n\n' if usage is not None else b"}\n\n"

        def frame(delta: bytes, finish: str | None = None) -> bytes:
            reason = b"null" if finish is None else msgspec.json.encode(finish)
            return (
                b"data: "
                + head
                + b',"choices":[{"index":0,"delta":'
                + delta
                + b',"logprobs":null,"finish_reason":'
                + reason
                + b"}]"
                + tail
            )

        def content(piece: str) -> bytes:
            return frame(b'{"content":' + msgspec.json.encode(piece) + b"}")

        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        if not await disconnect.sleep(ttft):
            return
        role = frame(b'{"role":"assistant","content":"","refusal":null}')
        if cut_after is not None:
            # Send some pieces (token_delay apart, like any others), then return with the
            # body unfinished: uvicorn closes the connection, which the client sees as a
            # stream cut mid-answer.
            out = [role, *(content(p) for p in pieces[:cut_after])]
            for i, part in enumerate(out):
                if i > 1 and token_delay > 0 and not await disconnect.sleep(token_delay):
                    return
                await send({"type": "http.response.body", "body": part, "more_body": True})
            return
        if token_delay <= 0:
            body = [role, *(content(p) for p in pieces)]
            await send({"type": "http.response.body", "body": b"".join(body), "more_body": True})
        else:
            for i, piece in enumerate(pieces):
                if i and not await disconnect.sleep(token_delay):
                    return
                part = content(piece)
                await send(
                    {
                        "type": "http.response.body",
                        "body": role + part if i == 0 else part,
                        "more_body": True,
                    }
                )
            if not pieces:
                await send({"type": "http.response.body", "body": role, "more_body": True})
        end = frame(b"{}", finish_reason)
        if usage is not None:
            end += (
                b"data: " + head + b',"choices":[],"usage":' + msgspec.json.encode(usage) + b"}\n\n"
            )
        end += b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": end, "more_body": False})
        if await disconnect.sleep(0):
            self.state.stats.chat_streams_completed += 1

    # -- control plane

    async def _control(self, method: str, path: str, receive: Receive, send: Send) -> None:
        state = self.state
        name = path.removeprefix("/_fake/")
        if (name, method) in {("stats", "GET"), ("health", "GET")}:
            await _read_body(receive)
            payload: object = state.stats if name == "stats" else {"status": "ok"}
            await _send_json(send, 200, payload)
        elif (name, method) == ("reset", "POST"):
            await _read_body(receive)
            state.reset()
            await _send_json(send, 200, {"status": "ok"})
        elif (name, method) == ("config", "POST"):
            update = self._decode(await _read_body(receive) or b"{}", ConfigUpdate)
            for attr in ("ttft", "token_delay"):
                value = getattr(update, attr)
                if value is not msgspec.UNSET:
                    if value < 0:
                        raise BadRequest(f"{attr} must not be negative")
                    setattr(state, attr, float(value))
            if update.answer is not msgspec.UNSET:
                state.answer = update.answer
            await _send_json(
                send,
                200,
                {"ttft": state.ttft, "token_delay": state.token_delay, "answer": state.answer},
            )
        elif (name, method) == ("faults", "POST"):
            faults = self._decode(await _read_body(receive), FaultList).faults
            for fault in faults:
                if fault.kind == "status" and not 400 <= fault.status <= 599:
                    raise BadRequest("a status fault needs a status from 400 to 599")
                if fault.times < 1 or fault.seconds < 0 or fault.after_pieces < 0:
                    raise BadRequest("times must be >= 1, seconds and after_pieces >= 0")
            state.faults.extend(faults)
            await _send_json(send, 200, {"queued": len(state.faults)})
        elif name in {"stats", "health", "reset", "config", "faults"}:
            await _send_error(send, 405, f"{method} not allowed on {path}")
        else:
            await _send_error(send, 404, f"no route for {method} {path}")


class _DropAbortLog(logging.Filter):
    """A ``cut`` fault ends a response on purpose; uvicorn would log it as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _ABORT_LOG


# --- entry point


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.fake_openai", description="Fake OpenAI-compatible API server."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8089, help="port; 0 picks a free one")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    parser.add_argument(
        "--token-delay", type=float, default=0.0, help="seconds between streamed tokens"
    )
    parser.add_argument(
        "--dimensions", type=int, default=1536, help="embedding size when a request gives none"
    )
    parser.add_argument(
        "--embeddings",
        default="hashed",
        choices=["hashed", "seeded"],
        help="hashed: the offline provider's n-gram features (paraphrases land close); "
        "seeded: random unit vectors seeded by the text, nearly free (benchmarks)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    if args.ttft < 0 or args.token_delay < 0:
        parser.error("--ttft and --token-delay must not be negative")
    if not 1 <= args.dimensions <= _MAX_DIMENSIONS:
        parser.error(f"--dimensions must be from 1 to {_MAX_DIMENSIONS}")
    return args


class _Server(uvicorn.Server):
    """Announces the listening URL once uvicorn accepts connections (tests wait for it)."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(f"fake-openai listening on {self.url}", flush=True)


async def serve(args: argparse.Namespace) -> None:
    state = FakeState(
        ttft=args.ttft,
        token_delay=args.token_delay,
        dimensions=args.dimensions,
        embeddings=args.embeddings,
    )
    config = uvicorn.Config(
        FakeOpenAI(state),
        log_level=args.log_level,
        access_log=False,
        lifespan="off",
        # Hung requests must not hold a shutdown up for their full sleep.
        timeout_graceful_shutdown=1,
        backlog=2048,
    )
    logging.getLogger("uvicorn.error").addFilter(_DropAbortLog())
    # Bind the socket ourselves so that port 0 resolves to a real port before we announce it.
    ipv6 = ":" in args.host
    # proto=IPPROTO_TCP matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets
    # that say they are TCP, and with Nagle on every response waits ~40 ms for an ACK.
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((args.host, args.port))
        host = f"[{args.host}]" if ipv6 else args.host
        url = f"http://{host}:{sock.getsockname()[1]}"
        await _Server(config, url).serve(sockets=[sock])
    finally:
        sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
