"""Tasks: submission (with idempotency keys), execution of structured plans and of the LLM loop, events and
cancellation.

A task runs in the background of the replica that accepted it, in the caller's request context (tenant and token
travel with it). Every state change is written to the store and announced on the task's event stream, which
followers read with a blocking read instead of polling. An input with a ``plan`` runs that plan; any other input goes
to the agent's LLM (:mod:`services.agent.conversation`), continuing the task's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from altan import context, telemetry
from altan.api.agents import llm_to_proto as agent_llm
from altan.api.convert import now_ms
from altan.api.tasks import TaskSubmission
from altan.errors import AltanError, FailedPrecondition, InvalidArgument, NotFound
from altan.store import TenantStore
from altan.v1 import runtime_pb2
from altan.wire import json_bytes, new_id
from services.agent.agents import AgentCatalog
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

__all__ = ["TERMINAL", "LlmBackend", "TaskLimits", "TaskRunner", "ToolAnswer", "ToolInvoker"]

log = logging.getLogger(__name__)

_TASKS = "tasks"
_IDEMPOTENCY = "idempotency"
_CANCELLATIONS = "cancellations"  # task id -> when another replica was asked to cancel it
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_TERMINAL_EVENTS = frozenset(f"task.{status}" for status in TERMINAL)

# Runs one tool for an agent's task: (agent, step, arguments, task_id) -> its answer.
ToolInvoker = Callable[[dict[str, Any], Step, dict[str, Any], str], Awaitable["ToolAnswer"]]


@dataclass(frozen=True)
class ToolAnswer:
    """What a tool call of a task answered: the output, the third party's HTTP status, the output's JSON size."""

    output: Any
    http_status: int
    size: int


@dataclass(frozen=True)
class TaskLimits:
    """How large a task may grow (docs/architecture.md, "Size limits")."""

    expansion_bytes: int = MAX_EXPANSION_BYTES  # what one step's ${...} references may bring into its arguments
    task_bytes: int = 4 * 1024 * 1024  # the task document: input, every step's output, and the result


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


def _events(task_id: str) -> str:
    return f"events:{task_id}"


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
    ) -> None:
        self._limits = limits or TaskLimits()
        self._llm = llm
        self._threads = ThreadStore(store)
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._store = store
        self._agents = agents
        self._missing_tools = missing_tools
        self._invoke = invoke
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._callers: dict[tuple[str, str], context.RequestContext] = {}

    async def submit(self, agent_id: str, submission: TaskSubmission) -> tuple[dict[str, Any], bool]:
        """Queue a task; ``(task, created)``, where an idempotency key seen before gives the first task back."""
        agent = await self._agents.get(agent_id)
        task_input, idempotency_key = submission.input, submission.idempotency_key or ""
        idem_id = f"{agent_id}:{idempotency_key}"
        if idempotency_key:
            earlier = await self._store.get(_IDEMPOTENCY, idem_id)
            if earlier is not None:
                return await self.get(earlier["task_id"]), False
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
            "created_at": now,
            "updated_at": now,
        }
        await self._store.put(_TASKS, task["task_id"], task)
        if idempotency_key and not await self._store.put_new(_IDEMPOTENCY, idem_id, {"task_id": task["task_id"]}):
            # Another request with the same key won the race: theirs is the task.
            await self._store.delete(_TASKS, task["task_id"])
            winner = await self._store.get(_IDEMPOTENCY, idem_id)
            assert winner is not None
            return await self.get(winner["task_id"]), False
        await self._emit(task["task_id"], "task.queued", {})
        caller = context.current()
        key = (caller.tenant_id, task["task_id"])
        work = self._run(agent, plan, task) if plan is not None else self._converse(agent, task)
        runner = asyncio.create_task(work)
        self._running[key] = runner
        self._callers[key] = caller
        runner.add_done_callback(lambda _: (self._running.pop(key, None), self._callers.pop(key, None)))
        return task, True

    async def _plan(self, agent: dict[str, Any], task_input: Any) -> Any:
        steps = task_input["plan"] if isinstance(task_input["plan"], list) else []
        named = {s["tool"] for s in steps if isinstance(s, dict) and isinstance(s.get("tool"), str)}
        bound = set(agent.get("tools", []))
        missing = set(await self._missing_tools(sorted(named | bound))) if named | bound else set()
        return parse_plan(task_input, known_tools=(named | bound) - missing, bound_tools=bound)

    async def aclose(self) -> None:
        """On shutdown: cancel what still runs here, so each task ends recorded as cancelled, not stuck running."""
        running = [(key, runner, self._callers[key]) for key, runner in self._running.items()]
        for _, runner, _ in running:
            runner.cancel()
        await asyncio.gather(*(runner for _, runner, _ in running), return_exceptions=True)
        for (_, task_id), _, caller in running:
            # A run cancelled before it took its first step never saw its cancellation: record it here.
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
        task.update(status="cancelled", error="cancelled", updated_at=now_ms())
        await self._store.put(_TASKS, task_id, task)
        await self._emit(task_id, "task.cancelled", {"error": "cancelled"})
        return task

    async def events(self, task_id: str, after: int) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """The task's events after ``after``, ending with the terminal one (at once if that was already sent)."""
        task = await self.get(task_id)
        after = max(after, 0)
        wait = 10.0
        if task["status"] in TERMINAL:
            for seq, event in await self._store.read(_events(task_id), after):
                yield seq, event
                after = seq
                if event["type"] in _TERMINAL_EVENTS:
                    return
            last = await self._store.tail(_events(task_id), 1)
            if last and last[0]["type"] in _TERMINAL_EVENTS:
                return  # sent before ``after``: the stream of a finished task ends at once
            # The terminal status is stored just before its event is appended: wait for that event, briefly (a
            # process that died in between never appends it).
            wait = 5.0
        while True:
            batch = await self._store.read(_events(task_id), after, block_seconds=wait)
            if not batch and wait < 10:
                return
            for seq, event in batch:
                yield seq, event
                after = seq
                if event["type"] in _TERMINAL_EVENTS:
                    return

    async def _emit(self, task_id: str, kind: str, data: dict[str, Any]) -> None:
        await self._store.append(_events(task_id), {"type": kind, "task_id": task_id, "time": now_ms(), "data": data})

    async def _run(self, agent: dict[str, Any], plan: Any, task: dict[str, Any]) -> None:
        task_id = task["task_id"]
        context.with_task(task_id)
        this_run = asyncio.current_task()
        assert this_run is not None
        cancelled_elsewhere = False

        # The task document holds its input, and each output twice (in its step and in the result).
        size = len(json_bytes(task["input"]))

        async def execute(step: Step, arguments: dict[str, Any]) -> Any:
            nonlocal size, cancelled_elsewhere
            if await self._store.get(_CANCELLATIONS, task_id) is not None:
                cancelled_elsewhere = True
                # Another replica recorded a cancellation: end this run as a local cancel would, calling nothing.
                this_run.cancel()
                await asyncio.Event().wait()  # until the run's cancellation cancels this step too
            answer = await self._invoke(agent, step, arguments, task_id)
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

        async def on_event(kind: str, data: dict[str, Any]) -> None:
            await self._save(task, run)
            await self._emit(task_id, kind, data)

        run = PlanRun(plan, execute, on_event, expansion_bytes=self._limits.expansion_bytes)
        try:
            await self._save(task, run, status="running")
            await self._emit(task_id, "task.started", {})
            outputs = await run.run()
        except PlanFailed as exc:
            await self._finish(
                task, run, status="failed", error=f"step {exc.step_id} failed: {error_message(exc.error)}"
            )
        except asyncio.CancelledError:
            # Cancelled elsewhere, the ending (and its event) is already recorded: only this run's steps are new.
            ending = self._save if cancelled_elsewhere else self._finish
            await asyncio.shield(ending(task, run, status="cancelled", error="cancelled"))
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
        context.with_task(task_id)
        this_run = asyncio.current_task()
        assert this_run is not None
        slots = self._slots.setdefault(context.current().tenant_id, asyncio.Semaphore(llm.tool_concurrency))
        size = len(json_bytes(task["input"]))

        async def run_tool(tool: str, arguments: dict[str, Any], step_id: str) -> tuple[Any, int]:
            nonlocal size
            if await self._store.get(_CANCELLATIONS, task_id) is not None:
                this_run.cancel()
                await asyncio.Event().wait()
            async with slots:
                answer = await self._invoke(agent, Step(step_id, tool), arguments, task_id)
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
            await self._threads.add(thread_id, message)

        try:
            await self._save(task, None, status="running")
            await self._emit(task_id, "task.started", {})
            budget = llm.context_budget_tokens
            history = fit_to_budget(coherent(await self._threads.recent(thread_id, budget)), budget)
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
            answer = await conversation.run(_text(task["input"]))
        except AltanError as exc:
            await self._finish(task, None, status="failed", error=exc.message)
        except asyncio.CancelledError:
            await asyncio.shield(self._finish(task, None, status="cancelled", error="cancelled"))
            raise
        except Exception as exc:
            log.exception("task crashed")
            await self._finish(task, None, status="failed", error=f"internal error: {type(exc).__name__}")
        else:
            await asyncio.shield(self._finish(task, None, status="succeeded", result={"answer": answer}))

    async def _save(self, task: dict[str, Any], run: PlanRun | None, **changes: Any) -> None:
        if run is not None:
            changes["steps"] = [_step(s) for s in run.steps.values()]
        task.update(changes, updated_at=now_ms())
        await self._store.put(_TASKS, task["task_id"], task)

    async def _finish(self, task: dict[str, Any], run: PlanRun | None, *, status: str, **changes: Any) -> None:
        await self._save(task, run, status=status, **changes)
        data = {"error": changes["error"]} if "error" in changes else {}
        await self._emit(task["task_id"], f"task.{status}", data)


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
