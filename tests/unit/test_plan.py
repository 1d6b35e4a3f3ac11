"""Structured plans: parsing, reference substitution and the concurrent run."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from altan.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.agent.plan import (
    MAX_STEPS,
    Plan,
    PlanFailed,
    PlanRun,
    Step,
    error_message,
    parse_plan,
    run_plan,
    substitute,
)

TOOLS = {"parse_email", "calendar_create", "slow", "echo", "fail"}


def plan_of(*steps: dict[str, Any], bound: set[str] | None = None) -> Plan:
    return parse_plan({"plan": list(steps)}, known_tools=TOOLS | {"unbound_tool"}, bound_tools=bound or TOOLS)


def refused(input_obj: Any, bound: set[str] | None = None) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_plan(input_obj, known_tools=TOOLS | {"unbound_tool"}, bound_tools=bound or TOOLS)
    return caught.value.message


def step(step_id: str, tool: str = "echo", arguments: Any = None, depends_on: Any = None) -> dict[str, Any]:
    raw: dict[str, Any] = {"id": step_id, "tool": tool}
    if arguments is not None:
        raw["arguments"] = arguments
    if depends_on is not None:
        raw["depends_on"] = depends_on
    return raw


# --- parse_plan -------------------------------------------------------------------------------------------


def test_the_contract_example_parses() -> None:
    plan = parse_plan(
        {
            "plan": [
                {"id": "s1", "tool": "parse_email", "arguments": {"raw": "..."}},
                {
                    "id": "s2",
                    "tool": "calendar_create",
                    "arguments": {"title": "${s1.output.subject}"},
                    "depends_on": ["s1"],
                },
            ]
        },
        known_tools=TOOLS,
        bound_tools=TOOLS,
    )
    assert plan.steps == (
        Step("s1", "parse_email", {"raw": "..."}, ()),
        Step("s2", "calendar_create", {"title": "${s1.output.subject}"}, ("s1",)),
    )


def test_defaults_copies_and_frozen_steps() -> None:
    arguments = {"nested": {"a": 1}}
    plan = plan_of(step("a"), step("b", arguments=arguments, depends_on=["a", "a"]))
    assert plan.steps[0].arguments == {}
    assert plan.steps[0].depends_on == ()
    assert plan.steps[1].depends_on == ("a",)
    arguments["nested"]["a"] = 2
    assert plan.steps[1].arguments == {"nested": {"a": 1}}
    with pytest.raises(AttributeError):
        plan.steps[0].tool = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("input_obj", "message"),
    [
        ("do things", 'input: a structured task is an object {"plan": [steps]}'),
        ({"steps": []}, "input: a structured task"),
        ({"plan": [step("s1")], "extra": 1}, "input: unknown field 'extra'"),
        ({"plan": []}, "plan: must be a non-empty list of steps"),
        ({"plan": {"id": "s1"}}, "plan: must be a non-empty list of steps"),
        ({"plan": [step(f"s{i}") for i in range(MAX_STEPS + 1)]}, "plan: at most 100 steps, got 101"),
        ({"plan": ["s1"]}, "plan[0]: a step must be an object"),
        ({"plan": [{"tool": "echo"}]}, "plan[0].id: must match"),
        ({"plan": [step("1s")]}, "plan[0].id: must match"),
        ({"plan": [step("s" * 65)]}, "plan[0].id: must match"),
        ({"plan": [step("s1"), step("s1")]}, "plan[1].id: duplicate step id 's1'"),
        ({"plan": [{**step("s1"), "when": "now"}]}, "step s1: unknown field 'when'"),
        ({"plan": [{"id": "s1"}]}, "step s1: tool must be a non-empty string"),
        ({"plan": [step("s1"), step("s2", "x")]}, "step s2: unknown tool 'x'"),
        ({"plan": [step("s1"), step("s2", "unbound_tool")]}, "step s2: tool 'unbound_tool' is not bound to this agent"),
        ({"plan": [step("s1", arguments=[1])]}, "step s1: arguments must be an object"),
        ({"plan": [step("s1", depends_on="s0")]}, "step s1: depends_on must be a list of step ids"),
        ({"plan": [step("s1", depends_on=[1])]}, "step s1: depends_on must be a list of step ids"),
        ({"plan": [step("s1", depends_on=["s9"])]}, "step s1: depends on unknown step 's9'"),
        ({"plan": [step("s1", depends_on=["s1"])]}, "step s1: depends on itself"),
    ],
)
def test_plan_problems_are_precise(input_obj: Any, message: str) -> None:
    assert refused(input_obj).startswith(message)


def test_exactly_100_steps_are_allowed() -> None:
    assert len(plan_of(*[step(f"s{i}") for i in range(MAX_STEPS)]).steps) == MAX_STEPS


def test_cycles_are_named() -> None:
    two = {"plan": [step("s1", depends_on=["s2"]), step("s2", depends_on=["s1"])]}
    assert refused(two).startswith("plan: dependency cycle s1 -> s2 -> s1")
    longer = {
        "plan": [
            step("a"),
            step("b", depends_on=["a", "d"]),
            step("c", depends_on=["b"]),
            step("d", depends_on=["c"]),
        ]
    }
    assert refused(longer).startswith("plan: dependency cycle b -> d -> c -> b")


def test_a_diamond_is_not_a_cycle() -> None:
    plan = plan_of(
        step("a"), step("b", depends_on=["a"]), step("c", depends_on=["a"]), step("d", depends_on=["b", "c"])
    )
    assert [s.id for s in plan.steps] == ["a", "b", "c", "d"]


def test_a_long_chain_does_not_exhaust_the_stack() -> None:
    steps = [step("s0")] + [step(f"s{i}", depends_on=[f"s{i - 1}"]) for i in range(1, MAX_STEPS)]
    assert len(plan_of(*steps).steps) == MAX_STEPS


def test_references_must_follow_dependencies() -> None:
    transitive = plan_of(
        step("s1"), step("s2", depends_on=["s1"]), step("s3", arguments={"x": "${s1.output.a}"}, depends_on=["s2"])
    )
    assert transitive.steps[2].arguments == {"x": "${s1.output.a}"}
    unknown = {"plan": [step("s1", arguments={"x": ["${s9.output}"]})]}
    assert refused(unknown) == "step s1: ${s9.output} refers to unknown step 's9'"
    sibling = {"plan": [step("s1"), step("s2", arguments={"deep": {"x": "id ${s1.output.id}"}})]}
    assert refused(sibling).startswith(
        "step s2: ${s1.output.id} refers to step 's1', which is not among its dependencies"
    )
    backwards = {"plan": [step("s1", arguments={"x": "${s2.output}"}), step("s2", depends_on=["s1"])]}
    assert refused(backwards).startswith("step s1: ${s2.output} refers to step 's2', which is not among")


@pytest.mark.parametrize("text", ["${s1.output.}", "${s1.output..a}", "${s1.output a}"])
def test_malformed_references_are_refused(text: str) -> None:
    input_obj = {"plan": [step("s1"), step("s2", arguments={"x": text}, depends_on=["s1"])]}
    assert refused(input_obj).startswith("step s2: malformed reference")


@pytest.mark.parametrize("text", ["${HOME}", "${s1.outputs}", "$ {s1.output}", "{s1.output}", "${s1}"])
def test_text_that_only_looks_like_a_reference_is_left_alone(text: str) -> None:
    plan = plan_of(step("s1", arguments={"x": text}))
    assert substitute(plan.steps[0].arguments, {}) == {"x": text}


def test_keys_are_not_references() -> None:
    plan = plan_of(step("s1", arguments={"${s9.output}": 1}))
    assert substitute(plan.steps[0].arguments, {}) == {"${s9.output}": 1}


# --- substitute -------------------------------------------------------------------------------------------

OUTPUTS: dict[str, Any] = {
    "s1": {"subject": "Hi", "count": 3, "items": [{"name": "first"}, {"name": "second"}], "ok": False, "none": None},
    "s2": [1, 2],
}


def test_an_exact_reference_keeps_its_type() -> None:
    arguments = {
        "whole": "${s1.output}",
        "count": "${s1.output.count}",
        "items": "${s1.output.items}",
        "name": "${s1.output.items.1.name}",
        "last": "${s2.output.-1}",
        "ok": "${s1.output.ok}",
        "none": "${s1.output.none}",
        "nested": [{"deep": "${s2.output.0}"}, 7, None, True],
    }
    result = substitute(arguments, OUTPUTS)
    assert result == {
        "whole": OUTPUTS["s1"],
        "count": 3,
        "items": [{"name": "first"}, {"name": "second"}],
        "name": "second",
        "last": 2,
        "ok": False,
        "none": None,
        "nested": [{"deep": 1}, 7, None, True],
    }
    assert result["whole"] is OUTPUTS["s1"]  # shared, not copied: the caller serializes the arguments at once


def test_references_inside_text_become_text() -> None:
    arguments = {
        "title": "Re: ${s1.output.subject} (${s1.output.count} items)",
        "json": "items=${s1.output.items}; ok=${s1.output.ok}; none=${s1.output.none}",
        "twice": "${s1.output.subject}${s1.output.subject}",
    }
    assert substitute(arguments, OUTPUTS) == {
        "title": "Re: Hi (3 items)",
        "json": 'items=[{"name": "first"}, {"name": "second"}]; ok=false; none=null',
        "twice": "HiHi",
    }


def test_arguments_are_not_changed_in_place() -> None:
    arguments = {"x": ["${s1.output.count}"]}
    substitute(arguments, OUTPUTS)
    assert arguments == {"x": ["${s1.output.count}"]}


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("${s1.output.subject.b}", "step s3: ${s1.output.subject.b}: 'b' not found"),
        ("${s1.output.a.b}", "step s3: ${s1.output.a.b}: 'a' not found"),
        ("${s1.output.items.2.name}", "step s3: ${s1.output.items.2.name}: '2' not found"),
        ("${s1.output.items.x}", "step s3: ${s1.output.items.x}: 'x' not found"),
        ("see ${s1.output.nope}", "step s3: ${s1.output.nope}: 'nope' not found"),
        ("${s7.output}", "step s3: ${s7.output}: step 's7' has no output"),
    ],
)
def test_missing_paths_name_the_segment(reference: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        substitute({"x": reference}, OUTPUTS, step_id="s3")
    assert caught.value.message == message


def test_in_string_substitution_is_bounded() -> None:
    with pytest.raises(FailedPrecondition, match=r"expand to more than 1048576 bytes \(ALTAN_MAX_EXPANSION_BYTES\)"):
        substitute("${s1.output}" * 10, {"s1": "x" * 200_000})


def test_whole_value_references_are_bounded_before_anything_is_built() -> None:
    """One 900 KB output referenced a hundred times used to become a hundred copies (95 MB -> 875 MB RSS)."""
    big = {"rows": ["x" * 1000] * 900}
    arguments = {f"copy{i}": "${s1.output}" for i in range(100)}
    with pytest.raises(FailedPrecondition, match=r"step s2: the references in its arguments expand to more than"):
        substitute(arguments, {"s1": big}, step_id="s2", budget=2 * 1024 * 1024)
    # Within the budget, the same value is measured once and shared, never copied.
    shared = substitute({"a": "${s1.output}", "b": "${s1.output.rows}"}, {"s1": big}, budget=2 * 1024 * 1024)
    assert shared["a"] is big and shared["b"] is big["rows"]


def test_the_budget_counts_text_in_utf8_bytes() -> None:
    assert substitute("${s1.output}!", {"s1": "é" * 100}, budget=201) == "é" * 100 + "!"
    with pytest.raises(FailedPrecondition):
        substitute("${s1.output}!", {"s1": "é" * 100}, budget=199)


# --- running ----------------------------------------------------------------------------------------------


class Recorder:
    """A fake ``execute`` that sleeps, answers or fails per tool, and records what happened."""

    def __init__(self, delays: dict[str, float] | None = None) -> None:
        self.delays = delays or {}
        self.calls: list[tuple[str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[str] = []

    async def execute(self, step: Step, arguments: dict[str, Any]) -> Any:
        self.calls.append((step.id, arguments))
        try:
            await asyncio.sleep(self.delays.get(step.id, 0))
        except asyncio.CancelledError:
            self.cancelled.append(step.id)
            raise
        if step.tool == "fail":
            raise Unavailable(f"{step.id} is down")
        return {"id": step.id, "got": arguments}

    async def on_event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))


async def test_independent_steps_run_concurrently() -> None:
    plan = plan_of(
        step("s1", arguments={"n": 1}),
        step("s2", arguments={"n": 2}),
        step("s3", arguments={"a": "${s1.output.got.n}", "b": "${s2.output.got.n}"}, depends_on=["s1", "s2"]),
    )
    recorder = Recorder({"s1": 1.0, "s2": 1.0})
    started = time.monotonic()
    outputs = await run_plan(plan, recorder.execute)
    elapsed = time.monotonic() - started
    assert 0.95 < elapsed < 1.8
    assert outputs["s3"] == {"id": "s3", "got": {"a": 1, "b": 2}}
    assert set(outputs) == {"s1", "s2", "s3"}


async def test_a_step_starts_as_soon_as_its_own_dependencies_succeed() -> None:
    # s3 needs only s1 (fast); it must not wait for the slow s2.
    plan = plan_of(step("s1"), step("s2"), step("s3", depends_on=["s1"]))
    recorder = Recorder({"s1": 0.05, "s2": 0.6, "s3": 0.05})
    run = PlanRun(plan, recorder.execute, recorder.on_event)
    task = asyncio.create_task(run.run())
    await asyncio.sleep(0.3)
    assert run.steps["s3"].status == "succeeded"
    assert run.steps["s2"].status == "running"
    await task


async def test_events_and_states() -> None:
    plan = plan_of(step("s1"), step("s2", arguments={"x": "${s1.output.id}"}, depends_on=["s1"]))
    recorder = Recorder({"s1": 0.02})
    run = PlanRun(plan, recorder.execute, recorder.on_event)
    assert [s.status for s in run.steps.values()] == ["pending", "pending"]
    outputs = await run.run()
    assert [(kind, data["step_id"]) for kind, data in recorder.events] == [
        ("tool.started", "s1"),
        ("tool.finished", "s1"),
        ("tool.started", "s2"),
        ("tool.finished", "s2"),
    ]
    assert recorder.events[0][1] == {"step_id": "s1", "tool": "echo"}
    finished = recorder.events[1][1]
    assert finished["status"] == "succeeded" and "error" not in finished
    assert isinstance(finished["duration_ms"], int) and finished["duration_ms"] >= 15
    state = run.steps["s2"]
    assert state.status == "succeeded"
    assert state.output == outputs["s2"] == {"id": "s2", "got": {"x": "s1"}}
    assert state.started_at is not None and state.finished_at is not None
    assert state.started_at <= state.finished_at
    assert state.to_dict()["step_id"] == "s2"
    with pytest.raises(RuntimeError):
        await run.run()


async def test_the_caller_sees_progress_at_every_event() -> None:
    plan = plan_of(step("s1"), step("s2", depends_on=["s1"]))
    snapshots: list[dict[str, str]] = []
    run: PlanRun

    async def on_event(kind: str, data: dict[str, Any]) -> None:
        snapshots.append({step_id: state.status for step_id, state in run.steps.items()})

    run = PlanRun(plan, Recorder().execute, on_event)
    await run.run()
    assert snapshots == [
        {"s1": "running", "s2": "pending"},
        {"s1": "succeeded", "s2": "pending"},
        {"s1": "succeeded", "s2": "running"},
        {"s1": "succeeded", "s2": "succeeded"},
    ]


async def test_the_first_failure_cancels_running_steps_and_skips_the_rest() -> None:
    plan = plan_of(
        step("bad", "fail"),
        step("slow", "slow"),
        step("after_bad", depends_on=["bad"]),
        step("after_slow", depends_on=["slow"]),
    )
    recorder = Recorder({"bad": 0.05, "slow": 5})
    run = PlanRun(plan, recorder.execute, recorder.on_event)
    started = time.monotonic()
    with pytest.raises(PlanFailed) as caught:
        await run.run()
    assert time.monotonic() - started < 1
    assert caught.value.step_id == "bad"
    assert isinstance(caught.value.error, Unavailable)
    assert str(caught.value) == "step bad failed: bad is down"
    assert recorder.cancelled == ["slow"]
    assert {step_id: s.status for step_id, s in run.steps.items()} == {
        "bad": "failed",
        "slow": "cancelled",
        "after_bad": "skipped",
        "after_slow": "skipped",
    }
    assert run.steps["bad"].error == "bad is down"
    finished = [data for kind, data in recorder.events if kind == "tool.finished"]
    assert [(d["step_id"], d["status"]) for d in finished] == [("bad", "failed"), ("slow", "cancelled")]
    assert finished[0]["error"] == "bad is down"
    assert [c[0] for c in recorder.calls] == ["bad", "slow"]


async def test_a_substitution_failure_fails_the_step() -> None:
    plan = plan_of(step("s1"), step("s2", arguments={"x": "${s1.output.missing}"}, depends_on=["s1"]))
    recorder = Recorder()
    run = PlanRun(plan, recorder.execute, recorder.on_event)
    with pytest.raises(PlanFailed) as caught:
        await run.run()
    assert caught.value.step_id == "s2"
    assert isinstance(caught.value.error, InvalidArgument)
    assert run.steps["s2"].error == "step s2: ${s1.output.missing}: 'missing' not found"
    assert [c[0] for c in recorder.calls] == ["s1"]


async def test_unexpected_errors_do_not_leak_their_message() -> None:
    async def execute(step: Step, arguments: dict[str, Any]) -> Any:
        raise RuntimeError("password=hunter2")

    run = PlanRun(plan_of(step("s1")), execute)
    with pytest.raises(PlanFailed) as caught:
        await run.run()
    assert isinstance(caught.value.error, RuntimeError)
    assert run.steps["s1"].error == "internal error (RuntimeError)"
    assert "hunter2" not in str(caught.value)
    assert error_message(asyncio.CancelledError()) == "cancelled"


async def test_cancelling_the_run_cancels_every_running_step() -> None:
    plan = plan_of(step("a"), step("b"), step("c", depends_on=["a"]))
    recorder = Recorder({"a": 5, "b": 5})
    run = PlanRun(plan, recorder.execute, recorder.on_event)
    task = asyncio.create_task(run.run())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(recorder.cancelled) == ["a", "b"]
    assert {step_id: s.status for step_id, s in run.steps.items()} == {
        "a": "cancelled",
        "b": "cancelled",
        "c": "cancelled",
    }
    assert all(not t.get_name().startswith("plan-step-") for t in asyncio.all_tasks())


async def test_a_failing_event_handler_stops_the_run_cleanly() -> None:
    recorder = Recorder({"a": 5, "b": 5})

    async def on_event(kind: str, data: dict[str, Any]) -> None:
        if data["step_id"] == "b":
            raise OSError("store down")

    run = PlanRun(plan_of(step("a"), step("b")), recorder.execute, on_event)
    with pytest.raises(OSError, match="store down"):
        await run.run()
    assert [s.status for s in run.steps.values()] == ["cancelled", "cancelled"]
    await asyncio.sleep(0)
    assert all(not t.get_name().startswith("plan-step-") for t in asyncio.all_tasks())


async def test_many_independent_steps_all_run_at_once() -> None:
    plan = plan_of(*[step(f"s{i}") for i in range(MAX_STEPS)])
    recorder = Recorder({f"s{i}": 0.2 for i in range(MAX_STEPS)})
    started = time.monotonic()
    outputs = await run_plan(plan, recorder.execute)
    assert time.monotonic() - started < 1
    assert len(outputs) == MAX_STEPS


async def test_a_step_is_called_only_once_its_start_was_written() -> None:
    """A run whose write of a turn is refused (another delivery took the task over, or the store went away) calls
    none of the steps that turn started: the write goes first, the calls after (a stale replica once called s2)."""
    plan = plan_of(step("s1"), step("s2", depends_on=["s1"]))
    called: list[str] = []

    async def execute(one: Step, arguments: dict[str, Any]) -> Any:
        called.append(one.id)
        return "ok"

    async def on_events(events: list[tuple[str, dict[str, Any]]]) -> None:
        await asyncio.sleep(0)  # a write's round trip: other tasks run meanwhile
        if ("tool.started", {"step_id": "s2", "tool": "echo"}) in events:
            raise Unavailable("this run no longer holds the task")

    run = PlanRun(plan, execute, on_events=on_events)
    with pytest.raises(Unavailable):
        await run.run()
    assert called == ["s1"]
    assert run.steps["s2"].status == "cancelled"
