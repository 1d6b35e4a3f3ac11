"""The resource models of altan.api and their proto conversions, alone: what both ports rely on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Value

from altan.api import agents, credentials, tasks, tools
from altan.api.common import MAX_STRUCT_DEPTH
from altan.api.convert import python_to_value, rfc3339, timestamp, value_to_python
from altan.errors import InvalidArgument
from altan.v1 import agent_pb2, tool_pb2
from services.tool.builtins import BUILTIN_TOOLS

LLM = {"llm_id": "gpt-4o", "provider": "openai", "endpoint": "https://api.openai.com/v1/chat/completions"}


@pytest.mark.parametrize(
    "document",
    [{}, [], {"a": {}}, {"a": []}, [{}, [], None], {"x": [1, 2.5, -3, True, None, "s", {"y": {}}]}, "", 0, None],
)
def test_json_survives_a_struct_unchanged(document: Any) -> None:
    # An empty object or list is still one on the other side (it used to come back as null).
    assert value_to_python(Value.FromString(python_to_value(document).SerializeToString())) == document


def test_a_schema_as_deep_as_allowed_crosses_the_wire_and_a_deeper_one_is_refused_first() -> None:
    def nested(levels: int) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string"}
        for _ in range(levels - 1):
            schema = {"not": schema}
        return schema

    deepest = {"type": "object", "properties": {"x": nested(MAX_STRUCT_DEPTH - 2)}}
    spec = tools.parse_tool_spec({"tool_id": "t", "name": "T", "endpoint": "https://x/", "input_schema": deepest})
    wire = tool_pb2.CreateToolRequest(tool=tools.tool_spec_to_proto(spec)).SerializeToString()
    assert tools.tool_spec_from_proto(tool_pb2.CreateToolRequest.FromString(wire).tool).input_schema == deepest
    too_deep = {"type": "object", "properties": {"x": nested(MAX_STRUCT_DEPTH)}}
    with pytest.raises(InvalidArgument, match=f"input_schema: nested deeper than {MAX_STRUCT_DEPTH} levels"):
        tools.parse_tool_spec({"tool_id": "t", "name": "T", "endpoint": "https://x/", "input_schema": too_deep})


def test_integers_a_double_cannot_hold_are_refused_in_struct_fields() -> None:
    with pytest.raises(InvalidArgument, match=r"llm.parameters: integers must be within ±2\^53"):
        agents.parse_agent_spec({"name": "a", "llm": LLM | {"parameters": {"seed": 2**60}}})
    assert agents.parse_agent_spec({"name": "a", "llm": LLM | {"parameters": {"seed": 2**53}}})


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_struct_number_json_cannot_hold_is_refused(number: float) -> None:
    """A gRPC client can put NaN in a Struct; stored, it would make every later REST answer invalid JSON."""
    proto = tool_pb2.Tool(tool_id="t", name="T", endpoint="https://x/")
    proto.input_schema.update({"type": "object", "properties": {"n": {"type": "number", "maximum": number}}})
    with pytest.raises(InvalidArgument, match="input_schema: numbers must be finite"):
        tools.tool_spec_from_proto(proto)
    llm = agent_pb2.LlmConfig(llm_id="m", provider=agent_pb2.LLM_PROVIDER_OPENAI, endpoint="https://x/")
    llm.parameters.update({"temperature": number})
    with pytest.raises(InvalidArgument, match=r"llm\.parameters: numbers must be finite"):
        agents.agent_spec_from_proto(agent_pb2.Agent(name="a", llm=llm))


def test_a_large_struct_from_grpc_is_refused_before_it_is_converted() -> None:
    proto = tool_pb2.Tool(tool_id="t", name="T", endpoint="https://x/")
    proto.input_schema.update({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(4000)}})
    with pytest.raises(InvalidArgument, match="tool: its JSON objects take more than 65536 bytes"):
        tools.tool_spec_from_proto(proto)
    llm = agent_pb2.LlmConfig(llm_id="m", provider=agent_pb2.LLM_PROVIDER_OPENAI, endpoint="https://x/")
    llm.parameters.update({"stop": ["x" * 1000] * 70})
    with pytest.raises(InvalidArgument, match="agent: its JSON objects take more than 65536 bytes"):
        agents.agent_spec_from_proto(agent_pb2.Agent(name="a", llm=llm))


def test_large_documents_are_refused_before_they_are_walked() -> None:
    many = {f"p{i}": {"type": "string"} for i in range(3000)}
    with pytest.raises(InvalidArgument, match="tool: more than 5000 JSON values in all"):
        tools.parse_tool_spec({"tool_id": "t", "name": "T", "endpoint": "https://x/", "input_schema": many})
    with pytest.raises(InvalidArgument, match="agent: more than 2000 JSON values in all"):
        agents.parse_agent_spec({"name": "a", "llm": LLM | {"parameters": {"l": list(range(2000))}}})


def test_an_agent_round_trips_through_its_proto() -> None:
    spec = agents.parse_agent_spec(
        {
            "name": "support",
            "instructions": "Be brief.",
            "llm": LLM | {"auth": {"type": "api_key", "credential": "openai"}, "parameters": {"temperature": 0.2}},
            "fallback_llms": [LLM | {"provider": "anthropic", "llm_id": "claude"}],
            "tools": ["json_extract"],
        }
    )
    assert agents.agent_spec_from_proto(agents.agent_spec_to_proto(spec)) == spec
    stored = {"id": "agt_1", **spec.model_dump(exclude_none=True), "created_at": 1_764_583_200_000, "updated_at": 1}
    shown = agents.agent_json(agents.agent_to_proto(stored))
    assert shown["llm"]["parameters"] == {"temperature": 0.2} and shown["llm"]["provider"] == "openai"
    assert shown["created_at"] == "2025-12-01T10:00:00.000Z" and shown["updated_at"] == "1970-01-01T00:00:00.001Z"


def test_output_only_fields_are_refused_alike_from_json_and_from_the_proto() -> None:
    with pytest.raises(InvalidArgument) as from_json:
        agents.parse_agent_spec({"name": "a", "created_at": "2026-01-01T00:00:00Z"})
    proto = agent_pb2.Agent(name="a")
    proto.created_at.GetCurrentTime()
    with pytest.raises(InvalidArgument) as from_proto:
        agents.agent_spec_from_proto(proto)
    assert from_json.value.message == from_proto.value.message == "created_at: output only; the platform sets it"


def test_a_patch_names_what_it_changes_and_null_removes_the_llm() -> None:
    patch = agents.parse_agent_patch({"name": "renamed", "llm": None})
    fields, mask = agents.patch_to_proto(patch)
    assert sorted(mask.paths) == ["llm", "name"]
    assert agents.patch_from_proto(fields, mask) == {"llm": None, "name": "renamed"}
    # An empty mask names the fields that are set.
    assert agents.patch_from_proto(agent_pb2.Agent(tools=["a"]), type(mask)()) == {"tools": ["a"]}
    with pytest.raises(InvalidArgument, match="update_mask: 'id' cannot be changed"):
        agents.patch_from_proto(agent_pb2.Agent(), type(mask)(paths=["id"]))
    with pytest.raises(InvalidArgument, match="name: Input should be a valid string"):
        agents.parse_agent_patch({"name": None})


def test_a_credential_round_trips_and_never_shows_its_secret() -> None:
    spec = credentials.parse_credential_spec(
        {"type": "api_key", "value": "sk-secret", "header": "X-Api-Key", "prefix": "", "hosts": ["api.example.com"]}
    )
    assert credentials.credential_spec_from_proto(credentials.credential_spec_to_proto(spec)) == spec
    meta = {
        "name": "crm",
        "type": "api_key",
        "header": "X-Api-Key",
        "prefix": "",
        "hosts": ["api.example.com"],
        "status": "connected",
        "created_at": 0,
        "updated_at": 0,
    }
    shown = credentials.credential_json(credentials.credential_to_proto(meta))
    assert "sk-secret" not in json.dumps(shown) and shown["prefix"] == "" and shown["status"] == "connected"


def test_a_task_and_its_events_render_as_api_md_says() -> None:
    task = {
        "task_id": "tsk_1",
        "agent_id": "agt_1",
        "status": "failed",
        "input": {"plan": []},
        "result": None,
        "steps": [
            {
                "id": "s1",
                "tool": "json_extract",
                "status": "failed",
                "started_at": 1000,
                "finished_at": 1500,
                "duration_ms": 500,
                "output": None,
                "error": "boom",
            },
            {"id": "s2", "tool": "json_extract", "status": "skipped"},
        ],
        "error": "step s1 failed: boom",
        "usage": {"tool_calls": 1},
        "created_at": 0,
        "updated_at": 1500,
    }
    shown = tasks.task_json(tasks.task_to_proto(task))
    assert shown["steps"][0] == {
        "id": "s1",
        "tool": "json_extract",
        "status": "failed",
        "started_at": "1970-01-01T00:00:01.000Z",
        "finished_at": "1970-01-01T00:00:01.500Z",
        "duration_ms": 500,
        "output": None,
        "error": "boom",
    }
    assert shown["steps"][1]["started_at"] is None and shown["steps"][1]["duration_ms"] is None
    assert shown["usage"] == {"input_tokens": 0, "output_tokens": 0, "llm_calls": 0, "tool_calls": 1}
    event = {
        "type": "tool.finished",
        "task_id": "tsk_1",
        "time": 1500,
        "data": {"step_id": "s1", "tool": "json_extract", "status": "failed", "duration_ms": 500, "error": "boom"},
    }
    assert tasks.event_json(tasks.event_to_proto(7, event)) == {
        "seq": 7,
        "type": "tool.finished",
        "task_id": "tsk_1",
        "time": "1970-01-01T00:00:01.500Z",
        "step_id": "s1",
        "tool": "json_extract",
        "status": "failed",
        "duration_ms": 500,
        "error": "boom",
    }


def test_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    assert rfc3339(timestamp(1_764_583_200_123)) == "2025-12-01T10:00:00.123Z"


def test_self_contained_builtins_are_builtins_that_need_no_credential() -> None:
    # The integrator skips reading these tools' definitions; that is only safe while this holds.
    assert tools.SELF_CONTAINED_BUILTINS < set(BUILTIN_TOOLS)
    for tool_id in tools.SELF_CONTAINED_BUILTINS:
        assert "credential" not in BUILTIN_TOOLS[tool_id]["input_schema"]["properties"]
    assert "http_request" not in tools.SELF_CONTAINED_BUILTINS
