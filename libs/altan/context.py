"""The verified caller of the current request, carried in a context variable.

The server interceptor sets it from the verified token; stores, loggers, audit and outbound clients read it from
here, so no caller can forget or forge the tenant. Background work started with ``asyncio.create_task`` inherits it.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, replace
from typing import Literal

from altan.errors import PermissionDenied, Unauthenticated

__all__ = ["RequestContext", "bind", "current", "current_or_none", "require_admin", "with_task"]

Role = Literal["admin", "member"]


@dataclass(frozen=True)
class RequestContext:
    """Who is calling, as proven by their token."""

    tenant_id: str
    user: str
    role: Role
    token: str
    task_id: str = ""
    # True when the token is an internal delegation (altan.auth.issue_delegation): it acts for task_id only.
    delegated: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("altan_request", default=None)


def current() -> RequestContext:
    """The caller of the running request; a call outside any request is a programming error turned into 401."""
    ctx = _current.get()
    if ctx is None:
        raise Unauthenticated("no verified caller for this request")
    return ctx


def current_or_none() -> RequestContext | None:
    return _current.get()


def bind(ctx: RequestContext) -> contextvars.Token[RequestContext | None]:
    """Make ``ctx`` the caller for the rest of this task (and tasks it spawns)."""
    return _current.set(ctx)


def with_task(task_id: str) -> None:
    """Label the current request with the task it works on (for logs and audit).

    A delegation acts for its own task only: naming another is refused (PERMISSION_DENIED).
    """
    caller = current()
    if caller.delegated and task_id != caller.task_id:
        raise PermissionDenied("this delegation acts for another task")
    _current.set(replace(caller, task_id=task_id))


def require_admin(action: str) -> None:
    """Only admins may change agents, tools and credentials (API.md)."""
    if not current().is_admin:
        raise PermissionDenied(f"{action} requires the admin role")
