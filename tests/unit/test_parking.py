"""TaskRunner over a queue whose deliveries must not wait long (work_queue.ParkingQueue, as Cloud Tasks' pushes):
a run waiting for approval parks (its progress saved, its delivery ended, a wake-up due after the deadline), the
decision wakes it, and a run that did not park is never woken (which would start a second run elsewhere)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import pytest

from altan.store import MemoryBackend, TenantStore
from services.agent.agents import AgentCatalog
from services.agent.tasks import TaskLimits, TaskRunner
from services.agent.work_queue import LocalWorkQueue, ParkingQueue, WorkItem
from tests.unit.test_durable_tasks import QUEUE, agent_of, delegate
from tests.unit.test_task_runner import WAIT, FakeTools, as_caller, follow, kinds, step, submit


class ParkingLocalQueue(LocalWorkQueue):
    """The embedded queue with wake-ups: one due now is delivered at once; a later one is only recorded."""

    def __init__(self, backend: MemoryBackend, park_after_seconds: float) -> None:
        super().__init__(backend, key=QUEUE, concurrency=100)
        self.park_after_seconds = park_after_seconds
        self.wakes: list[tuple[WorkItem, str, int | None]] = []

    async def wake(self, item: WorkItem, reason: str, *, at_ms: int | None = None) -> None:
        self.wakes.append((item, reason, at_ms))
        if at_ms is None:
            await self.put(item)


class Parking:
    def __init__(self) -> None:
        self.tools = FakeTools()
        self.tools.needs_approval = {"send_email"}
        self.backend = MemoryBackend()
        self.runners: list[TaskRunner] = []

    def start(self, park_after: float, limits: TaskLimits | None = None) -> tuple[TaskRunner, ParkingLocalQueue]:
        store = TenantStore(self.backend, "agent")
        queue = ParkingLocalQueue(self.backend, park_after)
        assert isinstance(queue, ParkingQueue)
        runner = TaskRunner(
            store,
            AgentCatalog(store, self.tools.missing_tools),
            self.tools.missing_tools,
            self.tools.invoke,
            limits,
            queue=queue,
            delegate=delegate,
        )
        runner.start()
        self.runners.append(runner)
        return runner, queue


@pytest.fixture
async def parking() -> AsyncIterator[Parking]:
    made = Parking()
    try:
        yield made
    finally:
        for runner in made.runners:
            await runner.aclose()


async def until(condition: Callable[[], object]) -> None:
    async with asyncio.timeout(WAIT):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.01)


async def asked(runner: TaskRunner, task_id: str) -> None:
    async with asyncio.timeout(WAIT):
        async for _, event in runner.events(task_id, 0):
            if event["type"] == "approval.requested":
                return


async def test_a_run_waiting_for_approval_parks_and_the_decision_wakes_it(parking: Parking) -> None:
    as_caller()
    runner, queue = parking.start(park_after=0.05)
    agent_id = await agent_of(parking, runner)  # type: ignore[arg-type]
    task, _ = await submit(runner, agent_id, step("s0"), step("s1", tool="send_email", depends_on=["s0"], to="ada"))
    item = WorkItem("acme", task["task_id"])
    await until(lambda: queue.wakes)
    await until(lambda: not runner._running)  # the delivery ended: nothing holds it
    parked = await runner.get(task["task_id"])
    assert parked["status"] == "waiting_approval" and parked["parked_at"]
    assert {s["id"]: s["status"] for s in parked["steps"]} == {"s0": "succeeded", "s1": "waiting_approval"}
    # One wake-up, due 5 s after the deadline: it can only end a task that still waits.
    assert queue.wakes == [(item, "deadline", parked["deadline_at"] + 5000)]
    assert await queue.depth() == 0

    await runner.decide(task["task_id"], "s1", True, "ok")
    events = await follow(runner, task["task_id"])
    done = await runner.get(task["task_id"])
    assert done["status"] == "succeeded", done
    assert queue.wakes[1:] == [(item, "decided-s1", None)]
    assert parking.tools.steps_called() == ["s0", "s1"]  # s0 not again after the wake-up
    assert kinds(await follow(runner, task["task_id"], 0)).count("approval.requested:s1") == 1
    assert "task.resumed" in kinds(events) and not done.get("parked_at")


async def test_a_decision_before_the_run_parks_wakes_nothing(parking: Parking) -> None:
    as_caller()
    runner, queue = parking.start(park_after=WAIT * 4)
    agent_id = await agent_of(parking, runner)  # type: ignore[arg-type]
    task, _ = await submit(runner, agent_id, step("s1", tool="send_email"))
    await asked(runner, task["task_id"])
    await runner.decide(task["task_id"], "s1", True, "")
    await follow(runner, task["task_id"])
    assert (await runner.get(task["task_id"]))["status"] == "succeeded"
    assert queue.wakes == []  # a wake-up here would start a second run on another replica


async def test_a_run_close_to_its_deadline_waits_in_place(parking: Parking) -> None:
    as_caller()
    runner, queue = parking.start(park_after=0.01, limits=TaskLimits(deadline_seconds=1))
    agent_id = await agent_of(parking, runner)  # type: ignore[arg-type]
    task, _ = await submit(runner, agent_id, step("s1", tool="send_email"))
    await follow(runner, task["task_id"])
    done = await runner.get(task["task_id"])
    assert done["status"] == "failed" and done["error"].startswith("deadline exceeded"), done
    assert queue.wakes == []
