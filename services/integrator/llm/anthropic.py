"""The Anthropic Messages wire format.

https://docs.anthropic.com/en/api/messages: the answer is a list of content blocks (``text``, ``tool_use``); tool
results go back as ``tool_result`` blocks in a user message; streamed as named events from ``message_start`` to
``message_stop``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from altan.outbound import GuardedHttpClient
from services.integrator.llm._wire import ServerSentEvent, exchange, malformed, stream_failure
from services.integrator.llm.base import (
    Message,
    ModelRequest,
    ModelTurn,
    OnDelta,
    ProviderError,
    ToolCall,
    Usage,
)

__all__ = ["API_VERSION", "DEFAULT_MAX_TOKENS", "AnthropicProvider"]

NAME = "anthropic"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # the API has no default and refuses a request without one
# What the provider writes itself: a parameter of the same name cannot replace it (max_tokens can).
_OWN_KEYS = frozenset({"model", "messages", "system", "tools", "stream"})
# Error events that asking again cannot fix; any other (overloaded_error, api_error, rate_limit_error, a type
# added later) is the server's trouble, worth a retry.
_PERMANENT_ERRORS = frozenset(
    {"invalid_request_error", "authentication_error", "permission_error", "not_found_error", "request_too_large"}
)


class AnthropicProvider:
    """Messages: one POST per turn, streamed when the request says so."""

    name: str = NAME

    async def complete(
        self, request: ModelRequest, http: GuardedHttpClient, on_delta: OnDelta | None = None
    ) -> ModelTurn:
        headers = {"anthropic-version": API_VERSION}
        if request.api_key:
            headers["x-api-key"] = request.api_key
        return await exchange(
            http,
            request,
            provider=NAME,
            headers=headers,
            body=request_body(request),
            key_header="x-api-key",
            parse=lambda body: _parse_whole(body, request.model),
            parse_stream=lambda events: _parse_stream(events, request.model, request.api_key, on_delta),
        )


def request_body(request: ModelRequest) -> dict[str, Any]:
    """The JSON body of a Messages request."""
    body: dict[str, Any] = {"model": request.model, "max_tokens": DEFAULT_MAX_TOKENS}
    if request.system:
        body["system"] = request.system
    body["messages"] = wire_messages(request.messages)
    if request.tools:
        body["tools"] = [
            {"name": tool.name, "description": tool.description, "input_schema": tool.input_schema}
            for tool in request.tools
        ]
    body.update((k, v) for k, v in request.parameters.items() if k not in _OWN_KEYS)
    if request.stream:
        body["stream"] = True
    return body


def wire_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """The conversation as the API takes it: roles alternate, so messages of the same role in a row (the results of
    one turn's tool calls, and any user text after them) become one message of several blocks."""
    merged: list[tuple[str, list[dict[str, Any]]]] = []
    for message in messages:
        role, blocks = _blocks(message)
        if merged and merged[-1][0] == role:
            merged[-1][1].extend(blocks)
        else:
            merged.append((role, blocks))
    out: list[dict[str, Any]] = []
    for role, blocks in merged:
        if not blocks:
            out.append({"role": role, "content": ""})
        elif len(blocks) == 1 and blocks[0]["type"] == "text":
            out.append({"role": role, "content": blocks[0]["text"]})  # the plain form, as most clients send it
        else:
            out.append({"role": role, "content": blocks})
    return out


def _blocks(message: Message) -> tuple[str, list[dict[str, Any]]]:
    if message.role == "tool":
        result = {
            "type": "tool_result",
            "tool_use_id": message.tool_call_id,
            "content": message.content,
            "is_error": message.is_error,
        }
        return "user", [result]
    # The API refuses an empty text block; a message of tool calls alone has none.
    blocks: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    if message.role == "assistant":
        blocks.extend(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": _input(call.arguments_json)}
            for call in message.tool_calls
        )
    return message.role, blocks


def _input(arguments_json: str) -> dict[str, Any]:
    """A tool call's input must be an object: arguments that are not the text of one are sent as ``{}``."""
    try:
        value = json.loads(arguments_json)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


# The answer, as far as we read it. Unknown fields, block types and event types are ignored, as the API asks.


class _Usage(BaseModel):
    input_tokens: int | None = None
    output_tokens: int | None = None


class _Block(BaseModel):
    type: str
    text: str = ""
    id: str = ""
    name: str = ""
    input: Any = None


class _Message(BaseModel):
    model: str = ""
    content: list[_Block]
    stop_reason: str | None = None
    usage: _Usage = Field(default_factory=_Usage)


class _Delta(BaseModel):
    type: str = ""
    text: str = ""
    partial_json: str = ""
    stop_reason: str | None = None


class _Error(BaseModel):
    type: str = ""
    message: str = ""


class _Event(BaseModel):
    type: str
    index: int = 0
    message: _Message | None = None  # message_start
    content_block: _Block | None = None  # content_block_start
    delta: _Delta | None = None  # content_block_delta, message_delta
    usage: _Usage | None = None  # message_delta
    error: _Error | None = None  # error


def _tool_call(block: _Block, value: Any) -> ToolCall:
    return ToolCall(id=block.id, name=block.name, arguments_json=json.dumps({} if value is None else value))


def _parse_whole(body: bytes, model: str) -> ModelTurn:
    try:
        answer = _Message.model_validate_json(body)
    except ValidationError as exc:
        raise malformed(NAME, "a message", exc) from None
    return ModelTurn(
        message=Message(
            role="assistant",
            content="".join(block.text for block in answer.content if block.type == "text"),
            tool_calls=tuple(_tool_call(block, block.input) for block in answer.content if block.type == "tool_use"),
        ),
        usage=Usage(input_tokens=answer.usage.input_tokens or 0, output_tokens=answer.usage.output_tokens or 0),
        stop_reason=answer.stop_reason or "",
        model=answer.model or model,
    )


async def _parse_stream(
    events: AsyncIterator[ServerSentEvent], model: str, key: str | None, on_delta: OnDelta | None
) -> ModelTurn:
    blocks: dict[int, _Block] = {}
    pieces: dict[int, list[str]] = {}  # the text, or the input's JSON, of each block as it arrives
    usage = _Usage(input_tokens=0, output_tokens=0)
    stop_reason = ""
    async for sse in events:
        try:
            event = _Event.model_validate_json(sse.data)
        except ValidationError as exc:
            raise malformed(NAME, f"a {sse.event} event", exc) from None
        if event.type == "message_start" and event.message is not None:
            model = event.message.model or model
            usage = _merge(usage, event.message.usage)
        elif event.type == "content_block_start" and event.content_block is not None:
            blocks[event.index] = event.content_block
            pieces[event.index] = []
        elif event.type == "content_block_delta" and event.delta is not None and event.index in pieces:
            if event.delta.type == "text_delta" and event.delta.text:
                pieces[event.index].append(event.delta.text)
                if on_delta is not None:
                    await on_delta(event.delta.text)
            elif event.delta.type == "input_json_delta":
                pieces[event.index].append(event.delta.partial_json)
        elif event.type == "message_delta":
            if event.delta is not None:
                stop_reason = event.delta.stop_reason or stop_reason
            if event.usage is not None:
                usage = _merge(usage, event.usage)
        elif event.type == "message_stop":
            break
        elif event.type == "error":
            error = event.error or _Error()
            transient = error.type not in _PERMANENT_ERRORS
            raise stream_failure(NAME, error.type, error.message, key, transient=transient)
    else:
        raise ProviderError(f"{NAME}'s stream ended before it was complete", transient=True)
    text: list[str] = []
    calls: list[ToolCall] = []
    for index, block in sorted(blocks.items()):
        if block.type == "text":
            text.append(block.text + "".join(pieces[index]))
        elif block.type == "tool_use":
            calls.append(_streamed_call(block, "".join(pieces[index])))
    return ModelTurn(
        message=Message(role="assistant", content="".join(text), tool_calls=tuple(calls)),
        usage=Usage(input_tokens=usage.input_tokens or 0, output_tokens=usage.output_tokens or 0),
        stop_reason=stop_reason,
        model=model,
    )


def _merge(usage: _Usage, update: _Usage) -> _Usage:
    """Counts in a later event are running totals: each replaces the one before, a missing one keeps it."""
    return _Usage(
        input_tokens=usage.input_tokens if update.input_tokens is None else update.input_tokens,
        output_tokens=usage.output_tokens if update.output_tokens is None else update.output_tokens,
    )


def _streamed_call(block: _Block, partial_json: str) -> ToolCall:
    """A tool_use block from its streamed pieces, written as the same text as a whole answer's ``json.dumps``."""
    if not partial_json:  # a tool without arguments streams none
        return _tool_call(block, block.input)
    try:
        value = json.loads(partial_json)
    except (ValueError, RecursionError):
        return ToolCall(id=block.id, name=block.name, arguments_json=partial_json)  # as the model wrote it
    return _tool_call(block, value)
