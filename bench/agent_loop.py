"""An agent task through the whole stack next to LangGraph's prebuilt ReAct agent in-process: ``bench/agent_loop.py``.

The task is the same on every side: a model turn that calls two tools at once, each an HTTP GET on a third party
that answers after 50 ms, then a model turn that answers text. The model is ``bench/mock_llm.py`` (OpenAI wire
format, streamed, answering at once) and the third party ``bench/fake_api.py --delay-ms 50``, one process each,
shared by all sides. The sides:

- **stack**: ``altan up``; the agent has two custom HTTP tools; a task is submitted over REST and followed on its
  Server-Sent Events to ``task.succeeded`` (gateway → agent → integrator → mock LLM; agent → integrator → tool →
  fake API per call; the events back through the gateway);
- **LangGraph**: ``create_react_agent`` over ``ChatOpenAI`` with two async httpx tools, in one process
  (``bench/langgraph_agent.py`` under ``.venv-langgraph``, a subprocess of this benchmark);
- **direct**: the same four HTTP exchanges written by hand with httpx in this process, no framework: the floor.

Each side runs at 1 and at 64 tasks in flight (closed loops, after a warm-up), one side at a time. The agent step
overhead of a task is its latency minus the 50 ms its tools must wait (the mock LLM answers at once); CPU per task is
summed over every process of a side (the stack's four services; LangGraph's one process; for the direct floor the
benchmark process itself), the mock LLM's and fake API's being counted apart. Writes its tables into
docs/benchmarks.md between its own markers unless ``--no-write`` or ``--quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/agent_loop.py` from anywhere

from bench.harness import REPO, CpuMeter, Phase, Processes, closed_loop, percentile, start_processes
from bench.hotspots import find_py_spy, start_samplers, summarize
from bench.nl_tasks import ANSWER, AgentTarget, follow_task, prepare_agent
from bench.report import cpu_steal, machine, write_section

DOC = REPO / "docs" / "benchmarks.md"
MARKERS = ("<!-- bench:agent-loop:start -->", "<!-- bench:agent-loop:end -->")
LANGGRAPH_PYTHON = REPO / ".venv-langgraph" / "bin" / "python"
SERVICES = ("gateway", "agent", "integrator", "tool")
TOOL_DELAY_MS = 50.0
BUSY = 64


@dataclass(frozen=True)
class Bounds:
    warmup: int
    single_ops: int
    single_seconds: float
    busy_ops: int
    busy_seconds: float
    idle_seconds: float


FULL = Bounds(warmup=64, single_ops=300, single_seconds=8, busy_ops=5000, busy_seconds=15, idle_seconds=4)
QUICK = Bounds(warmup=64, single_ops=50, single_seconds=2, busy_ops=1000, busy_seconds=4, idle_seconds=1)


@dataclass
class Side:
    """One side's two phases and what its CPU per task counts."""

    name: str
    single: Phase
    busy: Phase
    cpu_names: tuple[str, ...]
    idle_cores: float = 0.0  # CPU the side spends with no task at all (timers, health checks), in cores


def _client(target: AgentTarget) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)  # one per slot, as bench/run.py does
    headers = {"Authorization": f"Bearer {target.token}"}
    return httpx.AsyncClient(base_url=target.base_url, headers=headers, limits=limits, timeout=60, trust_env=False)


async def run_stack(processes: Processes, target: AgentTarget, bounds: Bounds, profile: float = 0.0) -> Side:
    clients = [_client(target) for _ in range(BUSY)]
    meter = CpuMeter(processes)

    def op(client: httpx.AsyncClient) -> Any:
        async def task() -> None:
            await follow_task(client, target.agent_id)

        return task

    ops = [op(c) for c in clients]
    try:
        await closed_loop(ops, max_ops=bounds.warmup, max_seconds=20)  # also opens every connection
        meter.start()
        await asyncio.sleep(bounds.idle_seconds)
        idle = sum(meter.stop().get(n, 0.0) for n in SERVICES) / bounds.idle_seconds
        single = await closed_loop(ops[:1], max_ops=bounds.single_ops, max_seconds=bounds.single_seconds, meter=meter)
        samplers = start_samplers(_sampler(), processes, profile, rate=100) if profile else {}
        busy = await closed_loop(ops, max_ops=bounds.busy_ops, max_seconds=bounds.busy_seconds, meter=meter)
        await asyncio.gather(*(asyncio.to_thread(s.wait, profile + 30) for s in samplers.values()))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    for name in SERVICES if profile else ():
        raw = processes.workdir / f"{name}.txt"
        if raw.exists():
            print(f"stack at {BUSY} in flight, {name}:\n{summarize(raw, 12)}\n", file=sys.stderr)
    return Side("stack", single, busy, SERVICES, idle)


def _sampler() -> str:
    found = find_py_spy()
    if found is None:
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


async def _direct_task(client: httpx.AsyncClient, llm: str, api: str) -> None:
    """The task's four exchanges by hand: the model's turn, both tools at once, the model's answer."""
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object", "required": ["customer"]}}}
        for n in ("crm_lookup", "order_lookup")
    ]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Answer customers."},
        {"role": "user", "content": "?"},
    ]
    body = {"model": "mock", "messages": messages, "tools": tools}
    first = (await client.post(llm, json=body)).json()["choices"][0]["message"]
    calls = first["tool_calls"]

    async def call(tool_call: dict[str, Any]) -> dict[str, Any]:
        customer = json.loads(tool_call["function"]["arguments"])["customer"]
        answer = await client.get(f"{api}/v1/{customer}.json")
        return {"role": "tool", "tool_call_id": tool_call["id"], "content": answer.text}

    results = await asyncio.gather(*(call(c) for c in calls))
    body["messages"] = [*messages, first, *results]
    final = (await client.post(llm, json=body)).json()["choices"][0]["message"]
    if len(calls) != 2 or final["content"] != ANSWER:
        raise RuntimeError(f"direct: unexpected answers {first} then {final}")


async def run_direct(processes: Processes, bounds: Bounds) -> Side:
    llm = processes.llm_url
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    meter = CpuMeter(processes)
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as client:
        ops = [lambda: _direct_task(client, llm, processes.fake_url)] * BUSY
        await closed_loop(ops, max_ops=bounds.warmup, max_seconds=20)
        single = await closed_loop(ops[:1], max_ops=bounds.single_ops, max_seconds=bounds.single_seconds, meter=meter)
        busy = await closed_loop(ops, max_ops=bounds.busy_ops, max_seconds=bounds.busy_seconds, meter=meter)
    return Side("direct", single, busy, ("load generator",))


def run_langgraph(processes: Processes, bounds: Bounds) -> Side:
    """LangGraph's phases in its own process; its CPU is its own ``process_time``, the mock's read from /proc."""
    command = [str(LANGGRAPH_PYTHON), str(REPO / "bench" / "langgraph_agent.py")]
    command += ["--llm", processes.llm_url.removesuffix("/chat/completions"), "--api", processes.fake_url]
    command += ["--warmup", str(bounds.warmup)]
    command += ["--phase", f"1:{bounds.single_ops}:{bounds.single_seconds}"]
    command += ["--phase", f"{BUSY}:{bounds.busy_ops}:{bounds.busy_seconds}"]
    done = subprocess.run(command, capture_output=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"langgraph_agent.py failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
    phases = json.loads(done.stdout)["phases"]
    single, busy = (
        Phase(p["in_flight"], p["latencies"], p["elapsed"], {"langgraph": p["cpu_seconds"]}) for p in phases
    )
    return Side("LangGraph", single, busy, ("langgraph",))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _overhead(phase: Phase, q: float) -> float:
    return percentile([v - TOOL_DELAY_MS / 1000 for v in phase.latencies], q)


def report(sides: dict[str, Side], settings: dict[str, str], steal: float) -> str:
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Run of {now} on {machine()}; CPU stolen by the hypervisor during the run: {steal:.1%}. "
        f"Stack settings: {', '.join(f'{k}={v}' for k, v in settings.items()) or 'defaults'}.",
        "",
        "| side | in flight | tasks | throughput (/s) | latency p50 / p99 (ms) | overhead p50 / p99 (ms) "
        "| CPU per task (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side in sides.values():
        for phase in (side.single, side.busy):
            lines.append(
                f"| {side.name} | {phase.concurrency} | {phase.count} | {phase.throughput:,.1f} "
                f"| {_ms(phase.p(50))} / {_ms(phase.p(99))} "
                f"| {_ms(_overhead(phase, 50))} / {_ms(_overhead(phase, 99))} "
                f"| {phase.cpu_ms_per_op(*side.cpu_names):.2f} |"
            )
    stack, graph = sides.get("stack"), sides.get("LangGraph")
    if stack is not None and graph is not None:
        lines += [
            "",
            "Stack / LangGraph (below 1.00: the stack spends less; the target is at most 1.00):",
            "",
            "| in flight | overhead p50 | overhead p99 | CPU per task |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for ours, theirs in ((stack.single, graph.single), (stack.busy, graph.busy)):
            lines.append(
                f"| {ours.concurrency} | {_overhead(ours, 50) / _overhead(theirs, 50):.2f} "
                f"| {_overhead(ours, 99) / _overhead(theirs, 99):.2f} "
                f"| {ours.cpu_ms_per_op(*SERVICES) / theirs.cpu_ms_per_op('langgraph'):.2f} |"
            )
        per = ", ".join(f"{n} {stack.busy.cpu_ms_per_op(n):.2f}" for n in (*SERVICES, "altan up"))
        mock = " / ".join(
            f"{s.busy.cpu_ms_per_op('mock llm') + s.busy.cpu_ms_per_op('fake api'):.2f}"
            for s in (stack, sides["direct"])
            if s is not None
        )
        lines += [
            "",
            f"Stack CPU per task at {BUSY} in flight by process (ms): {per}; the load generator (the user's client) "
            f"{stack.busy.cpu_ms_per_op('load generator'):.2f}, not counted. Mock LLM + fake API per task, stack / "
            f"direct: {mock} (the same work on every side).",
            "",
            f"With no task at all the stack's four services spend {1000 * stack.idle_cores:.1f} ms of CPU a second "
            f"(timers, health checks): {1000 * stack.idle_cores / stack.single.throughput:.1f} ms of each task's CPU "
            f"at 1 in flight, {1000 * stack.idle_cores / stack.busy.throughput:.2f} ms at {BUSY}.",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases, for a smoke run; never writes")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    parser.add_argument("--no-langgraph", action="store_true", help="skip the LangGraph side")
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"sample every service with py-spy for the stack's first SECONDS at {BUSY} in flight; print where",
    )
    parser.add_argument("--tool-concurrency", type=int, help="ALTAN_TOOL_CONCURRENCY for the stack (default: its own)")
    args = parser.parse_args()
    if not args.no_langgraph and not LANGGRAPH_PYTHON.exists():
        print(
            "no .venv-langgraph: python3.11 -m venv .venv-langgraph && "
            ".venv-langgraph/bin/pip install -r bench/langgraph-requirements.txt (or pass --no-langgraph)",
            file=sys.stderr,
        )
        return 2
    bounds = QUICK if args.quick else FULL
    settings = {"ALTAN_TOOL_CONCURRENCY": str(args.tool_concurrency)} if args.tool_concurrency else {}
    print("starting the fake API, the mock LLM and altan up ...", file=sys.stderr, flush=True)
    processes = start_processes(fake_delay_ms=TOOL_DELAY_MS, llm_delay_ms=0, extra_env=settings)
    steal = cpu_steal()
    sides: dict[str, Side] = {}
    try:
        print("  stack: warm-up, 1 and 64 in flight", file=sys.stderr, flush=True)
        target = asyncio.run(prepare_agent(processes, tools=2))
        sides["stack"] = asyncio.run(run_stack(processes, target, bounds, args.profile))
        print("  direct: warm-up, 1 and 64 in flight", file=sys.stderr, flush=True)
        sides["direct"] = asyncio.run(run_direct(processes, bounds))
        if not args.no_langgraph:
            print("  LangGraph: warm-up, 1 and 64 in flight", file=sys.stderr, flush=True)
            sides["LangGraph"] = run_langgraph(processes, bounds)
    except Exception:
        print(processes.log_tail(), file=sys.stderr)
        raise
    finally:
        processes.stop()
    shutil.rmtree(processes.workdir, ignore_errors=True)
    table = report(sides, settings, steal())
    print(table)
    if not args.no_write and not args.quick:
        write_section(DOC, MARKERS, table)
        print(f"\nwritten to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
