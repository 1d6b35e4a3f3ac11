"""What every provider does the same way around its own wire format: send the turn, map a refusal to
:class:`~services.integrator.llm.base.ProviderError`, and read Server-Sent Events.

A provider supplies the body, its headers, and two parsers (a whole answer, a stream of events); this module owns
the rules that must not differ between providers: which statuses are worth retrying, what an error message may
quote (never the key, never a header), and where the deadline applies.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from altan.errors import AltanError
from altan.outbound import GuardedHttpClient
from services.integrator.llm.base import ModelRequest, ModelTurn, ProviderError

__all__ = [
    "ServerSentEvent",
    "api_error",
    "exchange",
    "is_transient",
    "malformed",
    "redact",
    "server_sent_events",
    "stream_failure",
]

# The API's own words are quoted up to this length: enough to act on, too little to carry a whole echoed request.
_QUOTE_LIMIT = 300
# Any piece of the key this long that an API echoes back ("sk-abc1***wxyz") is hidden as well as the whole key.
_KEY_PIECE = 6
_WORD = re.compile(r"[A-Za-z0-9_\-]+")
_REDACTED = "[redacted]"
# How long a stream whose answer is complete may take to end, so that its connection can be reused; and how much of the
# turn's time must be left for trying (the turn's own timeouts start a little before this module's clock).
_DRAIN_SECONDS = 0.1
_DRAIN_MARGIN = 0.05


@dataclass(frozen=True)
class ServerSentEvent:
    event: str  # "message" when the server named none
    data: str


def is_transient(status: int) -> bool:
    """Worth asking again: a timeout, a conflict, too many requests, or the server's own failure (529 included)."""
    return status in (408, 409, 429) or 500 <= status <= 599


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` or any long enough piece of it."""
    if not secret:
        return text
    text = text.replace(secret, _REDACTED)
    return _WORD.sub(lambda m: _REDACTED if len(m[0]) >= _KEY_PIECE and m[0] in secret else m[0], text)


def quote(text: str, secret: str | None) -> str:
    """An API's own words, safe to put in an error: one line, without the key, at most 300 characters."""
    one_line = " ".join(redact(text, secret).split())
    return one_line if len(one_line) <= _QUOTE_LIMIT else one_line[: _QUOTE_LIMIT - 1] + "…"


def _api_words(body: bytes) -> tuple[str, str]:
    """(type, message) from the error bodies APIs send: ``{"error": {"type", "message"}}`` (OpenAI, Anthropic,
    llama.cpp), ``{"error": "..."}`` (Ollama), ``{"type", "message"}`` (vLLM). Anything else is not quoted: an HTML
    page from a proxy, or a debugging server's echo of the request, could hold the headers."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return "", ""
    if not isinstance(parsed, dict):
        return "", ""
    error = parsed.get("error", parsed)
    if isinstance(error, str):
        return "", error
    if not isinstance(error, dict):
        return "", ""
    kind, message = error.get("type"), error.get("message")
    return (kind if isinstance(kind, str) else ""), (message if isinstance(message, str) else "")


def api_error(
    provider: str, status: int, body: bytes, headers: dict[str, str], retry_after: float | None, secret: str | None
) -> ProviderError:
    """The error for an answer with status >= 400."""
    kind, message = _api_words(body)
    text = f"{provider} answered {status}"
    if kind:
        text += f" ({quote(kind, secret)[:60]})"
    if message:
        text += f": {quote(message, secret)}"
    # OpenAI's own SDK reads retry-after-ms before Retry-After: it is the more precise of the two.
    try:
        milliseconds = float(headers.get("retry-after-ms", ""))
    except ValueError:
        pass
    else:
        if 0 <= milliseconds < float("inf"):
            retry_after = milliseconds / 1000
    return ProviderError(text, status=status, transient=is_transient(status), retry_after=retry_after)


def stream_failure(provider: str, kind: str, message: str, secret: str | None, *, transient: bool) -> ProviderError:
    """The error for an error event that arrived after the answer began (its status was 200)."""
    text = f"{provider} failed while answering"
    if kind:
        text += f" ({quote(kind, secret)[:60]})"
    return ProviderError(f"{text}: {quote(message, secret)}", transient=transient)


def malformed(provider: str, what: str, exc: ValidationError | None = None) -> ProviderError:
    """The error for an answer that is not what the API documents. Quotes where the body went wrong, never the
    value found there."""
    text = f"{provider} answered something that is not {what}"
    if exc is not None:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        text += f" ({where + ': ' if where else ''}{first['msg'][:100]})"
    return ProviderError(text)


async def server_sent_events(lines: AsyncIterator[str]) -> AsyncGenerator[ServerSentEvent, None]:
    """The events of a ``text/event-stream`` body, as the HTML standard reads them: ``event:`` names the next
    event, ``data:`` lines join with a newline, a blank line dispatches, a line starting with ``:`` is a comment.
    An event the body ends in the middle of is dropped, as the standard says."""
    event = ""
    data: list[str] = []
    try:
        async for line in lines:
            if not line:
                if data:
                    yield ServerSentEvent(event or "message", "\n".join(data))
                event, data = "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    finally:
        close = getattr(lines, "aclose", None)  # a generator left early is closed now, not when collected
        if close is not None:
            await close()


WholeParser = Callable[[bytes], ModelTurn]
StreamParser = Callable[[AsyncIterator[ServerSentEvent]], Awaitable[ModelTurn]]


async def exchange(
    http: GuardedHttpClient,
    request: ModelRequest,
    *,
    provider: str,
    headers: dict[str, str],
    body: dict[str, Any],
    key_header: str,
    parse: WholeParser,
    parse_stream: StreamParser,
) -> ModelTurn:
    """POST ``body`` to the request's endpoint and parse the answer, whole or streamed, within ``request.timeout``.

    ``key_header`` names the header that carries the key, so that a redirect to another host drops it. The HTTP
    client's own errors (EgressRefused, Unavailable, FailedPrecondition) pass through unchanged.
    """
    deadline = asyncio.get_running_loop().time() + request.timeout
    common: dict[str, Any] = {
        "headers": headers,
        "json": body,
        "timeout": request.timeout,
        "sensitive_headers": (key_header,),
    }
    if not request.stream:
        result = await http.request("POST", request.endpoint, **common)
        if result.status >= 400:
            raise api_error(provider, result.status, result.body, result.headers, result.retry_after, request.api_key)
        return parse(result.body)
    async with http.stream("POST", request.endpoint, **common) as response:
        if response.status >= 400:
            answer = await response.read()
            raise api_error(provider, response.status, answer, response.headers, response.retry_after, request.api_key)
        async with aclosing(server_sent_events(response.lines())) as events:
            turn = await parse_stream(events)
            await _drain(events, deadline - asyncio.get_running_loop().time())
            return turn


async def _drain(events: AsyncIterator[ServerSentEvent], remaining: float) -> None:
    """Read what a finished stream still sends (the blank line after ``[DONE]``, the end of the chunked body).

    The parsers stop at the answer's last event, before the body's end; a response closed before its end cannot go
    back to the pool, so every streamed turn would open a new connection (and a TLS handshake on a real endpoint).
    Servers end the body right after that event; one that does not is given up on after a moment (its connection
    closed, as before), always within the turn's deadline, so that a complete answer is never lost to the wait.
    """
    grace = min(_DRAIN_SECONDS, remaining - _DRAIN_MARGIN)
    if grace <= 0:
        return
    try:
        async with asyncio.timeout(grace):
            async for _ in events:
                pass
    except (TimeoutError, ProviderError, AltanError):
        pass  # the answer is complete: whatever goes wrong after it only costs the connection
