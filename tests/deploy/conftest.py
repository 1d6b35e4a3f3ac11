"""Session-wide renders of the chart, so that every check reads the same output and nothing renders twice."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python
import pytest

from .manifests import CHART, SCENARIOS, TENANTS, Render, RenderCache


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def renders(chart: helm_python.Chart) -> RenderCache:
    return RenderCache(chart)


@pytest.fixture(
    params=[(s, release, ns) for s in SCENARIOS for release, ns in TENANTS],
    ids=[f"{s}-{ns}" for s in SCENARIOS for _, ns in TENANTS],
)
def rendered(request: pytest.FixtureRequest, renders: RenderCache) -> Render:
    """The chart rendered for one ci/ scenario into one tenant namespace."""
    scenario, release, namespace = request.param
    return renders.get(scenario, release, namespace)
