"""The LLM loop of one task (services.agent.conversation) and the fitting of a thread to a context budget."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from altan.api.convert import python_to_struct, struct_to_dict
from altan.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from altan.v1 import agent_pb2, runtime_pb2
from services.agent.conversation import Conversation, LoopLimits
from services.agent.threads import coherent, fit_to_budget

TOOLS = [
    runtime_pb2.ModelTool(name="lookup", description="Look up", input_schema_json=b'{"type": "object"}'),
    runtime_pb2.ModelTool(name="slow", description="Slow", input_schema_json=b'{"type": "object"}'),
]


def answer(text: str = "", *calls: tuple[str, str, str], tokens: tuple[int, int] = (10, 5)) -> runtime_pb2.ModelAnswer:
    message = agent_pb2.ThreadMessage(
        role=agent_pb2.MESSAGE_ROLE_ASSISTANT,
        content=text,
        tool_calls=[agent_pb2.ToolCall(id=i, name=n, arguments_json=a) for i, n, a in calls],
    )
    return runtime_pb2.ModelAnswer(
        message=message, input_tokens=tokens[0], output_tokens=tokens[1], model="m-1", provider="openai"
    )


class Rig:
    """A conversation with a scripted model and recorded tools, events and thread messages."""

    def __init__(
        self,
        script: list[runtime_pb2.ModelAnswer],
        limits: LoopLimits | None = None,
        llm: agent_pb2.LlmConfig | None = None,
        fallbacks: list[agent_pb2.LlmConfig] | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        self.script = list(script)
        self.requests: list[runtime_pb2.CompleteRequest] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.recorded: list[dict[str, Any]] = []
        self.tool_calls: list[tuple[str, dict[str, Any], str]] = []
        self.tool_answers: dict[str, Any] = {}
        self.in_flight = 0
        self.most_in_flight = 0
        self.task: dict[str, Any] = {
            "task_id": "tsk_1",
            "steps": [],
            "usage": {"llm_calls": 0, "tool_calls": 0, "input_tokens": 0, "output_tokens": 0},
        }
        self.conversation = Conversation(
            task=self.task,
            agent={"instructions": "Be brief."},
            llm=llm or agent_pb2.LlmConfig(llm_id="m-1", provider=agent_pb2.LLM_PROVIDER_OPENAI),
            fallbacks=fallbacks or [],
            tools=TOOLS,
            history=history or [],
            limits=limits or LoopLimits(max_turns=5, max_tool_result_chars=50, max_tool_call_errors=1),
            model=self.model,
            run_tool=self.run_tool,
            emit=self.emit,
            record=self.record,
            changed=self.changed,
        )

    async def model(self, request: runtime_pb2.CompleteRequest, on_delta: Any) -> runtime_pb2.ModelAnswer:
        self.requests.append(request)
        reply = self.script.pop(0)
        for piece in [reply.message.content[i : i + 3] for i in range(0, len(reply.message.content), 3)]:
            await on_delta(piece)
        return reply

    async def run_tool(self, tool: str, arguments: dict[str, Any], step_id: str) -> tuple[Any, int]:
        self.tool_calls.append((tool, arguments, step_id))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # let the other calls of the turn start
            outcome = self.tool_answers.get(step_id, ({"ok": True}, 200))
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        finally:
            self.in_flight -= 1

    async def emit(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    async def record(self, message: dict[str, Any]) -> None:
        self.recorded.append(message)

    async def changed(self) -> None:
        pass

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


async def test_a_final_answer_streams_and_is_accounted() -> None:
    rig = Rig([answer("Hello there, how can I help you today?", tokens=(12, 7))])
    assert await rig.conversation.run("hi") == "Hello there, how can I help you today?"
    (request,) = rig.requests
    assert request.system == "Be brief." and request.stream and request.task_id == "tsk_1"
    assert [m.content for m in request.messages] == ["hi"] and [t.name for t in request.tools] == ["lookup", "slow"]
    text = "".join(data["text"] for kind, data in rig.events if kind == "message.delta")
    assert text == "Hello there, how can I help you today?"
    assert rig.kinds()[-1] == "llm.called"
    assert rig.events[-1][1] | {} == {
        "model": "m-1",
        "provider": "openai",
        "input_tokens": 12,
        "output_tokens": 7,
        "latency_ms": 0,
        "fallback_used": False,
    }
    assert rig.task["usage"] == {"llm_calls": 1, "tool_calls": 0, "input_tokens": 12, "output_tokens": 7}
    assert [(m["role"], m["content"]) for m in rig.recorded] == [("user", "hi"), ("assistant", text)]


async def test_one_turns_tool_calls_run_together_and_their_results_go_back() -> None:
    rig = Rig(
        [
            answer("", ("c1", "lookup", '{"q": 1}'), ("c2", "slow", '{"q": 2}')),
            answer("done"),
        ]
    )
    rig.tool_answers["t1c2"] = ({"big": "x" * 100}, 200)
    assert await rig.conversation.run("go") == "done"
    assert rig.most_in_flight == 2  # both calls of the turn were in flight at once
    assert sorted(rig.tool_calls) == [("lookup", {"q": 1}, "t1c1"), ("slow", {"q": 2}, "t1c2")]
    second = rig.requests[1].messages
    assert [m.role for m in second] == [
        agent_pb2.MESSAGE_ROLE_USER,
        agent_pb2.MESSAGE_ROLE_ASSISTANT,
        agent_pb2.MESSAGE_ROLE_TOOL,
        agent_pb2.MESSAGE_ROLE_TOOL,
    ]
    assert [c.id for c in second[1].tool_calls] == ["c1", "c2"]
    results = {m.tool_call_id: m for m in second[2:]}
    assert json.loads(results["c1"].content) == {"ok": True} and results["c1"].name == "lookup"
    assert results["c2"].content.startswith('{"big": "xxx') and "[truncated: the result has 111 characters" in (
        results["c2"].content
    )
    assert [(s["id"], s["call_id"], s["tool"], s["status"]) for s in rig.task["steps"]] == [
        ("t1c1", "c1", "lookup", "succeeded"),
        ("t1c2", "c2", "slow", "succeeded"),
    ]
    assert rig.kinds().count("tool.started") == 2 and rig.kinds().count("tool.finished") == 2


async def test_a_malformed_call_goes_back_to_the_model_a_bounded_number_of_times() -> None:
    rig = Rig(
        [
            answer("", ("c1", "nope", "{}")),
            answer("", ("c2", "lookup", "not json")),
        ]
    )
    with pytest.raises(FailedPrecondition, match=r"more than 1 malformed tool calls \(ALTAN_MAX_TOOL_CALL_ERRORS\)"):
        await rig.conversation.run("go")
    error = rig.requests[1].messages[-1]
    assert error.is_error and "there is no tool named 'nope'" in error.content
    assert rig.tool_calls == []


async def test_arguments_with_a_raw_newline_inside_a_string_are_read() -> None:
    rig = Rig([answer("", ("c1", "lookup", '{"customer": "Ada\n\tLovelace"}')), answer("found")])
    assert await rig.conversation.run("go") == "found"
    assert rig.tool_calls == [("lookup", {"customer": "Ada\n\tLovelace"}, "t1c1")]


async def test_a_tool_that_fails_is_reported_to_the_model_which_may_recover() -> None:
    rig = Rig([answer("", ("c1", "lookup", "{}"), ("c2", "slow", "{}")), answer("recovered")])
    rig.tool_answers["t1c1"] = PermissionDenied("egress refused: 10.0.0.1 is a private address")
    rig.tool_answers["t1c2"] = ({"error": "nope"}, 503)
    assert await rig.conversation.run("go") == "recovered"
    results = {m.tool_call_id: m for m in rig.requests[1].messages[2:]}
    assert results["c1"].is_error and results["c1"].content == "error: egress refused: 10.0.0.1 is a private address"
    assert results["c2"].is_error and results["c2"].content.startswith("HTTP 503: ")
    assert [s["status"] for s in rig.task["steps"]] == ["failed", "failed"]


async def test_arguments_the_tools_schema_refuses_count_as_malformed() -> None:
    rig = Rig([answer("", ("c1", "lookup", "{}")), answer("ok")], LoopLimits(max_tool_call_errors=0))
    rig.tool_answers["t1c1"] = InvalidArgument("arguments: 'q' is a required property")
    with pytest.raises(FailedPrecondition, match="the last: arguments: 'q' is a required property"):
        await rig.conversation.run("go")


async def test_the_loop_ends_after_its_turns() -> None:
    rig = Rig([answer("", (f"c{i}", "lookup", "{}")) for i in range(3)], LoopLimits(max_turns=3))
    with pytest.raises(FailedPrecondition, match=r"no answer after 3 model turns \(ALTAN_MAX_LLM_TURNS\)"):
        await rig.conversation.run("loop")
    assert len(rig.requests) == 3


async def test_steps_have_the_platforms_ids_even_when_the_model_repeats_or_omits_its_call_ids() -> None:
    rig = Rig(
        [
            answer("", ("call_0", "lookup", '{"n": 1}'), ("call_0", "lookup", '{"n": 2}'), ("", "lookup", "{}")),
            answer("", ("call_0", "lookup", '{"n": 3}')),
            answer("done"),
        ]
    )
    assert await rig.conversation.run("go") == "done"
    assert [(s["id"], s["call_id"]) for s in rig.task["steps"]] == [
        ("t1c1", "call_0"),
        ("t1c2", "call_t1c2"),
        ("t1c3", "call_t1c3"),
        ("t2c1", "call_0"),
    ]
    # each result answers the call it belongs to, in the ids the model was sent back
    sent = rig.requests[1].messages
    assert [c.id for c in sent[1].tool_calls] == ["call_0", "call_t1c2", "call_t1c3"]
    assert [m.tool_call_id for m in sent[2:]] == ["call_0", "call_t1c2", "call_t1c3"]


def llm_with(provider: agent_pb2.LlmProvider.ValueType, **parameters: Any) -> agent_pb2.LlmConfig:
    return agent_pb2.LlmConfig(llm_id="m-1", provider=provider, parameters=python_to_struct(parameters))


@pytest.mark.parametrize(
    "forced",
    [
        "required",
        {"type": "function", "function": {"name": "lookup"}},
        {"type": "tool", "name": "lookup"},  # Anthropic's
        {"type": "any"},
    ],
)
async def test_a_forced_tool_choice_holds_until_the_model_calls_a_tool_then_the_model_may_answer(forced: Any) -> None:
    llm = llm_with(agent_pb2.LLM_PROVIDER_OPENAI, tool_choice=forced, temperature=0.0)
    fallback = llm_with(agent_pb2.LLM_PROVIDER_ANTHROPIC, tool_choice={"type": "tool", "name": "lookup"})
    script = [answer("", ("c1", "lookup", "{}")), answer("", ("c2", "lookup", "{}")), answer("done")]
    rig = Rig(script, llm=llm, fallbacks=[fallback])
    assert await rig.conversation.run("go") == "done"
    sent = [(struct_to_dict(r.llm.parameters), struct_to_dict(r.fallback_llms[0].parameters)) for r in rig.requests]
    assert sent[0] == ({"tool_choice": forced, "temperature": 0.0}, {"tool_choice": {"type": "tool", "name": "lookup"}})
    # After the first call tool_choice is left out (the APIs' default: auto), as the OpenAI Agents SDK's
    # reset_tool_choice does; the other parameters stay.
    assert sent[1] == sent[2] == ({"temperature": 0.0}, {})
    assert struct_to_dict(llm.parameters)["tool_choice"] == forced  # the agent's own configuration is untouched


@pytest.mark.parametrize(
    ("forced", "choosing"),
    [
        ({"type": "any", "disable_parallel_tool_use": True}, {"type": "auto", "disable_parallel_tool_use": True}),
        (
            {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function"}]}},
            {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function"}]}},
        ),
    ],
)
async def test_a_forcing_choice_with_other_settings_becomes_the_choosing_one_that_keeps_them(
    forced: Any, choosing: Any
) -> None:
    llm = llm_with(agent_pb2.LLM_PROVIDER_ANTHROPIC, tool_choice=forced)
    rig = Rig([answer("", ("c1", "lookup", "{}")), answer("done")], llm=llm)
    assert await rig.conversation.run("go") == "done"
    assert [struct_to_dict(r.llm.parameters)["tool_choice"] for r in rig.requests] == [forced, choosing]


@pytest.mark.parametrize("choice", ["auto", "none", {"type": "auto"}, {"type": "none"}])
async def test_a_tool_choice_that_forces_nothing_is_sent_as_it_is_on_every_turn(choice: Any) -> None:
    llm = llm_with(agent_pb2.LLM_PROVIDER_OPENAI, tool_choice=choice)
    rig = Rig([answer("", ("c1", "lookup", "{}")), answer("done")], llm=llm)
    assert await rig.conversation.run("go") == "done"
    assert [r.llm for r in rig.requests] == [llm, llm]


async def test_a_forced_tool_choice_is_not_relaxed_by_the_tool_calls_of_earlier_tasks_of_the_thread() -> None:
    llm = llm_with(agent_pb2.LLM_PROVIDER_OPENAI, tool_choice="required")
    earlier_call = {"id": "c1", "name": "lookup", "arguments_json": "{}"}
    history = [
        {"role": "user", "content": "before", "task_id": "tsk_0"},
        {"role": "assistant", "content": "", "tool_calls": [earlier_call], "task_id": "tsk_0"},
        {"role": "tool", "content": "{}", "tool_call_id": "c1", "name": "lookup", "task_id": "tsk_0"},
        {"role": "assistant", "content": "then", "task_id": "tsk_0"},
    ]
    rig = Rig([answer("", ("c2", "lookup", "{}")), answer("done")], llm=llm, history=history)
    assert await rig.conversation.run("go") == "done"
    assert [struct_to_dict(r.llm.parameters).get("tool_choice") for r in rig.requests] == ["required", None]


def message(role: str, content: str = "", **more: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **more}


def test_a_thread_is_fitted_oldest_turns_first_never_splitting_a_call_from_its_result() -> None:
    call = {"id": "c1", "name": "lookup", "arguments_json": "{}"}
    history = [
        message("user", "a" * 400),  # turn 1: ~104 tokens
        message("assistant", "b" * 400),
        message("user", "c" * 40),  # turn 2: a tool call and its result
        message("assistant", tool_calls=[call]),
        message("tool", "d" * 40, tool_call_id="c1", name="lookup"),
        message("assistant", "e" * 40),
    ]
    assert fit_to_budget(history, 10_000) == history
    kept = fit_to_budget(history, 100)
    assert kept == history[2:]  # turn 1 dropped whole; turn 2 kept whole, its call with its result
    assert fit_to_budget(history, 1) == history[2:]  # the newest turn is always kept
    assert fit_to_budget([message("tool", "orphan"), *history[2:]], 100) == history[2:]
    assert fit_to_budget([], 100) == []


def test_a_thread_that_two_tasks_wrote_at_once_is_put_back_together_without_unanswered_calls() -> None:
    def msg(task: str, role: str, content: str = "", **fields: Any) -> dict[str, Any]:
        return {"task_id": task, "role": role, "content": content, **fields}

    call = {"id": "c1", "name": "lookup", "arguments_json": "{}"}
    other = {"id": "c9", "name": "lookup", "arguments_json": "{}"}
    history = [
        msg("t1", "user", "first"),
        msg("t2", "user", "second"),
        msg("t1", "assistant", tool_calls=[call]),
        msg("t2", "assistant", tool_calls=[other]),  # t2 is still running: its call has no result yet
        msg("t1", "tool", "{}", tool_call_id="c1", name="lookup"),
        msg("t1", "assistant", "done one"),
        msg("t3", "tool", "{}", tool_call_id="c7", name="lookup"),  # a result whose call was trimmed away
    ]
    assert [(m["task_id"], m["role"], m["content"]) for m in coherent(history)] == [
        ("t1", "user", "first"),
        ("t1", "assistant", ""),
        ("t1", "tool", "{}"),
        ("t1", "assistant", "done one"),
        ("t2", "user", "second"),
    ]


async def test_calls_beyond_the_limit_of_one_answer_are_refused_not_run() -> None:
    calls = [(f"c{i}", "lookup", "{}") for i in range(5)]
    rig = Rig([answer("", *calls), answer("fine")], LoopLimits(max_tool_calls_per_turn=3, max_tool_call_errors=1))
    assert await rig.conversation.run("go") == "fine"
    assert len(rig.tool_calls) == 3
    results = rig.requests[1].messages[2:]
    assert [m.tool_call_id for m in results] == ["c0", "c1", "c2", "c3", "c4"]
    assert [m.is_error for m in results] == [False, False, False, True, True]
    assert "at most 3 tool calls in one answer" in results[3].content
