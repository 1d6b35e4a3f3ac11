"""What a test scripts a fake LLM API to answer, and what the fake records of each request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_TEXT",
    "Answer",
    "Call",
    "CutShort",
    "Delay",
    "HttpError",
    "Linger",
    "Malformed",
    "Received",
    "Reply",
    "StreamError",
]

DEFAULT_TEXT = "This is the fake model's answer."


@dataclass(frozen=True)
class Call:
    """A tool call the model makes. ``arguments`` as a string is sent as written: it may not even be JSON."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str = ""  # "": derived from the call, so the same script gives the same ids, streamed or not


@dataclass(frozen=True)
class Reply:
    """A successful answer: text, tool calls, or both."""

    text: str = ""
    calls: tuple[Call, ...] = ()
    stop_reason: str = ""  # "": what the API says for such an answer ("stop"/"tool_calls", "end_turn"/"tool_use")
    usage: tuple[int, int] | None = None  # (input, output) tokens; None: estimated from the request and the answer


@dataclass(frozen=True)
class HttpError:
    """An error status with the API's error body (``{"error": {"type", "message"}}``)."""

    status: int
    message: str = "the fake was told to fail"
    error_type: str = ""  # "": the API's usual type for the status
    headers: dict[str, str] = field(default_factory=dict)  # e.g. {"Retry-After": "7"}


@dataclass(frozen=True)
class Malformed:
    """A body that is not what the API documents; streamed, it is the data of the stream's first event."""

    body: bytes = b'{"choices": [ this is not JSON'
    status: int = 200
    content_type: str = "application/json"


@dataclass(frozen=True)
class CutShort:
    """An answer that stops early. Streamed: after ``after`` events, the connection drops (``clean``: the HTTP body
    ends properly, only the stream's last events are missing). Whole: the connection drops halfway through."""

    reply: Reply = Reply(text="An answer that will not reach its end, however long it is.")
    after: int = 2
    clean: bool = False


@dataclass(frozen=True)
class StreamError:
    """An error event after ``after`` events of the stream. A request that is not streamed gets the HTTP error the
    API would send instead (529 for ``overloaded_error``, else 500)."""

    error_type: str = "overloaded_error"
    message: str = "Overloaded"
    after: int = 1
    reply: Reply = Reply(text="The start of an answer that an error interrupts.")


@dataclass(frozen=True)
class Delay:
    """Wait before answering."""

    seconds: float
    then: Answer = Reply(text=DEFAULT_TEXT)


@dataclass(frozen=True)
class Linger:
    """A streamed answer whose body stays open ``seconds`` after its last event before it ends, as a slow proxy might
    hold it. A request that is not streamed gets the reply at once."""

    reply: Reply = Reply(text=DEFAULT_TEXT)
    seconds: float = 5.0


Answer = Reply | HttpError | Malformed | CutShort | StreamError | Delay | Linger


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lowercase names
    body: Any  # the parsed JSON; None when the body is not JSON
    raw: bytes
    peer: tuple[str, int] = ("", 0)  # the client's address and port: the same for requests on one connection
