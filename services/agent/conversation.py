"""The LLM loop of one natural-language task: ask the model, run the tools it calls, give it the results, repeat.

Each turn sends the agent's instructions, the thread's conversation (fitted to the context budget) and the bound
tools' JSON Schemas to the Integrator, which holds the key and talks to the model. The answer's text streams out as
``message.delta`` events; the turn is announced as ``llm.called``. The tool calls of one turn run at once (bounded
per tenant), each as a step of the task; their results go back to the model, cut to a size with a note saying so. A
malformed call (not JSON, an unknown tool, arguments the tool's schema refuses) goes back as an error message, a
bounded number of times. The loop ends with an answer without tool calls, or fails after too many turns.

A ``tool_choice`` in the LLM's ``parameters`` that forces a call (OpenAI's ``"required"`` or a named function,
Anthropic's ``any`` or a named tool) is sent only until the model has called a tool in this task; after that it is
left out, so that the model chooses (the APIs' default when tools are offered: ``auto``) and can answer instead of
calling again until it runs out of turns. That is what the OpenAI Agents SDK does by default (``reset_tool_choice``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from altan.api.convert import now_ms, python_to_value, value_to_python
from altan.api.tasks import message_to_proto
from altan.errors import AltanError, FailedPrecondition, InvalidArgument
from altan.v1 import agent_pb2, runtime_pb2

__all__ = ["Conversation", "LoopLimits", "ModelTurn", "ToolRun"]

# One turn of the model: (request, on_delta) -> the whole answer.
ModelTurn = Callable[
    [runtime_pb2.CompleteRequest, Callable[[str], Awaitable[None]]], Awaitable[runtime_pb2.ModelAnswer]
]
# One tool call: (tool id, arguments, step id) -> (output, http status).
ToolRun = Callable[[str, dict[str, Any], str], Awaitable[tuple[Any, int]]]
Emit = Callable[[str, dict[str, Any]], Awaitable[None]]

_DELTA_CHARS = 64  # streamed text is passed on in pieces of at least this many characters...
_DELTA_SECONDS = 0.05  # ...or after this long, whichever comes first


@dataclass(frozen=True)
class LoopLimits:
    max_turns: int = 10
    max_tool_result_chars: int = 16_000
    max_tool_call_errors: int = 3
    max_tool_calls_per_turn: int = 32  # more in one answer are answered with an error, not run


def _calls(tool_calls: Any, turn: int) -> list[dict[str, Any]]:
    """The calls of one answer, each with an id unique in the turn (a model may leave it out or repeat it)."""
    calls: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, call in enumerate(tool_calls, start=1):
        call_id = call.id if call.id and call.id not in seen and len(call.id) <= 200 else f"call_t{turn}c{index}"
        seen.add(call_id)
        calls.append({"id": call_id, "name": call.name, "arguments_json": call.arguments_json})
    return calls


_DEFAULT = object()  # leave tool_choice out: the API's default, which is auto when tools are offered


def _choosing(choice: Any) -> Any:
    """What replaces a forcing ``tool_choice``: ``_DEFAULT``, or a choosing form where the choice carries other
    settings that must stay; None when ``choice`` forces nothing."""
    if choice in ("required", "any"):  # OpenAI; "any" is the same in Mistral's and some gateways' words
        return _DEFAULT
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "function":  # OpenAI: {"type": "function", "function": {"name": ...}}
        return _DEFAULT
    if kind in ("any", "tool"):  # Anthropic: {"type": "tool", "name": ...}, maybe with disable_parallel_tool_use
        rest = {key: value for key, value in choice.items() if key not in ("type", "name")}
        return {"type": "auto", **rest} if rest else _DEFAULT
    allowed = choice.get("allowed_tools")
    if kind == "allowed_tools" and isinstance(allowed, dict) and allowed.get("mode") == "required":
        return choice | {"allowed_tools": allowed | {"mode": "auto"}}  # OpenAI: still only those tools, not forced
    return None


def _unforced(llm: agent_pb2.LlmConfig) -> agent_pb2.LlmConfig:
    """``llm`` without a forcing ``tool_choice`` among its parameters (see :func:`_choosing`); else ``llm`` itself."""
    if "tool_choice" not in llm.parameters.fields:
        return llm
    choosing = _choosing(value_to_python(llm.parameters.fields["tool_choice"]))
    if choosing is None:
        return llm
    unforced = agent_pb2.LlmConfig()
    unforced.CopyFrom(llm)
    del unforced.parameters.fields["tool_choice"]  # (written into as it is, an object would keep its old keys)
    if choosing is not _DEFAULT:
        python_to_value(choosing, unforced.parameters.fields["tool_choice"])
    return unforced


class _Deltas:
    """Streamed text, passed on in pieces large enough that an event per token does not flood the store."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._pending: list[str] = []
        self._size = 0
        self._last = time.monotonic()

    async def add(self, text: str) -> None:
        self._pending.append(text)
        self._size += len(text)
        if self._size >= _DELTA_CHARS or time.monotonic() - self._last >= _DELTA_SECONDS:
            await self.flush()

    async def flush(self) -> None:
        if self._pending:
            text, self._pending, self._size = "".join(self._pending), [], 0
            self._last = time.monotonic()
            await self._emit("message.delta", {"text": text})


class Conversation:
    """One task's loop. ``record`` persists a new message of the thread; ``steps`` is the task's step list."""

    def __init__(
        self,
        *,
        task: dict[str, Any],
        agent: dict[str, Any],
        llm: agent_pb2.LlmConfig,
        fallbacks: list[agent_pb2.LlmConfig],
        tools: list[runtime_pb2.ModelTool],
        history: list[dict[str, Any]],
        limits: LoopLimits,
        model: ModelTurn,
        run_tool: ToolRun,
        emit: Emit,
        record: Callable[[dict[str, Any]], Awaitable[None]],
        changed: Callable[[], Awaitable[None]],
    ) -> None:
        self._task = task
        self._agent = agent
        self._llm = llm
        self._fallbacks = fallbacks
        self._tools = tools
        self._tool_names = {tool.name for tool in tools}
        self._messages = list(history)
        self._limits = limits
        self._model = model
        self._run_tool = run_tool
        self._emit = emit
        self._record = record
        self._changed = changed
        self._errors = 0
        self._called_a_tool = False  # in this task: from then on a forcing tool_choice is relaxed (see _unforced)

    async def run(self, user_input: str, resumed: list[dict[str, Any]] | None = None) -> str:
        """The model's final answer; FailedPrecondition when the loop cannot reach one.

        ``resumed``: this task's messages recorded by an earlier run that stopped (its process died). The loop goes
        on after them: the calls of the last answer that have no result yet run again with their step ids (so with
        the same Idempotency-Key), the turns are numbered on, and the input is not added twice.
        """
        first_turn = 1
        if resumed:
            self._messages.extend(resumed)
            answers = [m for m in resumed if m["role"] == "assistant"]
            first_turn = len(answers) + 1
            if answers and not answers[-1].get("tool_calls"):
                return str(answers[-1]["content"])  # the answer was recorded, the task's end was not
            if answers:
                self._called_a_tool = True
                answered = {m.get("tool_call_id") for m in resumed if m["role"] == "tool"}
                await self._run_calls(answers[-1]["tool_calls"], len(answers), answered)
        else:
            await self._add({"role": "user", "content": user_input})
        for turn in range(first_turn, self._limits.max_turns + 1):
            answer = await self._turn()
            message = answer.message
            calls = _calls(message.tool_calls, turn)
            await self._add({"role": "assistant", "content": message.content, "tool_calls": calls})
            if not calls:
                return str(message.content)
            self._called_a_tool = True
            await self._run_calls(calls, turn, set())
        raise FailedPrecondition(f"no answer after {self._limits.max_turns} model turns (ALTAN_MAX_LLM_TURNS)")

    async def _run_calls(self, calls: list[dict[str, Any]], turn: int, answered: set[Any]) -> None:
        """Run the calls of one answer (those without a result in ``answered``) and record their results."""
        run, excess = calls[: self._limits.max_tool_calls_per_turn], calls[self._limits.max_tool_calls_per_turn :]
        steps = [f"t{turn}c{index}" for index in range(1, len(run) + 1)]
        pending = [(call, step) for call, step in zip(run, steps, strict=True) if call["id"] not in answered]
        results = await asyncio.gather(*(self._call(call, step) for call, step in pending))
        excess = [call for call in excess if call["id"] not in answered]
        if excess:
            reason = f"not run: at most {self._limits.max_tool_calls_per_turn} tool calls in one answer"
            refused = await self._malformed({"role": "tool"}, reason)
            results.extend({**refused, "tool_call_id": c["id"], "name": c["name"]} for c in excess)
        for result in results:
            await self._add(result)

    async def _add(self, message: dict[str, Any]) -> None:
        message = {**message, "task_id": self._task["task_id"]}
        self._messages.append(message)
        await self._record(message)

    async def _turn(self) -> runtime_pb2.ModelAnswer:
        # Every turn is built here, so this is the one place where a forced tool_choice is relaxed.
        llm, fallbacks = self._llm, self._fallbacks
        if self._called_a_tool:
            llm, fallbacks = _unforced(llm), [_unforced(fallback) for fallback in fallbacks]
        request = runtime_pb2.CompleteRequest(
            llm=llm,
            fallback_llms=fallbacks,
            system=self._agent.get("instructions", ""),
            messages=[message_to_proto(m) for m in self._messages],
            tools=self._tools,
            stream=True,
            task_id=self._task["task_id"],
        )
        deltas = _Deltas(self._emit)
        answer = await self._model(request, deltas.add)
        await deltas.flush()
        usage = self._task["usage"]
        usage["llm_calls"] += 1
        usage["input_tokens"] += answer.input_tokens
        usage["output_tokens"] += answer.output_tokens
        await self._changed()
        await self._emit(
            "llm.called",
            {
                "model": answer.model,
                "provider": answer.provider,
                "input_tokens": answer.input_tokens,
                "output_tokens": answer.output_tokens,
                "latency_ms": answer.latency_ms,
                "fallback_used": answer.fallback_used,
            },
        )
        return answer

    async def _call(self, call: dict[str, Any], step_id: str) -> dict[str, Any]:
        """Run one tool call as step ``step_id`` of the task; its result (or its error) as a tool message.

        The step's id is the platform's (``t<turn>c<n>``), not the model's: it makes the Idempotency-Key of the
        call's outbound request, which must differ between calls even when a model repeats its call ids.
        """
        tool = call["name"]
        result: dict[str, Any] = {"role": "tool", "tool_call_id": call["id"], "name": tool}
        try:
            # strict=False: a raw newline or tab inside a string is still read. A grammar-constrained model writes
            # them (llama.cpp's server does), and the meaning is plain; anything else that is not JSON stays refused.
            arguments = json.loads(call["arguments_json"] or "{}", strict=False)
        except ValueError:
            arguments = None
        if tool not in self._tool_names:
            return await self._malformed(result, f"there is no tool named {tool!r}; the tools are the ones offered")
        if not isinstance(arguments, dict):
            return await self._malformed(result, "the arguments must be a JSON object")
        state: dict[str, Any] = {
            "id": step_id,
            "tool": tool,
            "call_id": call["id"],
            "status": "running",
            "started_at": now_ms(),
        }
        # A step run again after a restart replaces the state its first run left.
        self._task["steps"] = [s for s in self._task["steps"] if s["id"] != step_id]
        self._task["steps"].append(state)
        await self._changed()
        await self._emit("tool.started", {"step_id": step_id, "tool": tool})
        started = time.monotonic()
        try:
            output, status = await self._run_tool(tool, arguments, step_id)
        except InvalidArgument as exc:  # the tool's schema refused the arguments: the model may correct them
            self._finish(state, "failed", started, error=exc.message)
            await self._emit_finished(state)
            return await self._malformed(result, exc.message)
        except AltanError as exc:
            self._finish(state, "failed", started, error=exc.message)
            await self._emit_finished(state)
            return {**result, "content": f"error: {exc.message}", "is_error": True}
        self._finish(state, "succeeded" if status < 400 else "failed", started, output=output)
        await self._emit_finished(state)
        text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        if status >= 400:
            text = f"HTTP {status}: {text}"
        return {**result, "content": self._cut(text), "is_error": status >= 400}

    async def _malformed(self, result: dict[str, Any], reason: str) -> dict[str, Any]:
        self._errors += 1
        if self._errors > self._limits.max_tool_call_errors:
            raise FailedPrecondition(
                f"the model made more than {self._limits.max_tool_call_errors} malformed tool calls "
                f"(ALTAN_MAX_TOOL_CALL_ERRORS); the last: {reason}"
            )
        return {**result, "content": f"error: {reason}", "is_error": True}

    def _cut(self, text: str) -> str:
        limit = self._limits.max_tool_result_chars
        if len(text) <= limit:
            return text
        return f"{text[:limit]}\n[truncated: the result has {len(text)} characters; these are the first {limit}]"

    @staticmethod
    def _finish(state: dict[str, Any], status: str, started: float, **fields: Any) -> None:
        state.update(
            status=status, finished_at=now_ms(), duration_ms=round((time.monotonic() - started) * 1000), **fields
        )

    async def _emit_finished(self, state: dict[str, Any]) -> None:
        await self._changed()
        event = {k: state[k] for k in ("tool", "status", "duration_ms")} | {"step_id": state["id"]}
        if state.get("error"):
            event["error"] = state["error"]
        await self._emit("tool.finished", event)
