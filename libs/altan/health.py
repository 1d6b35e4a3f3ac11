"""gRPC health that tells the truth about what a service needs: a service whose state backend cannot be reached
answers NOT_SERVING, so the gateway's ``/readyz`` (and a Kubernetes readiness probe) sees it.

The backend is asked when someone checks, not by a polling loop: one short ping, its answer kept for about a
second, shared by every check that arrives meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from grpc_health.v1 import health, health_pb2

__all__ = ["CachedProbe", "Probe", "ProbedHealthServicer"]

log = logging.getLogger(__name__)

# Answers whether a dependency can be used right now; may raise, which means no.
Probe = Callable[[], Awaitable[bool]]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CachedProbe:
    """A probe asked at most once per ``ttl`` seconds, bounded by ``timeout``; concurrent callers share one ask."""

    def __init__(
        self,
        probe: Probe,
        *,
        label: str = "dependency",
        ttl: float = 1.0,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._label = label
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._lock = asyncio.Lock()
        self._answer = True
        self._expires = float("-inf")

    async def __call__(self) -> bool:
        if self._clock() < self._expires:
            return self._answer
        async with self._lock:
            if self._clock() < self._expires:  # another check asked while this one waited for the lock
                return self._answer
            answer = await self._ask()
            if answer != self._answer:
                log.warning("%s: %s", self._label, "ready again" if answer else "not ready (its probe fails)")
            self._answer, self._expires = answer, self._clock() + self._ttl
            return answer

    async def _ask(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._probe(), self._timeout))
        except Exception as exc:  # a probe that fails or hangs is the answer "no"
            log.debug("health probe failed: %s", type(exc).__name__)
            return False


class ProbedHealthServicer(health.aio.HealthServicer):
    """``grpc.health.v1.Health`` whose ``Check`` also asks each service's probe.

    ``probes`` maps a service name to what it needs; the overall status (``""``) needs all of them. The status set
    with ``set`` still wins when it is not SERVING (graceful shutdown). ``Watch`` streams the set status only.
    """

    def __init__(self, probes: dict[str, Probe], *, ttl: float = 1.0, timeout: float = 1.0) -> None:
        super().__init__()
        # Services of one process usually share one backend: ask it once per check, not once per service.
        sharing: dict[Probe, list[str]] = {}
        for name, probe in probes.items():
            sharing.setdefault(probe, []).append(name)
        cached = {
            probe: CachedProbe(probe, label=", ".join(names), ttl=ttl, timeout=timeout)
            for probe, names in sharing.items()
        }
        self._probes = {name: cached[probe] for name, probe in probes.items()}

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        answer = await super().Check(request, context)  # aborts with NOT_FOUND for an unknown service
        if answer is None or answer.status != _SERVING:
            return answer
        needed = set(self._probes.values()) if request.service == "" else {self._probes.get(request.service)}
        results = await asyncio.gather(*(probe() for probe in needed if probe is not None))
        return answer if all(results) else health_pb2.HealthCheckResponse(status=_NOT_SERVING)
