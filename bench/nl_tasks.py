"""Natural-language agent tasks as a user runs them, for the agent benchmarks (``agent_loop.py``, ``many_tasks.py``).

A fresh tenant gets custom HTTP tools reading the fake API and an agent whose LLM is the mock
(``bench/mock_llm.py``, OpenAI wire format, reached with the install's key). A task is submitted with
``POST /v1/agents/{id}/tasks`` and followed on ``GET /v1/tasks/{id}/events`` (Server-Sent Events) to its terminal
event, the way a client shows an answer as it streams; the streamed text must be the mock's answer.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import httpx

from bench.harness import Processes
from bench.scenarios import UnexpectedAnswer

__all__ = ["ANSWER", "AgentTarget", "TaskTimes", "follow_task", "prepare_agent"]

ANSWER = "Done: both lookups answered."  # bench/mock_llm.py's text answer
QUESTION = "Look the customer up in the CRM and in the order system, then answer."
TOOLS = ("crm_lookup", "order_lookup")


@dataclass(frozen=True)
class AgentTarget:
    base_url: str
    token: str
    agent_id: str


@dataclass(frozen=True)
class TaskTimes:
    """When one task was accepted (202) and when its terminal event arrived, in seconds after its submission."""

    accepted: float
    finished: float
    retried: bool = False  # the events' request met a closed keep-alive connection and was sent again


def _check(response: httpx.Response, status: int) -> dict[str, object]:
    if response.status_code != status:
        raise UnexpectedAnswer(
            f"{response.request.method} {response.request.url}: {response.status_code} {response.text[:300]}"
        )
    answer: dict[str, object] = response.json()
    return answer


async def prepare_agent(processes: Processes, tools: int) -> AgentTarget:
    """A fresh tenant with ``tools`` custom HTTP tools (GET on the fake API, no credential) and an agent using them."""
    assert processes.llm is not None, "start the stack with the mock LLM (llm_delay_ms)"
    token = processes.token(f"bench-{uuid.uuid4().hex[:8]}")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=processes.base_url, headers=headers, timeout=30, trust_env=False) as api:
        for tool_id in TOOLS[:tools]:
            tool = {
                "tool_id": tool_id,
                "name": tool_id.replace("_", " "),
                "description": f"Reads a customer record ({tool_id})",
                "parameters": [{"name": "customer", "type": "string", "required": True}],
                "endpoint": f"{processes.fake_url}/v1/{{customer}}.json",
                "method": "GET",
            }
            _check(await api.post("/v1/tools", json=tool), 201)
        agent = {
            "name": "support",
            "instructions": "Answer customers.",
            "tools": list(TOOLS[:tools]),
            "llm": {"llm_id": "mock", "provider": "openai", "endpoint": processes.llm_url},
        }
        agent_id = str(_check(await api.post("/v1/agents", json=agent), 201)["id"])
    return AgentTarget(processes.base_url, token, agent_id)


async def follow_task(api: httpx.AsyncClient, agent_id: str) -> TaskTimes:
    """Submit one task and read its events to the end; raises unless it succeeded with the mock's answer."""
    t0 = time.perf_counter()
    submitted = _check(await api.post(f"/v1/agents/{agent_id}/tasks", json={"input": QUESTION}), 202)
    accepted = time.perf_counter() - t0
    event, text, retried = "", [], False
    while True:
        try:
            async with api.stream("GET", f"/v1/tasks/{submitted['task_id']}/events") as stream:
                if stream.status_code != 200:
                    raise UnexpectedAnswer(f"events: {stream.status_code}")
                async for line in stream.aiter_lines():  # read to the end: the server closes after the last event
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "message.delta":
                        text.append(json.loads(line[6:])["text"])
            break
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # The connection was closed or reset before the first event (seen with 1,000 streams at once on a busy
            # machine): ask again on a new one, once, as browsers do. Counted, so the report says how often.
            if retried or event:
                raise
            retried = True
    finished = time.perf_counter() - t0
    if event != "task.succeeded" or "".join(text) != ANSWER:
        raise UnexpectedAnswer(f"task {submitted['task_id']} ended with {event or 'no event'}, text {''.join(text)!r}")
    return TaskTimes(accepted, finished, retried)
