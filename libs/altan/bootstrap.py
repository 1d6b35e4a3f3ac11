"""The ``main`` of every gRPC service: settings, logging, tracing, metrics, serve until SIGTERM, clean up."""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from pydantic import ValidationError

from altan.auth import TokenVerifier
from altan.config import ConfigurationError, Settings, configuration_problems
from altan.delegation import refuse_signing_key
from altan.listen import CannotListen
from altan.logging import configure_logging
from altan.metrics import serve_metrics
from altan.server import GrpcService, ServerTls, serve_until_stopped, shutdown_event
from altan.telemetry import TracingSetup, configure_tracing
from altan.tls import tls_files

__all__ = ["ConfigurationError", "Wiring", "open_files_for", "refuse", "run_service", "start_tracing"]

log = logging.getLogger(__name__)

# Descriptors a service needs besides its outbound connections: listeners, gRPC channels, the state store, logs.
_OTHER_FILES = 256

# Builds a service's servicers from settings; resources that need closing go on the exit stack.
Wiring = Callable[[Settings, AsyncExitStack], Awaitable[list[GrpcService]]]


def load_settings() -> Settings:
    """Settings from the environment, or exit with status 2 and one line per problem (no traceback, no values)."""
    try:
        return Settings()
    except ValidationError as exc:
        sys.stderr.write("".join(f"invalid configuration: {line}\n" for line in configuration_problems(exc)))
        raise SystemExit(2) from None


def refuse(check: Callable[[], None]) -> None:
    """Run a start-up check; exit with status 2 and its one line if it raises :class:`ConfigurationError`."""
    try:
        check()
    except ConfigurationError as exc:
        sys.stderr.write(f"invalid configuration: {exc}\n")
        raise SystemExit(2) from None


def start_tracing(name: str, settings: Settings) -> TracingSetup:
    """This process's tracing from the ``OTEL_*`` variables, or exit with status 2 naming the bad one."""
    try:
        return configure_tracing(name, propagate_outbound=settings.trace_propagate_outbound)
    except ValueError as exc:
        sys.stderr.write(f"invalid configuration: {exc}\n")
        raise SystemExit(2) from None


def open_files_for(connections: int) -> int:
    """Raise this process's soft limit of open files towards what ``connections`` outbound connections need (up to
    the hard limit, as the Go runtime does at start); answer the limit now. A laptop's soft limit is often 1,024
    (macOS: 256) while its hard limit is far higher; a container's is usually high already."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _OTHER_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open files limit %d is below what ALTAN_OUTBOUND_MAX_CONNECTIONS=%d needs (%d): calls past it fail",
            soft,
            connections,
            wanted,
        )
    return soft


def run_service(name: str, port: Callable[[Settings], int], wiring: Wiring) -> None:
    """Run one gRPC service in the foreground until SIGTERM/SIGINT."""
    settings = load_settings()
    if name != "agent":
        refuse(lambda: refuse_signing_key(settings, f"{name} service"))
    configure_logging(name, settings.log_level)
    open_files_for(settings.outbound_max_connections)
    tracing = start_tracing(name, settings)
    metrics_port: int | None = getattr(settings, f"{name}_metrics_port", None)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            if metrics_port is not None:
                stack.enter_context(serve_metrics(metrics_port, settings.bind_host))
            services = await wiring(settings, stack)
            files = tls_files(settings)
            await serve_until_stopped(
                services,
                verifier=TokenVerifier(settings, accept_delegation=True),  # internal ports only
                address=f"{settings.bind_host}:{port(settings)}",
                grace_seconds=settings.shutdown_grace_seconds,
                stop=shutdown_event(),
                tls=ServerTls(files, settings.tls_allowed_clients) if files is not None else None,
                health_address=f"{settings.bind_host}:{settings.health_port}" if settings.health_port else None,
                service=name,
            )

    try:
        asyncio.run(main())
    except ConfigurationError as exc:
        sys.stderr.write(f"invalid configuration: {exc}\n")
        raise SystemExit(2) from None
    except CannotListen as exc:
        sys.stderr.write(exc.line(f"{name} service", f"ALTAN_{name.upper()}_PORT") + "\n")
        raise SystemExit(1) from None
    finally:
        tracing.shutdown()  # the spans still queued, exported before the process ends
