"""The ``main`` of every gRPC service: settings, logging, serve until SIGTERM, clean up."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

from pydantic import ValidationError

from altan.auth import TokenVerifier
from altan.config import ConfigurationError, Settings, configuration_problems
from altan.listen import CannotListen
from altan.logging import configure_logging
from altan.server import GrpcService, serve_until_stopped, shutdown_event

__all__ = ["ConfigurationError", "Wiring", "run_service"]

# Builds a service's servicers from settings; resources that need closing go on the exit stack.
Wiring = Callable[[Settings, AsyncExitStack], Awaitable[list[GrpcService]]]


def load_settings() -> Settings:
    """Settings from the environment, or exit with status 2 and one line per problem (no traceback, no values)."""
    try:
        return Settings()
    except ValidationError as exc:
        sys.stderr.write("".join(f"invalid configuration: {line}\n" for line in configuration_problems(exc)))
        raise SystemExit(2) from None


def run_service(name: str, port: Callable[[Settings], int], wiring: Wiring) -> None:
    """Run one gRPC service in the foreground until SIGTERM/SIGINT."""
    settings = load_settings()
    configure_logging(name, settings.log_level)

    async def main() -> None:
        async with AsyncExitStack() as stack:
            services = await wiring(settings, stack)
            await serve_until_stopped(
                services,
                verifier=TokenVerifier(settings, accept_delegation=True),  # internal ports only
                address=f"{settings.bind_host}:{port(settings)}",
                grace_seconds=settings.shutdown_grace_seconds,
                stop=shutdown_event(),
            )

    try:
        asyncio.run(main())
    except ConfigurationError as exc:
        sys.stderr.write(f"invalid configuration: {exc}\n")
        raise SystemExit(2) from None
    except CannotListen as exc:
        sys.stderr.write(exc.line(f"{name} service", f"ALTAN_{name.upper()}_PORT") + "\n")
        raise SystemExit(1) from None
