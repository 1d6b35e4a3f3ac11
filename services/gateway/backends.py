"""The gateway's long-lived clients of the three services, and readiness."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from altan.clients import AgentClient, IntegratorClient, ServiceChannel, ToolClient
from altan.config import Settings
from altan.tls import tls_files

__all__ = ["Backends"]


@dataclass
class Backends:
    agent: AgentClient
    tool: ToolClient
    integrator: IntegratorClient

    @classmethod
    def connect(cls, settings: Settings) -> Backends:
        deadline, tls = settings.call_deadline_seconds, tls_files(settings)
        return cls(
            agent=AgentClient(settings.agent_addr, deadline, tls),
            tool=ToolClient(settings.tool_addr, deadline, tls),
            integrator=IntegratorClient(settings.integrator_addr, deadline, tls),
        )

    def by_service(self) -> dict[str, ServiceChannel]:
        """The client of each public gRPC service."""
        return {
            "altan.v1.AgentService": self.agent,
            "altan.v1.ToolService": self.tool,
            "altan.v1.IntegratorService": self.integrator,
        }

    async def unhealthy(self) -> list[str]:
        """Names of the services that do not answer SERVING right now."""
        names = ("agent", "tool", "integrator")
        answers = await asyncio.gather(*(getattr(self, n).healthy() for n in names))
        return [n for n, ok in zip(names, answers, strict=True) if not ok]

    async def aclose(self) -> None:
        for client in (self.agent, self.tool, self.integrator):
            await client.aclose()
