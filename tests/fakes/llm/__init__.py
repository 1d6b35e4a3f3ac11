"""Fake LLM APIs on 127.0.0.1: OpenAI Chat Completions and Anthropic Messages, in their real wire formats.

Each fake is an HTTP/1.1 server in a thread of its own, so sync tests, async tests and the end-to-end stack (whose
services run as separate processes) reach it alike. A test scripts the answers in order with :meth:`script`; when
the script is empty the fake answers plain text (or what its ``responder`` says). Every request is recorded with its
parsed JSON body, so a test can check exactly what left the platform. Like the real APIs, a fake refuses a request
the real one would refuse (a tool result without its call, roles out of turn, a null content, which llama.cpp's
server refuses), so a mistake in a wire format fails here first.

    python -m tests.fakes.llm --port 8089 [--provider anthropic]

serves a fake that calls the first offered tool, with example arguments from its schema, unless the last message
already is a tool's result, and answers text otherwise.
"""

from tests.fakes.llm.anthropic import FakeAnthropic
from tests.fakes.llm.openai import FakeOpenAI
from tests.fakes.llm.responders import tool_then_text
from tests.fakes.llm.script import (
    DEFAULT_TEXT,
    Answer,
    Call,
    CutShort,
    Delay,
    HttpError,
    Linger,
    Malformed,
    Received,
    Reply,
    StreamError,
)
from tests.fakes.llm.server import FakeLlm

__all__ = [
    "DEFAULT_TEXT",
    "Answer",
    "Call",
    "CutShort",
    "Delay",
    "FakeAnthropic",
    "FakeLlm",
    "FakeOpenAI",
    "HttpError",
    "Linger",
    "Malformed",
    "Received",
    "Reply",
    "StreamError",
    "tool_then_text",
]
