"""What a task costs the stack, this tree side by side with other revisions in one run: ``python bench/task_cost.py``.

Issue 9: "a task through the durable queue costs no more stack CPU than before it" (the README's 3-step plan of
``bench/run.py``'s ``task`` path: submit, then follow its events to the end). Several stacks run at once on free
ports, each with its own fake API:

- ``before``: ``--before`` (default 3933be1, the main line before the durable queue), exported with ``git archive``
  into a temporary directory and run from there with this environment (``bench/tracing_cost.py`` does the same);
- ``REV`` for each ``--also-on REV`` (say ``main``: the code this tree changes);
- ``this``: this tree.

The path runs in rounds at ``bench/run.py``'s concurrency, the stacks taking turns in a rotating order so that a
shared machine's drift spreads over all of them; stack CPU (gateway, agent, integrator, tool, from /proc) per task is
summed over the rounds, and each stack is compared with ``before``: pooled, and the median of the rounds' ratios.
With ``--redis-url`` every stack keeps its state in that Redis (each its own work-queue key; tenants are fresh per
run), flushed first. Prints a Markdown table; ``--write`` puts it into docs/benchmarks.md between its own markers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import statistics
import sys
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/task_cost.py` from anywhere

from bench.harness import REPO, CpuMeter, Phase, Processes, closed_loop, cpu_ticks, start_processes
from bench.run import BOUNDS, LABELS, SERVICES, _machine
from bench.scenarios import Worker, prepare
from bench.tracing_cost import _export, _git

DOC = REPO / "docs" / "benchmarks.md"
BEFORE = "3933be1"  # main just before the durable queue (merge e9b4752) came in


def _markers(state: str) -> tuple[str, str]:
    return f"<!-- bench:task-cost:{state}:start -->", f"<!-- bench:task-cost:{state}:end -->"


async def measure(stacks: dict[str, Processes], path: str, rounds: int, seconds: float) -> dict[str, list[Phase]]:
    targets = {name: await prepare(processes) for name, processes in stacks.items()}
    b = BOUNDS[path]
    workers = {name: [Worker(target) for _ in range(b.busy)] for name, target in targets.items()}
    meters = {name: CpuMeter(processes) for name, processes in stacks.items()}
    variants = list(stacks)
    phases: dict[str, list[Phase]] = {v: [] for v in variants}
    try:
        ops = {name: [w.operation(path) for w in workers[name]] for name in variants}
        print(f"  {path}: warm-up, then {rounds} rounds of {b.busy} in flight", file=sys.stderr, flush=True)
        for name in variants:
            await closed_loop(ops[name], max_ops=b.warmup, max_seconds=10)
        for round_ in range(rounds):
            for name in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
                phase = await closed_loop(ops[name], max_ops=b.busy_ops, max_seconds=seconds, meter=meters[name])
                phases[name].append(phase)
    finally:
        await asyncio.gather(*(w.aclose() for group in workers.values() for w in group))
    return phases


def _per_op(phases: list[Phase], *names: str) -> float:
    return 1000 * sum(sum(p.cpu.get(n, 0.0) for n in names) for p in phases) / max(1, sum(p.count for p in phases))


def _ratio(runs: list[Phase], base: list[Phase]) -> str:
    pooled = _per_op(runs, *SERVICES) / _per_op(base, *SERVICES)
    median = statistics.median(
        _per_op([p], *SERVICES) / _per_op([b], *SERVICES) for p, b in zip(runs, base, strict=True)
    )
    return f"{pooled:.2f} ({median:.2f})"


def report(phases: dict[str, list[Phase]], path: str, state: str, revisions: dict[str, str], steal: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    names = "; ".join(f"`{name}` is {rev}" for name, rev in revisions.items())
    lines = [
        f"Run of {now} on {_machine(state)}; load average at the end {load}; CPU stolen by the hypervisor during the "
        f"run: {steal:.1%}. {names}.",
        "",
        "| path | stack | tasks | throughput (/s) | p50 (ms) | stack CPU per task (ms) | per round (ms) "
        "| x before: pooled (median of rounds) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, runs in phases.items():
        count = sum(p.count for p in runs)
        latencies = sorted(x for p in runs for x in p.latencies)
        p50 = latencies[len(latencies) // 2] if latencies else 0.0
        rounds = " / ".join(f"{_per_op([p], *SERVICES):.2f}" for p in runs)
        ratio = "-" if name == "before" else _ratio(runs, phases["before"])
        lines.append(
            f"| {LABELS[path]} | {name} | {count} | {count / sum(p.elapsed for p in runs):,.0f} | {p50 * 1000:.1f} "
            f"| {_per_op(runs, *SERVICES):.2f} | {rounds} | {ratio} |"
        )
    lines += [
        "",
        "CPU per task by process (ms), summed over the rounds:",
        "",
        "| stack | " + " | ".join(SERVICES) + " |",
        "| --- | " + " | ".join("---:" for _ in SERVICES) + " |",
    ]
    for name, runs in phases.items():
        lines.append(f"| {name} | " + " | ".join(f"{_per_op(runs, s):.2f}" for s in SERVICES) + " |")
    return "\n".join(lines)


def write_doc(table: str, state: str) -> None:
    start, end = _markers(state)
    text = DOC.read_text()
    block = f"{start}\n{table}\n{end}"
    if start not in text:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    else:
        head, _, rest = text.partition(start)
        text = head + block + rest.partition(end)[2]
    DOC.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default="task", choices=sorted(BOUNDS), help="bench/run.py's path (default task)")
    parser.add_argument("--before", default=BEFORE, help=f"the revision compared with (default {BEFORE})")
    parser.add_argument("--also-on", metavar="REV", action="append", default=[], help="also run REV's code")
    parser.add_argument("--redis-url", help="every stack's state in this Redis (flushed first)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds on each stack")
    parser.add_argument("--seconds", type=float, default=8.0, help="at most this long per phase")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    trees = {"before": _export(args.before), **{rev: _export(rev) for rev in args.also_on}}
    revisions = {name: (tree / ".revision").read_text()[:12] for name, tree in trees.items()}
    revisions["this"] = _git("rev-parse", "--short=12", "HEAD") + (" + changes" if _git("status", "--short") else "")
    if args.redis_url:
        redis.Redis.from_url(args.redis_url).flushdb()
    stacks: dict[str, Processes] = {}
    print(f"starting {len(trees) + 1} stacks ...", file=sys.stderr, flush=True)
    try:
        for name, code in [*trees.items(), ("this", REPO)]:
            # Each stack its own work queue when they share a Redis (an older tree ignores the setting).
            queue = {"ALTAN_TASK_QUEUE": f"altan::bench:{uuid.uuid4().hex[:8]}"}
            stacks[name] = start_processes(redis_url=args.redis_url, code=code, extra_env=queue)
        steal_before, total_before = cpu_ticks()
        phases = asyncio.run(measure(stacks, args.path, args.rounds, args.seconds))
        steal_after, total_after = cpu_ticks()
    except Exception:
        for name, processes in stacks.items():
            print(f"--- {name}\n{processes.log_tail()}", file=sys.stderr)
        raise
    finally:
        for processes in stacks.values():
            processes.stop()
            shutil.rmtree(processes.workdir, ignore_errors=True)
        for tree in trees.values():
            shutil.rmtree(tree, ignore_errors=True)
    state = "Redis state" if args.redis_url else "embedded state (SQLite)"
    steal = (steal_after - steal_before) / max(1, total_after - total_before)
    table = report(phases, args.path, state, revisions, steal)
    print(table)
    if args.write:
        write_doc(table, "redis" if args.redis_url else "embedded")
        print(f"\nwritten to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
