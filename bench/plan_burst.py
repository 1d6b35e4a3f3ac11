"""1,000 one-step plan tasks at once, the tool answering after 1 s: ``bench/plan_burst.py``.

Issue 9's scale target: 1,000 such tasks accepted within 2 s and all finished within 3 s on 2 vCPU. The benchmark
starts the stack and ``bench/fake_api.py --delay-ms 1000``, binds ``http_request`` to an agent, then submits
``--tasks`` tasks ``{"plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": <fake API>}}]}`` from
``--submitters`` concurrent clients (one keep-alive connection each). "Accepted after" is when the last ``202``
arrived; "finished after" is the last task's ``updated_at`` (its terminal write, on the stack's clock) after the
first submission, read once every task is terminal (polled once a second in the order they were accepted, stopping at
the first still running, so as not to load the stack meanwhile).
CPU is each process's over the burst. Prints a Markdown table; nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/plan_burst.py` from anywhere

from bench.harness import CpuMeter, percentile, start_processes

SERVICES = ("gateway", "agent", "integrator", "tool")


async def burst(base: str, token: str, agent_id: str, url: str, tasks: int, submitters: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"}
    plan = {"plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": url}}]}
    accepted: list[float] = []
    ids: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(tasks):
        queue.put_nowait(index)
    clients = [
        httpx.AsyncClient(base_url=base, headers=headers, timeout=60, trust_env=False) for _ in range(submitters)
    ]
    started = time.monotonic()
    started_ms = time.time() * 1000

    async def submitter(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            answer = await client.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan})
            answer.raise_for_status()
            accepted.append(time.monotonic() - started)
            ids.append(answer.json()["task_id"])

    await asyncio.gather(*(submitter(c) for c in clients))
    all_accepted = time.monotonic() - started
    client = clients[0]
    pending = list(ids)  # in the order they were accepted
    ends: list[float] = []
    failed = 0
    while pending:
        await asyncio.sleep(1.0)
        # Tasks end about in the order they were accepted: each round reads them in that order and stops at the
        # first still running, so that the polling costs the stack about one read per task, not one per task and
        # second (which was most of the gateway's CPU in this benchmark).
        while pending:
            task = (await client.get(f"/v1/tasks/{pending[0]}")).json()
            if task["status"] not in ("succeeded", "failed", "cancelled"):
                break
            pending.pop(0)
            failed += task["status"] != "succeeded"
            ends.append(_ms(task["updated_at"]) - started_ms)
    for each in clients:
        await each.aclose()
    return {
        "accepted": all_accepted,
        "accept_p50": percentile(accepted, 50),
        "finished": max(ends) / 1000,
        "failed": failed,
    }


def _ms(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--submitters", type=int, default=256)
    parser.add_argument("--redis-url")
    parser.add_argument("--label", default="this tree")
    args = parser.parse_args()
    processes = start_processes(redis_url=args.redis_url, fake_delay_ms=1000)
    try:
        token = processes.token("bench")
        with httpx.Client(base_url=processes.base_url, headers={"Authorization": f"Bearer {token}"}) as api:
            agent = api.post("/v1/agents", json={"name": "burst", "tools": ["http_request"]})
            agent.raise_for_status()
            agent_id = agent.json()["id"]
        url = f"{processes.fake_url}/lookup"
        # Warm-up: connections, caches, the first task's imports.
        asyncio.run(burst(processes.base_url, token, agent_id, url, 20, 4))
        meter = CpuMeter(processes)
        meter.start()
        result = asyncio.run(burst(processes.base_url, token, agent_id, url, args.tasks, args.submitters))
        cpu = meter.stop()
    finally:
        processes.stop()
    stack_cpu = sum(cpu.get(name, 0.0) for name in SERVICES)
    state = "Redis" if args.redis_url else "embedded"
    print(
        "| tree | state | tasks | submitters | all accepted after (s) | accept p50 (s) | submits/s "
        "| all finished after (s) | failed | stack CPU per task (ms) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {args.label} | {state} | {args.tasks} | {args.submitters} | {result['accepted']:.2f} "
        f"| {result['accept_p50']:.2f} | {args.tasks / result['accepted']:.0f} | {result['finished']:.2f} "
        f"| {result['failed']:.0f} | {1000 * stack_cpu / args.tasks:.2f} |"
    )
    print("CPU (s): " + ", ".join(f"{name} {cpu.get(name, 0.0):.2f}" for name in (*SERVICES, "load generator")))


if __name__ == "__main__":
    main()
