"""Threads: the conversations that natural-language tasks continue.

A thread belongs to one agent. Its messages are an append-only stream in the state store (Redis when set), so two
tasks of one thread never overwrite each other's messages; each message is a plain dict: ``role`` (user, assistant,
tool), ``content``, ``task_id``, and ``tool_calls`` / ``tool_call_id`` / ``name`` / ``is_error`` where they apply.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from altan.api.convert import now_ms
from altan.errors import FailedPrecondition, InvalidArgument, NotFound
from altan.store import Fence, TenantStore
from altan.wire import new_id

__all__ = ["ThreadStore", "coherent", "fit_to_budget"]

_THREADS = "threads"
MAX_MESSAGES = 10_000  # a thread's stream is trimmed beyond this (the newest are kept)
CHARS_PER_TOKEN = 4  # what a token is estimated at when a thread is fitted to a model's context
_PAGE_BYTES = 1024 * 1024  # a page of GET /v1/threads/{id} stops past this much text (one message at least)


def _messages(thread_id: str) -> str:
    return f"thread:{thread_id}"


class ThreadStore:
    """Threads of the current tenant."""

    def __init__(self, store: TenantStore) -> None:
        self._store = store

    async def open(self, thread_id: str | None, agent_id: str) -> str:
        """The thread a task continues: the one named (created on first use), or a new one."""
        thread_id = thread_id or new_id("thr")
        doc = {"thread_id": thread_id, "agent_id": agent_id, "created_at": now_ms()}
        if not await self._store.put_new(_THREADS, thread_id, doc):
            existing = await self._store.get(_THREADS, thread_id)
            if existing is not None and existing["agent_id"] != agent_id:
                raise FailedPrecondition(
                    f"thread '{thread_id}' is a conversation with agent '{existing['agent_id']}', not this one"
                )
        return thread_id

    async def get(
        self, thread_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
        """The thread, one page of its messages (oldest first) and the token of the next page ("" at the end)."""
        if page_size < 0:
            raise InvalidArgument("page_size: must not be negative")
        after = _decode(page_token)
        thread = await self._store.get(_THREADS, thread_id)
        if thread is None:
            raise NotFound(f"thread '{thread_id}' not found")
        size = min(page_size or 100, 500)
        page = await self._store.read(_messages(thread_id), after=after, count=size + 1)
        messages: list[dict[str, Any]] = []
        total = 0
        for seq, message in page[:size]:
            total += len(json.dumps(message))
            if messages and total > _PAGE_BYTES:
                return thread, messages, _encode(after)
            messages.append(message)
            after = seq
        return thread, messages, _encode(after) if len(page) > size else ""

    async def recent(self, thread_id: str, budget_tokens: int) -> list[dict[str, Any]]:
        """The newest messages that may fit in ``budget_tokens`` (each message costs a few tokens at least)."""
        return await self._store.tail(_messages(thread_id), min(MAX_MESSAGES, budget_tokens // 4 + 1))

    async def add(self, thread_id: str, message: dict[str, Any], fence: Fence | None = None) -> bool:
        """Record a message; with ``fence``, only while it holds (False when a later holder took it)."""
        if fence is None:
            await self._store.append(_messages(thread_id), message, maxlen=MAX_MESSAGES)
            return True
        return bool(await self._store.append_fenced(_messages(thread_id), message, fence, maxlen=MAX_MESSAGES))


def _encode(after: int) -> str:
    return base64.urlsafe_b64encode(f"m{after}".encode()).decode()


def _decode(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if text.startswith("m") and text[1:].isdigit():
            return int(text[1:])
    except ValueError:
        pass
    raise InvalidArgument("page_token: not a token this service issued")


def _size(message: dict[str, Any]) -> int:
    size = len(message.get("content", ""))
    for call in message.get("tool_calls", ()):
        size += len(call.get("name", "")) + len(call.get("arguments_json", ""))
    return size // CHARS_PER_TOKEN + 4  # a few tokens of framing per message


def fit_to_budget(history: list[dict[str, Any]], budget_tokens: int) -> list[dict[str, Any]]:
    """The newest part of ``history`` that fits in ``budget_tokens``, dropping the oldest turns first.

    A turn starts at a user message; an assistant's tool calls and their results are never separated, and the
    kept part never starts with a tool result (a model would refuse a result whose call it never saw).
    """
    starts = [i for i, message in enumerate(history) if message["role"] == "user"]
    if not starts:
        return []
    total = 0
    keep_from = len(history)
    for start, end in zip(reversed(starts), [len(history), *reversed(starts[1:])], strict=True):
        turn = sum(_size(m) for m in history[start:end])
        if total + turn > budget_tokens and keep_from < len(history):
            break
        total += turn
        keep_from = start
    return history[keep_from:]


def coherent(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The thread as a model accepts it, whatever ran at once.

    Two tasks of one thread that ran at the same time wrote their messages interleaved; each task's messages are
    put together again, in the order the tasks began. A tool call without its result (a task still running, or one
    that ended while its tools ran) is left out with whatever results it has, as is a tool result without its call.
    """
    by_task: dict[str, list[dict[str, Any]]] = {}
    for message in history:
        by_task.setdefault(message.get("task_id", ""), []).append(message)
    kept: list[dict[str, Any]] = []
    for messages in by_task.values():
        results = {m.get("tool_call_id") for m in messages if m["role"] == "tool"}
        answered: set[str] = set()
        for message in messages:
            if message["role"] == "assistant" and message.get("tool_calls"):
                ids = {call["id"] for call in message["tool_calls"]}
                if not ids <= results:
                    continue
                answered |= ids
            elif message["role"] == "tool" and message.get("tool_call_id") not in answered:
                continue
            kept.append(message)
    return kept
