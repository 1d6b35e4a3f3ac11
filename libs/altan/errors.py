"""Domain errors and their one mapping to gRPC status codes and to the public REST error shape.

Business logic raises these; servicers turn them into gRPC status, clients turn gRPC status back into them,
and the gateway turns them into ``{"error": {"code", "message"}}`` with the matching HTTP status. A message is
always safe to show the caller: it never carries a secret or a stack trace.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc

__all__ = [
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
    "error_from_status",
    "http_status_for",
]


class AltanError(Exception):
    """Base of every error that may cross a service boundary."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def to_body(self) -> dict[str, Any]:
        """The public REST error body."""
        return {"error": {"code": self.code.name, "message": self.message}}


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


def http_status_for(code: grpc.StatusCode) -> int:
    """HTTP status for a gRPC status code, by the usual gRPC-HTTP mapping."""
    return _HTTP_STATUS.get(code, 500)


def error_from_status(code: grpc.StatusCode, message: str, retry_after: float | None = None) -> AltanError:
    """Rebuild a domain error from a gRPC status received from another service."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = AltanError(message, retry_after=retry_after)
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, retry_after=retry_after)
