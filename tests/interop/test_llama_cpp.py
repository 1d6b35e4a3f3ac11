"""An agent task against a model server no one here wrote: llama-cpp-python's OpenAI-compatible server running
SmolLM2-135M-Instruct on the CPU, with the agent's ``parameters`` forcing the first tool call.

What it proves that the fakes cannot: the wire format, streaming included, is the one a real server reads and writes
(its quirks too: an assistant message with tool calls must carry ``content: ""``, never null); a named
``tool_choice`` reaches it and is honoured; after the call the loop stops forcing it, so a model that would otherwise
call the tool on every turn answers. llama.cpp's ``chatml-function-calling`` format leaves tool results out of the
prompt, so the answer's words are the model's own and are not checked.
"""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack
from tests.e2e.test_tasks import _events
from tests.interop.llama_server import MODEL_ALIAS, LlamaServer

FORCED = {"type": "function", "function": {"name": "customer_lookup"}}


def _setup(api: httpx.Client, llama: LlamaServer, third_party: FakeThirdParty) -> str:
    tool = {
        "tool_id": "customer_lookup",
        "name": "Customer lookup",
        "description": "Reads a customer's record by the customer's first name.",
        "parameters": [{"name": "customer", "type": "string", "required": True, "description": "A first name"}],
        "endpoint": f"{third_party.base_url}/v1/customers/{{customer}}",
        "method": "GET",
        "auth": "none",
    }
    created = api.post("/v1/tools", json=tool)
    assert created.status_code == 201, created.text
    llm = {
        "llm_id": MODEL_ALIAS,
        "provider": "openai",
        "endpoint": llama.endpoint,  # no auth: the install's key, which the stack sends to 127.0.0.1 only
        "parameters": {"tool_choice": FORCED, "temperature": 0, "max_tokens": 96},
    }
    agent = api.post(
        "/v1/agents",
        json={
            "name": "interop",
            # A 135M model: a short, plain prompt gets a sensible argument (the check below does not depend on it).
            "instructions": "You look up customers.",
            "llm": llm,
            "tools": ["customer_lookup"],
        },
    )
    assert agent.status_code == 201, agent.text
    return str(agent.json()["id"])


@pytest.mark.timeout(180)  # the server's start and the stack's included; each model turn takes a few seconds
def test_an_agent_task_with_a_forced_tool_call_completes_on_llama_cpp(
    stack: Stack, tenant: str, llama: LlamaServer, third_party: FakeThirdParty
) -> None:
    with stack.client(tenant) as api:
        agent_id = _setup(api, llama, third_party)
        submitted = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": "Look up the customer Ada."})
        assert submitted.status_code == 202, submitted.text
        task_id = submitted.json()["task_id"]
        events = _events(api, task_id)
        task = api.get(f"/v1/tasks/{task_id}").json()
        thread = api.get(f"/v1/threads/{task['thread_id']}").json()
        audit = api.get("/v1/audit", params={"task_id": task_id}).json()["events"]

    assert task["status"] == "succeeded", f"{task}\n--- llama.cpp:\n{llama.logs()}\n--- stack:\n{stack.logs()[-5000:]}"
    answer = task["result"]["answer"]
    assert isinstance(answer, str) and answer.strip()

    # The forced call ran as the first step, and reached the third party with the argument the model wrote.
    first = task["steps"][0]
    assert (first["id"], first["tool"], first["status"]) == ("t1c1", "customer_lookup", "succeeded")
    assert first["output"]["method"] == "GET" and first["output"]["path"].startswith("/v1/customers/")
    called = [r for r in third_party.received if r.path.startswith("/v1/customers/")]
    assert called and called[0].method == "GET"
    finished = [e for e in events if e["type"] == "tool.finished"]
    assert finished[0]["tool"] == "customer_lookup" and finished[0]["status"] == "succeeded"

    # Two turns: the forced call, then the answer once the loop stopped forcing it (forced on every turn, the task
    # would fail after ALTAN_MAX_LLM_TURNS). Each was answered by the real server (it names the model by its alias),
    # none by a fallback, with the install's key, which the server asks for.
    turns = [e for e in events if e["type"] == "llm.called"]
    assert len(turns) == task["usage"]["llm_calls"] == 2 and len(task["steps"]) == 1
    assert {(e["model"], e["provider"], e["fallback_used"]) for e in turns} == {(MODEL_ALIAS, "openai", False)}
    assert [(e["action"], e["outcome"], e["target"]) for e in audit if e["action"] == "llm.call"] == [
        ("llm.call", "ok", f"127.0.0.1:{llama.port}")
    ] * len(turns)

    # The answer streamed, and closes the thread after the call and its result.
    assert "".join(e["text"] for e in events if e["type"] == "message.delta") == answer
    roles = [m["role"] for m in thread["messages"]]
    assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"
    assert thread["messages"][1]["tool_calls"][0]["name"] == "customer_lookup"
    assert thread["messages"][-1]["content"] == answer
