"""Structured plans: a task input ``{"plan": [steps]}`` checked up front, then run as a dependency graph.

Steps whose dependencies have all succeeded start at once and run concurrently. A step's arguments may read the
output of a step it (transitively) depends on with ``${s1.output}`` or ``${s1.output.items.0.name}``: a string
that is exactly one reference takes the referenced value with its type; a reference inside a longer string is
replaced by its text. The first failure cancels what is still running, and the steps not started are skipped.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from altan.api.convert import now_ms
from altan.errors import AltanError, FailedPrecondition, InvalidArgument

__all__ = [
    "MAX_EXPANSION_BYTES",
    "MAX_STEPS",
    "STEP_ID_PATTERN",
    "Plan",
    "PlanFailed",
    "PlanRun",
    "Step",
    "StepState",
    "error_message",
    "parse_plan",
    "run_plan",
    "substitute",
]

MAX_STEPS = 100
STEP_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"
# What a step's ${...} references may bring into its arguments, unless PlanRun is given another budget.
MAX_EXPANSION_BYTES = 1024 * 1024

_STEP_ID = re.compile(STEP_ID_PATTERN[1:-1])
_STEP_FIELDS = frozenset({"id", "tool", "arguments", "depends_on"})
# ${<step id>.output<rest>}; <rest> is checked apart so that a malformed path is an error, not literal text.
_REFERENCE = re.compile(r"\$\{([A-Za-z][A-Za-z0-9_\-]{0,63})\.output(?![A-Za-z0-9_\-])([^{}]*)\}")
_INDEX = re.compile(r"-?\d+")

Execute = Callable[["Step", dict[str, Any]], Awaitable[Any]]
OnEvent = Callable[[str, dict[str, Any]], Awaitable[None]]
# The events of one turn of the run (steps started together, a batch settled and what it lets start), in order.
OnEvents = Callable[[list[tuple[str, dict[str, Any]]]], Awaitable[None]]


@dataclass(frozen=True)
class Step:
    """One tool call of a plan."""

    id: str
    tool: str
    arguments: dict[str, Any] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Checked steps, in the order they were given."""

    steps: tuple[Step, ...]


class PlanFailed(Exception):
    """A step failed; ``error`` is what it raised."""

    def __init__(self, step_id: str, error: BaseException) -> None:
        self.step_id = step_id
        self.error = error
        super().__init__(f"step {step_id} failed: {error_message(error)}")


def _error(task: asyncio.Task[Any]) -> BaseException | None:
    return asyncio.CancelledError() if task.cancelled() else task.exception()


def error_message(error: BaseException) -> str:
    """A message safe to show the caller: a domain error's own, otherwise only the kind of failure."""
    if isinstance(error, AltanError):
        return error.message
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return f"internal error ({type(error).__name__})"


# --- parsing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reference:
    text: str
    step_id: str
    path: tuple[str, ...]


def parse_plan(input_obj: Any, *, known_tools: set[str], bound_tools: set[str]) -> Plan:
    """Check a structured task input and return its :class:`Plan`; every problem is an InvalidArgument."""
    if not isinstance(input_obj, dict) or "plan" not in input_obj:
        raise InvalidArgument('input: a structured task is an object {"plan": [steps]}')
    unknown = sorted(set(input_obj) - {"plan"})
    if unknown:
        raise InvalidArgument(f"input: unknown field {unknown[0]!r}")
    raw_steps = input_obj["plan"]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise InvalidArgument("plan: must be a non-empty list of steps")
    if len(raw_steps) > MAX_STEPS:
        raise InvalidArgument(f"plan: at most {MAX_STEPS} steps, got {len(raw_steps)}")

    steps: list[Step] = []
    for index, raw in enumerate(raw_steps):
        step = _parse_step(index, raw, known_tools, bound_tools)
        if any(other.id == step.id for other in steps):
            raise InvalidArgument(f"plan[{index}].id: duplicate step id {step.id!r}")
        steps.append(step)

    by_id = {step.id: step for step in steps}
    for step in steps:
        for dependency in step.depends_on:
            if dependency == step.id:
                raise InvalidArgument(f"step {step.id}: depends on itself")
            if dependency not in by_id:
                raise InvalidArgument(f"step {step.id}: depends on unknown step {dependency!r}")
    _check_acyclic(steps, by_id)

    for step in steps:
        ancestors = _ancestors(step, by_id)
        for reference in _references(step.arguments, f"step {step.id}: "):
            if reference.step_id not in by_id:
                raise InvalidArgument(f"step {step.id}: {reference.text} refers to unknown step {reference.step_id!r}")
            if reference.step_id not in ancestors:
                raise InvalidArgument(
                    f"step {step.id}: {reference.text} refers to step {reference.step_id!r}, "
                    "which is not among its dependencies (add it to depends_on)"
                )
    return Plan(tuple(steps))


def _parse_step(index: int, raw: Any, known_tools: set[str], bound_tools: set[str]) -> Step:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"plan[{index}]: a step must be an object")
    step_id = raw.get("id")
    if not isinstance(step_id, str) or not _STEP_ID.fullmatch(step_id):
        raise InvalidArgument(f"plan[{index}].id: must match {STEP_ID_PATTERN}")
    where = f"step {step_id}"
    unknown = sorted(set(raw) - _STEP_FIELDS)
    if unknown:
        raise InvalidArgument(f"{where}: unknown field {unknown[0]!r}")
    tool = raw.get("tool")
    if not isinstance(tool, str) or not tool:
        raise InvalidArgument(f"{where}: tool must be a non-empty string")
    if tool not in known_tools:
        raise InvalidArgument(f"{where}: unknown tool {tool!r}")
    if tool not in bound_tools:
        raise InvalidArgument(f"{where}: tool {tool!r} is not bound to this agent")
    arguments = raw.get("arguments", {})
    if not isinstance(arguments, dict):
        raise InvalidArgument(f"{where}: arguments must be an object")
    depends_on = raw.get("depends_on", [])
    if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
        raise InvalidArgument(f"{where}: depends_on must be a list of step ids")
    # The step keeps its own copy, so the caller changing its input later cannot change the plan.
    return Step(step_id, tool, copy.deepcopy(arguments), tuple(dict.fromkeys(depends_on)))


def _check_acyclic(steps: list[Step], by_id: dict[str, Step]) -> None:
    done: set[str] = set()
    for start in steps:
        if start.id in done:
            continue
        # Iterative depth-first search; `path` is the chain being explored, so a back edge names the cycle.
        path: list[str] = [start.id]
        on_path = {start.id}
        pending: list[Iterator[str]] = [iter(start.depends_on)]
        while pending:
            dependency = next(pending[-1], None)
            if dependency is None:
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                pending.pop()
                continue
            if dependency in on_path:
                cycle = [*path[path.index(dependency) :], dependency]
                raise InvalidArgument(f"plan: dependency cycle {' -> '.join(cycle)} (each step depends on the next)")
            if dependency not in done:
                path.append(dependency)
                on_path.add(dependency)
                pending.append(iter(by_id[dependency].depends_on))


def _ancestors(step: Step, by_id: dict[str, Step]) -> set[str]:
    seen: set[str] = set()
    pending = list(step.depends_on)
    while pending:
        step_id = pending.pop()
        if step_id not in seen:
            seen.add(step_id)
            pending.extend(by_id[step_id].depends_on)
    return seen


def _references(value: Any, where: str) -> Iterator[_Reference]:
    if isinstance(value, str):
        for match in _REFERENCE.finditer(value):
            yield _reference(match, where)
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _references(item, where)


def _reference(match: re.Match[str], where: str) -> _Reference:
    rest = match.group(2)
    path = tuple(rest[1:].split(".")) if rest else ()
    if rest and (not rest.startswith(".") or not all(path)):
        raise InvalidArgument(f"{where}malformed reference {match.group(0)!r}")
    return _Reference(match.group(0), match.group(1), path)


# --- substitution -----------------------------------------------------------------------------------------


def substitute(arguments: Any, outputs: dict[str, Any], *, step_id: str = "", budget: int | None = None) -> Any:
    """``arguments`` with every ``${sN.output...}`` reference in its string values resolved.

    Keys are never substituted. A path missing from the output is an InvalidArgument naming the segment,
    prefixed with ``step <step_id>:`` when a step id is given. What the references bring in, counted as UTF-8 JSON,
    may not exceed ``budget`` bytes (default :data:`MAX_EXPANSION_BYTES`): one output referenced a hundred times
    would otherwise become a hundred copies. Referenced values are shared with ``outputs``, not copied: the caller
    serializes the arguments and must not change them.
    """
    expander = _Expander(
        outputs, f"step {step_id}: " if step_id else "", MAX_EXPANSION_BYTES if budget is None else budget
    )
    return expander.expand(arguments)


class _Expander:
    """One step's substitution, and what it has brought in so far."""

    def __init__(self, outputs: dict[str, Any], where: str, budget: int) -> None:
        self._outputs = outputs
        self._where = where
        self._budget = budget
        self._spent = 0
        self._sizes: dict[int, int] = {}  # id(value) -> its JSON size, each value measured once

    def expand(self, arguments: Any) -> Any:
        if isinstance(arguments, dict):
            return {key: self.expand(value) for key, value in arguments.items()}
        if isinstance(arguments, list):
            return [self.expand(item) for item in arguments]
        if not isinstance(arguments, str):
            return arguments
        whole = _REFERENCE.fullmatch(arguments)
        if whole is not None:
            value = _resolve(_reference(whole, self._where), self._outputs, self._where)
            self._spend(self._size(value))
            return value
        pieces: list[str] = []
        position = 0
        for match in _REFERENCE.finditer(arguments):
            value = _resolve(_reference(match, self._where), self._outputs, self._where)
            if isinstance(value, str):
                self._spend(len(value.encode()))
                text = value
            else:
                self._spend(self._size(value))
                text = json.dumps(value, ensure_ascii=False)
            pieces += [arguments[position : match.start()], text]
            position = match.end()
        pieces.append(arguments[position:])
        return "".join(pieces)

    def _size(self, value: Any) -> int:
        key = id(value)
        if key not in self._sizes:
            self._sizes[key] = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
        return self._sizes[key]

    def _spend(self, size: int) -> None:
        self._spent += size
        if self._spent > self._budget:
            raise FailedPrecondition(
                f"{self._where}the references in its arguments expand to more than {self._budget} bytes "
                "(ALTAN_MAX_EXPANSION_BYTES)"
            )


def _resolve(reference: _Reference, outputs: dict[str, Any], where: str) -> Any:
    if reference.step_id not in outputs:
        raise InvalidArgument(f"{where}{reference.text}: step {reference.step_id!r} has no output")
    current = outputs[reference.step_id]
    for segment in reference.path:
        if isinstance(current, dict) and segment in current:
            current = current[segment]
        elif isinstance(current, list) and _INDEX.fullmatch(segment) and -len(current) <= int(segment) < len(current):
            current = current[int(segment)]
        else:
            raise InvalidArgument(f"{where}{reference.text}: {segment!r} not found")
    return current


# --- running ----------------------------------------------------------------------------------------------


def _now() -> int:
    return now_ms()


@dataclass
class StepState:
    """Live progress of one step: ``pending``, ``running``, ``succeeded``, ``failed``, ``cancelled`` or ``skipped``."""

    step_id: str
    tool: str
    status: str = "pending"
    started_at: int | None = None  # milliseconds since the epoch
    finished_at: int | None = None
    duration_ms: int | None = None
    output: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: called after every event, and outputs are only read (serialized) afterwards.
        return dict(vars(self))


class PlanRun:
    """One run of a plan; read :attr:`steps` at any time (for example after every event) to persist progress."""

    def __init__(
        self,
        plan: Plan,
        execute: Execute,
        on_event: OnEvent | None = None,
        *,
        expansion_bytes: int = MAX_EXPANSION_BYTES,
        completed: dict[str, dict[str, Any]] | None = None,
        on_events: OnEvents | None = None,
    ) -> None:
        """``completed``: the steps that succeeded in an earlier run of this plan (their saved state, by id), which
        this run keeps as they are instead of running them again. ``on_events`` (instead of ``on_event``): the
        events of each turn of the run at once, so that a caller saving its progress on every event writes once per
        turn (a step's call has started, or its result is kept, before its event is handed over)."""
        self.plan = plan
        self._expansion_bytes = expansion_bytes
        self.steps: dict[str, StepState] = {step.id: StepState(step.id, step.tool) for step in plan.steps}
        self.outputs: dict[str, Any] = {}
        for step_id, saved in (completed or {}).items():
            if step_id in self.steps:
                state = self.steps[step_id]
                state.status, state.output = "succeeded", saved.get("output")
                state.started_at, state.finished_at = saved.get("started_at"), saved.get("finished_at")
                state.duration_ms = saved.get("duration_ms")
                self.outputs[step_id] = state.output
        self._execute = execute
        self._on_event = on_event
        self._on_events = on_events
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._running: dict[asyncio.Task[Any], Step] = {}
        self._ready: list[Step] = []  # marked running, their events not yet handed over: not called yet
        self._order = {step.id: index for index, step in enumerate(plan.steps)}
        self._started = False

    async def run(self) -> dict[str, Any]:
        """Run every step; return ``{step_id: output}``, or raise :class:`PlanFailed` for the first failure."""
        if self._started:
            raise RuntimeError("a PlanRun runs once")
        self._started = True
        try:
            failure = await self._drive()
        except BaseException:
            # Our own cancellation, or an on_event that raised: nothing may keep running behind us.
            await self._abort("cancelled", emit=False)
            raise
        if failure is not None:
            raise PlanFailed(*failure)
        return dict(self.outputs)

    async def _drive(self) -> tuple[str, BaseException] | None:
        await self._start_ready()
        await self._flush()
        self._launch()
        while self._running:
            done, _ = await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
            # Settle the whole batch, in plan order, before reacting to a failure in it.
            batch = sorted(done, key=lambda task: self._order[self._running[task].id])
            failures = [(self._running[task].id, error) for task in batch if (error := _error(task)) is not None]
            for task in batch:
                await self._settle(self._running.pop(task), task)
            if failures:
                await self._abort("skipped", emit=True)
                await self._flush()
                return failures[0]
            await self._start_ready()
            await self._flush()
            self._launch()
        return None

    async def _start_ready(self) -> None:
        for step in self.plan.steps:
            state = self.steps[step.id]
            if state.status == "pending" and all(self.steps[d].status == "succeeded" for d in step.depends_on):
                state.status, state.started_at = "running", _now()
                self._ready.append(step)
                await self._emit("tool.started", {"step_id": step.id, "tool": step.tool})

    def _launch(self) -> None:
        """Call the steps started this turn, once their start is written (:meth:`_flush`): a run whose write was
        refused (another delivery took the task over, or the store is down) calls nothing more."""
        ready, self._ready = self._ready, []
        for step in ready:
            call = asyncio.create_task(self._call(step, self.steps[step.id]), name=f"plan-step-{step.id}")
            self._running[call] = step

    async def _call(self, step: Step, state: StepState) -> Any:
        started = time.monotonic()
        try:
            arguments = substitute(step.arguments, self.outputs, step_id=step.id, budget=self._expansion_bytes)
            return await self._execute(step, arguments)
        finally:
            state.finished_at = _now()
            state.duration_ms = round((time.monotonic() - started) * 1000)

    async def _settle(self, step: Step, task: asyncio.Task[Any]) -> None:
        state = self.steps[step.id]
        error = _error(task)
        if error is None:
            state.status, state.output = "succeeded", task.result()
            self.outputs[step.id] = state.output
        else:
            # Cancelled without us asking (we never cancel before settling) is a failure of that step.
            state.status, state.error = "failed", error_message(error)
        await self._emit("tool.finished", self._finished_event(step, state))

    async def _abort(self, not_started: str, *, emit: bool) -> None:
        """Cancel the running steps and wait for them; mark the pending ones ``not_started``."""
        running, self._running = self._running, {}
        for step in self._ready:  # started, never called
            self.steps[step.id].status, self.steps[step.id].error = "cancelled", "cancelled"
        self._ready = []
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        for task, step in running.items():
            state = self.steps[step.id]
            error = _error(task)
            if error is None:  # it finished before the cancellation reached it
                state.status, state.output = "succeeded", task.result()
                self.outputs[step.id] = state.output
            elif isinstance(error, asyncio.CancelledError):
                state.status, state.error = "cancelled", "cancelled"
            else:
                state.status, state.error = "failed", error_message(error)
        for state in self.steps.values():
            if state.status == "pending":
                state.status = not_started
        # Events only once every state is final, so an event handler that fails leaves nothing half-marked.
        for step in running.values() if emit else ():
            await self._emit("tool.finished", self._finished_event(step, self.steps[step.id]))

    @staticmethod
    def _finished_event(step: Step, state: StepState) -> dict[str, Any]:
        event = {"step_id": step.id, "tool": step.tool, "status": state.status, "duration_ms": state.duration_ms}
        return event if state.error is None else event | {"error": state.error}

    async def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self._on_events is not None:
            self._pending.append((event, data))
        elif self._on_event is not None:
            await self._on_event(event, data)

    async def _flush(self) -> None:
        """Hand the turn's events to ``on_events``."""
        if self._on_events is not None and self._pending:
            events, self._pending = self._pending, []
            await self._on_events(events)


async def run_plan(plan: Plan, execute: Execute, on_event: OnEvent | None = None) -> dict[str, Any]:
    """Run ``plan`` to the end: ``{step_id: output}``, or :class:`PlanFailed` for the first failed step."""
    return await PlanRun(plan, execute, on_event).run()
