"""Protos of the services turned into the public JSON of API.md."""

from __future__ import annotations

import json
from typing import Any

from altan.v1 import agent_pb2, integrator_pb2, tool_pb2

__all__ = ["agent_json", "audit_json", "credential_json", "event_json", "task_json", "tool_json"]


def _load(text: str, default: Any = None) -> Any:
    return json.loads(text) if text else default


def agent_json(agent: agent_pb2.Agent) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "instructions": agent.instructions,
        "llm": _load(agent.llm_json),
        "fallback_llms": _load(agent.fallback_llms_json, []),
        "tools": list(agent.tools),
        "created_at": agent.created_at,
        "updated_at": agent.updated_at,
    }


def tool_json(tool: tool_pb2.Tool) -> dict[str, Any]:
    body: dict[str, Any] = _load(tool.definition_json, {})
    body["input_schema"] = _load(tool.input_schema_json, {})
    return body


def credential_json(cred: integrator_pb2.CredentialInfo) -> dict[str, Any]:
    body: dict[str, Any] = {"name": cred.name, "type": cred.type}
    if cred.type == "api_key":
        body.update(header=cred.header, prefix=cred.prefix)
    body.update(created_at=cred.created_at, updated_at=cred.updated_at)
    return body


def task_json(task: agent_pb2.Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "agent_id": task.agent_id,
        "status": task.status,
        "input": _load(task.input_json),
        "result": _load(task.result_json),
        "steps": [
            {
                "id": s.id,
                "tool": s.tool,
                "status": s.status,
                "started_at": s.started_at or None,
                "finished_at": s.finished_at or None,
                "duration_ms": s.duration_ms,
                "output": _load(s.output_json),
                "error": s.error or None,
            }
            for s in task.steps
        ],
        "error": task.error or None,
        "usage": _load(task.usage_json, {}),
        "created_at": task.created_at,
        "updated_at": task.updated_at,
    }


def event_json(event: agent_pb2.StreamTaskEventsResponse) -> dict[str, Any]:
    return {"seq": event.seq, "type": event.type, "task_id": event.task_id, "time": event.time,
            **_load(event.data_json, {})}


def audit_json(event: integrator_pb2.AuditEvent) -> dict[str, Any]:
    return {
        "time": event.time,
        "tenant_id": event.tenant_id,
        "user": event.user,
        "action": event.action,
        "tool_id": event.tool_id or None,
        "task_id": event.task_id or None,
        "target": event.target or None,
        "outcome": event.outcome,
        "latency_ms": event.latency_ms,
        "reason": event.reason or None,
        "credential": event.credential or None,
    }
