"""The tenant's request rate at the gateway (``ALTAN_TENANT_REQUESTS_PER_SECOND``, ``ALTAN_TENANT_BURST``).

One token bucket per tenant for the REST and the public gRPC port together, in the state store: with Redis every
gateway replica takes from the same bucket, so the limit is the install's, not each replica's. A request over it is
429 / RESOURCE_EXHAUSTED with the seconds until a token in ``Retry-After``, before its body is read.
"""

from __future__ import annotations

import math

from altan.errors import ResourceExhausted
from altan.metrics import RATE_LIMITED, count
from altan.store import TenantStore

__all__ = ["TenantLimiter"]


class TenantLimiter:
    """``rate`` requests per second per tenant, ``burst`` at once."""

    def __init__(self, store: TenantStore, rate: float, burst: int = 0) -> None:
        self._store = store
        self._rate = rate
        self._burst = burst or max(1, math.ceil(2 * rate))

    async def check(self) -> None:
        """Take a token for the current request, or raise ResourceExhausted."""
        wait = await self._store.take_token("gateway:requests", self._burst, self._burst / self._rate)
        if wait:
            count(RATE_LIMITED, "tenant")
            raise ResourceExhausted(
                f"this tenant is over its limit of {self._rate:g} requests per second; try again shortly",
                retry_after=wait,
            )
