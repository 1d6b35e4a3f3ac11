"""The gateway's long-lived clients of the three services, and readiness."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from altan.clients import ServiceClient, agent_client, integrator_client, tool_client
from altan.config import Settings
from altan.v1 import agent_pb2_grpc, integrator_pb2_grpc, tool_pb2_grpc

__all__ = ["Backends"]


@dataclass
class Backends:
    agent: ServiceClient[agent_pb2_grpc.AgentServiceStub]
    tool: ServiceClient[tool_pb2_grpc.ToolServiceStub]
    integrator: ServiceClient[integrator_pb2_grpc.IntegratorServiceStub]

    @classmethod
    def connect(cls, settings: Settings) -> Backends:
        deadline = settings.call_deadline_seconds
        return cls(
            agent=agent_client(settings.agent_addr, deadline),
            tool=tool_client(settings.tool_addr, deadline),
            integrator=integrator_client(settings.integrator_addr, deadline),
        )

    async def unhealthy(self) -> list[str]:
        """Names of the services that do not answer SERVING right now."""
        names = ("agent", "tool", "integrator")
        answers = await asyncio.gather(*(getattr(self, n).healthy() for n in names))
        return [n for n, ok in zip(names, answers, strict=True) if not ok]

    async def aclose(self) -> None:
        for client in (self.agent, self.tool, self.integrator):
            await client.aclose()
