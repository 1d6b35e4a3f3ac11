"""Prometheus metrics of the LLM calls: per provider and model, never per tenant.

A model's name is the tenant's to choose, and ``/metrics`` is for the operator: only the models the operator lists
(``ALTAN_METRICS_MODELS``) get a label of their own, every other one counts as ``other``. That keeps one tenant's
names out of what another could read, and the number of series bounded whatever tenants write.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["LlmMetrics"]


class LlmMetrics:
    def __init__(self, registry: CollectorRegistry, models: frozenset[str]) -> None:
        self._models = models
        labels = ["provider", "model"]
        self.calls = Counter(
            "altan_llm_calls",
            "LLMs asked for a model turn (each once, whatever its retries), by outcome",
            [*labels, "outcome"],
            registry=registry,
        )
        self.tokens = Counter("altan_llm_tokens", "LLM tokens by direction", [*labels, "direction"], registry=registry)
        self.latency = Histogram(
            "altan_llm_call_duration_seconds",
            "One LLM's part of a model turn, its retries included",
            labels,
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.fallbacks = Counter(
            "altan_llm_fallbacks",
            "Model turns answered by a fallback LLM, by the one that answered",
            labels,
            registry=registry,
        )

    def model(self, name: str) -> str:
        return name if name in self._models else "other"

    def called(self, provider: str, model: str, outcome: str, seconds: float) -> None:
        label = self.model(model)
        self.calls.labels(provider or "unknown", label, outcome).inc()
        self.latency.labels(provider or "unknown", label).observe(seconds)

    def answered(self, provider: str, model: str, input_tokens: int, output_tokens: int, fallback: bool) -> None:
        label = self.model(model)
        self.tokens.labels(provider, label, "input").inc(input_tokens)
        self.tokens.labels(provider, label, "output").inc(output_tokens)
        if fallback:
            self.fallbacks.labels(provider, label).inc()
