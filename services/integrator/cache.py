"""The response cache: a custom tool with ``cacheable_seconds`` answers identical arguments from the tenant's cache.

Entries live in the state store's expiring values (Redis when set, so every replica shares them; the embedded state,
bounded, without it), under the caller's tenant like every key. An entry is keyed by the tool's whole definition
(so any change to the tool is a new key) and its arguments in canonical JSON, and only successful answers (HTTP
status below 400) are kept, each at most ``max_entry_bytes``.
"""

from __future__ import annotations

import base64
import hashlib
import json

from altan.errors import InvalidArgument
from altan.store import TenantStore
from altan.v1 import tool_pb2
from altan.wire import parse_json

__all__ = ["ResponseCache"]

_KIND = "response-cache"


class ResponseCache:
    """Answers of cacheable tools, per tenant."""

    def __init__(self, store: TenantStore, *, max_entry_bytes: int = 1024 * 1024) -> None:
        self._store = store
        self._max_entry_bytes = max_entry_bytes

    async def get(self, tool: tool_pb2.Tool, arguments_json: bytes) -> tuple[bytes, int] | None:
        """``(output_json, http_status)`` of an earlier identical call still fresh, or None."""
        key = _key(tool, arguments_json)
        raw = await self._store.get_expiring(_KIND, key) if key else None
        if raw is None:
            return None
        entry = json.loads(raw)
        return base64.b64decode(entry["output"]), int(entry["status"])

    async def put(self, tool: tool_pb2.Tool, arguments_json: bytes, output_json: bytes, http_status: int) -> None:
        """Keep a successful answer for the tool's ``cacheable_seconds``; failures and outsized answers are not kept."""
        key = _key(tool, arguments_json)
        if not key or http_status >= 400 or len(output_json) > self._max_entry_bytes:
            return
        entry = json.dumps({"output": base64.b64encode(output_json).decode("ascii"), "status": http_status})
        await self._store.set_expiring(_KIND, key, entry, tool.cacheable_seconds)


def _key(tool: tool_pb2.Tool, arguments_json: bytes) -> str:
    """The definition and the arguments, hashed; "" when the arguments are not a JSON object (nothing to cache)."""
    try:
        arguments = parse_json(arguments_json, "arguments", default={})
    except InvalidArgument:
        return ""
    if not isinstance(arguments, dict):
        return ""
    digest = hashlib.sha256(tool.SerializeToString(deterministic=True))
    digest.update(b"\0" + json.dumps(arguments, sort_keys=True, separators=(",", ":")).encode())
    return f"{tool.tool_id}:{digest.hexdigest()}"
