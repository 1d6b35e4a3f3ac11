"""1,000 one-step plan tasks at once, the tool answering after 1 s: ``bench/plan_burst.py``.

Issue 9's scale target: 1,000 such tasks accepted within 2 s and all finished within 3 s on 2 vCPU. The benchmark
starts the stack and ``bench/fake_api.py --delay-ms 1000``, binds ``http_request`` to an agent, then submits
``--tasks`` tasks ``{"plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": <fake API>}}]}`` from
``--submitters`` concurrent clients (one keep-alive connection each). "Accepted after" is when the last ``202``
arrived; "finished after" is the last task's ``updated_at`` (its terminal write, on the stack's clock) after the
first submission, read once every task is terminal (polled once a second in the order they were accepted, stopping at
the first still running, so as not to load the stack meanwhile).

The submitters are aiohttp (one connector, a connection per submitter): an httpx pool spent more CPU than the stack
did, so the load generator measured itself. Its CPU is reported apart ("client CPU"), with the stack's.

CPU is each process's over the burst (submission and run); "accept CPU" is the stack's until the last ``202``,
per task, which is what acceptance costs. With ``--also-on REV`` the same burst also runs on that revision's code (a
tree exported from git), the stacks taking turns for ``--rounds`` rounds, one at a time, so both see the same machine.
``--profile DIR`` samples each service with py-spy during the burst (``pip install py-spy``) into DIR.
``--accept-only`` lets one task run at a time (``ALTAN_TASK_CONCURRENCY=1``) and does not wait for the tasks: the
burst then measures acceptance alone, without the runs competing for the CPU ("finished" is then not measured).
Prints a Markdown table; nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/plan_burst.py` from anywhere

from bench.harness import REPO, CpuMeter, Processes, percentile, start_processes
from bench.tracing_cost import _export

SERVICES = ("gateway", "agent", "integrator", "tool")


async def burst(
    base: str,
    token: str,
    agent_id: str,
    url: str,
    tasks: int,
    submitters: int,
    meter: CpuMeter | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Submit ``tasks`` tasks from ``submitters`` clients, wait for all to end; ``meter`` is read once all were
    answered (what acceptance cost)."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    plan = {"plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": url}}]}
    body = json.dumps({"input": plan}).encode()  # the same bytes for every submission
    accepted: list[float] = []
    ids: list[str] = []
    refused: dict[int, int] = {}
    remaining = tasks
    connector = aiohttp.TCPConnector(limit=submitters, force_close=False)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector) as session:
        started = time.monotonic()
        started_ms = time.time() * 1000

        async def submitter() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with session.post(f"/v1/agents/{agent_id}/tasks", data=body) as answer:
                    doc = await answer.json()
                    if answer.status != 202:
                        refused[answer.status] = refused.get(answer.status, 0) + 1
                        continue
                accepted.append(time.monotonic() - started)
                ids.append(doc["task_id"])

        await asyncio.gather(*(submitter() for _ in range(submitters)))
        all_accepted = time.monotonic() - started
        accept_cpu = meter.stop() if meter is not None else {}
        pending = dict.fromkeys(ids if wait else ())
        ends: list[float] = []
        failed = 0
        while pending:
            await asyncio.sleep(1.0)
            # In submission order, up to the first still running: the next round goes on from there, so the stack
            # answers about one read per task in all rather than one per task and round.
            for task_id in list(pending):
                async with session.get(f"/v1/tasks/{task_id}") as answer:
                    task = await answer.json()
                if task["status"] not in ("succeeded", "failed", "cancelled"):
                    break
                del pending[task_id]
                failed += task["status"] != "succeeded"
                ends.append(_ms(task["updated_at"]) - started_ms)
    return {
        "accepted": all_accepted,
        "accept_cpu": accept_cpu,
        "count": len(ids),
        "accept_p50": percentile(accepted, 50) if accepted else float("nan"),
        "finished": max(ends) / 1000 if ends else float("nan"),
        "failed": failed,
        "refused": refused,
    }


def _ms(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000


def _profile(processes: Processes, directory: Path, label: str, seconds: int) -> list[subprocess.Popen[bytes]]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                py_spy,
                "record",
                "--nonblocking",
                "-r",
                "50",
                "-d",
                str(seconds),
                "-f",
                "raw",
                "-p",
                str(pid),
                "-o",
                str(directory / f"{label}-{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in processes.pids.items()
    ]


def run_once(args: argparse.Namespace, label: str, code: Path) -> dict[str, Any]:
    if args.redis_url:
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
    # --accept-only: one task runs at a time, so the burst measures what accepting costs, alone.
    extra = {"ALTAN_TASK_CONCURRENCY": "1"} if args.accept_only else {}
    processes = start_processes(redis_url=args.redis_url, fake_delay_ms=1000, code=code, extra_env=extra)
    try:
        token = processes.token("bench")
        with httpx.Client(base_url=processes.base_url, headers={"Authorization": f"Bearer {token}"}) as api:
            agent = api.post("/v1/agents", json={"name": "burst", "tools": ["http_request"]})
            agent.raise_for_status()
            agent_id = agent.json()["id"]
        url = f"{processes.fake_url}/lookup"
        # Warm-up: connections, caches, the first task's imports.
        asyncio.run(burst(processes.base_url, token, agent_id, url, 20, 4))
        spies = _profile(processes, Path(args.profile), label, 8) if args.profile else []
        meter = CpuMeter(processes)
        accept_meter = CpuMeter(processes)
        load = os.getloadavg()[0]
        meter.start()
        accept_meter.start()
        submitting = burst(
            processes.base_url, token, agent_id, url, args.tasks, args.submitters, accept_meter, not args.accept_only
        )
        result = asyncio.run(submitting)
        cpu = meter.stop()
        for spy in spies:
            spy.wait(30)
    finally:
        processes.stop()
    result.update(label=label, cpu=cpu, load=load)
    return result


def _row(args: argparse.Namespace, row: dict[str, Any]) -> str:
    state = "Redis" if args.redis_url else "embedded"
    stack = sum(row["cpu"].get(name, 0.0) for name in SERVICES)
    accept = sum(row["accept_cpu"].get(name, 0.0) for name in SERVICES)
    refused = ", ".join(f"{n} x{status}" for status, n in sorted(row["refused"].items())) or "0"
    count = max(1, row["count"])  # CPU per accepted task: a refused submission costs little
    return (
        f"| {row['label']} | {state} | {args.tasks} | {args.submitters} | {row['accepted']:.2f} "
        f"| {row['accept_p50']:.2f} | {count / row['accepted']:.0f} | {row['finished']:.2f} "
        f"| {row['failed']:.0f} | {refused} | {1000 * stack / count:.2f} | {1000 * accept / count:.2f} "
        f"| {1000 * row['cpu']['load generator'] / count:.2f} | {row['load']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--submitters", type=int, default=256)
    parser.add_argument("--redis-url", help="Redis state and queue (a database it may flush: use one no test uses)")
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--also-on", metavar="REV", help="also run REV's code, taking turns with this tree's")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", metavar="DIR", help="sample each service with py-spy into DIR")
    parser.add_argument(
        "--accept-only", action="store_true", help="one task runs at a time (ALTAN_TASK_CONCURRENCY=1); no waiting"
    )
    args = parser.parse_args()
    trees = [(args.label, REPO)]
    if args.also_on:
        trees.insert(0, (args.also_on, _export(args.also_on)))
    rows = []
    try:
        for round_ in range(args.rounds):
            for label, code in trees if round_ % 2 == 0 else reversed(trees):
                rows.append(run_once(args, label, code))
                print(_row(args, rows[-1]), file=sys.stderr, flush=True)
    finally:
        for _, code in trees:
            if code != REPO:
                shutil.rmtree(code, ignore_errors=True)
    print(
        "| tree | state | tasks | submitters | all accepted after (s) | accept p50 (s) | submits/s "
        "| all finished after (s) | failed | refused | stack CPU per accepted task (ms) | accept CPU per task (ms) "
        "| client CPU per task (ms) | load avg |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(_row(args, row))
    for row in rows:
        for phase, cpu in (("burst", row["cpu"]), ("until accepted", row["accept_cpu"])):
            spent = ", ".join(f"{name} {cpu.get(name, 0.0):.2f}" for name in (*SERVICES, "load generator"))
            print(f"CPU (s) of {row['label']}, {phase}: {spent}")


if __name__ == "__main__":
    main()
