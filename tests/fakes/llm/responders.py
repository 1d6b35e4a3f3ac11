"""Answers chosen from the request, for a fake that runs without a script (the README, the benchmarks)."""

from __future__ import annotations

from typing import Any

from tests.fakes.llm.script import DEFAULT_TEXT, Answer, Call, Received, Reply

__all__ = ["tool_then_text"]


def tool_then_text(received: Received) -> Answer:
    """Call the first offered tool unless the last message is already a tool's result; then answer text."""
    body = received.body if isinstance(received.body, dict) else {}
    tools = body.get("tools") or []
    messages = body.get("messages") or [{}]
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    content = last.get("content")
    answered = last.get("role") == "tool" or (
        isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
    )
    if not tools or answered:
        return Reply(text=DEFAULT_TEXT)
    tool = tools[0].get("function", tools[0])  # OpenAI nests the function; Anthropic does not
    schema = tool.get("parameters") or tool.get("input_schema") or {}
    return Reply(calls=(Call(tool["name"], _example(schema)),))


def _example(schema: dict[str, Any]) -> dict[str, Any]:
    """Arguments that satisfy the required properties of a simple schema."""
    by_type: dict[str, Any] = {"string": "example", "integer": 1, "number": 1.0, "boolean": True, "array": []}
    properties = schema.get("properties") or {}
    arguments: dict[str, Any] = {}
    for name in schema.get("required") or []:
        spec = properties.get(name) or {}
        if "enum" in spec:
            arguments[name] = spec["enum"][0]
        elif "default" in spec:
            arguments[name] = spec["default"]
        elif spec.get("type") == "object":
            arguments[name] = _example(spec)
        else:
            arguments[name] = by_type.get(spec.get("type", "string"), "example")
    return arguments
