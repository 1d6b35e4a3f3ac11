"""A stand-in OpenAI-compatible LLM for benchmarks: ``python bench/mock_llm.py PORT [--delay-ms N]``.

Like ``bench/fake_api.py`` it must cost next to nothing per request, so that the benchmarks measure the stack (or
LiteLLM, or LangGraph) and not the mock: a bare ``asyncio.Protocol`` on HTTP/1.1 keep-alive, in a process of its own so
that its CPU is counted apart. It answers ``POST .../chat/completions`` as the agent benchmarks need:

- while the request offers tools and its last message is not a tool's result, one assistant turn that calls each
  offered tool once (at most ``--max-calls``, in parallel in one turn), with the arguments each one's schema requires;
- otherwise a short text answer.

``"stream": true`` is answered as Server-Sent Events (with a final usage chunk when asked, as OpenAI does), sent in one
write with a Content-Length; every answer comes ``--delay-ms`` after the request, without blocking other requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import Any

TEXT = "Done: both lookups answered."
USAGE = {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}


def _arguments(schema: dict[str, Any]) -> dict[str, Any]:
    by_type: dict[str, Any] = {"string": "example", "integer": 1, "number": 1.0, "boolean": True, "array": []}
    properties = schema.get("properties") or {}
    return {
        name: by_type.get((properties.get(name) or {}).get("type"), "example") for name in schema.get("required") or []
    }


def answer(request: dict[str, Any], max_calls: int) -> tuple[str | None, list[dict[str, Any]]]:
    """The text and the tool calls of the next assistant turn."""
    messages = request.get("messages") or [{}]
    tools = request.get("tools") or []
    if not tools or messages[-1].get("role") == "tool":
        return TEXT, []
    calls = []
    for position, tool in enumerate(tools[:max_calls]):
        function = tool.get("function") or {}
        calls.append(
            {
                "id": f"call_{position}",
                "type": "function",
                "function": {
                    "name": function.get("name"),
                    "arguments": json.dumps(_arguments(function.get("parameters") or {})),
                },
            }
        )
    return None, calls


def whole(model: str, text: str | None, calls: list[dict[str, Any]]) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
        "usage": USAGE,
    }
    return json.dumps(body).encode()


def streamed(model: str, text: str | None, calls: list[dict[str, Any]], usage: bool) -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> bytes:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta or finish else []
        body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model}
        return b"data: " + json.dumps({**body, "choices": choices, **more}).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    if text:
        events += [chunk({"content": word}) for word in re.findall(r"\S+\s*", text)]
    for position, call in enumerate(calls):
        events.append(chunk({"tool_calls": [{"index": position, **call}]}))
    events.append(chunk({}, "tool_calls" if calls else "stop"))
    if usage:
        events.append(chunk({}, usage=USAGE))
    return b"".join(events) + b"data: [DONE]\n\n"


class _Llm(asyncio.Protocol):
    def __init__(self, delay: float, max_calls: int) -> None:
        self._delay, self._max_calls = delay, max_calls
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._writer = asyncio.ensure_future(self._answer_in_order())

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head = self._buffer[:end].decode("latin-1").lower()
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip() == "content-length":
                    length = int(value)
            if len(self._buffer) < end + 4 + length:
                return
            self._queue.put_nowait(self._buffer[end + 4 : end + 4 + length])
            self._buffer = self._buffer[end + 4 + length :]

    async def _answer_in_order(self) -> None:
        while (body := await self._queue.get()) is not None:
            request = json.loads(body or b"{}")
            text, calls = answer(request, self._max_calls)
            model = str(request.get("model", "mock"))
            if request.get("stream"):
                usage = bool((request.get("stream_options") or {}).get("include_usage"))
                payload, kind = streamed(model, text, calls, usage), b"text/event-stream"
            else:
                payload, kind = whole(model, text, calls), b"application/json"
            if self._delay:
                await asyncio.sleep(self._delay)
            if self._transport is None or self._transport.is_closing():
                return
            self._transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: "
                + kind
                + b"\r\ncontent-length: "
                + str(len(payload)).encode()
                + b"\r\n\r\n"
                + payload
            )


async def serve(port: int, delay: float, max_calls: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Llm(delay, max_calls), "127.0.0.1", port, backlog=4096)
    print(f"mock llm listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="time before each answer (default 0)")
    parser.add_argument("--max-calls", type=int, default=2, help="tool calls in one turn at most (default 2)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms / 1000, args.max_calls))
