"""The OpenAI Chat Completions wire format (OpenAI, and vLLM, Ollama, llama.cpp and most gateways).

https://platform.openai.com/docs/api-reference/chat: ``tools`` offered as functions, ``tool_calls`` answered, tool
results sent back as ``role: tool`` messages; streamed as ``data:`` chunks ending with ``data: [DONE]``.
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

__all__ = ["OpenAIProvider"]

NAME = "openai"
# What the provider writes itself: a parameter of the same name cannot replace it.
_OWN_KEYS = frozenset({"model", "messages", "tools", "stream", "stream_options"})


class OpenAIProvider:
    """Chat Completions: one POST per turn, streamed when the request says so."""

    name: str = NAME

    async def complete(
        self, request: ModelRequest, http: GuardedHttpClient, on_delta: OnDelta | None = None
    ) -> ModelTurn:
        headers = {"Authorization": f"Bearer {request.api_key}"} if request.api_key else {}
        return await exchange(
            http,
            request,
            provider=NAME,
            headers=headers,
            body=request_body(request),
            key_header="Authorization",
            parse=lambda body: _parse_whole(body, request.model),
            parse_stream=lambda events: _parse_stream(events, request.model, request.api_key, on_delta),
        )


def request_body(request: ModelRequest) -> dict[str, Any]:
    """The JSON body of a Chat Completions request."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.extend(_wire_message(message) for message in request.messages)
    body: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": tool.name, "description": tool.description, "parameters": tool.input_schema},
            }
            for tool in request.tools
        ]
    body.update((k, v) for k, v in request.parameters.items() if k not in _OWN_KEYS)
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # else a streamed answer does not say what it cost
    return body


def _wire_message(message: Message) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.role == "assistant" and message.tool_calls:
        return {
            "role": "assistant",
            "content": message.content,  # "" rather than null: llama.cpp's server refuses a null content
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
                for call in message.tool_calls
            ],
        }
    return {"role": message.role, "content": message.content}


# The answer, as far as we read it. Unknown fields are ignored: servers add their own.


class _Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Function(BaseModel):
    name: str = ""
    # A string of JSON by the specification; a few compatible servers send the object itself.
    arguments: str | dict[str, Any] | None = None


class _ToolCall(BaseModel):
    id: str = ""
    function: _Function


class _Message(BaseModel):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Choice(BaseModel):
    message: _Message
    finish_reason: str | None = None


class _Completion(BaseModel):
    model: str = ""
    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage | None = None


class _ToolCallDelta(BaseModel):
    index: int | None = None
    id: str | None = None
    function: _Function | None = None


class _Delta(BaseModel):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _ChunkChoice(BaseModel):
    index: int = 0
    delta: _Delta = Field(default_factory=_Delta)
    finish_reason: str | None = None


class _StreamError(BaseModel):
    type: str | None = None
    message: str = ""


class _Chunk(BaseModel):
    model: str = ""
    choices: list[_ChunkChoice] = Field(default_factory=list)
    usage: _Usage | None = None
    error: _StreamError | None = None  # an error after the answer began (OpenAI, vLLM and llama.cpp send one)


def _arguments(value: str | dict[str, Any] | None) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    return value or ""


def _parse_whole(body: bytes, model: str) -> ModelTurn:
    try:
        completion = _Completion.model_validate_json(body)
    except ValidationError as exc:
        raise malformed(NAME, "a chat completion", exc) from None
    choice = completion.choices[0]
    calls = tuple(
        ToolCall(id=call.id, name=call.function.name, arguments_json=_arguments(call.function.arguments))
        for call in choice.message.tool_calls or ()
    )
    usage = completion.usage or _Usage()
    return ModelTurn(
        message=Message(role="assistant", content=choice.message.content or "", tool_calls=calls),
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
        stop_reason=choice.finish_reason or "",
        model=completion.model or model,
    )


class _CallBeingBuilt:
    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.arguments: list[str] = []


async def _parse_stream(
    events: AsyncIterator[ServerSentEvent], model: str, key: str | None, on_delta: OnDelta | None
) -> ModelTurn:
    text: list[str] = []
    calls: dict[int, _CallBeingBuilt] = {}
    usage = _Usage()
    stop_reason = ""
    async for event in events:
        if event.data.strip() == "[DONE]":
            break
        try:
            chunk = _Chunk.model_validate_json(event.data)
        except ValidationError as exc:
            raise malformed(NAME, "a chat completion chunk", exc) from None
        if chunk.error is not None:
            raise stream_failure(NAME, chunk.error.type or "", chunk.error.message, key, transient=True)
        model = chunk.model or model
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # n > 1 asks for several answers; a turn is the first
            stop_reason = choice.finish_reason or stop_reason
            if choice.delta.content:
                text.append(choice.delta.content)
                if on_delta is not None:
                    await on_delta(choice.delta.content)
            for position, delta in enumerate(choice.delta.tool_calls or ()):
                # The id and name come in a call's first delta, its arguments in pieces after; a server that repeats
                # them in later deltas must not have them doubled.
                call = calls.setdefault(delta.index if delta.index is not None else position, _CallBeingBuilt())
                call.id = call.id or (delta.id or "")
                if delta.function is not None:
                    call.name = call.name or delta.function.name
                    call.arguments.append(_arguments(delta.function.arguments))
    else:
        raise ProviderError(f"{NAME}'s stream ended before it was complete", transient=True)
    return ModelTurn(
        message=Message(
            role="assistant",
            content="".join(text),
            tool_calls=tuple(
                ToolCall(id=call.id, name=call.name, arguments_json="".join(call.arguments))
                for _, call in sorted(calls.items())
            ),
        ),
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
        stop_reason=stop_reason,
        model=model,
    )
