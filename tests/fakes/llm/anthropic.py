"""A fake Anthropic Messages API: ``POST /v1/messages``, whole or streamed as named events."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tests.fakes.llm.script import Call, HttpError, Received, Reply
from tests.fakes.llm.server import FakeLlm, arguments_text, call_id, dumps, pieces, usage_of

__all__ = ["FakeAnthropic"]


class FakeAnthropic(FakeLlm):
    """``POST /v1/messages``."""

    path = "/v1/messages"
    provider = "anthropic"

    def check(self, received: Received) -> HttpError | None:
        if self.api_key is not None and received.headers.get("x-api-key") != self.api_key:
            return HttpError(401, "invalid x-api-key", "authentication_error")
        if "anthropic-version" not in received.headers:
            return HttpError(400, "anthropic-version: header is required", "invalid_request_error")
        return _check_anthropic(received.body)

    def error_body(self, status: int, message: str, error_type: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": error_type or _error_type(status), "message": message}}

    def whole(self, reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
        content += [
            {"type": "tool_use", "id": call_id("toolu_", call, i), "name": call.name, "input": _input(call)}
            for i, call in enumerate(reply.calls)
        ]
        tokens_in, tokens_out = usage_of(reply, request)
        return {
            **self._message(request),
            "content": content,
            "stop_reason": self._stop(reply),
            "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out},
        }

    def events(self, reply: Reply, request: dict[str, Any]) -> list[bytes]:
        tokens_in, tokens_out = usage_of(reply, request)
        start = {**self._message(request), "content": [], "stop_reason": None}
        start["usage"] = {"input_tokens": tokens_in, "output_tokens": 1}
        events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
        index = 0
        if reply.text:
            events.append({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            events.append({"type": "ping"})
            events += [
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
                for piece in pieces(reply.text)
            ]
            events.append({"type": "content_block_stop", "index": 0})
            index = 1
        for i, call in enumerate(reply.calls, start=index):
            block = {"type": "tool_use", "id": call_id("toolu_", call, i - index), "name": call.name, "input": {}}
            events.append({"type": "content_block_start", "index": i, "content_block": block})
            events += [
                {"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": p}}
                for p in ["", *pieces(arguments_text(call), 8)]
            ]
            events.append({"type": "content_block_stop", "index": i})
        stop = {"stop_reason": self._stop(reply), "stop_sequence": None}
        events.append({"type": "message_delta", "delta": stop, "usage": {"output_tokens": tokens_out}})
        events.append({"type": "message_stop"})
        return [b"event: %s\ndata: %s\n\n" % (e["type"].encode(), dumps(e)) for e in events]

    def error_event(self, error_type: str, message: str) -> bytes:
        return b"event: error\ndata: %s\n\n" % dumps(
            {"type": "error", "error": {"type": error_type, "message": message}}
        )

    def raw_event(self, data: bytes) -> bytes:
        return b"event: message_start\ndata: %s\n\n" % data

    def _message(self, request: dict[str, Any]) -> dict[str, Any]:
        seed = hashlib.sha256(dumps(request.get("messages"))).hexdigest()[:24]
        return {"id": f"msg_{seed}", "type": "message", "role": "assistant", "model": request.get("model", "")}

    @staticmethod
    def _stop(reply: Reply) -> str:
        return reply.stop_reason or ("tool_use" if reply.calls else "end_turn")


def _input(call: Call) -> Any:
    return json.loads(call.arguments) if isinstance(call.arguments, str) else call.arguments


def _check_anthropic(body: Any) -> HttpError | None:
    def bad(message: str) -> HttpError:
        return HttpError(400, message, "invalid_request_error")

    if not isinstance(body, dict):
        return bad("There was an issue with the request body: it is not JSON")
    for name, kind in (("model", str), ("max_tokens", int), ("messages", list)):
        if not isinstance(body.get(name), kind):
            return bad(f"{name}: Field required")
    if not isinstance(body.get("system", ""), str | list):
        return bad("system: Input should be a valid list")
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not tool.get("name") or not isinstance(tool.get("input_schema"), dict):
            return bad(f"tools.{i}.custom.input_schema: Field required")
    messages = body["messages"]
    if not messages or messages[0].get("role") != "user":
        return bad('messages: first message must use the "user" role')
    waiting: set[str] = set()  # tool_use ids of the last assistant message
    previous = ""
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            return bad(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if role == previous:
            return bad(
                'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
            )
        previous = role
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            return bad(f"messages.{i}.content: Input should be a valid list")
        answered = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if answered - waiting:
            return bad(
                f"messages.{i}.content: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{', '.join(sorted(map(str, answered - waiting)))}. Each `tool_result` block must have a "
                "corresponding `tool_use` block in the previous message."
            )
        if waiting - answered:
            return bad(
                f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(sorted(waiting - answered))}"
            )
        waiting = set()
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "text" and not block.get("text") and len(blocks) > 1:
                return bad(f"messages.{i}.content.{j}.text: text content blocks must be non-empty")
            if kind == "tool_use":
                if role != "assistant" or not isinstance(block.get("input"), dict):
                    return bad(f"messages.{i}.content.{j}.tool_use.input: Input should be a valid dictionary")
                waiting.add(block.get("id"))
            if kind == "tool_result" and role != "user":
                return bad(f"messages.{i}.content.{j}: tool_result blocks belong in user messages")
    return None


def _error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")
