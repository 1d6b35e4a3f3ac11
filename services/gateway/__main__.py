"""``python -m services.gateway``: the public REST and gRPC ports in one process."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn

import uvicorn

from altan.auth import TokenVerifier
from altan.bootstrap import load_settings, refuse, start_tracing
from altan.config import ConfigurationError
from altan.delegation import refuse_signing_key
from altan.listen import CannotListen, listen_socket
from altan.logging import configure_logging
from altan.server import serve_until_stopped, shutdown_event
from altan.store import TenantStore, open_state
from services.gateway.backends import Backends
from services.gateway.grpc_proxy import PUBLIC_SERVICES, PublicHealth, PublicProxy, public_descriptor_pool
from services.gateway.limits import TenantLimiter
from services.gateway.rest import create_app


class _Server(uvicorn.Server):
    """Uvicorn without its own signal handling: the process-wide shutdown event stops REST and gRPC together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _cannot_listen(line: str) -> NoReturn:
    sys.stderr.write(line + "\n")
    raise SystemExit(1)


def main() -> None:
    settings = load_settings()
    refuse(lambda: refuse_signing_key(settings, "gateway"))
    configure_logging("gateway", settings.log_level)
    tracing = start_tracing("gateway", settings)
    try:
        # Bound here rather than by uvicorn, which would log the failure and exit from inside the event loop.
        rest = listen_socket(settings.http_host, settings.http_port)
    except CannotListen as exc:
        _cannot_listen(exc.line("gateway's REST server", "ALTAN_HTTP_PORT"))

    async def serve() -> None:
        stop = shutdown_event()
        backends = Backends.connect(settings)
        verifier = TokenVerifier(settings)
        # The tenant's request rate needs state only when it is limited: Redis shares it among gateway replicas.
        state = open_state(settings) if settings.tenant_requests_per_second > 0 else None
        limiter = None
        if state is not None:
            rate, burst = settings.tenant_requests_per_second, settings.tenant_burst
            limiter = TenantLimiter(TenantStore(state, "gateway"), rate, burst)
        app = create_app(backends, verifier, settings.max_body_bytes, limiter)
        http = _Server(
            uvicorn.Config(
                app,
                host=settings.http_host,  # what uvicorn logs; it serves the socket bound above
                port=settings.http_port,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or 1,
            )
        )
        proxy = PublicProxy(backends.by_service(), limiter)

        async def stop_http() -> None:
            await stop.wait()
            http.should_exit = True

        async def serve_grpc() -> None:
            try:
                await serve_until_stopped(
                    [],
                    verifier=verifier,
                    address=f"{settings.bind_host}:{settings.grpc_port}",
                    grace_seconds=settings.shutdown_grace_seconds,
                    stop=stop,
                    generic_handlers=[proxy],
                    # A public call may carry as much as a REST body, no more (413 there, RESOURCE_EXHAUSTED here).
                    max_message_bytes=settings.max_body_bytes,
                    reflection_names=list(PUBLIC_SERVICES),
                    reflection_pool=public_descriptor_pool(),
                    health_servicer=PublicHealth(backends.by_service()),
                    service="gateway",
                    edge=True,  # each public call starts its own trace (altan.telemetry.server_span)
                )
            finally:
                stop.set()  # however gRPC ends (its port taken), REST stops with it

        try:
            ended = await asyncio.gather(http.serve([rest]), stop_http(), serve_grpc(), return_exceptions=True)
        finally:
            await backends.aclose()
            if state is not None:
                await state.aclose()
        for outcome in ended:
            if isinstance(outcome, BaseException):
                raise outcome

    try:
        asyncio.run(serve())
    except ConfigurationError as exc:  # the state file (ALTAN_DATA_DIR) or the client certificate (ALTAN_TLS_*)
        sys.stderr.write(f"invalid configuration: {exc}\n")
        raise SystemExit(2) from None
    except CannotListen as exc:
        _cannot_listen(exc.line("gateway's public gRPC server", "ALTAN_GRPC_PORT"))
    finally:
        tracing.shutdown()


if __name__ == "__main__":
    main()
