"""Every model provider by the name an agent's ``llm.provider`` gives it. Adding one is a module and a line here."""

from __future__ import annotations

from altan.errors import InvalidArgument
from services.integrator.llm.anthropic import AnthropicProvider
from services.integrator.llm.base import ModelProvider
from services.integrator.llm.openai import OpenAIProvider

__all__ = ["PROVIDERS", "provider_for"]

PROVIDERS: dict[str, ModelProvider] = {provider.name: provider for provider in (OpenAIProvider(), AnthropicProvider())}


def provider_for(name: str) -> ModelProvider:
    """The provider of that name; InvalidArgument naming the known ones when there is none."""
    try:
        return PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise InvalidArgument(f"unknown model provider {name[:40]!r} (known: {known})") from None
