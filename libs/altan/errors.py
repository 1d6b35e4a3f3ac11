"""Domain errors and their one mapping: domain error ↔ gRPC status (with trailers) ↔ HTTP status, headers and body.

Business logic raises these. A servicer's error becomes a gRPC status here (:func:`abort`), a client turns the status
back into the same domain error here (:func:`from_rpc_error`), and the gateway turns it into
``{"error": {"code", "message"}}`` with the matching HTTP status and headers here (:func:`http_response`). A message
is always safe to show the caller: it never carries a secret or a stack trace.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, NoReturn

import grpc

__all__ = [
    "ERROR_STATUSES",
    "AlreadyExists",
    "AltanError",
    "DeadlineExceeded",
    "EgressRefused",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "abort",
    "code_for_http_status",
    "error_body",
    "error_from_status",
    "from_rpc_error",
    "http_response",
    "http_status_for",
    "trailers_for",
]

log = logging.getLogger(__name__)

# Trailing metadata that carries what a status code alone cannot.
_RETRY_AFTER = "retry-after"  # seconds, as in HTTP
_TARGET = "altan-target"  # host:port of a refused outbound destination, for the audit trail
# On every error a service raised: "hop" when what it passes on is a hop of its own that failed, else "1". An
# UNAVAILABLE without it, or with "hop", means a service of the platform could not be reached (down, restarting, or
# dying during the call): a caller holding an idempotency key may try again.
_RAISED = "altan-raised"


class AltanError(Exception):
    """Base of every error that may cross a service boundary."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.hop_failed = False  # set by from_rpc_error: the callee never answered (see _RAISED)

    def to_body(self) -> dict[str, Any]:
        """The public REST error body."""
        return error_body(self.code.name, self.message)


class InvalidArgument(AltanError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(AltanError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AltanError):
    code = grpc.StatusCode.PERMISSION_DENIED


class EgressRefused(PermissionDenied):
    """An outbound call was refused because its destination is not public (or not allowed)."""

    def __init__(self, message: str, *, target: str = "") -> None:
        super().__init__(message)
        self.target = target


class NotFound(AltanError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AltanError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(AltanError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AltanError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(AltanError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(AltanError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(AltanError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[AltanError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        InternalError,
    )
}

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# What the public REST API answers besides success, and what each means (the OpenAPI document lists them).
ERROR_STATUSES: dict[int, str] = {
    400: "The request is malformed or breaks a rule (INVALID_ARGUMENT, FAILED_PRECONDITION)",
    401: "No valid bearer token (UNAUTHENTICATED)",
    403: "The caller's role may not do this, or the destination is refused (PERMISSION_DENIED)",
    404: "No such resource in the caller's tenant (NOT_FOUND)",
    409: "The resource already exists (ALREADY_EXISTS)",
    413: "The request body is over the size limit (RESOURCE_EXHAUSTED)",
    429: "Over a rate limit; Retry-After says when to try again (RESOURCE_EXHAUSTED)",
    503: "A service or the state store is unreachable; Retry-After says when to try again (UNAVAILABLE)",
    504: "The call did not finish within its deadline (DEADLINE_EXCEEDED)",
}

# Starlette's own HTTP errors (routing, methods) in the same shape.
_CODE_FOR_HTTP = {
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ALREADY_EXISTS",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


def http_status_for(code: grpc.StatusCode) -> int:
    """HTTP status for a gRPC status code, by the usual gRPC-HTTP mapping."""
    return _HTTP_STATUS.get(code, 500)


def code_for_http_status(status: int) -> str:
    """The gRPC status name an HTTP error of the web framework itself (404, 405, ...) is reported as."""
    return _CODE_FOR_HTTP.get(status, "INVALID_ARGUMENT" if status < 500 else "INTERNAL")


def error_body(code: str, message: str) -> dict[str, Any]:
    """``{"error": {"code", "message"}}``: the one shape of every REST error."""
    return {"error": {"code": code, "message": message}}


def error_from_status(code: grpc.StatusCode, message: str, retry_after: float | None = None) -> AltanError:
    """Rebuild a domain error from a gRPC status received from another service."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = AltanError(message, retry_after=retry_after)
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, retry_after=retry_after)


def _retry_after_seconds(value: float) -> str:
    return str(max(1, int(value + 0.999)))  # whole seconds, rounded up, never 0 ("now" invites a stampede)


def trailers_for(exc: AltanError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that goes with an error's status."""
    trailers: list[tuple[str, str]] = []
    if exc.retry_after is not None:
        trailers.append((_RETRY_AFTER, _retry_after_seconds(exc.retry_after)))
    target = getattr(exc, "target", "")
    if target:
        trailers.append((_TARGET, target))
    trailers.append((_RAISED, "hop" if exc.hop_failed else "1"))
    return tuple(trailers)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> AltanError:
    """The domain error a callee raised, with its ``retry-after`` and, for egress refusals, its ``target``."""
    trailers = {key: value for key, value in (exc.trailing_metadata() or ()) if isinstance(value, str)}
    retry_after = None
    if trailers.get(_RETRY_AFTER, "").isdigit():
        retry_after = float(trailers[_RETRY_AFTER])
    error = error_from_status(exc.code(), exc.details() or exc.code().name, retry_after)
    if _TARGET in trailers:
        error.target = trailers[_TARGET]  # type: ignore[attr-defined]
    error.hop_failed = trailers.get(_RAISED, "hop") == "hop"
    return error


async def abort(ctx: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End an RPC with the status of ``exc``; anything but a domain error is logged and becomes INTERNAL."""
    if isinstance(exc, AltanError):
        trailers = trailers_for(exc)
        if trailers:
            ctx.set_trailing_metadata(trailers)
        await ctx.abort(exc.code, exc.message)
    log.error("unhandled error in RPC", exc_info=exc)
    await ctx.abort(grpc.StatusCode.INTERNAL, "internal error")


def http_response(exc: AltanError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, body, headers)`` of the REST answer to a domain error."""
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = _retry_after_seconds(exc.retry_after)
    elif exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        headers["Retry-After"] = "1"  # API.md: 429 and 503 always say when to come back
    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    return http_status_for(exc.code), exc.to_body(), headers
