"""The audit trail: one event per tool call, credential change and refusal, per tenant; never a secret."""

from __future__ import annotations

from typing import Any

from altan import context
from altan.api.convert import now_ms
from altan.errors import InvalidArgument
from altan.store import TenantStore

__all__ = ["AuditLog"]

_STREAM = "audit"
_PER_TASK_MAX = 10_000
_FIELDS = ("tool_id", "target", "outcome", "latency_ms", "reason", "credential", "model")


class AuditLog:
    """Appends and reads the current tenant's audit events."""

    def __init__(self, store: TenantStore, max_events: int = 100_000) -> None:
        self._store = store
        self._max = max_events

    async def record(self, action: str, **fields: Any) -> None:
        unknown = set(fields) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown audit fields {sorted(unknown)}")
        caller = context.current()
        event: dict[str, Any] = {
            "time": now_ms(),
            "tenant_id": caller.tenant_id,
            "user": caller.user,
            "action": action,
            "tool_id": "",
            "task_id": caller.task_id,
            "target": "",
            "outcome": "ok",
            "latency_ms": 0,
            "reason": "",
            "credential": "",
            "model": "",
        }
        event.update({k: v for k, v in fields.items() if v is not None})
        await self._store.append(_STREAM, event, maxlen=self._max)
        if caller.task_id:
            # A per-task copy makes "the audit of this task" a tail read instead of a scan.
            await self._store.append(_task_stream(caller.task_id), event, maxlen=_PER_TASK_MAX)

    async def query(self, task_id: str, limit: int) -> list[dict[str, Any]]:
        if limit < 0 or limit > 1000:
            raise InvalidArgument("limit: must be between 1 and 1000")
        return await self._store.tail(_task_stream(task_id) if task_id else _STREAM, limit or 100)


def _task_stream(task_id: str) -> str:
    return f"{_STREAM}:task:{task_id}"
