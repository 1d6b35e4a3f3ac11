"""What the integrator's Google Cloud backends share: how a client reaches Google, its deadline, and the one mapping
of Google's errors to ours.

Clients are the libraries' own asyncio clients over ``grpc.aio`` (no thread pool): the calls are I/O only, and the
event loop serves other tenants while one waits. They authenticate with Application Default Credentials, which on
GKE are the Workload Identity of the pod's Kubernetes service account. ``ALTAN_GCP_EMULATOR_HOST`` points them at a
local emulator instead (plaintext, no credentials), which is how the tests reach an in-process fake of the API.

Every failure that is Google's or the install's (unreachable, refused identity, quota) becomes 503 UNAVAILABLE with a
message that names the problem and never a secret: the caller can do nothing about it but come back, and the
operator reads the cause in the integrator's log. Nothing falls back to another backend.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import grpc
from google.api_core import exceptions as google_errors
from google.api_core.retry_async import AsyncRetry
from google.auth import exceptions as auth_errors

from altan.config import ConfigurationError, Settings
from altan.errors import AltanError, Unavailable

__all__ = ["GOOGLE_ERRORS", "call_options", "google_error", "open_client"]

log = logging.getLogger(__name__)

# What a Google call may raise: the API's statuses (and RetryError when retries ran out) and the credential machinery's
# failures (the metadata server unreachable, a token refused).
GOOGLE_ERRORS = (google_errors.GoogleAPIError, auth_errors.GoogleAuthError)

# Worth another try within the deadline; anything else is an answer.
_TRANSIENT = (google_errors.ServiceUnavailable, google_errors.DeadlineExceeded, google_errors.InternalServerError)
_RETRY_AFTER_UNREACHABLE = 5.0
_RETRY_AFTER_REFUSED = 30.0  # an IAM fix takes minutes to propagate: no point in coming back at once

C = TypeVar("C")

# After an outage a channel waits its reconnect backoff before it tries again (up to 120 s by gRPC's default), and
# fails every call meanwhile: capped, calls work again within a second of Google (or the network) coming back.
_CHANNEL_OPTIONS = [("grpc.max_reconnect_backoff_ms", 1000)]


def open_client(settings: Settings, client_type: type[C], transport_type: type[Any], setting: str) -> C:
    """An asyncio client of one Google API; call inside the running event loop (its channel belongs to it).

    A missing identity stops the process at start with a line naming ``setting``, rather than failing every call.
    """
    if settings.gcp_emulator_host:
        channel = grpc.aio.insecure_channel(settings.gcp_emulator_host, options=_CHANNEL_OPTIONS)
        return client_type(transport=transport_type(channel=channel))  # type: ignore[call-arg]

    def create_channel(*args: Any, options: list[tuple[str, Any]], **kwargs: Any) -> grpc.aio.Channel:
        return transport_type.create_channel(*args, options=[*options, *_CHANNEL_OPTIONS], **kwargs)  # type: ignore[no-any-return]

    try:
        return client_type(transport=transport_type(channel=create_channel))  # type: ignore[call-arg]
    except auth_errors.DefaultCredentialsError:
        raise ConfigurationError(
            f"{setting}=gcp: no Google credentials found (Workload Identity on GKE, or GOOGLE_APPLICATION_CREDENTIALS)"
        ) from None


def call_options(timeout: float) -> dict[str, Any]:
    """``retry`` and ``timeout`` of one call: transient failures are retried with backoff, all within ``timeout``
    (a call's timeout alone does not bound the library's default retries)."""
    retry = AsyncRetry(
        predicate=lambda exc: isinstance(exc, _TRANSIENT),
        initial=0.1,
        maximum=1.0,
        multiplier=2.0,
        timeout=timeout,
    )
    return {"retry": retry, "timeout": timeout}


def google_error(exc: BaseException, doing: str, *, needs: str) -> AltanError:
    """Our error for a failed Google call while ``doing`` something; ``needs`` names the IAM roles it takes."""
    if isinstance(exc, google_errors.PermissionDenied | google_errors.Unauthenticated | auth_errors.RefreshError):
        log.error("Google refused the integrator's identity while %s: %s (it needs %s)", doing, exc, needs)
        return Unavailable(
            f"{doing}: Google Cloud refused the integrator's service account ({_code(exc)}); it needs {needs}",
            retry_after=_RETRY_AFTER_REFUSED,
        )
    if isinstance(exc, google_errors.ResourceExhausted):
        log.warning("Google quota exhausted while %s: %s", doing, exc)
        return Unavailable(f"{doing}: the Google Cloud project is over its quota", retry_after=_RETRY_AFTER_REFUSED)
    if isinstance(exc, (google_errors.RetryError, auth_errors.TransportError, *_TRANSIENT)):
        log.warning("Google Cloud unreachable while %s: %s", doing, exc)
        return Unavailable(f"{doing}: Google Cloud is unreachable", retry_after=_RETRY_AFTER_UNREACHABLE)
    log.error("Google Cloud failed while %s: %r", doing, exc)
    return Unavailable(f"{doing}: Google Cloud answered {_code(exc)}", retry_after=_RETRY_AFTER_UNREACHABLE)


def _code(exc: BaseException) -> str:
    status = getattr(exc, "grpc_status_code", None)
    return status.name if isinstance(status, grpc.StatusCode) else type(exc).__name__
