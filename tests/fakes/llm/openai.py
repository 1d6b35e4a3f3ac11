"""A fake OpenAI Chat Completions API: ``POST /v1/chat/completions``, whole or streamed as ``data:`` chunks."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from tests.fakes.llm.script import HttpError, Received, Reply
from tests.fakes.llm.server import FakeLlm, arguments_text, call_id, dumps, pieces, usage_of

__all__ = ["FakeOpenAI"]


class FakeOpenAI(FakeLlm):
    """``POST /v1/chat/completions``."""

    path = "/v1/chat/completions"
    provider = "openai"

    def check(self, received: Received) -> HttpError | None:
        given = received.headers.get("authorization", "")
        if self.api_key is not None and given != f"Bearer {self.api_key}":
            if not given:
                return HttpError(401, "You didn't provide an API key.", "invalid_request_error")
            return HttpError(401, f"Incorrect API key provided: {_mask(given)}.", "invalid_request_error")
        return _check_openai(received.body)

    def error_body(self, status: int, message: str, error_type: str) -> dict[str, Any]:
        kind = error_type or (
            "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
        )
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def whole(self, reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None}
        if reply.calls:
            message["tool_calls"] = [
                {
                    "id": call_id("call_", call, i),
                    "type": "function",
                    "function": {"name": call.name, "arguments": arguments_text(call)},
                }
                for i, call in enumerate(reply.calls)
            ]
        return {
            **self._envelope("chat.completion", request),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self._stop(reply)}],
            "usage": _usage(reply, request),
        }

    def events(self, reply: Reply, request: dict[str, Any]) -> list[bytes]:
        with_usage = (request.get("stream_options") or {}).get("include_usage") is True
        envelope = self._envelope("chat.completion.chunk", request)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**envelope, "choices": [choice], **({"usage": None} if with_usage else {})}

        chunks = [chunk({"role": "assistant", "content": "", "refusal": None})]
        chunks += [chunk({"content": piece}) for piece in pieces(reply.text)]
        for i, call in enumerate(reply.calls):
            first = {"index": i, "id": call_id("call_", call, i), "type": "function"}
            chunks.append(chunk({"tool_calls": [{**first, "function": {"name": call.name, "arguments": ""}}]}))
            chunks += [
                chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                for piece in pieces(arguments_text(call), 8)
            ]
        chunks.append(chunk({}, self._stop(reply)))
        if with_usage:
            chunks.append({**envelope, "choices": [], "usage": _usage(reply, request)})
        return [b"data: %s\n\n" % dumps(c) for c in chunks] + [b"data: [DONE]\n\n"]

    def error_event(self, error_type: str, message: str) -> bytes:
        return b"data: %s\n\n" % dumps({"error": {"message": message, "type": error_type, "param": None, "code": None}})

    def raw_event(self, data: bytes) -> bytes:
        return b"data: %s\n\n" % data

    def _envelope(self, kind: str, request: dict[str, Any]) -> dict[str, Any]:
        seed = hashlib.sha256(dumps(request.get("messages"))).hexdigest()[:24]
        created = int(time.time())
        return {"id": f"chatcmpl-{seed}", "object": kind, "created": created, "model": request.get("model", "")}

    @staticmethod
    def _stop(reply: Reply) -> str:
        return reply.stop_reason or ("tool_calls" if reply.calls else "stop")


def _usage(reply: Reply, request: dict[str, Any]) -> dict[str, int]:
    tokens_in, tokens_out = usage_of(reply, request)
    return {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out}


def _mask(header: str) -> str:
    key = header.removeprefix("Bearer ")
    return key[:3] + "*" * 4 + key[-4:] if len(key) > 8 else "*" * len(key)


def _check_openai(body: Any) -> HttpError | None:
    def bad(message: str) -> HttpError:
        return HttpError(400, message, "invalid_request_error")

    if not isinstance(body, dict):
        return bad("We could not parse the JSON body of your request.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return bad("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return bad("[] is too short - 'messages'")
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function" or not function.get("name"):
            return bad("Missing required parameter: 'tools[0].function'.")
    waiting: set[str] = set()  # tool calls of the last assistant message that have no result yet
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            return bad(f"Invalid value: '{role}'. Supported values are: 'system', 'user', 'assistant' and 'tool'.")
        if not isinstance(message.get("content"), str):  # OpenAI accepts null beside tool_calls; llama.cpp does not
            return bad(f"messages[{i}].content must be a string")
        if role == "tool":
            if message.get("tool_call_id") not in waiting:
                return bad(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
                    "'tool_calls'."
                )
            waiting.discard(message["tool_call_id"])
            continue
        if waiting:
            return bad(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(waiting)}"
            )
        for call in message.get("tool_calls") or [] if role == "assistant" else []:
            if not isinstance(call.get("function", {}).get("arguments"), str):
                return bad(f"messages[{i}].tool_calls: function.arguments must be a string")
            waiting.add(call.get("id"))
    return None
