"""What the model provider tests share: the tools they offer, a client that may reach a fake, and one turn asked."""

from __future__ import annotations

import ssl

from altan.egress import EgressGuard, EgressPolicy
from altan.outbound import GuardedHttpClient
from services.integrator.llm.base import ModelRequest, ModelTurn, ToolSpec
from services.integrator.llm.registry import provider_for
from tests.fakes.llm import FakeLlm

__all__ = ["NOTIFY", "WEATHER", "client_for", "complete"]

WEATHER = ToolSpec(
    "get_weather",
    "The current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
NOTIFY = ToolSpec("notify", "Send a message", {"type": "object", "properties": {"text": {"type": "string"}}})
# One certificate store for every test's client: building one per client is most of a test's set-up time.
_TLS = ssl.create_default_context()


def client_for(*fakes: FakeLlm | int) -> GuardedHttpClient:
    """The egress-guarded client, allowed to reach these fakes (or ports) on 127.0.0.1 and nothing else."""
    ports = [fake if isinstance(fake, int) else fake.port for fake in fakes]
    policy = EgressPolicy.parse(",".join(f"127.0.0.1:{port}" for port in ports))
    return GuardedHttpClient(EgressGuard(policy), verify=_TLS)


async def complete(
    fake: FakeLlm, http: GuardedHttpClient, request: ModelRequest, deltas: list[str] | None = None
) -> ModelTurn:
    """One turn from the provider that speaks this fake's wire format; the streamed text goes to ``deltas``."""

    async def on_delta(piece: str) -> None:
        assert deltas is not None
        deltas.append(piece)

    return await provider_for(fake.provider).complete(request, http, on_delta if deltas is not None else None)
