"""What every benchmark's report says about where it ran, and how it lands in docs/benchmarks.md.

Each benchmark owns one section of that file between its own pair of markers (``<!-- bench:NAME:start -->`` and
``<!-- bench:NAME:end -->``) and rewrites only what lies between them, so the prose around them, and the other
benchmarks' sections, are kept.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from collections.abc import Callable
from pathlib import Path

from bench.harness import cpu_model, cpu_ticks

__all__ = ["cpu_steal", "machine", "write_section"]


def cpu_steal() -> Callable[[], float]:
    """Start counting; the function returned gives the share of CPU time the hypervisor stole since."""
    steal_before, total_before = cpu_ticks()

    def since() -> float:
        steal_after, total_after = cpu_ticks()
        return (steal_after - steal_before) / max(1, total_after - total_before)

    return since


def machine(state: str = "embedded state") -> str:
    """The machine, the Python and the stack's state backend, in one sentence."""
    servers = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m) is not None]
    return (
        f"{os.cpu_count()} vCPU ({cpu_model()}), Linux {platform.release()}, Python {platform.python_version()}; "
        f"everything on 127.0.0.1, {state}, log level INFO; "
        f"uvicorn extras installed: {', '.join(servers) or 'none (asyncio loop, h11)'}"
    )


def write_section(doc: Path, markers: tuple[str, str], text: str, heading: str = "Results") -> None:
    """Put ``text`` between the two markers in ``doc``; append the markers under ``heading`` if they are missing."""
    start, end = markers
    content = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start not in content or end not in content:
        content = content.rstrip("\n") + f"\n\n## {heading}\n\n{start}\n{end}\n"
    head, _, rest = content.partition(start)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{start}\n{text}\n{end}{tail}")
