"""The OpenAI provider: any OpenAI-compatible API through the official async client.

Retries live in one layer, here: the client's own are off (``max_retries=0``)
and tenacity retries 429, 5xx, timeouts and connection errors with
exponential back-off and jitter, waiting what ``Retry-After`` asks for when
the server says (capped by ``PROVIDER_RETRY_MAX_WAIT``). Other 4xx are the
request's fault and fail at once. A chat stream is retried only until its
first piece of content: after that the learner has seen text, and a retry
would repeat or contradict it.

The circuit breaker (``rag/protection/breaker.py``, one per operation and model, shared
by every worker) sits inside that loop: each attempt asks it first and
reports its outcome after, so during an outage the calls in flight stop at
their next attempt instead of retrying on, and while it is open no request
leaves at all. A chat stream's outcome is known only at its end: a stream
that is cut, stalls or sends an unreadable chunk midway is a failure, and
only a finished one is a success (a provider that cuts every stream after
its first piece must open the breaker, not reset it each time).

Timeouts: connecting and each read (the client's), the first piece of answer
text per attempt, the silence between two chunks, and the whole generation,
retries included.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import functools
import logging
import ssl
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import msgspec
import numpy as np
import openai
from openai._constants import DEFAULT_CONNECTION_LIMITS
from openai._vendor.httpx_aiohttp.transport import (
    AiohttpResponseStream,
    AiohttpTransport,
    map_aiohttp_exceptions,
)
from openai.types.chat import ChatCompletionMessageParam
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from rag.platform import metrics
from rag.platform.errors import ConfigError, ProviderRejected, ProviderUnavailable
from rag.platform.redis import Redis
from rag.platform.settings import Settings
from rag.platform.tokens import count_tokens
from rag.protection.breaker import BreakerOpen, CircuitBreaker, Ticket, provider_breakers
from rag.providers.base import ChatDelta, ChatMessage, Provider, Usage, Vectors

if TYPE_CHECKING:
    import httpx2

log = logging.getLogger("rag.providers")

_T = TypeVar("_T")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Back-off before retry n (1-based) without a Retry-After: 0.5 * 2**(n-1) s plus up
#: to 0.5 s of jitter, never above PROVIDER_RETRY_MAX_WAIT.
_BACKOFF_MULTIPLIER = 0.5
_BACKOFF_JITTER = 0.5
#: OpenAI's reasoning models refuse ``max_tokens``; most compatible servers
#: (Ollama, LM Studio) know only ``max_tokens``.
_MAX_COMPLETION_TOKENS_PREFIXES = ("o1", "o3", "o4", "gpt-5")


class _IncompleteStream(Exception):
    """The chat stream ended before its first piece of content: as good as a cut connection."""


class _UnreadableChunk(openai.APIError):
    """A chunk that is not the JSON of a chat chunk: the provider is broken, not the request."""


class _NoFirstToken(Exception):
    """No piece of answer text arrived in time (``PROVIDER_FIRST_TOKEN_TIMEOUT``, or what
    was left of ``PROVIDER_GENERATION_TIMEOUT``)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer text within {seconds:g}s")
        self.seconds = seconds


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None

    @property
    def text(self) -> str | None:
        return self.delta.content if self.delta is not None else None


class _ChunkUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    """The fields of a ``chat.completion.chunk`` that we read; the rest are skipped.
    Compatible servers differ in what they leave out or send as null (``choices``,
    ``delta``, ``usage``): all of it is optional here."""

    choices: list[_Choice] | None = None
    usage: _ChunkUsage | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class _EmbeddingItem(msgspec.Struct):
    index: int
    embedding: str | list[float]


class _Embeddings(msgspec.Struct):
    """The fields of an embeddings response that we read. Decoded from the raw body:
    the SDK's own parsing builds a pydantic model per vector, about 10 ms of CPU per
    128-text batch here (a tenth of a bulk reindex's load phase)."""

    data: list[_EmbeddingItem]
    usage: _ChunkUsage | None = None


_decode_embeddings = msgspec.json.Decoder(_Embeddings).decode
_DRAIN_SECONDS = 0.1


class _ChatStream:
    """A streamed chat completion's Server-Sent Events, decoded with msgspec.

    The SDK's own stream builds a pydantic model per chunk: about 95 µs of CPU a
    piece on this machine against about 9 µs for this reader (8,000 pieces from
    the fake server), 45 ms of worker CPU saved on a 500-token answer. The
    request still goes through the client (``with_streaming_response``: auth,
    base URL, timeouts, status errors raised as ``APIStatusError`` before any
    body is read); only the body is read here, so this also translates
    transport errors the way the SDK's stream does, taking the exception
    classes from the HTTP library the client's response comes from (``httpx``,
    or ``httpx2`` in newer SDKs; both name them alike).
    """

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self._lines: AsyncIterator[str] | None = None
        self._request: Any = None
        self._timeouts: tuple[type[BaseException], ...] = ()
        self._errors: tuple[type[BaseException], ...] = ()
        self._done = False

    async def open(self) -> None:
        response = await self._manager.__aenter__()
        http_response = response.http_response
        transport = sys.modules[type(http_response).__module__.partition(".")[0]]
        self._request = http_response.request
        self._timeouts = (transport.TimeoutException,)
        self._errors = (transport.RequestError, ssl.SSLError)
        self._lines = response.iter_lines()

    async def __anext__(self) -> _Chunk:
        if self._done or self._lines is None:
            raise StopAsyncIteration
        data: list[str] = []
        try:
            async for line in self._lines:
                if line.startswith("data:"):
                    data.append(line[6:] if line.startswith("data: ") else line[5:])
                elif not line and data:
                    return self._dispatch("\n".join(data))
                # Other lines: comments, event names, ids, retry hints.
            if data:  # a last event without its blank line
                return self._dispatch("\n".join(data))
        except self._timeouts as exc:
            if (root := _misread_timeout(exc)) is not None:
                raise openai.APIConnectionError(request=self._request) from root
            raise openai.APITimeoutError(request=self._request) from exc
        except self._errors as exc:
            raise openai.APIConnectionError(request=self._request) from exc
        self._done = True
        raise StopAsyncIteration

    def _dispatch(self, data: str) -> _Chunk:
        """One event's data: a chunk, the end (``[DONE]``), or the provider's error."""
        if data.startswith("[DONE]"):
            self._done = True
            raise StopAsyncIteration
        try:
            chunk = _decode_chunk(data)
        except msgspec.DecodeError as exc:
            raise _UnreadableChunk(
                f"unreadable chat stream chunk: {exc}", request=self._request, body=None
            ) from exc
        if chunk.error:
            error = chunk.error
            message = error.get("message") if isinstance(error, dict) else None
            raise openai.APIError(
                message if isinstance(message, str) and message else "error in the chat stream",
                request=self._request,
                body=error,
            )
        return chunk

    async def close(self) -> None:
        """Drain what is left after ``[DONE]`` (the end of the body, so HTTP/1.1 can reuse
        the connection; at most 0.1 s, as the SDK does), then release the response."""
        if self._done and self._lines is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_DRAIN_SECONDS):
                    async for _ in self._lines:
                        pass
        if isinstance(self._lines, AsyncGenerator):
            await self._lines.aclose()
        await self._manager.__aexit__(None, None, None)


def _held_bytes(content: aiohttp.StreamReader) -> bytes:
    """What ``content`` received before it was given its error, still unread.

    aiohttp has no public way to read it: every read checks for the error first
    (``StreamReader.read``, ``readany``, ``read_nowait``). So the error is lifted for one
    ``read_nowait``, which keeps the reader's own bookkeeping, and put back.
    """
    error = content.exception()
    content._exception = None
    try:
        return content.read_nowait()
    except Exception:  # a reader in a state this does not know: nothing to add
        return b""
    finally:
        content._exception = error


class _DrainingResponseStream(AiohttpResponseStream):
    """The SDK's aiohttp response body, with the bytes that came with a cut read first.

    aiohttp's reader raises a broken connection's error *in place of* the bytes it
    still holds. The worker reads a stream between publishing batches, so when a
    stream is cut the pieces that arrived meanwhile were lost: the job failed with
    fewer pieces than were sent, or, if none had been read, as a stream that never
    began, and was generated again. Here they are read, then the error is raised,
    as on httpx (``tests/rag/test_openai_provider.py`` runs both).
    """

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._aiohttp_response.content
        with map_aiohttp_exceptions():  # the SDK's mapping to httpx errors, as before
            while True:
                try:
                    chunk = await content.readany()
                except Exception:
                    if held := _held_bytes(content):
                        yield held
                    raise
                if not chunk:
                    return
                yield chunk


class _AiohttpTransport(AiohttpTransport):
    """The SDK's aiohttp transport, reading bodies through :class:`_DrainingResponseStream`.

    Written here because the SDK's transport has no hook for its body reader; the rest
    of it (requests, timeouts, error mapping) is the SDK's, and the pinned versions are
    the ones the provider tests run.
    """

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        if isinstance(response.stream, AiohttpResponseStream):
            response.stream = _DrainingResponseStream(response.stream._aiohttp_response)
        return response


def _misread_timeout(exc: BaseException) -> BaseException | None:
    """The aiohttp error under ``exc`` if ``exc`` calls a connection error a timeout.

    The SDK's aiohttp transport (``openai._vendor.httpx_aiohttp``) maps every
    ``aiohttp.ClientConnectionError`` to httpx's ``ConnectTimeout``, so a refused or
    dropped connection would be reported, logged and counted as a timeout. aiohttp's
    own timeouts are ``TimeoutError`` subclasses; any other aiohttp error in the chain
    is a connection error, which is what the httpx transport reports.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientError):
            return None if isinstance(cause, TimeoutError) else cause
        cause = cause.__cause__
    return None


async def _reclassified(fn: Callable[[], Awaitable[_T]]) -> _T:
    """``fn()``, with a connection error the aiohttp transport misread as a timeout
    raised as the connection error it is (:func:`_misread_timeout`)."""
    try:
        return await fn()
    except openai.APITimeoutError as exc:
        if (root := _misread_timeout(exc)) is None:
            raise
        raise openai.APIConnectionError(request=exc.request) from root


def _retryable(exc: BaseException) -> bool:
    """Worth another attempt, and a failure for the circuit breaker."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    # APITimeoutError is a subclass of APIConnectionError.
    return isinstance(exc, openai.APIConnectionError | _IncompleteStream | _NoFirstToken)


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """What the error response asks us to wait (``retry-after-ms`` or ``retry-after``)."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(float(raw_ms) / 1000, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class _WaitRetryAfter(wait_base):
    """The server's Retry-After when it sent one, else exponential back-off; both capped."""

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self.backoff = wait_exponential_jitter(
            multiplier=_BACKOFF_MULTIPLIER, max=cap, jitter=_BACKOFF_JITTER
        )

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        hinted = retry_after_seconds(outcome.exception() if outcome is not None else None)
        if hinted is not None:
            return min(hinted, self.cap)
        return self.backoff(retry_state)


def _status_label(exc: BaseException) -> str:
    """A failed attempt as a metric label: the HTTP status, else a short kind."""
    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    if isinstance(exc, BreakerOpen):
        return "circuit_open"
    if isinstance(exc, openai.APITimeoutError | _NoFirstToken):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


def _describe(exc: BaseException, *, public: bool = False) -> str:
    """What went wrong; with ``public``, without the provider's or the network's own
    words (a quota notice, an organisation id, a host and port), which only the
    log and the operator's CLI see."""
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return "connection error" if public else f"connection error ({cause or exc.message})"
    if isinstance(exc, openai.APIStatusError):
        return (
            f"HTTP {exc.status_code}"
            if public
            else f"HTTP {exc.status_code}: {_server_message(exc)}"
        )
    if isinstance(exc, _IncompleteStream):
        return "stream ended before any content"
    if isinstance(exc, _NoFirstToken):
        return f"timed out: {exc}"
    if isinstance(exc, openai.APIError) and public:
        return "an error in the response"
    return type(exc).__name__ if public else f"{type(exc).__name__}: {exc}"


def _server_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
    return exc.message


def _details(operation: str, exc: BaseException, attempts: int | None) -> dict[str, Any]:
    details: dict[str, Any] = {"provider": "openai", "operation": operation}
    if attempts is not None:
        details["attempts"] = attempts
    if isinstance(exc, openai.APIStatusError):
        details["status"] = exc.status_code
        if exc.code:
            details["code"] = exc.code
        if exc.request_id:
            details["request_id"] = exc.request_id
    elif isinstance(exc, openai.APITimeoutError | _NoFirstToken):
        details["reason"] = "timeout"
    elif isinstance(exc, openai.APIConnectionError | _IncompleteStream):
        details["reason"] = "connection"
    return details


async def _report(breaker: CircuitBreaker, ticket: Ticket, exc: BaseException) -> None:
    """Tell the breaker how an attempt ended. Only provider trouble counts as a failure;
    a request the provider refused (400, 401, 404, 422...) is the caller's fault and
    leaves the count alone, though as a probe's outcome it shows the provider is up."""
    if _retryable(exc) or isinstance(exc, _UnreadableChunk):
        await breaker.failure(ticket)
    elif isinstance(exc, openai.APIStatusError):
        if ticket.probe:
            await breaker.success(ticket)
    else:  # cancelled, or a bug: no verdict
        await breaker.release(ticket)


def _message_param(message: ChatMessage) -> ChatCompletionMessageParam:
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    return {"role": "user", "content": message.content}


def _decode_embedding(raw: object) -> np.ndarray[Any, np.dtype[np.float32]]:
    # We ask for base64 (4 bytes a number instead of ~20 characters of JSON) but a
    # compatible server may ignore the format and send floats.
    if isinstance(raw, str):
        return np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
    return np.asarray(raw, dtype=np.float32)


class OpenAIProvider(Provider):
    """Embeddings and streaming chat from an OpenAI-compatible API.

    With ``redis`` (and ``BREAKER_FAILURES`` above 0) every call goes through a
    circuit breaker that all processes on that Redis share.
    """

    name = "openai"

    def __init__(self, settings: Settings, *, redis: Redis | None = None) -> None:
        if not settings.openai_api_key:
            raise ConfigError("the openai provider needs OPENAI_API_KEY")
        self.settings = settings
        self.embedding_model = settings.embedding_model
        self.dimensions = settings.embedding_dimensions
        self.chat_model = settings.chat_model
        #: Shared through Redis by every process (rag/protection/breaker.py).
        self.breakers = provider_breakers(settings, redis) if redis is not None else {}
        timeout = openai.Timeout(
            settings.provider_read_timeout, connect=settings.provider_connect_timeout
        )
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key,
            # Explicit, so the client never falls back to reading OPENAI_BASE_URL itself.
            base_url=settings.openai_base_url or DEFAULT_BASE_URL,
            max_retries=0,
            timeout=timeout,
            # OPENAI_HTTP_CLIENT=aiohttp (the default): the SDK's aiohttp transport parses
            # HTTP in C where httpx's h11 is pure Python, about 40% less CPU per streamed
            # answer and per embeddings call (docs/decisions.md).
            http_client=(
                openai.DefaultAioHttpClient(
                    timeout=timeout,
                    transport=_AiohttpTransport(limits=DEFAULT_CONNECTION_LIMITS),
                )
                if settings.openai_http_client == "aiohttp"
                else None
            ),
        )

    async def aclose(self) -> None:
        await self._client.close()

    # -- retry layer

    async def _call(
        self,
        operation: str,
        fn: Callable[[], Awaitable[_T]],
        *,
        deadline: float | None = None,
        hold: bool = False,
    ) -> tuple[_T, Ticket]:
        """Run ``fn`` with retries, each attempt through the breaker; translate the final
        failure into ``rag.platform.errors``. No retry starts a back-off that would end past
        ``deadline`` (event loop time).

        Returns the result and the successful attempt's breaker ticket. With ``hold``
        that ticket is not settled yet: the caller reports the outcome with
        :meth:`_verdict` once it knows it (a chat stream at its end)."""
        max_attempts = self.settings.provider_max_attempts
        breaker = self.breakers.get(operation)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "openai %s failed (%s), attempt %d of %d; retrying in %.2fs",
                operation,
                _describe(exc) if exc is not None else "?",
                state.attempt_number,
                max_attempts,
                wait,
            )

        stop: stop_base = stop_after_attempt(max_attempts)
        if deadline is not None:
            stop = stop | stop_before_delay(max(deadline - asyncio.get_running_loop().time(), 0))
        retrying = AsyncRetrying(
            stop=stop,
            wait=_WaitRetryAfter(self.settings.provider_retry_max_wait),
            # BreakerOpen is not retryable: an attempt the breaker refuses ends the loop.
            retry=retry_if_exception(_retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        attempts = 0
        model = self.embedding_model if operation == "embeddings" else self.chat_model
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    try:
                        result = await self._attempt(breaker, fn, settle=not hold)
                    except BaseException as exc:
                        metrics.provider_call(operation, model, _status_label(exc))
                        raise
                    metrics.provider_call(operation, model, "ok")
                    return result
        except BreakerOpen as exc:
            raise self._circuit_open(operation, exc, attempts - 1) from exc
        except (openai.OpenAIError, _IncompleteStream, _NoFirstToken) as exc:
            raise self._translate(operation, exc, attempts) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    @staticmethod
    async def _attempt(
        breaker: CircuitBreaker | None, fn: Callable[[], Awaitable[_T]], *, settle: bool
    ) -> tuple[_T, Ticket]:
        """One attempt: admitted by the breaker (or refused with BreakerOpen), a failure
        reported back at once, a success too unless ``settle`` is off."""
        if breaker is None:
            return await _reclassified(fn), Ticket()
        ticket = await breaker.admit()
        try:
            result = await _reclassified(fn)
        except BaseException as exc:
            await asyncio.shield(_report(breaker, ticket, exc))
            raise
        if settle:
            await breaker.success(ticket)
        return result, ticket

    def _circuit_open(self, operation: str, exc: BreakerOpen, calls: int) -> ProviderUnavailable:
        return ProviderUnavailable(
            f"the model provider is unavailable (OpenAI {operation} failed repeatedly; "
            f"circuit breaker open): try again in {max(exc.retry_in, 1):.0f}s",
            details={
                "provider": "openai",
                "operation": operation,
                "reason": "circuit_open",
                "retry_in": round(exc.retry_in, 1),
                "attempts": calls,
            },
        )

    async def _verdict(self, operation: str, ticket: Ticket, ok: bool | None) -> None:
        """Settle a held ticket (see :meth:`_call`): a success, a failure, or no verdict
        (``None``: the caller stopped early, which says nothing about the provider)."""
        breaker = self.breakers.get(operation)
        if breaker is None:
            return
        outcome = breaker.success if ok else breaker.failure if ok is False else breaker.release
        await asyncio.shield(outcome(ticket))

    def _translate(self, operation: str, exc: BaseException, attempts: int) -> Exception:
        details = _details(operation, exc, attempts)
        if _retryable(exc):
            plural = "attempt" if attempts == 1 else "attempts"
            failed = f"OpenAI {operation} failed after {attempts} {plural}"
            return ProviderUnavailable(
                f"{failed}: {_describe(exc)}",
                details=details,
                public=f"{failed}: {_describe(exc, public=True)}",
            )
        if isinstance(exc, openai.APIStatusError):
            rejected = f"OpenAI rejected the {operation} request (HTTP {exc.status_code})"
            return ProviderRejected(
                f"{rejected}: {_server_message(exc)}", details=details, public=rejected
            )
        # A response we could not parse: asking again would get the same answer.
        unusable = f"OpenAI {operation} returned an unusable response"
        return ProviderRejected(
            f"{unusable}: {_describe(exc)}",
            details=details,
            public=f"{unusable}: {_describe(exc, public=True)}",
        )

    # -- embeddings

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Embed ``texts`` in one request; rows in input order, L2-normalized float32."""
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        batch = list(texts)
        raw, _ = await self._call(
            "embeddings",
            lambda: self._client.embeddings.with_raw_response.create(
                model=self.embedding_model,
                input=batch,
                dimensions=self.dimensions,
                encoding_format="base64",
            ),
        )
        try:
            response = _decode_embeddings(raw.content)
        except msgspec.DecodeError as exc:
            raise ProviderRejected(
                f"unreadable OpenAI embeddings response: {exc}",
                details={"provider": "openai", "operation": "embeddings"},
            ) from exc
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != len(batch):
            raise ProviderRejected(
                f"OpenAI embeddings returned {len(data)} vectors for {len(batch)} texts",
                details={"provider": "openai", "operation": "embeddings"},
            )
        rows = [_decode_embedding(item.embedding) for item in data]
        got = {row.shape[0] for row in rows}
        if got != {self.dimensions}:
            sizes = ", ".join(str(n) for n in sorted(got))
            raise ProviderRejected(
                f"model {self.embedding_model!r} returned {sizes}-dimension vectors but "
                f"EMBEDDING_DIMENSIONS={self.dimensions}: set EMBEDDING_DIMENSIONS to the "
                "model's size (then run `python -m workers reindex --all --full`) or pick "
                "a model that supports the `dimensions` parameter",
                details={
                    "provider": "openai",
                    "operation": "embeddings",
                    "expected": self.dimensions,
                    "received": sorted(got),
                },
            )
        if response.usage is not None:
            metrics.provider_tokens(self.embedding_model, response.usage.prompt_tokens, 0)
        vectors = np.vstack(rows).astype(np.float32, copy=False)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        result: Vectors = vectors / norms
        return result

    # -- chat

    def _chat_params(self, messages: Sequence[ChatMessage], max_tokens: int) -> dict[str, Any]:
        limit = (
            "max_completion_tokens"
            if self.chat_model.startswith(_MAX_COMPLETION_TOKENS_PREFIXES)
            else "max_tokens"
        )
        return {
            "model": self.chat_model,
            "messages": [_message_param(m) for m in messages],
            limit: max_tokens,
        }

    async def _open_stream(
        self, params: dict[str, Any], deadline: float
    ) -> tuple[_ChatStream, list[_Chunk]]:
        """Open a stream and read up to its first chunk with content or a finish, within
        ``PROVIDER_FIRST_TOKEN_TIMEOUT`` (and before ``deadline``).

        This is the unit that is retried: it returns the open stream and the
        chunks read so far, or closes the stream and raises.
        """
        budget = min(
            self.settings.provider_first_token_timeout,
            deadline - asyncio.get_running_loop().time(),
        )
        if budget <= 0:
            raise _NoFirstToken(0)
        # A server that accepts the request and then sends nothing, or only empty
        # chunks, never trips a read timeout on its own; this bounds the whole wait.
        limit = asyncio.timeout(budget)
        try:
            async with limit:
                stream = _ChatStream(
                    self._client.chat.completions.with_streaming_response.create(
                        **params, stream=True, stream_options={"include_usage": True}
                    )
                )
                await stream.open()
                try:
                    seen: list[_Chunk] = []
                    while True:
                        try:
                            chunk = await stream.__anext__()
                        except StopAsyncIteration:
                            raise _IncompleteStream() from None
                        seen.append(chunk)
                        if chunk.usage is not None or any(
                            choice.text or choice.finish_reason for choice in chunk.choices or ()
                        ):
                            return stream, seen
                except BaseException:
                    await stream.close()
                    raise
        except TimeoutError:
            if limit.expired():
                raise _NoFirstToken(round(budget, 3)) from None
            raise

    async def stream_chat(
        self, messages: Sequence[ChatMessage], *, max_tokens: int = 800
    ) -> AsyncGenerator[ChatDelta, None]:
        """Stream a chat completion; the last delta carries ``finish_reason`` and usage.

        A generator: ``aclose()`` it (``contextlib.aclosing``) when stopping early.
        """
        params = self._chat_params(messages, max_tokens)
        loop = asyncio.get_running_loop()
        total = self.settings.provider_generation_timeout
        deadline = loop.time() + total
        (stream, first), ticket = await self._call(
            "chat", lambda: self._open_stream(params, deadline), deadline=deadline, hold=True
        )
        verdict = functools.partial(self._verdict, "chat", ticket)
        pieces: list[str] = []
        finish_reason: str | None = None
        usage: Usage | None = None
        try:
            chunks: list[_Chunk] = first
            while True:
                for chunk in chunks:
                    if chunk.usage is not None:
                        usage = Usage(
                            prompt_tokens=chunk.usage.prompt_tokens,
                            completion_tokens=chunk.usage.completion_tokens,
                        )
                    for choice in chunk.choices or ():
                        if text := choice.text:
                            pieces.append(text)
                            yield ChatDelta(text)
                        if choice.finish_reason:
                            finish_reason = choice.finish_reason
                # Time spent by the consumer between pieces is not the provider's.
                remaining = deadline - loop.time()
                gap = min(self.settings.provider_stream_gap_timeout, remaining)
                if gap <= 0:
                    raise self._stalled(pieces, total, whole=True)
                limit = asyncio.timeout(gap)
                try:
                    async with limit:
                        chunks = [await stream.__anext__()]
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if not limit.expired():
                        raise
                    whole = gap < self.settings.provider_stream_gap_timeout
                    raise self._stalled(pieces, total if whole else gap, whole=whole) from None
        except openai.OpenAIError as exc:
            await verdict(False)
            interrupted = f"OpenAI chat stream interrupted after {len(pieces)} pieces"
            raise ProviderUnavailable(
                f"{interrupted}: {_describe(exc)}",
                details=_details("chat", exc, None) | {"pieces": len(pieces)},
                public=f"{interrupted}: {_describe(exc, public=True)}",
            ) from exc
        except ProviderUnavailable:
            await verdict(False)
            raise
        except BaseException:
            # An early stop by the consumer (GeneratorExit), a cancellation: no verdict on
            # the provider either way, but a probe gives its place up.
            await verdict(None)
            raise
        finally:
            # Also on an early stop by the consumer: free the connection.
            await stream.close()
        if finish_reason is None:
            await verdict(False)
            raise ProviderUnavailable(
                f"OpenAI chat stream interrupted after {len(pieces)} pieces: "
                "it ended without a finish_reason",
                details={
                    "provider": "openai",
                    "operation": "chat",
                    "reason": "incomplete",
                    "pieces": len(pieces),
                },
            )
        await verdict(True)  # a finished stream, and only that, is a success
        if usage is None:
            # Some compatible servers ignore include_usage: estimate rather than report 0.
            usage = Usage(
                prompt_tokens=sum(count_tokens(m.content) for m in messages),
                completion_tokens=count_tokens("".join(pieces)),
            )
        metrics.provider_tokens(self.chat_model, usage.prompt_tokens, usage.completion_tokens)
        yield ChatDelta("", finish_reason=finish_reason, usage=usage)

    @staticmethod
    def _stalled(pieces: list[str], seconds: float, *, whole: bool) -> ProviderUnavailable:
        """A stream that went silent midway, or ran past the whole generation's limit."""
        if whole:
            message = f"OpenAI chat generation took longer than {seconds:g}s"
            reason = "generation_timeout"
        else:
            message = f"OpenAI chat stream stalled: no chunk for {seconds:g}s"
            reason = "timeout"
        return ProviderUnavailable(
            f"{message} (interrupted after {len(pieces)} pieces)",
            details={
                "provider": "openai",
                "operation": "chat",
                "reason": reason,
                "pieces": len(pieces),
            },
        )
