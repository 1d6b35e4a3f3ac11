"""The audit trail: one event per tool call, credential change and refusal; never a secret."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from altan.api.common import Timestamp
from altan.api.convert import enum_name, enum_value, rfc3339, timestamp
from altan.v1 import integrator_pb2

__all__ = ["AuditEvent", "AuditList", "audit_json", "audit_to_proto"]

_OUTCOME = integrator_pb2.AuditOutcome.DESCRIPTOR


class AuditEvent(BaseModel):
    """One audited action of the tenant."""

    time: Timestamp
    tenant_id: str
    user: str
    action: str
    tool_id: str | None
    task_id: str | None
    target: str | None
    outcome: Literal["ok", "error", "denied"]
    latency_ms: int
    reason: str | None
    credential: str | None
    model: str | None = None


class AuditList(BaseModel):
    """The newest audit events, oldest first."""

    events: list[AuditEvent]


def audit_to_proto(event: dict[str, Any]) -> integrator_pb2.AuditEvent:
    """The proto of a stored audit event."""
    return integrator_pb2.AuditEvent(
        time=timestamp(event["time"]),
        tenant_id=event["tenant_id"],
        user=event["user"],
        action=event["action"],
        tool_id=event.get("tool_id", ""),
        task_id=event.get("task_id", ""),
        target=event.get("target", ""),
        outcome=enum_value(_OUTCOME, event.get("outcome", "ok")),  # type: ignore[arg-type]
        latency_ms=event.get("latency_ms", 0),
        reason=event.get("reason", ""),
        credential=event.get("credential", ""),
        model=event.get("model", ""),
    )


def audit_json(msg: integrator_pb2.AuditEvent) -> dict[str, Any]:
    """The REST form of an audit event (the :class:`AuditEvent` model)."""
    return {
        "time": rfc3339(msg.time),
        "tenant_id": msg.tenant_id,
        "user": msg.user,
        "action": msg.action,
        "tool_id": msg.tool_id or None,
        "task_id": msg.task_id or None,
        "target": msg.target or None,
        "outcome": enum_name(_OUTCOME, msg.outcome) or "ok",
        "latency_ms": msg.latency_ms,
        "reason": msg.reason or None,
        "credential": msg.credential or None,
        "model": msg.model or None,
    }
