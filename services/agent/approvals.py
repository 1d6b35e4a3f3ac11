"""Calls that wait for a person: a tool with ``requires_approval`` pauses each call of it in a task until an admin
approves or rejects it.

What was asked (``approvals``) and the decision (``approval-decisions``, written once: the first decision stands,
whichever replica got it) are in the tenant's state, keyed ``<task id>:<call id>``, so a task resumed after a restart
waits for the same call without asking twice, or acts on a decision made while it was down. The call id is the step's
id (``s1``, ``t1c1``). The wait follows the task's event stream, which every decision appends to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from altan import context
from altan.api.convert import now_ms
from altan.errors import AlreadyExists, NotFound, PermissionDenied
from altan.store import TenantStore

__all__ = ["Approvals", "AuditDecision", "rejection", "task_events"]

_APPROVALS = "approvals"  # "<task id>:<call id>" -> a call waiting for approval (what was asked)
_DECISIONS = "approval-decisions"  # "<task id>:<call id>" -> the decision

# Records an approval decision in the audit trail, as the decider: (task id, call id, tool, approved, comment).
AuditDecision = Callable[[str, str, str, bool, str], Awaitable[None]]
Emit = Callable[[str, str, dict[str, Any]], Awaitable[None]]


def task_events(task_id: str) -> str:
    """The stream of a task's events."""
    return f"events:{task_id}"


def rejection(decided: dict[str, Any]) -> PermissionDenied:
    """What a rejected call fails with: the plan step's error, or the result the LLM reads."""
    comment = f": {decided['comment']}" if decided.get("comment") else ""
    return PermissionDenied(f"the call was rejected by {decided.get('decided_by') or 'an admin'}{comment}")


def _shown(arguments: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments as an approver sees them: header values (where a key could hide) left out."""
    shown = dict(arguments)
    if isinstance(shown.get("headers"), dict):
        shown["headers"] = {name: "[redacted]" for name in shown["headers"]}
    return shown


class Approvals:
    """The current tenant's calls waiting for approval, and their decisions."""

    def __init__(self, store: TenantStore, emit: Emit, audit: AuditDecision | None) -> None:
        self._store = store
        self._emit = emit
        self._audit = audit

    async def wait(self, task_id: str, call_id: str, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The decision on this call, once there is one; asks for it (once) when nobody was asked yet. The wait ends
        with the task's deadline like anything else the task does (its run is cancelled)."""
        key = f"{task_id}:{call_id}"
        decided = await self._store.get(_DECISIONS, key)
        if decided is not None:
            return decided
        asked = {"call_id": call_id, "step_id": call_id, "tool": tool, "arguments": _shown(arguments)}
        if await self._store.put_new(_APPROVALS, key, {**asked, "asked_at": now_ms()}):
            await self._emit(task_id, "approval.requested", asked)
        seen = 0  # the first reads catch up with the stream, then each waits for a new event
        while True:
            decided = await self._store.get(_DECISIONS, key)
            if decided is not None:
                return decided
            for seq, _ in await self._store.read(task_events(task_id), seen, count=1000, block_seconds=10):
                seen = seq

    async def decided(self, task_id: str, call_id: str) -> dict[str, Any] | None:
        """The decision on a call, if there is one yet."""
        return await self._store.get(_DECISIONS, f"{task_id}:{call_id}")

    async def decide(self, task: dict[str, Any], call_id: str, approve: bool, comment: str) -> None:
        """Record the current caller's decision on a call ``task`` (not ended) waits for; audited and announced."""
        task_id = task["task_id"]
        key = f"{task_id}:{call_id}"
        asked = await self._store.get(_APPROVALS, key)
        if asked is None:
            raise NotFound(f"task '{task_id}' has no call '{call_id}' waiting for approval")
        decision = {"approved": approve, "decided_by": context.current().user, "comment": comment}
        if not await self._store.put_new(_DECISIONS, key, {**decision, "decided_at": now_ms()}):
            earlier = await self._store.get(_DECISIONS, key) or {}
            verdict = "approved" if earlier.get("approved") else "rejected"
            raise AlreadyExists(f"call '{call_id}' of task '{task_id}' was already {verdict}")
        # The decision and who made it go to the audit trail (GET /v1/audit) and the task's events.
        if self._audit is not None:
            await self._audit(task_id, call_id, asked.get("tool", ""), approve, comment)
        await self._emit(task_id, "approval.decided", {"call_id": call_id, "step_id": call_id, **decision})
