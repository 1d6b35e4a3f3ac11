"""``altan up`` supervises its services as Kubernetes does a pod's: a service that dies comes back with backoff,
``/readyz`` says so meanwhile, and only Ctrl-C / SIGTERM ends the stack."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.stack import Stack, start_stack


def wait_until(condition: Callable[[], bool], what: str, stack: Stack, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}:\n{stack.logs()[-3000:]}"
        time.sleep(0.05)


def ready_status(stack: Stack) -> int | None:
    """What /readyz answers, or None while nothing listens on the REST port (the gateway is down)."""
    try:
        return httpx.get(f"{stack.base_url}/readyz", timeout=5, trust_env=False).status_code
    except httpx.TransportError:
        return None


def kill_and_wait_for_restart(stack: Stack, service: str) -> int:
    """SIGKILL ``service``; wait until the stack is not ready, then until a new process makes it ready; its pid."""
    before = stack.service_pids()[service]
    restarted = f"altan: {service} restarted (pid "
    seen = stack.logs().count(restarted)
    os.kill(before, signal.SIGKILL)
    wait_until(lambda: ready_status(stack) != 200, f"/readyz notices that {service} is down", stack)
    wait_until(lambda: stack.logs().count(restarted) > seen, f"altan up restarts {service}", stack)
    wait_until(lambda: ready_status(stack) == 200, f"/readyz is 200 again after {service} restarted", stack)
    after = stack.service_pids()[service]
    assert after != before
    assert f"altan: {service} (pid {before}) was killed by SIGKILL after" in stack.logs()
    return after


def retry_while_unavailable(call: Callable[[], httpx.Response], timeout: float = 5) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (answer := call()).status_code == 503 and time.monotonic() < deadline:
        assert answer.json()["error"]["code"] == "UNAVAILABLE", answer.text
        time.sleep(0.1)
    return answer


@pytest.mark.parametrize("mode", ["embedded", "redis"])
def test_each_service_killed_comes_back_and_the_stack_serves_again(
    tmp_path: Path, request: pytest.FixtureRequest, tenant: str, mode: str
) -> None:
    url = request.getfixturevalue("redis_url") if mode == "redis" else None
    stack = start_stack(data_dir=tmp_path / "data", egress_allow="", redis_url=url)
    try:
        with stack.client(tenant) as api:
            created = api.post("/v1/agents", json={"name": "before", "tools": ["json_extract"]})
            assert created.status_code == 201, created.text
            for service in ("agent", "tool", "integrator", "gateway"):
                kill_and_wait_for_restart(stack, service)
                assert stack.process.poll() is None
                # A REST call through the restarted service works: at once from the gateway, whose channel the
                # readiness probe exercised; the other services' channels to it reconnect within their capped
                # reconnect backoff (2 s), answering 503 UNAVAILABLE until then.
                agent = retry_while_unavailable(
                    lambda s=service: api.post("/v1/agents", json={"name": f"after-{s}", "tools": ["json_extract"]})
                )
                assert agent.status_code == 201, agent.text
                assert api.get(f"/v1/agents/{agent.json()['id']}").json()["name"] == f"after-{service}"
                invoked = api.post("/v1/tools/json_extract/invoke", json={"arguments": {"data": {"k": 1}, "path": "k"}})
                assert invoked.status_code == 200, invoked.text
                # State outlives any process: in Redis, or in the embedded state file under the data directory.
                kept = api.get(f"/v1/agents/{created.json()['id']}")
                assert kept.status_code == 200 and kept.json()["name"] == "before", kept.text
        assert "Traceback" not in stack.logs()
    finally:
        assert stack.stop() == 0, stack.logs()[-3000:]


def test_a_service_that_keeps_dying_is_restarted_with_growing_delays_and_sigterm_stops_during_the_wait(
    tmp_path: Path,
) -> None:
    stack = start_stack(data_dir=tmp_path / "data", egress_allow="", redis_url=None)
    stopped = False
    try:
        restarted = "altan: tool restarted (pid "
        for kills in range(1, 4):
            os.kill(stack.service_pids()["tool"], signal.SIGKILL)
            wait_until(lambda k=kills: stack.logs().count(restarted) == k, f"restart number {kills}", stack)
        delays = [float(d) for d in re.findall(r"altan: tool \(pid \d+\) .* restarting it in ([\d.]+) s", stack.logs())]
        assert delays == [0.5, 1, 2], stack.logs()[-3000:]
        assert "(crash loop: 3rd exit in a row, backing off up to 30 s)" in stack.logs()

        # The fourth exit waits 4 s: SIGTERM within that wait stops the stack cleanly, without a restart.
        os.kill(stack.service_pids()["tool"], signal.SIGKILL)
        wait_until(lambda: "restarting it in 4 s" in stack.logs(), "the fourth restart is scheduled", stack)
        others = stack.service_pids()
        assert "tool" not in others
        began = time.monotonic()
        code = stack.stop()
        stopped = True
        assert code == 0, stack.logs()[-3000:]
        assert time.monotonic() - began < 4
        assert "altan: tool not restarted: stopping" in stack.logs()
        assert stack.logs().count(restarted) == 3
        for pid in others.values():
            assert not Path(f"/proc/{pid}").exists()
    finally:
        if not stopped:
            stack.stop()
