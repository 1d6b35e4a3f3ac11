"""Tasks: submission, the task with its steps and usage, and its events (API.md "tasks", "Structured tasks")."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, JsonValue

from altan.api.common import ABSENT, ApiModel, Timestamp, validate
from altan.api.convert import enum_name, enum_value, rfc3339, timestamp
from altan.v1 import agent_pb2
from altan.wire import json_bytes

__all__ = [
    "ApprovalDecision",
    "Step",
    "Task",
    "TaskAccepted",
    "TaskEvent",
    "TaskSubmission",
    "Thread",
    "Usage",
    "event_json",
    "event_to_proto",
    "parse_decision",
    "parse_submission",
    "step_status_value",
    "task_json",
    "task_status_name",
    "task_status_value",
    "task_to_proto",
    "thread_json",
    "thread_to_proto",
]

_TASK_STATUS = agent_pb2.TaskStatus.DESCRIPTOR
_STEP_STATUS = agent_pb2.StepStatus.DESCRIPTOR

TaskStatus = Literal["queued", "running", "waiting_approval", "succeeded", "failed", "cancelled"]
StepStatus = Literal["pending", "running", "waiting_approval", "succeeded", "failed", "cancelled", "skipped"]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=200)]
ThreadId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]

_PLAN_EXAMPLE: dict[str, Any] = {
    "plan": [
        {"id": "s1", "tool": "parse_email", "arguments": {"raw": "From: Ada <ada@example.com>\nSubject: Hi\n\nHello"}},
        {
            "id": "s2",
            "tool": "text_template",
            "depends_on": ["s1"],
            "arguments": {"template": "Re: {{ s }}", "values": {"s": "${s1.output.subject}"}},
        },
    ]
}


class TaskSubmission(ApiModel):
    """A task for an agent."""

    # Any JSON (parsed and checked with the body); not walked again here, the Agent Service reads it.
    input: Any = Field(
        description='Natural language (a string) or a structured plan {"plan": [{"id", "tool", "arguments", '
        '"depends_on"}]}: steps without a dependency between them run in parallel, and "${s1.output.path}" '
        "reads the output of a step the step depends on.",
        json_schema_extra={"examples": [_PLAN_EXAMPLE]},  # type: ignore[dict-item]
    )
    idempotency_key: IdempotencyKey = Field(
        default=ABSENT, description="The same key for the same agent gives back the same task."
    )
    thread_id: ThreadId = Field(default=ABSENT, description="The conversation this task continues.")


class TaskAccepted(BaseModel):
    """A task that was queued (or found by its idempotency key)."""

    task_id: str
    status: TaskStatus
    thread_id: str | None


class Step(BaseModel):
    """One step: a plan subtask or a tool call of the LLM loop."""

    id: str
    tool: str
    status: StepStatus
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_ms: int | None
    output: JsonValue
    error: str | None
    call_id: str | None = Field(
        None, description="Only in a natural-language task: the model's id of the tool call (as in the thread)."
    )


class Usage(BaseModel):
    """What a task consumed."""

    input_tokens: int
    output_tokens: int
    llm_calls: int
    tool_calls: int


class Task(BaseModel):
    """A task as the API answers it."""

    task_id: str
    agent_id: str
    status: TaskStatus
    input: JsonValue
    result: JsonValue
    steps: list[Step]
    error: str | None
    usage: Usage
    thread_id: str | None
    trace_id: str | None
    created_at: Timestamp
    updated_at: Timestamp


class TaskEvent(BaseModel):
    """One Server-Sent Event of a task; the SSE id is ``seq``."""

    seq: int
    type: str = Field(
        description="task.queued, task.started, llm.called, message.delta, tool.started, tool.finished, "
        "approval.requested, approval.decided, task.resumed, task.succeeded, task.failed, task.cancelled"
    )
    task_id: str
    time: Timestamp
    step_id: str | None = None
    tool: str | None = None
    status: StepStatus | None = None
    duration_ms: int | None = None
    error: str | None = None
    model: str | None = Field(default=None, description="llm.called: the model that answered.")
    provider: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    latency_ms: int | None = None
    fallback_used: bool | None = None
    text: str | None = Field(default=None, description="message.delta: the next piece of the answer.")
    call_id: str | None = Field(
        default=None, description="approval.requested, approval.decided: the call to name in the approvals route."
    )
    arguments: JsonValue | None = Field(
        default=None, description="approval.requested: the call's arguments (header values left out)."
    )
    approved: bool | None = Field(default=None, description="approval.decided: whether the call was approved.")
    decided_by: str | None = Field(default=None, description="approval.decided: who decided.")
    comment: str | None = Field(default=None, description="approval.decided: the decider's comment.")


class ToolCallOut(BaseModel):
    """A tool call the model asked for."""

    id: str
    name: str
    arguments_json: str


class ThreadMessageOut(BaseModel):
    """One message of a conversation."""

    role: Literal["user", "assistant", "tool"]
    content: str
    task_id: str | None
    tool_calls: list[ToolCallOut] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    is_error: bool | None = None


class Thread(BaseModel):
    """A conversation: the messages its tasks added, oldest first."""

    thread_id: str
    agent_id: str
    messages: list[ThreadMessageOut]
    next_page_token: str | None = Field(
        None, description="Present when there are more messages: pass it as page_token."
    )


class ApprovalDecision(ApiModel):
    """An admin's answer to a call that waits for approval."""

    approve: bool = Field(description="true runs the call; false rejects it.")
    comment: str = Field(default="", max_length=2000, description="Why; the LLM reads it with a rejection.")


def parse_decision(body: Any) -> ApprovalDecision:
    return validate(ApprovalDecision, body, "approval")


def parse_submission(body: Any) -> TaskSubmission:
    return validate(TaskSubmission, body, "task")


def task_status_value(name: str) -> int:
    return enum_value(_TASK_STATUS, name)


def task_status_name(number: int) -> str:
    return enum_name(_TASK_STATUS, number) or "queued"


def step_status_value(name: str) -> int:
    return enum_value(_STEP_STATUS, name)


# --- protos -----------------------------------------------------------------------------------------------


def _json_or_empty(value: Any) -> bytes:
    return b"" if value is None else json_bytes(value)


def task_to_proto(task: dict[str, Any]) -> agent_pb2.Task:
    """The proto of a stored task."""
    out = agent_pb2.Task(
        task_id=task["task_id"],
        agent_id=task["agent_id"],
        status=task_status_value(task["status"]),  # type: ignore[arg-type]
        input_json=json_bytes(task["input"]),
        result_json=_json_or_empty(task.get("result")),
        error=task.get("error") or "",
        thread_id=task.get("thread_id") or "",
        trace_id=task.get("trace_id") or "",
        created_at=timestamp(task["created_at"]),
        updated_at=timestamp(task["updated_at"]),
    )
    usage = task.get("usage") or {}
    out.usage.input_tokens = usage.get("input_tokens", 0)
    out.usage.output_tokens = usage.get("output_tokens", 0)
    out.usage.llm_calls = usage.get("llm_calls", 0)
    out.usage.tool_calls = usage.get("tool_calls", 0)
    for step in task["steps"]:
        proto = out.steps.add(
            id=step["id"],
            tool=step["tool"],
            status=step_status_value(step["status"]),  # type: ignore[arg-type]
            output_json=_json_or_empty(step.get("output")),
            error=step.get("error") or "",
            call_id=step.get("call_id", ""),
        )
        if step.get("started_at") is not None:
            proto.started_at.CopyFrom(timestamp(step["started_at"]))
        if step.get("finished_at") is not None:
            proto.finished_at.CopyFrom(timestamp(step["finished_at"]))
        if step.get("duration_ms") is not None:
            proto.duration_ms = step["duration_ms"]
    return out


_MESSAGE_ROLE = agent_pb2.MessageRole.DESCRIPTOR


def message_to_proto(message: dict[str, Any]) -> agent_pb2.ThreadMessage:
    """The proto of a stored thread message (services/agent/threads.py)."""
    return agent_pb2.ThreadMessage(
        role=enum_value(_MESSAGE_ROLE, message["role"]),  # type: ignore[arg-type]
        content=message.get("content", ""),
        task_id=message.get("task_id", ""),
        tool_calls=[agent_pb2.ToolCall(**call) for call in message.get("tool_calls", ())],
        tool_call_id=message.get("tool_call_id", ""),
        name=message.get("name", ""),
        is_error=message.get("is_error", False),
    )


def thread_to_proto(thread: dict[str, Any], messages: list[dict[str, Any]]) -> agent_pb2.Thread:
    """The proto of a stored thread and its messages."""
    return agent_pb2.Thread(
        thread_id=thread["thread_id"], agent_id=thread["agent_id"], messages=[message_to_proto(m) for m in messages]
    )


def thread_json(msg: agent_pb2.Thread, next_page_token: str = "") -> dict[str, Any]:
    """The REST form of a thread (the :class:`Thread` model)."""
    messages = []
    for m in msg.messages:
        body: dict[str, Any] = {
            "role": enum_name(_MESSAGE_ROLE, m.role) or "user",
            "content": m.content,
            "task_id": m.task_id or None,
        }
        if m.tool_calls:
            body["tool_calls"] = [
                {"id": c.id, "name": c.name, "arguments_json": c.arguments_json} for c in m.tool_calls
            ]
        if m.tool_call_id:
            body.update(tool_call_id=m.tool_call_id, name=m.name, is_error=m.is_error)
        messages.append(body)
    body = {"thread_id": msg.thread_id, "agent_id": msg.agent_id, "messages": messages}
    return body | ({"next_page_token": next_page_token} if next_page_token else {})


def event_to_proto(seq: int, event: dict[str, Any]) -> agent_pb2.TaskEvent:
    """The proto of a stored event: ``{"type", "task_id", "time", "data": {...}}``."""
    data = event.get("data") or {}
    out = agent_pb2.TaskEvent(
        seq=seq,
        type=event["type"],
        task_id=event["task_id"],
        time=timestamp(event["time"]),
        step_id=data.get("step_id", ""),
        tool=data.get("tool", ""),
        error=data.get("error") or "",
    )
    if data.get("status"):
        out.status = step_status_value(data["status"])  # type: ignore[assignment]
    if data.get("duration_ms") is not None:
        out.duration_ms = data["duration_ms"]
    if "model" in data:
        out.model = data["model"]
        out.provider = data.get("provider", "")
        out.input_tokens = data.get("input_tokens", 0)
        out.output_tokens = data.get("output_tokens", 0)
        out.latency_ms = data.get("latency_ms", 0)
        out.fallback_used = data.get("fallback_used", False)
    out.text = data.get("text", "")
    out.call_id = data.get("call_id", "")
    if "arguments" in data:
        out.arguments_json = json_bytes(data["arguments"])
    if "approved" in data:
        out.approved = bool(data["approved"])
        out.decided_by = data.get("decided_by", "")
        out.comment = data.get("comment", "")
    return out


# --- REST -------------------------------------------------------------------------------------------------


def _load(raw: bytes) -> Any:
    return json.loads(raw) if raw else None  # written by the agent service itself


def task_json(msg: agent_pb2.Task) -> dict[str, Any]:
    """The REST form of a task (the :class:`Task` model)."""
    return {
        "task_id": msg.task_id,
        "agent_id": msg.agent_id,
        "status": task_status_name(msg.status),
        "input": _load(msg.input_json),
        "result": _load(msg.result_json),
        "steps": [
            {
                "id": s.id,
                "tool": s.tool,
                "status": enum_name(_STEP_STATUS, s.status) or "pending",
                "started_at": rfc3339(s.started_at) if s.HasField("started_at") else None,
                "finished_at": rfc3339(s.finished_at) if s.HasField("finished_at") else None,
                "duration_ms": s.duration_ms if s.HasField("duration_ms") else None,
                "output": _load(s.output_json),
                "error": s.error or None,
            }
            | ({"call_id": s.call_id} if s.call_id else {})
            for s in msg.steps
        ],
        "error": msg.error or None,
        "usage": {
            "input_tokens": msg.usage.input_tokens,
            "output_tokens": msg.usage.output_tokens,
            "llm_calls": msg.usage.llm_calls,
            "tool_calls": msg.usage.tool_calls,
        },
        "thread_id": msg.thread_id or None,
        "trace_id": msg.trace_id or None,
        "created_at": rfc3339(msg.created_at),
        "updated_at": rfc3339(msg.updated_at),
    }


def event_json(msg: agent_pb2.TaskEvent) -> dict[str, Any]:
    """The REST form of an event (the :class:`TaskEvent` model): only the fields its type uses."""
    body: dict[str, Any] = {"seq": msg.seq, "type": msg.type, "task_id": msg.task_id, "time": rfc3339(msg.time)}
    if msg.step_id:
        body["step_id"] = msg.step_id
    if msg.tool:
        body["tool"] = msg.tool
    if msg.status:
        body["status"] = enum_name(_STEP_STATUS, msg.status)
    if msg.HasField("duration_ms"):
        body["duration_ms"] = msg.duration_ms
    if msg.error:
        body["error"] = msg.error
    if msg.model:
        body.update(
            model=msg.model,
            provider=msg.provider,
            input_tokens=msg.input_tokens,
            output_tokens=msg.output_tokens,
            latency_ms=msg.latency_ms,
            fallback_used=msg.fallback_used,
        )
    if msg.text:
        body["text"] = msg.text
    if msg.call_id:
        body["call_id"] = msg.call_id
    if msg.arguments_json:
        body["arguments"] = _load(msg.arguments_json)
    if msg.HasField("approved"):
        body.update(approved=msg.approved, decided_by=msg.decided_by, comment=msg.comment)
    return body
