"""Chaos: a random service is SIGKILLed every 1.5 s while 200 tasks run; ``altan up`` restarts it. Every task
ends, every one succeeds, and each step's call was performed once per Idempotency-Key at a third party that honours
the key (issue 9's "Done when").

Both modes kill any service, the agent included: its tasks are taken up again by the restarted agent, from the
Redis stream after their lease, or embedded from the queue kept in the SQLite state under ALTAN_DATA_DIR.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack, new_tenant, start_stack

TASKS = 200
KILL_EVERY_SECONDS = 1.5
STEP_SECONDS = 1.0  # what each step's call takes at the third party: the run lasts long enough for several kills
# At most this many kills in a run: a service killed again within a minute comes back after a doubling delay
# (supervision's crash-loop backoff), and the run must stay short enough for CI.
MAX_KILLS = 10
TERMINAL = ("succeeded", "failed", "cancelled")


def _again(call: Any, deadline: float) -> httpx.Response:
    """A request, made again while the gateway or a service behind it is down (transport error or 503)."""
    while True:
        try:
            answer: httpx.Response = call()
        except httpx.TransportError:
            answer = httpx.Response(599)
        if answer.status_code not in (503, 599) or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)  # a restart takes about a second: nothing to wait on but the clock


class Killer(threading.Thread):
    """Kills one of ``services`` (chosen by a seeded random) every ``every`` seconds until stopped."""

    def __init__(self, stack: Stack, services: tuple[str, ...], every: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.stack, self.services, self.every = stack, services, every
        self.random = random.Random(seed)
        self.stopped = threading.Event()
        self.killed: list[str] = []

    def run(self) -> None:
        while not self.stopped.wait(self.every) and len(self.killed) < MAX_KILLS:
            service = self.random.choice(self.services)
            pid = self.stack.service_pids().get(service)
            if pid is not None:  # (not while it waits to be restarted)
                os.kill(pid, signal.SIGKILL)
                self.killed.append(service)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["redis", "embedded"])
def test_200_tasks_survive_a_service_killed_every_few_seconds(
    mode: str, request: pytest.FixtureRequest, tmp_path: Path, third_party: FakeThirdParty
) -> None:
    url = request.getfixturevalue("redis_url") if mode == "redis" else None
    env = {
        "ALTAN_TASK_LEASE_SECONDS": "2",
        # A step outlives a restart of the tool service: the integrator retries the hop within the call's deadline.
        "ALTAN_TOOL_RETRY_ATTEMPTS": "10",
        "ALTAN_CALL_DEADLINE_SECONDS": "20",
        "ALTAN_LOG_LEVEL": "INFO",
    }
    stack = start_stack(
        data_dir=tmp_path / "data", egress_allow=f"127.0.0.1:{third_party.port}", redis_url=url, extra_env=env
    )
    tenant = new_tenant()
    path = f"/idempotent/chaos-{tenant}"
    services = ("agent", "tool", "integrator", "gateway")
    seed = int(os.environ.get("CHAOS_SEED") or uuid.uuid4().int % 10_000)
    killer = Killer(stack, services, KILL_EVERY_SECONDS, seed)
    try:
        with stack.client(tenant) as api:
            agent_id = api.post("/v1/agents", json={"name": "chaos", "tools": ["http_request"]}).json()["id"]
            deadline = time.monotonic() + 240
            killer.start()
            task_ids = []
            for index in range(TASKS):
                url_of = f"{third_party.base_url}{path}?sleep={STEP_SECONDS}"
                plan = {
                    "plan": [
                        {"id": "s1", "tool": "http_request", "arguments": {"url": url_of}},
                        {"id": "s2", "tool": "http_request", "depends_on": ["s1"], "arguments": {"url": url_of}},
                    ]
                }
                body = {"input": plan, "idempotency_key": f"chaos-{index}"}  # a retried submit is the same task
                submitted = _again(lambda b=body: api.post(f"/v1/agents/{agent_id}/tasks", json=b), deadline)
                assert submitted.status_code == 202, submitted.text
                task_ids.append(submitted.json()["task_id"])
            assert len(set(task_ids)) == TASKS

            tasks: dict[str, dict[str, Any]] = {}
            while len(tasks) < TASKS and time.monotonic() < deadline:
                for task_id in [t for t in task_ids if t not in tasks]:
                    answer = _again(lambda t=task_id: api.get(f"/v1/tasks/{t}"), deadline)
                    assert answer.status_code == 200, answer.text
                    if answer.json()["status"] in TERMINAL:
                        tasks[task_id] = answer.json()
                if len(tasks) < TASKS:
                    time.sleep(0.5)  # polling 200 tasks: nothing else to wait on
            killer.stopped.set()
            killer.join()
        where = f"seed {seed}, killed {killer.killed}"
        stuck = [t for t in task_ids if t not in tasks][:1]
        if stuck:
            with stack.client(tenant) as api:
                where += f"; one of them: {api.get(f'/v1/tasks/{stuck[0]}').text[:1500]}"
        assert len(tasks) == TASKS, f"{TASKS - len(tasks)} tasks never ended ({where})"
        failed = {t: task["error"] for t, task in tasks.items() if task["status"] != "succeeded"}
        assert not failed, f"{len(failed)} tasks did not succeed ({where}): {list(failed.items())[:3]}"
        assert len(killer.killed) >= 3, where
        # Each step's call was performed once per key, however many times it was sent.
        performed = {key: n for key, n in third_party.performed.items() if key.split(":")[0] in tasks}
        assert performed == {f"{t}:{s}": 1 for t in task_ids for s in ("s1", "s2")}, where
        sent = [r.headers.get("Idempotency-Key") for r in third_party.requests_to(path)]
        assert all(key is not None and key.split(":")[0] in tasks for key in sent)
    finally:
        killer.stopped.set()
        assert stack.stop() == 0, stack.logs()[-3000:]
        if url:
            client = redis.Redis.from_url(url)
            for pattern in (f"altan:{tenant}:*", f"{stack.env['ALTAN_TASK_QUEUE']}*"):
                keys = list(client.scan_iter(match=pattern, count=1000))
                if keys:
                    client.delete(*keys)
            client.close()
