"""1,000 natural-language tasks in flight at once, each waiting 1 s per model turn: ``bench/many_tasks.py``.

What an agent platform mostly does is wait: for the model, for tools. This benchmark submits 1,000 tasks at once
(``POST /v1/agents/{id}/tasks``, each followed on its Server-Sent Events to ``task.succeeded``, the way a client
shows an answer) against ``bench/mock_llm.py --delay-ms 1000``, and measures how much longer than the model's own
time a task takes when 999 others wait too, what the stack's processes hold in memory meanwhile, and their CPU.
Two workloads, one after the other on one stack:

- **text**: the agent has no tools, so the model answers text after 1 s: ideal latency 1 s;
- **tool**: the agent has one custom HTTP tool (the fake API, answering at once), so the model calls it after 1 s
  and answers text 1 s after the result: ideal 2 s.

Before each burst one task runs alone, to show the stack's own latency at rest. Latency inflation is the burst's
latency over the ideal, minus one. Memory is each service's resident set (``VmRSS`` of ``/proc/<pid>/status``)
before the burst and its largest value during it, sampled every 50 ms. Writes its tables into docs/benchmarks.md
between its own markers unless ``--no-write`` or ``--quick`` (100 tasks instead of 1,000).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/many_tasks.py` from anywhere

from bench.harness import REPO, CpuMeter, Processes, memory_kib, percentile, start_processes
from bench.hotspots import find_py_spy, start_samplers, summarize
from bench.nl_tasks import AgentTarget, TaskTimes, follow_task, prepare_agent
from bench.report import cpu_steal, machine, write_section

DOC = REPO / "docs" / "benchmarks.md"
MARKERS = ("<!-- bench:many-tasks:start -->", "<!-- bench:many-tasks:end -->")
SERVICES = ("gateway", "agent", "integrator", "tool")
LLM_DELAY_S = 1.0
TASKS_PER_CLIENT = 25  # the load generator's tasks per httpx client (each task holds one connection at a time)
WORKLOADS = {"text": (0, 1 * LLM_DELAY_S), "tool": (1, 2 * LLM_DELAY_S)}  # tools bound, ideal latency (s)


@dataclass
class Burst:
    """One workload: a task alone, then ``count`` at once."""

    workload: str
    ideal: float
    alone: TaskTimes
    times: list[TaskTimes]
    elapsed: float  # first submission to last terminal event
    cpu: dict[str, float]
    rss_before: dict[str, int]  # KiB
    peak: dict[str, int]  # KiB, the largest VmRSS sampled during the burst

    def latency(self, q: float) -> float:
        return percentile([t.finished for t in self.times], q)

    def accepted(self, q: float) -> float:
        return percentile([t.accepted for t in self.times], q)


def _sampler() -> str:
    found = find_py_spy()
    if found is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


def _rss(processes: Processes) -> dict[str, int]:
    return {name: memory_kib(pid).get("VmRSS", 0) for name, pid in processes.pids.items()}


async def _sample_peaks(processes: Processes, peak: dict[str, int]) -> None:
    """Each service's largest resident set seen while the burst runs, sampled every 50 ms (VmHWM would also
    count what start-up touched and let go of)."""
    while True:
        for name, kib in _rss(processes).items():
            peak[name] = max(peak.get(name, 0), kib)
        await asyncio.sleep(0.05)


def _clients(target: AgentTarget, count: int) -> list[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=TASKS_PER_CLIENT, max_keepalive_connections=TASKS_PER_CLIENT)
    headers = {"Authorization": f"Bearer {target.token}"}
    return [
        httpx.AsyncClient(base_url=target.base_url, headers=headers, limits=limits, timeout=120, trust_env=False)
        for _ in range(-(-count // TASKS_PER_CLIENT))
    ]


async def burst(processes: Processes, workload: str, count: int, profile: float = 0.0) -> Burst:
    tools, ideal = WORKLOADS[workload]
    target = await prepare_agent(processes, tools=tools)
    clients = _clients(target, count)
    meter = CpuMeter(processes)
    try:
        alone = await follow_task(clients[0], target.agent_id)  # also warms this agent's path up
        rss_before = _rss(processes)
        peak = dict(rss_before)
        sampling = asyncio.create_task(_sample_peaks(processes, peak))
        samplers = start_samplers(_sampler(), processes, profile, rate=100) if profile else {}
        meter.start()
        t0 = time.perf_counter()
        times = await asyncio.gather(
            *(follow_task(clients[i // TASKS_PER_CLIENT], target.agent_id) for i in range(count))
        )
        elapsed = time.perf_counter() - t0
        cpu = meter.stop()
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(s.wait, profile + 30) for s in samplers.values()))
        for name in SERVICES:
            raw = processes.workdir / f"{name}.txt"
            if raw.exists():
                print(f"{workload}, {name}:\n{summarize(raw, 12)}\n", file=sys.stderr)
                shutil.copy(raw, Path(tempfile.gettempdir()) / f"many_tasks-{workload}-{name}.txt")
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return Burst(workload, ideal, alone, list(times), elapsed, cpu, rss_before, peak)


def _s(seconds: float) -> str:
    return f"{seconds:.3f}"


def report(bursts: list[Burst], count: int, settings: dict[str, str], steal: float) -> str:
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Run of {now} on {machine()}; CPU stolen by the hypervisor during the run: {steal:.1%}. "
        f"Stack settings: {', '.join(f'{k}={v}' for k, v in settings.items()) or 'defaults'}. "
        f"{count:,} tasks at once per workload; the model answers {LLM_DELAY_S:g} s after each request.",
        "",
        "| workload | ideal (s) | one task alone (s) | all accepted after (s) | accept p50 / p99 (s) "
        "| latency p50 / p99 / max (s) | inflation p50 / p99 | last answer after (s) | stack CPU per task (ms) "
        "| cores busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in bursts:
        stack_cpu = sum(b.cpu.get(n, 0.0) for n in SERVICES)
        busy = sum(b.cpu.values()) / b.elapsed
        lines.append(
            f"| {b.workload} | {b.ideal:g} | {_s(b.alone.finished)} | {_s(max(t.accepted for t in b.times))} "
            f"| {_s(b.accepted(50))} / {_s(b.accepted(99))} "
            f"| {_s(b.latency(50))} / {_s(b.latency(99))} / {_s(b.latency(100))} "
            f"| {b.latency(50) / b.ideal - 1:+.1%} / {b.latency(99) / b.ideal - 1:+.1%} | {_s(b.elapsed)} "
            f"| {1000 * stack_cpu / len(b.times):.2f} | {busy:.2f} |"
        )
    retried = sum(t.retried for b in bursts for t in b.times)
    if retried:
        lines += [
            "",
            f"{retried} event streams met a kept-alive connection the gateway had closed, and were asked again.",
        ]
    lines += [
        "",
        "Memory by process, MiB: resident before the burst → its peak during the burst, and the growth per task in "
        "flight (KiB); CPU over the burst, s:",
        "",
        "| workload | "
        + " | ".join(SERVICES)
        + " | growth per task (KiB): "
        + " / ".join(SERVICES)
        + " | CPU (s): "
        + " / ".join((*SERVICES, "mock llm", "load generator"))
        + " |",
        "| --- | " + " | ".join("---:" for _ in SERVICES) + " | ---: | ---: |",
    ]
    for b in bursts:
        rss = [f"{b.rss_before.get(n, 0) / 1024:.0f} → {b.peak.get(n, 0) / 1024:.0f}" for n in SERVICES]
        growth = " / ".join(f"{max(0, b.peak.get(n, 0) - b.rss_before.get(n, 0)) / len(b.times):.1f}" for n in SERVICES)
        cpu = " / ".join(f"{b.cpu.get(n, 0.0):.2f}" for n in (*SERVICES, "mock llm", "load generator"))
        lines.append(f"| {b.workload} | " + " | ".join(rss) + f" | {growth} | {cpu} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 tasks instead of 1,000; never writes")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    parser.add_argument("--tasks", type=int, help="tasks at once (default 1,000; 100 with --quick)")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="default: both")
    parser.add_argument("--setting", action="append", default=[], metavar="ALTAN_X=V", help="a stack setting")
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sample every service with py-spy for the burst's first SECONDS; print where their CPU went",
    )
    args = parser.parse_args()
    count = args.tasks or (100 if args.quick else 1000)
    settings = dict(s.split("=", 1) for s in args.setting)
    print("starting the fake API, the mock LLM and altan up ...", file=sys.stderr, flush=True)
    processes = start_processes(llm_delay_ms=LLM_DELAY_S * 1000, extra_env=settings)
    steal = cpu_steal()
    bursts = []
    try:
        for workload in args.workload or list(WORKLOADS):
            print(f"  {workload}: one task, then {count} at once", file=sys.stderr, flush=True)
            bursts.append(asyncio.run(burst(processes, workload, count, args.profile)))
    except Exception:
        print(processes.log_tail(), file=sys.stderr)
        raise
    finally:
        processes.stop()
    shutil.rmtree(processes.workdir, ignore_errors=True)
    table = report(bursts, count, settings, steal())
    print(table)
    if not args.no_write and not args.quick and args.tasks is None:
        write_section(DOC, MARKERS, table)
        print(f"\nwritten to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
