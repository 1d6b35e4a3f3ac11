"""Durable tasks in services.agent.tasks.TaskRunner over the embedded work queue (services.agent.work_queue):
a replica that stops leaves its tasks to the next, which resumes them without redoing finished steps; deadlines end
tasks wherever they are; a task runs as its delegate, not as the caller that submitted it.

Two runners on one MemoryBackend play a replica that stopped and the one that takes over (as a restarted agent
would, once the embedded state lasts across restarts).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from altan import context
from altan.api.agents import parse_agent_spec
from altan.context import RequestContext
from altan.errors import AlreadyExists, NotFound, PermissionDenied, Unavailable
from altan.store import MemoryBackend, TenantStore
from services.agent.agents import AgentCatalog
from services.agent.tasks import TaskLimits, TaskRunner
from services.agent.work_queue import LocalWorkQueue, WorkItem
from tests.unit.test_task_runner import WAIT, FakeTools, Gate, answer, as_caller, follow, kinds, step, submit, until

QUEUE = "altan::agent:work"


def delegate(task: dict[str, Any], tenant: str) -> RequestContext:
    owner = task["owner"]["sub"]
    return RequestContext(tenant, owner, "member", f"delegation-{task['task_id']}", task["task_id"], delegated=True)


class Replicas:
    def __init__(self, tools: FakeTools) -> None:
        self.tools = tools
        tools.needs_approval = {"send_email"}
        self.backend = MemoryBackend()
        self.made: list[TaskRunner] = []

    def start(self, limits: TaskLimits | None = None) -> TaskRunner:
        store = TenantStore(self.backend, "agent")
        queue = LocalWorkQueue(self.backend, key=QUEUE, concurrency=100)
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
        self.made.append(runner)
        return runner


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    made = Replicas(FakeTools())
    try:
        yield made
    finally:
        for runner in made.made:
            await runner.aclose()


async def agent_of(replicas: Replicas, runner: TaskRunner) -> str:
    agents = AgentCatalog(TenantStore(replicas.backend, "agent"), replicas.tools.missing_tools)
    agent = await agents.create(parse_agent_spec({"name": "assistant", "tools": ["echo", "send_email"]}))
    return str(agent["id"])


async def test_a_stopped_replicas_task_is_resumed_without_redoing_finished_steps(replicas: Replicas) -> None:
    as_caller()
    first = replicas.start()
    agent_id = await agent_of(replicas, first)
    gate = Gate()
    replicas.tools.behaviours["s2"] = gate
    task, _ = await submit(first, agent_id, step("s1"), step("s2", depends_on=["s1"], x="${s1.output}"))
    await until(gate.started)
    await first.aclose()  # stops while s2 runs: its progress is saved, the task stays in the queue
    stopped = await first.get(task["task_id"])
    assert stopped["status"] == "running"
    assert {s["id"]: s["status"] for s in stopped["steps"]} == {"s1": "succeeded", "s2": "pending"}

    replicas.tools.behaviours.pop("s2")
    second = replicas.start()
    events = await follow(second, task["task_id"])
    done = await second.get(task["task_id"])
    assert done["status"] == "succeeded", done
    # s1 ran once; s2, in flight when the first replica stopped, ran again (with the same step id, hence key).
    assert replicas.tools.steps_called() == ["s1", "s2", "s2"]
    assert done["result"]["s2"] == {"echo": {"x": {"echo": {}}}}
    assert "task.resumed" in kinds(events) and kinds(events)[-1] == "task.succeeded"
    resumed = next(e for _, e in events if e["type"] == "task.resumed")
    assert resumed["data"] == {"completed_steps": ["s1"]}
    # The resumed run acts as the task's delegate, for this task only.
    last = replicas.tools.calls[-1]
    assert last.context_task_id == task["task_id"] == last.task_id


async def test_a_task_runs_as_its_delegate_not_as_the_submitters_token(replicas: Replicas) -> None:
    as_caller()
    runner = replicas.start()
    agent_id = await agent_of(replicas, runner)
    seen: list[RequestContext] = []

    async def record(call: Any) -> Any:
        seen.append(context.current())
        return answer("ok")

    replicas.tools.behaviours["s1"] = record
    task, _ = await submit(runner, agent_id, step("s1"))
    await follow(runner, task["task_id"])
    (caller,) = seen
    assert caller.delegated and caller.token == f"delegation-{task['task_id']}"
    assert (caller.tenant_id, caller.user, caller.role) == ("acme", "alice", "member")


async def test_a_task_past_its_deadline_fails_with_the_reason(replicas: Replicas) -> None:
    as_caller()
    runner = replicas.start(TaskLimits(deadline_seconds=1))
    agent_id = await agent_of(replicas, runner)
    gate = Gate()  # never opened: the step outlives the task's deadline
    replicas.tools.behaviours["s1"] = gate
    task, _ = await submit(runner, agent_id, step("s1"), step("s2", depends_on=["s1"]))
    events = await follow(runner, task["task_id"])
    done = await runner.get(task["task_id"])
    assert done["status"] == "failed" and done["error"].startswith("deadline exceeded"), done
    assert "ALTAN_TASK_DEADLINE_SECONDS" in done["error"]
    assert {s["id"]: s["status"] for s in done["steps"]} == {"s1": "cancelled", "s2": "cancelled"}
    assert kinds(events)[-1] == "task.failed"


async def test_a_task_resumed_past_its_deadline_fails_at_once(replicas: Replicas) -> None:
    as_caller()
    first = replicas.start()
    agent_id = await agent_of(replicas, first)
    gate = Gate()
    replicas.tools.behaviours["s1"] = gate
    task, _ = await submit(first, agent_id, step("s1"))
    await until(gate.started)
    await first.aclose()
    # The deadline passed while no replica ran the task.
    stored = await first.get(task["task_id"])
    stored["deadline_at"] = stored["created_at"] - 1
    await TenantStore(replicas.backend, "agent").put("tasks", task["task_id"], stored)

    second = replicas.start()
    await follow(second, task["task_id"])
    done = await second.get(task["task_id"])
    assert done["status"] == "failed" and done["error"].startswith("deadline exceeded")
    assert replicas.tools.steps_called() == ["s1"]  # not called again


async def test_a_cancelled_task_is_not_resumed(replicas: Replicas) -> None:
    as_caller()
    first = replicas.start()
    agent_id = await agent_of(replicas, first)
    gate = Gate()
    replicas.tools.behaviours["s1"] = gate
    task, _ = await submit(first, agent_id, step("s1"))
    await until(gate.started)
    await first.aclose()
    again = Gate()
    replicas.tools.behaviours["s1"] = again
    second = replicas.start()
    await until(again.started)  # resumed: s1 runs again
    cancelled = await second.cancel(task["task_id"])
    assert cancelled["status"] == "cancelled"
    third = replicas.start()  # a later delivery of the same task finds it ended
    await third.aclose()
    assert (await second.get(task["task_id"]))["status"] == "cancelled"
    assert await replicas.backend.hgetall(f"{QUEUE}-pending") == {}


async def test_an_approval_survives_a_restart_and_the_approved_call_runs_once(replicas: Replicas) -> None:
    as_caller()
    first = replicas.start()
    agent_id = await agent_of(replicas, first)
    task, _ = await submit(first, agent_id, step("s1", tool="send_email", to="ada"))
    events = first.events(task["task_id"], 0)
    async with asyncio.timeout(WAIT):
        async for _, event in events:
            if event["type"] == "approval.requested":
                break
    assert (await first.get(task["task_id"]))["status"] == "waiting_approval"
    await first.aclose()  # stops while the task waits: the request stays, and is not asked again

    second = replicas.start()
    await second.decide(task["task_id"], "s1", True, "ok")
    followed = await follow(second, task["task_id"])
    done = await second.get(task["task_id"])
    assert done["status"] == "succeeded", done
    assert replicas.tools.steps_called() == ["s1"]
    assert kinds(await follow(second, task["task_id"], 0)).count("approval.requested:s1") == 1
    assert kinds(followed)[-1] == "task.succeeded"


async def test_an_unanswered_approval_ends_with_the_tasks_deadline(replicas: Replicas) -> None:
    as_caller()
    runner = replicas.start(TaskLimits(deadline_seconds=1))
    agent_id = await agent_of(replicas, runner)
    task, _ = await submit(runner, agent_id, step("s1", tool="send_email"))
    events = await follow(runner, task["task_id"])
    done = await runner.get(task["task_id"])
    assert done["status"] == "failed" and done["error"].startswith("deadline exceeded"), done
    assert "approval.requested:s1" in kinds(events) and replicas.tools.calls == []
    with pytest.raises(NotFound, match="already failed: no call of it waits for approval"):
        await runner.decide(task["task_id"], "s1", True, "")


async def test_only_an_admin_decides_once_and_only_a_call_that_waits(replicas: Replicas) -> None:
    as_caller()
    runner = replicas.start()
    agent_id = await agent_of(replicas, runner)
    task, _ = await submit(runner, agent_id, step("s1", tool="send_email"))
    async with asyncio.timeout(WAIT):
        async for _, event in runner.events(task["task_id"], 0):
            if event["type"] == "approval.requested":
                break
    with pytest.raises(NotFound):
        await runner.decide(task["task_id"], "s2", True, "")
    context.bind(RequestContext("acme", "bob", "member", "t"))
    with pytest.raises(PermissionDenied):
        await runner.decide(task["task_id"], "s1", True, "")
    as_caller("other")
    with pytest.raises(NotFound):
        await runner.decide(task["task_id"], "s1", True, "")
    as_caller()
    await runner.decide(task["task_id"], "s1", False, "no")
    with pytest.raises(AlreadyExists, match="already rejected"):
        await runner.decide(task["task_id"], "s1", True, "")
    await follow(runner, task["task_id"])
    done = await runner.get(task["task_id"])
    assert done["status"] == "failed" and "rejected by alice: no" in done["error"]


async def test_a_task_that_could_not_be_queued_fails_and_frees_its_key(replicas: Replicas) -> None:
    as_caller()
    runner = replicas.start()
    agent_id = await agent_of(replicas, runner)

    class Down(LocalWorkQueue):
        def put_ops(self, item: WorkItem) -> None:
            return None  # a queue of its own (as Redis's is), put after the task's writes

        async def put(self, item: WorkItem) -> None:
            raise Unavailable("the work queue is unreachable; try again shortly")

    store = TenantStore(replicas.backend, "agent")
    broken = TaskRunner(
        store,
        AgentCatalog(store, replicas.tools.missing_tools),
        replicas.tools.missing_tools,
        replicas.tools.invoke,
        queue=Down(replicas.backend, key=QUEUE, concurrency=1),
        delegate=delegate,
    )
    with pytest.raises(Unavailable):
        await submit(broken, agent_id, step("s1"), key="k")
    (lost,) = (await store.all("tasks")).values()
    assert lost["status"] == "failed" and "could not be queued" in lost["error"]
    await broken.aclose()
    task, created = await submit(runner, agent_id, step("s1"), key="k")  # the key is free again
    assert created and task["task_id"] != lost["task_id"]
    await follow(runner, task["task_id"])
    assert (await runner.get(task["task_id"]))["status"] == "succeeded"


async def test_a_replica_that_stalled_past_its_lease_writes_nothing_once_another_took_the_task_over(
    replicas: Replicas, caplog: pytest.LogCaptureFixture
) -> None:
    as_caller()
    first = replicas.start()
    agent_id = await agent_of(replicas, first)
    stalled, woken = asyncio.Event(), asyncio.Event()

    async def s1(call: Any) -> Any:
        if not stalled.is_set():  # the first replica's call: it hangs (a SIGSTOP, a long GC) until woken
            stalled.set()
            await woken.wait()
            return answer("late")
        return answer("on time")

    replicas.tools.behaviours["s1"] = s1
    task, _ = await submit(first, agent_id, step("s1"), step("s2", depends_on=["s1"]))
    await until(stalled)
    # Its lease lapsed: the item is delivered to another replica, which runs the task to its end.
    second = replicas.start()
    events = await follow(second, task["task_id"])
    assert kinds(events)[-1] == "task.succeeded"
    done = await second.get(task["task_id"])
    # The first wakes up: its step's answer comes back, and it must neither record it nor go on to s2.
    woken.set()
    superseded = "a later delivery took this task over"
    for _ in range(500):
        if any(superseded in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    assert any(superseded in r.getMessage() for r in caplog.records)
    assert replicas.tools.steps_called() == ["s1", "s1", "s2"]
    assert await second.get(task["task_id"]) == done
    assert done["result"]["s1"] == "on time"
    after = await first.get(task["task_id"])
    assert after == done
    all_events = kinds(await follow(second, task["task_id"]))
    assert all_events == kinds(events)
    assert [k for k in all_events if k.startswith("task.") and k != "task.resumed"].count("task.succeeded") == 1


class CountingBackend(MemoryBackend):
    """Counts the writes of the state backend, and may refuse the batched ones (a store that went away)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.refuse = False

    async def hset(self, key: str, field: str, value: str) -> None:
        self.writes.append("hset")
        await super().hset(key, field, value)

    async def hsetnx(self, key: str, field: str, value: str) -> bool:
        self.writes.append("hsetnx")
        return await super().hsetnx(key, field, value)

    async def append(self, key: str, value: str, maxlen: int) -> int:
        self.writes.append("append")
        return await super().append(key, value, maxlen)

    async def write_many(self, hsets: Any, appends: Any, guard: Any = None) -> list[int] | None:
        self.writes.append("write")
        if self.refuse:
            raise Unavailable("state store unreachable; try again shortly")
        return await super().write_many(hsets, appends, guard)


async def test_a_submission_is_one_transaction_with_its_event_and_queue_entry_or_nothing() -> None:
    as_caller()
    tools = FakeTools()
    replicas = Replicas(tools)
    backend = replicas.backend = CountingBackend()
    runner = replicas.start()
    try:
        agent_id = await agent_of(replicas, runner)
        backend.writes.clear()
        task, created = await submit(runner, agent_id, step("s1"))
        # One round trip: the task, its task.queued event and its queue entry together.
        assert created and backend.writes[0] == "write"
        events = await follow(runner, task["task_id"])
        assert kinds(events)[0] == "task.queued" and kinds(events)[-1] == "task.succeeded"

        # A store that refuses the transaction: a clear 503, and nothing of the task left behind (no task, no
        # queue entry that would run a task nobody was told about).
        backend.refuse = True
        store = TenantStore(backend, "agent")
        before = await store.all("tasks")
        pending = set(await backend.hgetall(f"{QUEUE}-pending"))
        with pytest.raises(Unavailable):
            await submit(runner, agent_id, step("s1"))
        assert await store.all("tasks") == before
        assert set(await backend.hgetall(f"{QUEUE}-pending")) <= pending
    finally:
        await runner.aclose()
