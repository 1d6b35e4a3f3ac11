"""What every model provider implements, and the plain types a model turn is made of.

A provider turns one :class:`ModelRequest` into the wire format of its API, sends it through the egress-guarded
HTTP client, reads the answer (streamed or not) and returns one :class:`ModelTurn`: the assistant's message (text
and tool calls) and the tokens used. It knows nothing of tenants, credentials, retries or fallbacks: the Integrator
resolves the key, retries and falls back around it. Adding a provider is one module and its tests, plus its name in
:mod:`services.integrator.llm.registry`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from altan.outbound import GuardedHttpClient

__all__ = [
    "Message",
    "ModelProvider",
    "ModelRequest",
    "ModelTurn",
    "OnDelta",
    "ProviderError",
    "ToolCall",
    "ToolSpec",
    "Usage",
]

# Receives each piece of the answer's text as it streams.
OnDelta = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model: its name (the tool id), what it does, and the JSON Schema of its arguments."""

    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class ToolCall:
    """A call the model asked for. ``arguments_json`` is the text the model wrote: it may not even be JSON."""

    id: str
    name: str
    arguments_json: str


@dataclass(frozen=True)
class Message:
    """One message of the conversation.

    ``user``: the tenant's input. ``assistant``: the model's text and the tool calls it asked for. ``tool``: the
    result of one tool call (``tool_call_id`` and the tool's ``name``), as text.
    """

    role: Literal["user", "assistant", "tool"]
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""
    is_error: bool = False  # a tool result that reports a failure (Anthropic marks it; OpenAI reads the text)


@dataclass(frozen=True)
class ModelRequest:
    """One turn asked of one model."""

    model: str  # the provider's model id, e.g. "gpt-4o"
    endpoint: str  # the full URL of the API's endpoint
    api_key: str | None  # None: send no key (a local server)
    system: str  # the agent's instructions; "" for none
    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)  # merged into the body (max_tokens, temperature...)
    stream: bool = False
    timeout: float = 30.0  # seconds for the whole turn, reading included


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class ModelTurn:
    """What the model answered: an assistant :class:`Message`, the tokens it cost, and why it stopped."""

    message: Message
    usage: Usage
    stop_reason: str  # the provider's own words ("stop", "tool_calls", "end_turn", "tool_use", "length", ...)
    model: str  # the model that answered, as the provider names it


class ProviderError(Exception):
    """The API refused or failed the turn. ``transient``: worth retrying (connection errors, 429, 5xx)."""

    def __init__(
        self, message: str, *, status: int = 0, transient: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.transient = transient
        self.retry_after = retry_after


class ModelProvider(Protocol):
    """One wire format (OpenAI Chat Completions, Anthropic Messages, ...)."""

    name: str  # as in an agent's llm.provider: "openai", "anthropic"

    async def complete(
        self, request: ModelRequest, http: GuardedHttpClient, on_delta: OnDelta | None = None
    ) -> ModelTurn:
        """Send one turn and return the model's answer.

        With ``request.stream``, ``on_delta`` receives the answer's text as it arrives. Raises
        :class:`ProviderError` for an answer the API refused or failed (status >= 400, a malformed body, an error
        event in the stream), and lets the HTTP client's own errors (EgressRefused, Unavailable) through. Never puts
        the key anywhere but in the request's headers.
        """
        ...
