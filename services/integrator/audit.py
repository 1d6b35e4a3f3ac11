"""The audit trail: one event per tool call, credential change and refusal, per tenant; never a secret.

Calls fail closed: :meth:`AuditLog.begin` writes a ``started`` entry to every trail (the state store's intents
stream, and the optional sink, e.g. Cloud Logging) *before* a tool or LLM call runs, and the call runs only if every
write succeeded. The outcome is recorded after the call as before (the one event per call that ``GET /v1/audit``
shows). So every call that ran has left at least its intent in every trail; one whose intent cannot be written does
not run (503). An outcome that cannot be written to the sink after the call is logged: the call has happened, and
failing it then would only invite a retry that runs it twice.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from altan import context
from altan.api.convert import now_ms
from altan.config import Settings
from altan.errors import AltanError, InvalidArgument, NotFound, PermissionDenied, Unavailable
from altan.store import TenantStore

__all__ = ["AUDIT_SINKS", "AuditIntent", "AuditLog", "AuditSink", "open_audit_sink", "outcome_of"]

log = logging.getLogger(__name__)

_STREAM = "audit"
_INTENTS = "audit:started"
_PER_TASK_MAX = 10_000
_FIELDS = ("tool_id", "target", "outcome", "latency_ms", "reason", "credential", "model")


class AuditSink(Protocol):
    """A second, operator-owned copy of the audit trail (Cloud Logging). ``call`` links a call's ``started`` entry
    (``first``) to its outcome (``last``); an event outside a call is both. Raises an ``AltanError`` when it cannot
    write."""

    async def write(self, event: dict[str, Any], *, call: str, first: bool, last: bool) -> None: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class AuditIntent:
    """A call whose ``started`` entry has been written: its outcome is recorded with it."""

    call_id: str


class AuditLog:
    """Appends and reads the current tenant's audit events."""

    def __init__(self, store: TenantStore, max_events: int = 100_000, sink: AuditSink | None = None) -> None:
        self._store = store
        self._max = max_events
        self._sink = sink

    async def begin(self, action: str, **fields: Any) -> AuditIntent:
        """Write that a call is about to run, to every trail; raises UNAVAILABLE (and the call must not run) when
        any of them cannot take it."""
        event = _event(action, {**fields, "outcome": "started"})
        intent = AuditIntent(uuid.uuid4().hex)
        try:
            await self._store.append(_INTENTS, event, maxlen=self._max)
            if self._sink is not None:
                await self._sink.write(event, call=intent.call_id, first=True, last=False)
        except AltanError as exc:
            raise Unavailable(
                f"the audit trail cannot be written, so the call was not run ({exc.message})",
                retry_after=exc.retry_after,
            ) from None
        return intent

    async def record(self, action: str, *, intent: AuditIntent | None = None, **fields: Any) -> None:
        """Record an outcome: of the call ``intent`` began, or of something that ran no call (a refusal, a cache
        hit, a credential change)."""
        event = _event(action, fields)
        appends = [(_STREAM, event, self._max)]
        caller = context.current()
        if caller.task_id:
            # A per-task copy makes "the audit of this task" a tail read instead of a scan; both in one write.
            appends.append((_task_stream(caller.task_id), event, _PER_TASK_MAX))
        await self._store.write((), appends)
        if self._sink is not None:
            call = intent.call_id if intent is not None else uuid.uuid4().hex
            try:
                await self._sink.write(event, call=call, first=intent is None, last=True)
            except AltanError as exc:
                log.error("audit outcome not written to the sink (its intent was): %s: %s", action, exc.message)

    async def query(self, task_id: str, limit: int) -> list[dict[str, Any]]:
        if limit < 0 or limit > 1000:
            raise InvalidArgument("limit: must be between 1 and 1000")
        return await self._store.tail(_task_stream(task_id) if task_id else _STREAM, limit or 100)


def _cloud_logging(settings: Settings) -> AuditSink:
    # Imported here: only installs that choose Google pay for loading its client library.
    from services.integrator.audit_sink import CloudLoggingSink

    return CloudLoggingSink.open(settings)


# ALTAN_AUDIT_SINK -> how to open it (inside the running event loop); "none" keeps the state store's trail only.
AUDIT_SINKS: dict[str, Callable[[Settings], AuditSink]] = {"gcp": _cloud_logging}


def open_audit_sink(settings: Settings) -> AuditSink | None:
    """The audit sink ``settings`` select, if any."""
    return None if settings.audit_sink == "none" else AUDIT_SINKS[settings.audit_sink](settings)


def outcome_of(exc: BaseException) -> str:
    """The audit outcome of a call that raised: ``denied`` when refused (a rule, or nothing to call), else ``error``."""
    return "denied" if isinstance(exc, PermissionDenied | NotFound) else "error"


def _event(action: str, fields: dict[str, Any]) -> dict[str, Any]:
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
    return event


def _task_stream(task_id: str) -> str:
    return f"{_STREAM}:task:{task_id}"
