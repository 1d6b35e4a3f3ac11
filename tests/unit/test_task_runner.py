"""services.agent.tasks.TaskRunner: submission with idempotency keys, plan validation, running a plan and its
events, the size limits, cancellation and shutdown.

The runner is real, on a TenantStore over the in-process MemoryBackend, with a real AgentCatalog. Its two injected
dependencies (which tools exist, and one tool call of a step) are the plain async functions of :class:`FakeTools`.
A step that must still be running when the test acts waits on a :class:`Gate`; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from altan import context
from altan.api.agents import parse_agent_spec
from altan.api.tasks import parse_submission
from altan.context import RequestContext
from altan.errors import FailedPrecondition, InvalidArgument, NotFound
from altan.store import MemoryBackend, TenantStore
from altan.wire import json_bytes
from services.agent.agents import AgentCatalog
from services.agent.plan import Step
from services.agent.tasks import TaskLimits, TaskRunner, ToolAnswer

WAIT = 10.0  # seconds: the deadline of every wait in this module
TOOLS = frozenset({"echo", "http_request", "send_email"})


def as_caller(tenant: str = "acme") -> None:
    """Bind a verified caller of ``tenant`` to the running test (as the server interceptor does)."""
    context.bind(RequestContext(tenant_id=tenant, user="alice", role="admin", token="t"))


def answer(output: Any, http_status: int = 0) -> ToolAnswer:
    return ToolAnswer(output, http_status, len(json_bytes(output)))


@dataclass(frozen=True)
class Call:
    """One tool call the runner made, and the caller it made it as."""

    step_id: str
    tool: str
    arguments: dict[str, Any]
    task_id: str
    agent_id: str
    tenant: str
    context_task_id: str


Behaviour = Callable[[Call], Awaitable[ToolAnswer]]


@dataclass
class FakeTools:
    """The tenant's tools as the runner sees them: which exist, and what each step's call answers.

    A step without a behaviour answers ``{"echo": <its arguments>}``.
    """

    existing: set[str] = field(default_factory=lambda: set(TOOLS))
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # steps whose call was cancelled while it ran
    before_lookup: Callable[[], Awaitable[None]] | None = None
    # Tools whose every call needs a person's approval: called without it, they answer so and run nothing (as the
    # integrator does).
    needs_approval: set[str] = field(default_factory=set)

    async def missing_tools(self, tool_ids: list[str]) -> list[str]:
        if self.before_lookup is not None:
            await self.before_lookup()
        return [t for t in tool_ids if t not in self.existing]

    async def invoke(
        self, agent: dict[str, Any], step: Step, arguments: dict[str, Any], task_id: str, approved: bool = False
    ) -> ToolAnswer:
        if step.tool in self.needs_approval and not approved:
            return ToolAnswer(None, 0, 0, approval_required=True)
        caller = context.current()
        call = Call(step.id, step.tool, arguments, task_id, agent["id"], caller.tenant_id, caller.task_id)
        self.calls.append(call)
        behaviour = self.behaviours.get(step.id)
        try:
            return await behaviour(call) if behaviour else answer({"echo": arguments})
        except asyncio.CancelledError:
            self.cancelled.append(step.id)
            raise

    def steps_called(self) -> list[str]:
        return [c.step_id for c in self.calls]


@dataclass
class Gate:
    """A step that starts, then waits until the test opens it, then answers ``output``."""

    output: Any = "done"
    started: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, call: Call) -> ToolAnswer:
        self.started.set()
        await self.opened.wait()
        return answer(self.output)


def fails_with(error: BaseException) -> Behaviour:
    async def behaviour(call: Call) -> ToolAnswer:
        raise error

    return behaviour


def answers(output: Any, http_status: int = 0) -> Behaviour:
    async def behaviour(call: Call) -> ToolAnswer:
        return answer(output, http_status)

    return behaviour


@dataclass
class Harness:
    tools: FakeTools
    backend: MemoryBackend
    runner: TaskRunner
    agents: AgentCatalog
    replica: Callable[..., TaskRunner]  # another runner on the same state, as a second replica would be


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    tools = FakeTools()
    backend = MemoryBackend()
    made: list[TaskRunner] = []

    def replica(limits: TaskLimits | None = None) -> TaskRunner:
        store = TenantStore(backend, "agent")
        runner = TaskRunner(store, AgentCatalog(store, tools.missing_tools), tools.missing_tools, tools.invoke, limits)
        made.append(runner)
        return runner

    runner = replica()
    agents = AgentCatalog(TenantStore(backend, "agent"), tools.missing_tools)
    try:
        yield Harness(tools, backend, runner, agents, replica)
    finally:
        for each in made:
            await each.aclose()


def step(step_id: str, tool: str = "echo", depends_on: list[str] | None = None, **arguments: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"id": step_id, "tool": tool, "arguments": arguments}
    if depends_on:
        raw["depends_on"] = depends_on
    return raw


async def new_agent(harness: Harness, tools: list[str] | None = None) -> str:
    agent = await harness.agents.create(parse_agent_spec({"name": "assistant", "tools": tools or ["echo"]}))
    return str(agent["id"])


async def submit(
    runner: TaskRunner, agent_id: str, *steps: dict[str, Any], key: str | None = None
) -> tuple[dict[str, Any], bool]:
    body: dict[str, Any] = {"input": {"plan": list(steps)}}
    if key is not None:
        body["idempotency_key"] = key
    return await runner.submit(agent_id, parse_submission(body))


async def held(harness: Harness, agent_id: str, *after: dict[str, Any]) -> tuple[dict[str, Any], Gate]:
    """A task whose first step ``s1`` is running, held until the test opens its gate; ``after`` are more steps."""
    gate = Gate()
    harness.tools.behaviours["s1"] = gate
    task, _ = await submit(harness.runner, agent_id, step("s1"), *after)
    await until(gate.started)
    return task, gate


async def follow(runner: TaskRunner, task_id: str, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """The task's events after ``after`` up to the terminal one (the stream must end by itself)."""
    async with asyncio.timeout(WAIT):
        return [item async for item in runner.events(task_id, after)]


def kinds(events: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """``task.started``, ``tool.started:s1``, ...: each event's type, with its step when it has one."""
    return [e["type"] + (f":{e['data']['step_id']}" if "step_id" in e["data"] else "") for _, e in events]


async def until(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT)


# --- submitting -----------------------------------------------------------------------------------------------------


async def test_submit_queues_the_task_as_given(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    body = {"input": {"plan": [step("s1", text="hi")]}, "thread_id": "thread-1"}
    task, created = await harness.runner.submit(agent_id, parse_submission(body))
    assert created is True
    assert task["task_id"].startswith("tsk_")
    assert (task["agent_id"], task["status"], task["input"], task["thread_id"]) == (
        agent_id,
        "queued",
        body["input"],
        "thread-1",
    )
    assert task["steps"] == [{"id": "s1", "tool": "echo", "status": "pending"}]
    assert (task["result"], task["error"]) == (None, None)
    assert (await harness.runner.get(task["task_id"]))["task_id"] == task["task_id"]


async def test_an_idempotency_key_gives_the_first_task_back(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    first, created = await submit(harness.runner, agent_id, step("s1"), key="order-42")
    await follow(harness.runner, first["task_id"])
    # Whatever the new body says, the key answers with the first task, and nothing runs again.
    again, created_again = await submit(harness.runner, agent_id, step("s9", "nonexistent"), key="order-42")
    assert (created, created_again) == (True, False)
    assert again["task_id"] == first["task_id"]
    assert again["status"] == "succeeded"
    assert harness.tools.steps_called() == ["s1"]


async def test_idempotency_keys_are_per_agent_and_optional(harness: Harness) -> None:
    as_caller()
    agent_a, agent_b = await new_agent(harness), await new_agent(harness)
    a, _ = await submit(harness.runner, agent_a, step("s1"), key="same")
    b, created_b = await submit(harness.runner, agent_b, step("s1"), key="same")
    c, created_c = await submit(harness.runner, agent_a, step("s1"))
    d, created_d = await submit(harness.runner, agent_a, step("s1"))
    assert (created_b, created_c, created_d) == (True, True, True)
    assert len({a["task_id"], b["task_id"], c["task_id"], d["task_id"]}) == 4


async def test_two_submits_racing_with_one_key_make_one_task(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    # Both submissions look the key up before either stores its task: hold each in the tool lookup (which comes
    # after the key check) until both are there.
    arrived: list[None] = []
    both_there = asyncio.Event()

    async def hold_until_both_arrive() -> None:
        arrived.append(None)
        if len(arrived) == 2:
            both_there.set()
        await until(both_there)

    harness.tools.before_lookup = hold_until_both_arrive
    (one, one_created), (two, two_created) = await asyncio.gather(
        submit(harness.runner, agent_id, step("s1"), key="k"),
        submit(harness.runner, agent_id, step("s1"), key="k"),
    )
    harness.tools.before_lookup = None
    assert len(arrived) == 2
    assert one["task_id"] == two["task_id"]
    assert sorted([one_created, two_created]) == [False, True]
    await follow(harness.runner, one["task_id"])
    assert harness.tools.steps_called() == ["s1"]  # one task ran
    stored = await TenantStore(harness.backend, "agent").all("tasks")
    assert list(stored) == [one["task_id"]]  # the loser's document is gone, not left queued forever


# --- validating the plan --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bound", "plan_tool", "existing", "message"),
    [
        (["echo"], "nonexistent", TOOLS, "step s1: unknown tool 'nonexistent'"),
        (["echo"], "send_email", TOOLS, "step s1: tool 'send_email' is not bound to this agent"),
        # Bound when the agent was made, deleted since.
        (["echo", "send_email"], "send_email", TOOLS - {"send_email"}, "step s1: unknown tool 'send_email'"),
    ],
    ids=["missing", "unbound", "deleted-since"],
)
async def test_a_plan_naming_a_tool_it_may_not_use_is_refused(
    harness: Harness, bound: list[str], plan_tool: str, existing: frozenset[str], message: str
) -> None:
    as_caller()
    agent_id = await new_agent(harness, bound)
    harness.tools.existing = set(existing)
    with pytest.raises(InvalidArgument) as caught:
        await submit(harness.runner, agent_id, step("s1", plan_tool), key="k")
    assert caught.value.message == message
    assert await TenantStore(harness.backend, "agent").all("tasks") == {}
    # The refused submission did not spend its idempotency key.
    harness.tools.existing = set(TOOLS)
    task, created = await submit(harness.runner, agent_id, step("s1"), key="k")
    assert created is True
    assert task["steps"][0]["id"] == "s1"


async def test_natural_language_for_an_agent_without_an_llm_and_unknown_agents_are_refused(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    with pytest.raises(FailedPrecondition, match=r"needs an agent with an llm.*submit \{\"plan\""):
        await harness.runner.submit(agent_id, parse_submission({"input": "book me a flight"}))
    assert await TenantStore(harness.backend, "agent").all("tasks") == {}
    with pytest.raises(NotFound, match="agent 'agt_nope' not found"):
        await submit(harness.runner, "agt_nope", step("s1"))
    assert harness.tools.calls == []


# --- running --------------------------------------------------------------------------------------------------------


async def test_a_plan_runs_to_succeeded_with_its_events_in_order(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness, ["echo", "send_email"])
    harness.tools.behaviours["s1"] = answers({"items": [{"name": "Ada"}]})
    task, _ = await submit(
        harness.runner,
        agent_id,
        step("s1", query="people"),
        step("s2", "send_email", depends_on=["s1"], to="${s1.output.items.0.name}", subject="Hi ${s1.output.items}"),
    )
    task_id = task["task_id"]
    events = await follow(harness.runner, task_id)

    assert kinds(events) == [
        "task.queued",
        "task.started",
        "tool.started:s1",
        "tool.finished:s1",
        "tool.started:s2",
        "tool.finished:s2",
        "task.succeeded",
    ]
    assert [seq for seq, _ in events] == list(range(1, 8))
    assert {e["task_id"] for _, e in events} == {task_id}
    assert [e["data"]["status"] for _, e in events if e["type"] == "tool.finished"] == ["succeeded", "succeeded"]

    # Each call ran as the submitting caller, labelled with the task, with the references filled in.
    first, second = harness.tools.calls
    assert (first.arguments, first.task_id, first.agent_id, first.tenant, first.context_task_id) == (
        {"query": "people"},
        task_id,
        agent_id,
        "acme",
        task_id,
    )
    assert second.arguments == {"to": "Ada", "subject": 'Hi [{"name": "Ada"}]'}

    done = await harness.runner.get(task_id)
    assert (done["status"], done["error"]) == ("succeeded", None)
    assert done["result"] == {"s1": {"items": [{"name": "Ada"}]}, "s2": {"echo": second.arguments}}
    assert [(s["id"], s["status"], s["output"]) for s in done["steps"]] == [
        ("s1", "succeeded", {"items": [{"name": "Ada"}]}),
        ("s2", "succeeded", {"echo": second.arguments}),
    ]
    assert done["usage"]["tool_calls"] == 2


async def test_steps_without_a_dependency_between_them_run_at_once(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    def meet(me: str, other: str) -> Behaviour:
        async def behaviour(call: Call) -> ToolAnswer:
            started[me].set()
            await until(started[other])  # would time out if the two ran one after the other
            return answer(me)

        return behaviour

    harness.tools.behaviours.update(a=meet("a", "b"), b=meet("b", "a"))
    task, _ = await submit(
        harness.runner, agent_id, step("a"), step("b"), step("c", depends_on=["a", "b"], got="${a.output}${b.output}")
    )
    events = await follow(harness.runner, task["task_id"])
    assert kinds(events)[2:4] == ["tool.started:a", "tool.started:b"]
    assert kinds(events)[-3:] == ["tool.started:c", "tool.finished:c", "task.succeeded"]
    assert harness.tools.calls[-1].arguments == {"got": "ab"}


async def test_a_failing_step_fails_the_task_and_the_rest_is_skipped(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    harness.tools.behaviours["s1"] = fails_with(FailedPrecondition("quota exhausted"))
    task, _ = await submit(
        harness.runner, agent_id, step("s1"), step("s2", depends_on=["s1"]), step("s3", depends_on=["s2"])
    )
    events = await follow(harness.runner, task["task_id"])
    assert kinds(events)[-2:] == ["tool.finished:s1", "task.failed"]
    assert events[-2][1]["data"] | {"duration_ms": 0} == {
        "step_id": "s1",
        "tool": "echo",
        "status": "failed",
        "error": "quota exhausted",
        "duration_ms": 0,
    }
    assert events[-1][1]["data"] == {"error": "step s1 failed: quota exhausted"}
    done = await harness.runner.get(task["task_id"])
    assert (done["status"], done["error"], done["result"]) == ("failed", "step s1 failed: quota exhausted", None)
    assert {s["id"]: s["status"] for s in done["steps"]} == {"s1": "failed", "s2": "skipped", "s3": "skipped"}
    assert harness.tools.steps_called() == ["s1"]


async def test_an_unexpected_error_fails_the_step_without_its_message(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    harness.tools.behaviours["s1"] = fails_with(RuntimeError("password=hunter2 at /srv/secret.py"))
    task, _ = await submit(harness.runner, agent_id, step("s1"))
    events = await follow(harness.runner, task["task_id"])
    done = await harness.runner.get(task["task_id"])
    assert done["error"] == "step s1 failed: internal error (RuntimeError)"
    assert "hunter2" not in json.dumps(done) + json.dumps(events)


@pytest.mark.parametrize(
    ("http_status", "status"), [(200, "succeeded"), (399, "succeeded"), (400, "failed"), (503, "failed")]
)
async def test_an_http_status_of_400_or_more_fails_the_step(harness: Harness, http_status: int, status: str) -> None:
    as_caller()
    agent_id = await new_agent(harness, ["echo", "http_request"])
    harness.tools.behaviours["s1"] = answers({"error": "as the third party said"}, http_status)
    task, _ = await submit(harness.runner, agent_id, step("s1", "http_request"), step("s2", depends_on=["s1"]))
    await follow(harness.runner, task["task_id"])
    done = await harness.runner.get(task["task_id"])
    assert done["status"] == status
    if status == "failed":
        assert done["error"] == f"step s1 failed: tool 'http_request' answered HTTP {http_status}"
        assert {s["id"]: s["status"] for s in done["steps"]} == {"s1": "failed", "s2": "skipped"}
    else:
        assert harness.tools.steps_called() == ["s1", "s2"]


# --- size limits ----------------------------------------------------------------------------------------------------


async def test_a_step_taking_the_task_past_its_byte_limit_fails_and_the_task_stays_readable(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    steps = [step("s1"), step("s2", depends_on=["s1"]), step("s3", depends_on=["s2"])]
    input_size = len(json_bytes({"plan": steps}))
    # The input, then each output twice (in its step and in the result): s1 fits exactly, s2 is one byte too many.
    first = "x" * 100
    first_size = len(json_bytes(first))
    limit = input_size + 2 * first_size + 2 * len(json_bytes("y" * 10)) - 1
    runner = harness.replica(TaskLimits(task_bytes=limit))
    harness.tools.behaviours.update(s1=answers(first), s2=answers("y" * 10))
    task, _ = await submit(runner, agent_id, *steps)
    events = await follow(runner, task["task_id"])

    assert kinds(events)[-1] == "task.failed"
    done = await runner.get(task["task_id"])
    assert done["status"] == "failed"
    assert done["error"] == (
        f"step s2 failed: its output of 12 bytes would take the task past {limit} bytes (ALTAN_MAX_TASK_BYTES)"
    )
    assert {s["id"]: (s["status"], s["output"]) for s in done["steps"]} == {
        "s1": ("succeeded", first),
        "s2": ("failed", None),
        "s3": ("skipped", None),
    }
    assert harness.tools.steps_called() == ["s1", "s2"]


async def test_references_expanding_past_their_limit_fail_the_step_before_its_call(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    runner = harness.replica(TaskLimits(expansion_bytes=100))
    harness.tools.behaviours["s1"] = answers("z" * 60)
    task, _ = await submit(
        runner, agent_id, step("s1"), step("s2", depends_on=["s1"], a="${s1.output}", b="${s1.output}")
    )
    await follow(runner, task["task_id"])
    done = await runner.get(task["task_id"])
    assert done["status"] == "failed"
    assert done["error"] == (
        "step s2 failed: step s2: the references in its arguments expand to more than 100 bytes "
        "(ALTAN_MAX_EXPANSION_BYTES)"
    )
    assert harness.tools.steps_called() == ["s1"]


# --- cancelling -----------------------------------------------------------------------------------------------------


async def test_cancelling_a_running_task_stops_its_step(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    task, _ = await held(harness, agent_id, step("s2", depends_on=["s1"]))

    cancelled = await harness.runner.cancel(task["task_id"])
    assert (cancelled["status"], cancelled["error"]) == ("cancelled", "cancelled")
    assert {s["id"]: s["status"] for s in cancelled["steps"]} == {"s1": "cancelled", "s2": "cancelled"}
    assert harness.tools.cancelled == ["s1"]
    assert kinds(await follow(harness.runner, task["task_id"]))[-1] == "task.cancelled"
    assert (await harness.runner.get(task["task_id"]))["status"] == "cancelled"
    with pytest.raises(FailedPrecondition, match=f"task '{task['task_id']}' already cancelled"):
        await harness.runner.cancel(task["task_id"])
    assert harness.tools.steps_called() == ["s1"]


@pytest.mark.parametrize("how", ["cancel", "shutdown"])
async def test_a_task_cancelled_while_still_queued_ends_cancelled(harness: Harness, how: str) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    task, _ = await submit(harness.runner, agent_id, step("s1"))
    assert task["status"] == "queued"
    if how == "cancel":
        answered = await harness.runner.cancel(task["task_id"])
        assert answered["status"] == "cancelled"
    else:
        await harness.runner.aclose()
    assert (await harness.runner.get(task["task_id"]))["status"] == "cancelled"
    assert kinds(await follow(harness.runner, task["task_id"]))[-1] == "task.cancelled"
    assert harness.tools.calls == []


async def test_another_replica_records_the_cancellation_of_a_task_it_does_not_run(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    task, _ = await held(harness, agent_id)
    other = harness.replica()
    cancelled = await other.cancel(task["task_id"])
    assert (cancelled["status"], cancelled["error"]) == ("cancelled", "cancelled")
    assert kinds(await follow(other, task["task_id"]))[-1] == "task.cancelled"


async def test_a_cancellation_recorded_by_another_replica_stands(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    gate = Gate()
    harness.tools.behaviours["s1"] = gate
    task, _ = await submit(harness.runner, agent_id, step("s1"), step("s2", depends_on=["s1"]))
    await until(gate.started)
    # The run of the task, in the replica that accepted it.
    (background,) = [t for t in asyncio.all_tasks() if t.get_name() == f"work-{task['task_id']}"]
    await harness.replica().cancel(task["task_id"])

    gate.opened.set()
    done, _ = await asyncio.wait({background}, timeout=WAIT)
    assert background in done
    assert (await harness.runner.get(task["task_id"]))["status"] == "cancelled"
    assert harness.tools.steps_called() == ["s1"]  # no tool is called for a task once it is cancelled


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
async def test_a_finished_task_cannot_be_cancelled(harness: Harness, outcome: str) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    if outcome == "failed":
        harness.tools.behaviours["s1"] = fails_with(FailedPrecondition("no"))
    task, _ = await submit(harness.runner, agent_id, step("s1"))
    await follow(harness.runner, task["task_id"])
    with pytest.raises(FailedPrecondition, match=f"task '{task['task_id']}' already {outcome}"):
        await harness.runner.cancel(task["task_id"])
    assert (await harness.runner.get(task["task_id"]))["status"] == outcome
    with pytest.raises(NotFound, match="task 'tsk_nope' not found"):
        await harness.runner.cancel("tsk_nope")


async def test_aclose_cancels_the_running_tasks_so_they_end_cancelled(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    gates = {"a": Gate(), "b": Gate()}
    harness.tools.behaviours.update(gates)
    first, _ = await submit(harness.runner, agent_id, step("a"))
    second, _ = await submit(harness.runner, agent_id, step("b"))
    for gate in gates.values():
        await until(gate.started)

    await harness.runner.aclose()
    for task in (first, second):
        done = await harness.runner.get(task["task_id"])
        assert (done["status"], done["error"]) == ("cancelled", "cancelled")
        assert kinds(await follow(harness.runner, task["task_id"]))[-1] == "task.cancelled"
    assert sorted(harness.tools.cancelled) == ["a", "b"]


# --- following ------------------------------------------------------------------------------------------------------


async def test_a_follower_arriving_between_the_terminal_status_and_its_event_still_gets_the_event(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner writes the terminal status and its event in one write; a store (or a replica of an earlier
    version) that stored the status first and the event after must not make a follower that reads the status in
    between end the stream without the event: it waits for it."""
    as_caller()
    agent_id = await new_agent(harness)
    task, gate = await held(harness, agent_id)
    store = harness.runner._store
    write = store.write
    stored, release = asyncio.Event(), asyncio.Event()

    async def status_then_event(puts: Any = (), appends: Any = (), **kwargs: Any) -> list[int] | None:
        if any(event["type"] == "task.succeeded" for _, event, _ in appends):
            await write(puts, [], **kwargs)
            stored.set()
            await release.wait()
            return await write([], appends, **kwargs)
        return await write(puts, appends, **kwargs)

    monkeypatch.setattr(store, "write", status_then_event)
    gate.opened.set()
    await until(stored)
    assert (await harness.runner.get(task["task_id"]))["status"] == "succeeded"
    following = asyncio.create_task(follow(harness.runner, task["task_id"]))
    await asyncio.sleep(0)  # one turn of the loop: the embedded store never yields, so the follower reads it all
    release.set()
    assert kinds(await following)[-1] == "task.succeeded"
    # Once sent, a finished task's stream after its last event ends at once.
    last_seq = (await follow(harness.runner, task["task_id"]))[-1][0]
    assert await follow(harness.runner, task["task_id"], last_seq) == []


async def test_a_run_writes_its_document_with_the_events_of_each_change_once_per_turn(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each change of a running task is one write: the document and the events announcing it together (never an
    event ahead of the state it announces), the steps started or settled in one turn of the plan in one write."""
    as_caller()
    agent_id = await new_agent(harness)
    writes: list[tuple[list[Any], list[Any]]] = []
    backend = harness.backend
    write_many, hset, append = backend.write_many, backend.hset, backend.append

    inside: list[bool] = []  # the memory backend's write_many appends with its own append

    async def recorded_write_many(hsets: Any, appends: Any, guard: Any = None) -> list[int] | None:
        writes.append((list(hsets), list(appends)))
        inside.append(True)
        try:
            return await write_many(hsets, appends, guard)
        finally:
            inside.pop()

    async def recorded_hset(key: str, field: str, value: str) -> None:
        writes.append(([(key, field, value)], []))
        await hset(key, field, value)

    async def recorded_append(key: str, value: str, maxlen: int) -> int:
        if not inside:
            writes.append(([], [(key, value, maxlen)]))
        return await append(key, value, maxlen)

    for name, wrapper in (("write_many", recorded_write_many), ("hset", recorded_hset), ("append", recorded_append)):
        monkeypatch.setattr(backend, name, wrapper)
    task, _ = await submit(harness.runner, agent_id, step("s1"), step("s2"), step("s3", depends_on=["s1", "s2"]))
    events = await follow(harness.runner, task["task_id"])
    assert kinds(events)[-1] == "task.succeeded"
    run_writes = [w for w in writes if any('"task.queued"' in value for _, value, _ in w[1])]
    run_writes = writes[writes.index(run_writes[0]) + 1 :]  # those of the run, after its submission
    assert len(run_writes) <= 6, [
        [json.loads(a[1])["type"] for a in w[1]] for w in run_writes
    ]  # 16 with a document write and one per event
    announced = 0
    for hsets, appends in run_writes:
        assert len(hsets) == 1, "every event is written with the task document"
        doc = json.loads(hsets[0][2])
        for _, value, _ in appends:
            event = json.loads(value)["data"]
            announced += 1
            if "step_id" in event:
                (state,) = [s for s in doc["steps"] if s["id"] == event["step_id"]]
                assert state["status"] == event.get("status", "running")
    assert announced == len(events) - 1  # every event but task.queued


async def test_a_follower_gets_events_as_they_happen_and_the_stream_ends_at_the_terminal_one(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    gate = Gate()
    harness.tools.behaviours["s1"] = gate
    task, _ = await submit(harness.runner, agent_id, step("s1"))
    received: asyncio.Queue[str] = asyncio.Queue()

    async def follower() -> None:
        async for _, event in harness.runner.events(task["task_id"], 0):
            received.put_nowait(event["type"])

    following = asyncio.create_task(follower())
    try:
        seen = []
        async with asyncio.timeout(WAIT):
            while "tool.started" not in seen:
                seen.append(await received.get())
            assert seen == ["task.queued", "task.started", "tool.started"]
            # What happens from now on reaches the follower only through its blocking read.
            gate.opened.set()
            while seen[-1] != "task.succeeded":
                seen.append(await received.get())
            await following  # the stream ended by itself after the terminal event
    finally:
        following.cancel()
    assert seen[3:] == ["tool.finished", "task.succeeded"]
    assert received.empty()


async def test_events_resume_after_a_sequence_number_and_a_finished_task_answers_at_once(harness: Harness) -> None:
    as_caller()
    agent_id = await new_agent(harness)
    task, _ = await submit(harness.runner, agent_id, step("s1"))
    everything = await follow(harness.runner, task["task_id"])
    assert await follow(harness.runner, task["task_id"]) == everything
    assert await follow(harness.runner, task["task_id"], after=3) == everything[3:]
    assert await follow(harness.runner, task["task_id"], after=len(everything)) == []
    with pytest.raises(NotFound, match="task 'tsk_nope' not found"):
        await follow(harness.runner, "tsk_nope")


async def test_another_tenant_cannot_see_follow_or_cancel_a_task(harness: Harness) -> None:
    as_caller("acme")
    agent_id = await new_agent(harness)
    task, gate = await held(harness, agent_id)

    as_caller("globex")
    for attempt in (
        harness.runner.get(task["task_id"]),
        harness.runner.cancel(task["task_id"]),
        follow(harness.runner, task["task_id"]),
    ):
        with pytest.raises(NotFound):
            await attempt
    with pytest.raises(NotFound):
        await submit(harness.runner, agent_id, step("s1"))

    as_caller("acme")
    gate.opened.set()
    assert kinds(await follow(harness.runner, task["task_id"]))[-1] == "task.succeeded"
    assert harness.tools.cancelled == []
