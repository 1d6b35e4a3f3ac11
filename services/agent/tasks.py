"""Tasks: submission (with idempotency keys), execution of structured plans and of the LLM loop, events and
cancellation.

A task runs in the background of the replica that accepted it, in the caller's request context (tenant and token
travel with it). Every state change is written to the store and announced on the task's event stream, which
followers read with a blocking read instead of polling. An input with a ``plan`` runs that plan; any other input goes
to the agent's LLM (:mod:`services.agent.conversation`), continuing the task's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from altan import context, telemetry
from altan.api.agents import llm_to_proto as agent_llm
from altan.api.convert import now_ms
from altan.api.tasks import TaskSubmission
from altan.errors import AlreadyExists, AltanError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from altan.store import Fence, TenantStore
from altan.v1 import runtime_pb2
from altan.wire import json_bytes, new_id
from services.agent.agents import AgentCatalog
from services.agent.approvals import Approvals, AuditDecision, rejection, task_events
from services.agent.conversation import Conversation, LoopLimits, ModelTurn
from services.agent.plan import (
    MAX_EXPANSION_BYTES,
    PlanFailed,
    PlanRun,
    Step,
    StepState,
    error_message,
    parse_plan,
)
from services.agent.threads import ThreadStore, coherent, fit_to_budget
from services.agent.work_queue import ImmediateQueue, ParkingQueue, Superseded, WorkItem, WorkQueue

__all__ = [
    "TERMINAL",
    "Delegate",
    "LlmBackend",
    "TaskLimits",
    "TaskRunner",
    "ToolAnswer",
    "ToolInvoker",
]

log = logging.getLogger(__name__)

_TASKS = "tasks"
_IDEMPOTENCY = "idempotency"
_CANCELLATIONS = "cancellations"  # task id -> when another replica was asked to cancel it
_FENCES = "fences"  # task id -> the number of its latest delivery: only that run writes the task
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_TOOLS_SEEN_SECONDS = 2.0  # how long "these tools exist" stands for new submissions (TaskRunner._missing)
_TERMINAL_EVENTS = frozenset(f"task.{status}" for status in TERMINAL)
_EVENTS_MAXLEN = 10_000  # events kept per task (TenantStore.append's default)
# A run close to its deadline waits for an approval in place rather than park (its deadline wake-up may come early).
_PARK_MARGIN_MS = 30_000
_DEADLINE_WAKE_DELAY_MS = 5_000
# The fence of the run this code belongs to (set by each delivery, inherited by the run's own asyncio tasks): its
# writes of the task happen only while no later delivery took the task over. Requests (a cancel, a decision) have none.
_fence: contextvars.ContextVar[Fence | None] = contextvars.ContextVar("altan_task_fence", default=None)

# Runs one tool for an agent's task: (agent, step, arguments, task_id, approved) -> its answer. Not ``approved``, a
# tool that requires a person's approval of each call is not called: the answer says ``approval_required``.
ToolInvoker = Callable[[dict[str, Any], Step, dict[str, Any], str, bool], Awaitable["ToolAnswer"]]


@dataclass(frozen=True)
class ToolAnswer:
    """What a tool call of a task answered: the output, the third party's HTTP status, the output's JSON size; or
    that the tool requires approval of each call, and nothing ran."""

    output: Any
    http_status: int
    size: int
    approval_required: bool = False


@dataclass(frozen=True)
class TaskLimits:
    """How large a task may grow (docs/architecture.md, "Size limits")."""

    expansion_bytes: int = MAX_EXPANSION_BYTES  # what one step's ${...} references may bring into its arguments
    task_bytes: int = 4 * 1024 * 1024  # the task document: input, every step's output, and the result
    deadline_seconds: float = 3600.0  # from acceptance to the end, resumptions included (ALTAN_TASK_DEADLINE_SECONDS)


# The caller a queued task runs as, from its task document (tenant, submitter, role, task id, deadline), or None when
# this replica cannot act for it (no private key to sign a delegation with).
Delegate = Callable[[dict[str, Any], str], "context.RequestContext | None"]


# Answers which of the given tool ids do not exist in the tenant.
MissingTools = Callable[[list[str]], Awaitable[list[str]]]


@dataclass(frozen=True)
class LlmBackend:
    """What the LLM loop needs: a model turn through the Integrator, the bound tools' specs, and its limits."""

    model: ModelTurn
    describe: Callable[[list[str]], Awaitable[list[runtime_pb2.ModelTool]]]
    loop: LoopLimits
    context_budget_tokens: int = 32_000
    tool_concurrency: int = 16  # one tenant's tool calls in flight in this replica


class TaskRunner:
    """Submits, runs, reads and cancels the current tenant's tasks."""

    def __init__(
        self,
        store: TenantStore,
        agents: AgentCatalog,
        missing_tools: MissingTools,
        invoke: ToolInvoker,
        limits: TaskLimits | None = None,
        llm: LlmBackend | None = None,
        *,
        queue: WorkQueue | None = None,
        delegate: Delegate | None = None,
        audit_decision: AuditDecision | None = None,
    ) -> None:
        self._limits = limits or TaskLimits()
        self._llm = llm
        self._threads = ThreadStore(store)
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._store = store
        self._agents = agents
        self._missing_tools = missing_tools
        self._invoke = invoke
        self._queue: WorkQueue = queue or ImmediateQueue()
        self._delegate = delegate
        self._approvals = Approvals(store, self._emit, audit_decision)
        self._serving: asyncio.Task[None] | None = None
        self._stopping = False
        self._running: dict[tuple[str, str], asyncio.Task[Any]] = {}
        # Without a delegate: the submitter, kept in memory until this replica runs the task.
        self._callers: dict[tuple[str, str], context.RequestContext] = {}
        self._expired: set[tuple[str, str]] = set()  # runs stopped by their task's deadline
        # Runs parked while they wait for approval (a ParkingQueue), with the steps that wait.
        self._parked: dict[tuple[str, str], set[str]] = {}
        self._tools_seen: dict[tuple[str, tuple[str, ...]], float] = {}  # (tenant, tool ids) -> all exist until

    def start(self) -> None:
        """Take work from the queue: new tasks, and those a process that died left unfinished."""
        if self._serving is None:
            self._serving = asyncio.create_task(self._queue.serve(self._execute), name="task-queue")

    async def submit(self, agent_id: str, submission: TaskSubmission) -> tuple[dict[str, Any], bool]:
        """Queue a task; ``(task, created)``, where an idempotency key seen before gives the first task back."""
        agent = await self._agents.get(agent_id)
        task_input, idempotency_key = submission.input, submission.idempotency_key or ""
        idem_id = f"{agent_id}:{idempotency_key}"
        if idempotency_key:
            earlier = await self._store.get(_IDEMPOTENCY, idem_id)
            if earlier is not None:
                first = await self.get(earlier["task_id"])
                if first["status"] == "queued":
                    # Its submitter may have been cut off before it was queued (a crash between the two writes): the
                    # retry queues it (again). A task delivered twice runs once: a delivery finds it running or ended.
                    self.start()
                    await self._queue.put(WorkItem(context.current().tenant_id, first["task_id"]))
                return first, False
        thread_id = submission.thread_id
        if _is_plan(task_input):
            plan = await self._plan(agent, task_input)
            steps = [{"id": s.id, "tool": s.tool, "status": "pending"} for s in plan.steps]
        else:
            plan, steps = None, []
            _text(task_input)  # refused now rather than when the task runs
            if self._llm is None or not agent.get("llm"):
                raise FailedPrecondition(
                    'natural-language input needs an agent with an llm; give the agent one, or submit {"plan": [...]}'
                )
            thread_id = await self._threads.open(thread_id, agent_id)
        caller = context.current()
        now = now_ms()
        task: dict[str, Any] = {
            "task_id": new_id("tsk"),
            "agent_id": agent_id,
            "status": "queued",
            "input": task_input,
            "result": None,
            "steps": steps,
            "error": None,
            "usage": {"tool_calls": 0, "llm_calls": 0, "input_tokens": 0, "output_tokens": 0},
            "thread_id": thread_id,
            "trace_id": telemetry.current_trace_id(),  # the submitting request's: logs and spans share it
            "trace_parent": telemetry.traceparent(),  # the run's spans are children of the submission's (internal)
            "created_at": now,
            "updated_at": now,
            # Who the task acts for when it runs (or resumes) after the submitter's token expired; never a token.
            "owner": {"sub": caller.user},
            "deadline_at": now + int(self._limits.deadline_seconds * 1000),
        }
        item = WorkItem(caller.tenant_id, task["task_id"])
        queued = [(task_events(task["task_id"]), _event(task["task_id"], "task.queued", {}), _EVENTS_MAXLEN)]
        queue_ops = self._queue.put_ops(item)  # None: a queue outside the state backend, put after the writes
        puts = []
        if idempotency_key:
            await self._store.put(_TASKS, task["task_id"], task)
            if not await self._store.put_new(_IDEMPOTENCY, idem_id, {"task_id": task["task_id"]}):
                # Another request with the same key won the race: theirs is the task.
                await self._store.delete(_TASKS, task["task_id"])
                winner = await self._store.get(_IDEMPOTENCY, idem_id)
                assert winner is not None
                return await self.get(winner["task_id"]), False
        else:
            # The task, its first event and (embedded) its queue entry in one transaction, one round trip.
            puts = [(_TASKS, task["task_id"], task)]
        if self._delegate is None:
            self._callers[(caller.tenant_id, task["task_id"])] = caller
        self.start()
        written = False
        try:
            await self._store.write(puts, queued, raw=queue_ops or ([], []))
            written = True
            if queue_ops is None:
                await self._queue.put(item)
        except Exception:
            if not written and not idempotency_key:
                # Nothing of it was written: refused as a whole (503), to be submitted again.
                self._callers.pop((caller.tenant_id, task["task_id"]), None)
                raise
            # Not queued, so it would never run: it ends now, saying why, and its idempotency key is freed so that
            # the submission can be made again (best effort: the store may be down too).
            error = "it could not be queued (the work queue was unreachable); submit it again"
            with contextlib.suppress(Exception):
                if idempotency_key:
                    await self._store.delete(_IDEMPOTENCY, idem_id)
                await self._finish(task, None, status="failed", error=error)
            raise
        return task, True

    async def _execute(self, item: WorkItem) -> None:
        """Run (or resume) one queued task to its end; a delivery of a task that already ended does nothing."""
        key = (item.tenant_id, item.task_id)
        if key in self._running:
            return  # delivered again while it runs here
        this_run = asyncio.current_task()
        assert this_run is not None
        self._running[key] = this_run
        try:
            await self._execute_here(item, key)
        except asyncio.CancelledError:
            if key not in self._parked or self._stopping:
                raise
            # Parked: its progress is saved, and its wake-ups are queued (the decision, the deadline).
            this_run.uncancel()
        finally:
            self._running.pop(key, None)
            self._expired.discard(key)
            self._parked.pop(key, None)

    async def _execute_here(self, item: WorkItem, key: tuple[str, str]) -> None:
        caller = self._callers.pop(key, None)
        # Enough to read the tenant's state; the run itself acts as the task's caller.
        context.bind(context.RequestContext(tenant_id=item.tenant_id, user="", role="member", token=""))
        # This delivery takes the task over before reading it: a run of an earlier delivery (a replica that hung past
        # its lease) can write nothing of the task from now on, and what it wrote before is read here.
        _fence.set(await self._store.take_fence(_FENCES, item.task_id))
        task = await self._store.get(_TASKS, item.task_id)
        if task is None or task["status"] in TERMINAL:
            return
        task.pop("parked_at", None)  # a parked task woken up: the next save says it runs
        if caller is None and self._delegate is not None:
            caller = self._delegate(task, item.tenant_id)
        if caller is None:
            await self._finish(
                task,
                None,
                status="failed",
                error="the replica that accepted the task stopped before running it, and no other may act for its "
                "submitter (ALTAN_DELEGATION_SIGNING_KEY_FILE is not set)",
            )
            return
        context.bind(caller)
        context.with_task(item.task_id)
        if await self._store.get(_CANCELLATIONS, item.task_id) is not None:
            await self._record_cancelled(item.task_id)
            return
        deadline_at = task.get("deadline_at") or task["created_at"] + int(self._limits.deadline_seconds * 1000)
        remaining = (deadline_at - now_ms()) / 1000
        if remaining <= 0:
            await self._finish(task, None, status="failed", error=_deadline_error(self._limits.deadline_seconds))
            return
        try:
            agent = await self._agents.get(task["agent_id"])
        except NotFound:
            await self._finish(task, None, status="failed", error=f"agent '{task['agent_id']}' was deleted")
            return
        run = self._running[key]
        timer = asyncio.get_running_loop().call_later(remaining, self._expire, key, run)
        # The run joins the submission's trace (and its log lines carry that trace id), wherever and whenever it runs.
        attributes = {telemetry.TENANT: item.tenant_id, telemetry.TASK: item.task_id}
        try:
            trace_id, parent = task.get("trace_id") or "", task.get("trace_parent")
            with telemetry.resumed(trace_id, attributes=attributes, submitted_by=parent):
                if _is_plan(task["input"]):
                    await self._run(agent, _replan(task["input"]), task)
                else:
                    await self._converse(agent, task)
        finally:
            timer.cancel()

    def _expire(self, key: tuple[str, str], run: asyncio.Task[Any]) -> None:
        self._expired.add(key)
        run.cancel()

    async def _stopped(self, task: dict[str, Any], run: PlanRun | None, cancelled_elsewhere: bool = False) -> bool:
        """A run was cancelled: record why. True when the cancellation must go on (this process is stopping, or
        the run was cancelled by a caller); False when the run ended here (its deadline)."""
        key = (context.current().tenant_id, task["task_id"])
        if key in self._expired:
            error = _deadline_error(self._limits.deadline_seconds)
            await asyncio.shield(self._finish(task, run, status="failed", error=error))
            return False
        parked = self._parked.get(key)
        if (self._stopping or parked is not None) and self._queue.durable:
            # Shutting down: the progress so far is saved, and the queue delivers the task again (here after a
            # restart, or to another replica), which goes on from there; the steps stopped here are to run again.
            # Parked: the same, the steps waiting for approval still shown waiting.
            for state in run.steps.values() if run is not None else ():
                if state.status in ("cancelled", "skipped"):
                    waits = parked is not None and state.step_id in parked
                    state.status, state.error = ("waiting_approval" if waits else "pending"), None
            await asyncio.shield(self._save(task, run))
            return True
        # Cancelled elsewhere, the ending (and its event) is already recorded: only this run's steps are new.
        ending = self._save if cancelled_elsewhere else self._finish
        await asyncio.shield(ending(task, run, status="cancelled", error="cancelled"))
        return True

    async def _plan(self, agent: dict[str, Any], task_input: Any) -> Any:
        steps = task_input["plan"] if isinstance(task_input["plan"], list) else []
        named = {s["tool"] for s in steps if isinstance(s, dict) and isinstance(s.get("tool"), str)}
        bound = set(agent.get("tools", []))
        missing = await self._missing(sorted(named | bound)) if named | bound else set()
        return parse_plan(task_input, known_tools=(named | bound) - missing, bound_tools=bound)

    async def _missing(self, tool_ids: list[str]) -> set[str]:
        """Which of ``tool_ids`` do not exist. An answer that all exist stands for ``_TOOLS_SEEN_SECONDS``, so a
        burst of submissions naming the same tools asks the Integrator (and the Tool Service) about once: a tool
        deleted within that time is still accepted, and its step fails clearly when it runs."""
        key = (context.current().tenant_id, tuple(tool_ids))
        seen = self._tools_seen.get(key)
        if seen is not None and seen > time.monotonic():
            return set()
        missing = set(await self._missing_tools(tool_ids))
        if not missing:
            if len(self._tools_seen) > 10_000:
                self._tools_seen.clear()
            self._tools_seen[key] = time.monotonic() + _TOOLS_SEEN_SECONDS
        return missing

    async def aclose(self) -> None:
        """On shutdown: stop taking work, and stop what runs here. With a durable queue each task keeps its progress
        and is resumed (after a restart, or by another replica); otherwise it ends recorded as cancelled."""
        self._stopping = True
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.gather(self._serving, return_exceptions=True)
        closing = getattr(self._queue, "aclose", None)
        if closing is not None:
            await closing()
        if self._queue.durable:
            return
        for (_, task_id), caller in list(self._callers.items()):
            # A task that never started here: recorded as cancelled, as a running one is by its run.
            context.bind(caller)
            await self._record_cancelled(task_id)

    async def thread(
        self, thread_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
        """A thread of the current tenant, one page of its messages (oldest first), and the next page's token."""
        return await self._threads.get(thread_id, page_size, page_token)

    async def get(self, task_id: str) -> dict[str, Any]:
        task = await self._store.get(_TASKS, task_id)
        if task is None:
            raise NotFound(f"task '{task_id}' not found")
        return task

    async def decide(self, task_id: str, call_id: str, approve: bool, comment: str) -> dict[str, Any]:
        """An admin approves or rejects a call its task waits for; the first decision stands (409 after)."""
        context.require_admin("deciding an approval")
        task = await self.get(task_id)
        if task["status"] in TERMINAL:
            # Nothing of an ended task waits any more: as for a call that never waited.
            raise NotFound(f"task '{task_id}' already {task['status']}: no call of it waits for approval")
        try:
            await self._approvals.decide(task, call_id, approve, comment)
        except AlreadyExists:
            await self._wake(task_id, call_id)  # a decision whose wake-up failed: asking again wakes the task
            raise
        await self._wake(task_id, call_id)
        return await self.get(task_id)

    async def _wake(self, task_id: str, call_id: str) -> None:
        """A parked task whose call was decided runs again (a ParkingQueue; once per call). Only a parked one: a
        run still waiting acts on the decision itself (a wake-up would start a second run on another replica)."""
        if isinstance(self._queue, ParkingQueue) and (await self.get(task_id)).get("parked_at"):
            await self._queue.wake(WorkItem(context.current().tenant_id, task_id), f"decided-{call_id}")

    async def _cancelled_elsewhere(self, task_id: str) -> bool:
        """Whether another replica recorded a cancellation; a store out of reach for a moment says no (the end of
        the run asks again, and the replica that cancelled recorded the ending)."""
        try:
            return await self._store.get(_CANCELLATIONS, task_id) is not None
        except Unavailable:
            return False

    async def _call(
        self,
        task: dict[str, Any],
        run: PlanRun | None,
        state: Any,
        agent: dict[str, Any],
        step: Step,
        arguments: dict[str, Any],
        waiting: list[str],
    ) -> ToolAnswer:
        """One tool call of a task; one that requires approval (the integrator says so, from the tool's definition,
        and runs nothing) waits for a person's decision and is made again, approved."""
        task_id = task["task_id"]
        answer = await self._invoke(agent, step, arguments, task_id, False)
        if answer.approval_required:
            await self._await_approval(task, run, state, step.id, step.tool, arguments, waiting)
            answer = await self._invoke(agent, step, arguments, task_id, True)
        return answer

    async def _await_approval(
        self,
        task: dict[str, Any],
        run: PlanRun | None,
        state: Any,
        step_id: str,
        tool: str,
        arguments: dict[str, Any],
        waiting: list[str],
    ) -> None:
        """Pause this step (and say so in the task) until its call is decided; a rejection raises."""

        def mark(status: str) -> None:
            if isinstance(state, dict):
                state["status"] = status
            else:
                state.status = status

        mark("waiting_approval")
        waiting.append(step_id)
        await self._save(task, run, status="waiting_approval")
        try:
            decided = await self._decision(task, step_id, tool, arguments)
        finally:
            waiting.remove(step_id)
        mark("running")
        await self._save(task, run, status="waiting_approval" if waiting else "running")
        if not decided["approved"]:
            raise rejection(decided)

    async def _decision(self, task: dict[str, Any], step_id: str, tool: str, arguments: dict[str, Any]) -> Any:
        """The decision on a call; with a ParkingQueue, a wait longer than its ``park_after_seconds`` parks the run
        instead: a wake-up is queued at the deadline (the decision queues another), and the run is cancelled."""
        waited = self._approvals.wait(task["task_id"], step_id, tool, arguments)
        deadline_at = int(task.get("deadline_at") or 0)
        if not isinstance(self._queue, ParkingQueue) or deadline_at - now_ms() < _PARK_MARGIN_MS:
            return await waited
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(waited, self._queue.park_after_seconds)
        # Marked parked first, then the decision read again: a decision made meanwhile either sees the mark (and
        # queues a wake-up) or is seen here (and the run goes on).
        task["parked_at"] = now_ms()
        await self._save(task, None)  # fenced, as every write of a run
        decided = await self._approvals.decided(task["task_id"], step_id)
        if decided is not None:
            task["parked_at"] = None
            return decided
        key = (context.current().tenant_id, task["task_id"])
        self._parked.setdefault(key, set()).add(step_id)
        # Due just after the deadline, so that it ends a task that is still waiting, never runs one early.
        await self._queue.wake(WorkItem(*key), "deadline", at_ms=deadline_at + _DEADLINE_WAKE_DELAY_MS)
        log.info("task parked until its call is decided", extra={"task": task["task_id"], "step": step_id})
        self._running[key].cancel()
        await asyncio.Event().wait()  # until that cancellation reaches this step

    async def cancel(self, task_id: str) -> dict[str, Any]:
        task = await self.get(task_id)
        if task["status"] in TERMINAL:
            raise FailedPrecondition(f"task '{task_id}' already {task['status']}")
        runner = self._running.get((context.current().tenant_id, task_id))
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        else:
            # Running in another replica (or a restart lost it): the flag stops that replica at its next step.
            await self._store.put(_CANCELLATIONS, task_id, {"at": now_ms()})
        # Also when the run was cancelled before it took its first step, and so never recorded it.
        return await self._record_cancelled(task_id)

    async def _record_cancelled(self, task_id: str) -> dict[str, Any]:
        task = await self.get(task_id)
        if task["status"] in TERMINAL:
            return task
        for step in task["steps"]:
            if step["status"] in ("pending", "running", "waiting_approval"):
                step["status"] = "cancelled" if step["status"] != "pending" else "skipped"
        await self._save(
            task, None, status="cancelled", error="cancelled", events=[("task.cancelled", {"error": "cancelled"})]
        )
        return task

    async def events(self, task_id: str, after: int) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """The task's events after ``after``, ending with the terminal one (at once if that was already sent)."""
        task = await self.get(task_id)
        after = max(after, 0)
        wait = 10.0
        if task["status"] in TERMINAL:
            for seq, event in await self._store.read(task_events(task_id), after):
                yield seq, event
                after = seq
                if event["type"] in _TERMINAL_EVENTS:
                    return
            last = await self._store.tail(task_events(task_id), 1)
            if last and last[0]["type"] in _TERMINAL_EVENTS:
                return  # sent before ``after``: the stream of a finished task ends at once
            # The terminal status is stored just before its event is appended: wait for that event, briefly (a
            # process that died in between never appends it).
            wait = 5.0
        while True:
            batch = await self._store.read(task_events(task_id), after, block_seconds=wait)
            if not batch and wait < 10:
                return
            for seq, event in batch:
                yield seq, event
                after = seq
                if event["type"] in _TERMINAL_EVENTS:
                    return

    async def _emit(self, task_id: str, kind: str, data: dict[str, Any]) -> None:
        appends = [(task_events(task_id), _event(task_id, kind, data), _EVENTS_MAXLEN)]
        if await self._store.write(appends=appends, fence=_fence_of(task_id)) is None:
            raise Superseded(task_id)

    async def _run(self, agent: dict[str, Any], plan: Any, task: dict[str, Any]) -> None:
        task_id = task["task_id"]
        this_run = asyncio.current_task()
        assert this_run is not None
        cancelled_elsewhere = False
        # A resumed task keeps the steps that succeeded before: they are not run again.
        done = {s["id"]: s for s in task["steps"] if s["status"] == "succeeded"}
        waiting: list[str] = []  # the steps waiting for approval now
        resumed = task["status"] != "queued"

        # The task document holds its input, and each output twice (in its step and in the result).
        size = len(json_bytes(task["input"])) + sum(2 * len(json_bytes(s.get("output"))) for s in done.values())

        async def execute(step: Step, arguments: dict[str, Any]) -> Any:
            nonlocal size, cancelled_elsewhere
            if await self._cancelled_elsewhere(task_id):
                cancelled_elsewhere = True
                # Another replica recorded a cancellation: end this run as a local cancel would, calling nothing.
                this_run.cancel()
                await asyncio.Event().wait()  # until the run's cancellation cancels this step too
            answer = await self._call(task, run, run.steps[step.id], agent, step, arguments, waiting)
            task["usage"]["tool_calls"] += 1
            if answer.http_status >= 400:
                raise FailedPrecondition(f"tool '{step.tool}' answered HTTP {answer.http_status}")
            if size + 2 * answer.size > self._limits.task_bytes:
                raise FailedPrecondition(
                    f"its output of {answer.size} bytes would take the task past {self._limits.task_bytes} bytes "
                    "(ALTAN_MAX_TASK_BYTES)"
                )
            size += 2 * answer.size
            return answer.output

        async def on_events(events: list[tuple[str, dict[str, Any]]]) -> None:
            await self._save(task, run, events=events)

        run = PlanRun(plan, execute, expansion_bytes=self._limits.expansion_bytes, completed=done, on_events=on_events)
        try:
            started = ("task.resumed", {"completed_steps": sorted(done)}) if resumed else ("task.started", {})
            await self._save(task, run, status="running", events=[started])
            outputs = await run.run()
        except Superseded:
            raise  # another delivery runs the task now: this run stops, writing nothing more
        except PlanFailed as exc:
            await self._finish(
                task, run, status="failed", error=f"step {exc.step_id} failed: {error_message(exc.error)}"
            )
        except asyncio.CancelledError:
            if await self._stopped(task, run, cancelled_elsewhere):
                raise
        except Unavailable:
            # The state store out of reach while the progress was saved: the run stops as it is, and the queue
            # delivers the task again once the lease lapses, to go on from its last saved step.
            raise
        except Exception as exc:
            log.exception("task crashed")
            await self._finish(task, run, status="failed", error=f"internal error: {type(exc).__name__}")
        else:
            # Shielded like the other endings: a cancel arriving now must not leave the task without its end.
            if await self._store.get(_CANCELLATIONS, task_id) is not None:
                await asyncio.shield(self._save(task, run, status="cancelled", error="cancelled"))
            else:
                await asyncio.shield(self._finish(task, run, status="succeeded", result=outputs))

    async def _converse(self, agent: dict[str, Any], task: dict[str, Any]) -> None:
        """Run a natural-language task: the agent's LLM loop, continuing the task's thread."""
        assert self._llm is not None
        llm = self._llm
        task_id, thread_id = task["task_id"], task["thread_id"]
        this_run = asyncio.current_task()
        assert this_run is not None
        slots = self._slots.setdefault(context.current().tenant_id, asyncio.Semaphore(llm.tool_concurrency))
        size = len(json_bytes(task["input"]))
        waiting: list[str] = []

        async def run_tool(tool: str, arguments: dict[str, Any], step_id: str) -> tuple[Any, int]:
            nonlocal size
            if await self._cancelled_elsewhere(task_id):
                this_run.cancel()
                await asyncio.Event().wait()
            async with slots:
                answer = await self._invoke(agent, Step(step_id, tool), arguments, task_id, False)
            if answer.approval_required:  # nothing ran: wait for a person (holding no slot), then call approved
                state = next(s for s in task["steps"] if s["id"] == step_id)
                await self._await_approval(task, None, state, step_id, tool, arguments, waiting)
                async with slots:
                    answer = await self._invoke(agent, Step(step_id, tool), arguments, task_id, True)
            task["usage"]["tool_calls"] += 1
            if size + 2 * answer.size > self._limits.task_bytes:
                raise FailedPrecondition(
                    f"its output of {answer.size} bytes would take the task past {self._limits.task_bytes} bytes "
                    "(ALTAN_MAX_TASK_BYTES)"
                )
            size += 2 * answer.size
            return answer.output, answer.http_status

        async def changed() -> None:
            await self._save(task, None)

        async def emit(kind: str, data: dict[str, Any]) -> None:
            await self._emit(task_id, kind, data)

        async def record(message: dict[str, Any]) -> None:
            if not await self._threads.add(thread_id, message, _fence.get()):
                raise Superseded(task_id)

        resumed = task["status"] != "queued"
        try:
            if resumed:
                done = [s["id"] for s in task["steps"] if s["status"] == "succeeded"]
                started = ("task.resumed", {"completed_steps": done})
            else:
                started = ("task.started", {})
            await self._save(task, None, status="running", events=[started])
            budget = llm.context_budget_tokens
            recent = await self._threads.recent(thread_id, budget)
            # This task's own messages, when an earlier run of it recorded some: the loop goes on after them.
            mine = [m for m in recent if m.get("task_id") == task_id] if resumed else []
            earlier = [m for m in recent if m.get("task_id") != task_id] if resumed else recent
            history = fit_to_budget(coherent(earlier), budget)
            conversation = Conversation(
                task=task,
                agent=agent,
                llm=agent_llm(agent["llm"]),
                fallbacks=[agent_llm(f) for f in agent.get("fallback_llms", ())],
                tools=await llm.describe(list(agent.get("tools", ()))),
                history=history,
                limits=llm.loop,
                model=llm.model,
                run_tool=run_tool,
                emit=emit,
                record=record,
                changed=changed,
            )
            answer = await conversation.run(_text(task["input"]), mine)
        except Superseded:
            raise  # another delivery runs the task now: this run stops, writing nothing more
        except AltanError as exc:
            await self._finish(task, None, status="failed", error=exc.message)
        except asyncio.CancelledError:
            if await self._stopped(task, None):
                raise
        except Exception as exc:
            log.exception("task crashed")
            await self._finish(task, None, status="failed", error=f"internal error: {type(exc).__name__}")
        else:
            await asyncio.shield(self._finish(task, None, status="succeeded", result={"answer": answer}))

    async def _save(
        self,
        task: dict[str, Any],
        run: PlanRun | None,
        *,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        **changes: Any,
    ) -> None:
        """The one place a running task's progress is written: its document with ``changes`` (and its plan's steps)
        and the events of that change, in one write (one transaction, one round trip), so a follower never sees an
        event before the state it announces."""
        if run is not None:
            changes["steps"] = [_step(s) for s in run.steps.values()]
        now = now_ms()
        task.update(changes, updated_at=now)
        task_id = task["task_id"]
        appends = [(task_events(task_id), _event(task_id, kind, data, now), _EVENTS_MAXLEN) for kind, data in events]
        # From its run, only while that run holds the task (checked in the same write).
        if await self._store.write([(_TASKS, task_id, task)], appends, fence=_fence_of(task_id)) is None:
            raise Superseded(task_id)

    async def _finish(self, task: dict[str, Any], run: PlanRun | None, *, status: str, **changes: Any) -> None:
        data = {"error": changes["error"]} if "error" in changes else {}
        await self._save(task, run, status=status, events=[(f"task.{status}", data)], **changes)


def _replan(task_input: Any) -> Any:
    """The plan of a task accepted earlier (checked then, tools included: a tool gone since fails its step)."""
    named = {s["tool"] for s in task_input["plan"]}
    return parse_plan(task_input, known_tools=named, bound_tools=named)


def _deadline_error(seconds: float) -> str:
    return (
        f"deadline exceeded: the task did not end within {seconds:g}s of being accepted (ALTAN_TASK_DEADLINE_SECONDS)"
    )


def _is_plan(task_input: Any) -> bool:
    return isinstance(task_input, dict) and "plan" in task_input


def _text(task_input: Any) -> str:
    """What the model reads of a natural-language input: the text itself, or the JSON of any other value."""
    text = task_input if isinstance(task_input, str) else json.dumps(task_input, ensure_ascii=False)
    if not text.strip():
        raise InvalidArgument("input: empty; give the agent something to do")
    return text


def _step(state: StepState) -> dict[str, Any]:
    doc = state.to_dict()
    doc["id"] = doc.pop("step_id")
    return doc


def _event(task_id: str, kind: str, data: dict[str, Any], time: int | None = None) -> dict[str, Any]:
    return {"type": kind, "task_id": task_id, "time": now_ms() if time is None else time, "data": data}


def _fence_of(task_id: str) -> Fence | None:
    """The fence of the run this code belongs to, when it runs ``task_id``: its writes of the task happen only while
    it holds the task. None for a request (a cancel, a decision) and for another task's writes."""
    fence = _fence.get()
    return fence if fence is not None and fence.doc_id == task_id else None
