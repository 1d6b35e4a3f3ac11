"""Natural-language tasks end to end: the agent's LLM (a fake API in its real wire format, on a real socket) calls
tools through the real stack; keys, retries, fallbacks, threads, streaming events and failures as a user sees them."""

from __future__ import annotations

import time
from typing import Any

import grpc
import httpx
import pytest

from altan.api.tasks import thread_json
from altan.v1 import agent_pb2, agent_pb2_grpc
from tests.e2e.fake_llms import INSTALL_KEY, Llms
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack
from tests.e2e.test_tasks import _events, _finished
from tests.fakes.llm import Call, Delay, HttpError, Reply

TENANT_KEY = "sk-tenant-e2e-9f8e7d6c5b4a39281706"


def _agent(api: httpx.Client, llm: dict[str, Any], tools: list[str] | None = None, **fields: Any) -> str:
    body = {"name": "assistant", "instructions": "Be brief.", "llm": llm, "tools": tools or [], **fields}
    answer = api.post("/v1/agents", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _submit(api: httpx.Client, agent_id: str, text: str, **fields: Any) -> dict[str, Any]:
    answer = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": text, **fields})
    assert answer.status_code == 202, answer.text
    submitted: dict[str, Any] = answer.json()
    assert submitted["status"] == "queued" and submitted["thread_id"]
    return submitted


def _run(api: httpx.Client, agent_id: str, text: str, **fields: Any) -> dict[str, Any]:
    return _finished(api, _submit(api, agent_id, text, **fields)["task_id"])


def _openai_messages(llms: Llms, model: str, index: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = llms.requests(model)[index].body["messages"]
    return messages


def test_the_model_calls_tools_in_parallel_and_answers_with_their_results(
    stack: Stack, tenant: str, llms: Llms, third_party: FakeThirdParty
) -> None:
    slow = f"{third_party.base_url}/sleep/1"
    model = llms.model(
        Reply(calls=(Call("http_request", {"url": slow}), Call("http_request", {"url": slow}))),
        Reply(text="Both calls slept for one second."),
    )
    with stack.client(tenant) as api:
        agent_id = _agent(api, llms.config(model), ["http_request", "text_template"])
        started = time.monotonic()
        submitted = _submit(api, agent_id, "Sleep twice, please.")
        events = _events(api, submitted["task_id"])
        elapsed = time.monotonic() - started
        task = api.get(f"/v1/tasks/{submitted['task_id']}").json()
    assert task["status"] == "succeeded", task
    assert task["result"] == {"answer": "Both calls slept for one second."}
    assert elapsed < 1.9, f"two 1 s tool calls of one turn took {elapsed:.2f}s: not parallel"
    assert [(s["id"], s["tool"], s["status"], s["output"]["slept"]) for s in task["steps"]] == [
        ("t1c1", "http_request", "succeeded", 1.0),
        ("t1c2", "http_request", "succeeded", 1.0),
    ]
    assert all(s["call_id"] for s in task["steps"])
    usage = task["usage"]
    assert (usage["llm_calls"], usage["tool_calls"]) == (2, 2) and usage["input_tokens"] > 0 < usage["output_tokens"]

    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["task.queued", "task.started", "llm.called"]
    assert sorted(kinds[3:7]) == ["tool.finished", "tool.finished", "tool.started", "tool.started"]
    assert kinds[7:] == [*["message.delta"] * (len(kinds) - 9), "llm.called", "task.succeeded"]
    assert "".join(e["text"] for e in events if e["type"] == "message.delta") == "Both calls slept for one second."
    called = [e for e in events if e["type"] == "llm.called"]
    assert [(e["model"], e["provider"], e["fallback_used"]) for e in called] == [(model, "openai", False)] * 2
    assert sum(e["input_tokens"] for e in called) == usage["input_tokens"]

    # What the model was sent: the instructions, the bound tools' schemas, then the results of its calls.
    first, second = llms.requests(model)
    assert first.body["messages"][0] == {"role": "system", "content": "Be brief."}
    offered = {t["function"]["name"]: t["function"]["parameters"] for t in first.body["tools"]}
    assert set(offered) == {"http_request", "text_template"} and offered["http_request"]["type"] == "object"
    results = [m for m in second.body["messages"] if m["role"] == "tool"]
    assert len(results) == 2 and all('"slept": 1.0' in m["content"] for m in results)


def test_tasks_of_one_thread_continue_the_conversation(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(Reply(text="Nice to meet you, Ada."), Reply(text="Your name is Ada."))
    with stack.client(tenant) as api:
        agent_id = _agent(api, llms.config(model))
        first = _run(api, agent_id, "My name is Ada.")
        second = _run(api, agent_id, "What is my name?", thread_id=first["thread_id"])
        thread = api.get(f"/v1/threads/{first['thread_id']}")
    assert (first["status"], second["status"]) == ("succeeded", "succeeded")
    assert second["thread_id"] == first["thread_id"]
    assert [(m["role"], m["content"]) for m in _openai_messages(llms, model, 1)] == [
        ("system", "Be brief."),
        ("user", "My name is Ada."),
        ("assistant", "Nice to meet you, Ada."),
        ("user", "What is my name?"),
    ]
    assert thread.status_code == 200, thread.text
    body = thread.json()
    assert (body["thread_id"], body["agent_id"]) == (first["thread_id"], agent_id)
    assert [(m["role"], m["content"], m["task_id"]) for m in body["messages"]] == [
        ("user", "My name is Ada.", first["task_id"]),
        ("assistant", "Nice to meet you, Ada.", first["task_id"]),
        ("user", "What is my name?", second["task_id"]),
        ("assistant", "Your name is Ada.", second["task_id"]),
    ]


def test_a_thread_belongs_to_its_tenant_and_its_agent(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(Reply(text="Noted."), Reply(text="Noted."))
    with stack.client(tenant) as api, stack.client(f"{tenant}-other") as other:
        agent_id = _agent(api, llms.config(model))
        task = _run(api, agent_id, "The secret plan is in the drawer.")
        thread_id = task["thread_id"]
        assert other.get(f"/v1/threads/{thread_id}").status_code == 404
        # The other tenant's thread of the same name is its own: it never sees this one's messages.
        other_agent = _agent(other, llms.config(model))
        theirs = _run(other, other_agent, "Hello?", thread_id=thread_id)
        assert theirs["thread_id"] == thread_id
        assert [m["content"] for m in other.get(f"/v1/threads/{thread_id}").json()["messages"]] == ["Hello?", "Noted."]
        assert all("drawer" not in m["content"] for m in llms.requests(model)[-1].body["messages"])
        # Another agent of the same tenant may not continue it.
        second_agent = _agent(api, llms.config(model))
        refused = api.post(f"/v1/agents/{second_agent}/tasks", json={"input": "hi", "thread_id": thread_id})
        assert refused.status_code == 400 and "conversation with agent" in refused.json()["error"]["message"]
        assert api.get("/v1/threads/thr_nope").status_code == 404
        assert api.post(f"/v1/agents/{agent_id}/tasks", json={"input": "hi", "thread_id": "../x"}).status_code == 400
        assert len(api.get(f"/v1/threads/{thread_id}").json()["messages"]) == 2  # the refusals added nothing


def test_keys_go_only_where_they_are_meant_to_and_never_come_back(stack: Stack, tenant: str, llms: Llms) -> None:
    with stack.client(tenant) as api:
        stored = api.put("/v1/credentials/llm-key", json={"type": "api_key", "value": TENANT_KEY})
        assert stored.status_code in (200, 201), stored.text
        auth = {"type": "api_key", "credential": "llm-key"}
        with_credential, with_install_key, elsewhere, anthropic = (llms.model() for _ in range(4))
        tasks = [
            _run(api, _agent(api, llms.config(with_credential, auth=auth)), "one"),
            _run(api, _agent(api, llms.config(with_install_key)), "two"),
            _run(
                api,
                _agent(api, llms.config(elsewhere, endpoint=llms.openai.url.replace("127.0.0.1", "localhost"))),
                "3",
            ),
            _run(api, _agent(api, llms.config(anthropic, "anthropic", auth=auth)), "four"),
        ]
        seen = [api.get(f"/v1/threads/{t['thread_id']}").text + str(_events(api, t["task_id"])) for t in tasks]
        audit = api.get("/v1/audit", params={"limit": 100}).text
    assert [t["status"] for t in tasks] == ["succeeded"] * 4, [t["error"] for t in tasks]
    assert llms.requests(with_credential)[0].headers["authorization"] == f"Bearer {TENANT_KEY}"
    assert llms.requests(with_install_key)[0].headers["authorization"] == f"Bearer {INSTALL_KEY}"
    assert "authorization" not in llms.requests(elsewhere)[0].headers  # the install key is bound to 127.0.0.1
    assert llms.requests(anthropic)[0].headers["x-api-key"] == TENANT_KEY
    assert '"credential":"llm-key"' in audit and '"action":"llm.call"' in audit
    for text in [*seen, audit, str(tasks), stack.logs()]:
        assert TENANT_KEY not in text and INSTALL_KEY not in text


def test_a_rate_limited_model_is_retried_after_the_wait_it_asks_for(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(HttpError(429, "slow down", headers={"Retry-After": "1"}), Reply(text="Here I am."))
    with stack.client(tenant) as api:
        started = time.monotonic()
        task = _run(api, _agent(api, llms.config(model)), "hello")
        elapsed = time.monotonic() - started
        audit = [e for e in api.get("/v1/audit", params={"task_id": task["task_id"]}).json()["events"]]
    assert task["status"] == "succeeded" and task["result"] == {"answer": "Here I am."}
    assert len(llms.requests(model)) == 2 and elapsed >= 1.0
    assert [(e["action"], e["model"], e["outcome"]) for e in audit] == [("llm.call", model, "ok")]


def test_when_the_primary_fails_the_fallback_answers(stack: Stack, tenant: str, llms: Llms) -> None:
    primary = llms.model(*[HttpError(500, "internal")] * 3)
    fallback = llms.model(Reply(text="The fallback speaking."))
    with stack.client(tenant) as api:
        agent_id = _agent(api, llms.config(primary), fallback_llms=[llms.config(fallback, "anthropic")])
        submitted = _submit(api, agent_id, "hello")
        events = _events(api, submitted["task_id"])
        task = api.get(f"/v1/tasks/{submitted['task_id']}").json()
        audit = api.get("/v1/audit", params={"task_id": task["task_id"]}).json()["events"]
    assert task["status"] == "succeeded" and task["result"] == {"answer": "The fallback speaking."}
    assert len(llms.requests(primary)) == 3 and len(llms.requests(fallback)) == 1
    (called,) = [e for e in events if e["type"] == "llm.called"]
    assert (called["model"], called["provider"], called["fallback_used"]) == (fallback, "anthropic", True)
    assert [(e["model"], e["outcome"]) for e in audit] == [(primary, "error"), (fallback, "ok")]


def test_when_no_model_answers_the_task_fails_saying_why(stack: Stack, tenant: str, llms: Llms) -> None:
    primary = llms.model(HttpError(400, "model 'x' does not exist"))
    fallback = llms.model(HttpError(404, "not here"))
    with stack.client(tenant) as api:
        agent_id = _agent(api, llms.config(primary), fallback_llms=[llms.config(fallback)])
        task = _run(api, agent_id, "hello")
        thread = api.get(f"/v1/threads/{task['thread_id']}").json()
    assert task["status"] == "failed" and task["result"] is None
    assert task["error"].startswith("no LLM answered: ") and primary in task["error"] and fallback in task["error"]
    assert "does not exist" in task["error"]
    assert [m["role"] for m in thread["messages"]] == ["user"]  # the question stays; no answer was made up


@pytest.mark.parametrize("endpoint", ["http://169.254.169.254/v1/chat/completions", "http://10.0.0.7/v1/messages"])
def test_an_llm_endpoint_at_a_private_address_is_refused(stack: Stack, tenant: str, llms: Llms, endpoint: str) -> None:
    with stack.client(tenant) as api:
        task = _run(api, _agent(api, llms.config("gpt-4o", endpoint=endpoint)), "hello")
        (event,) = api.get("/v1/audit", params={"task_id": task["task_id"]}).json()["events"]
    assert task["status"] == "failed" and "egress refused" in task["error"]
    assert (event["action"], event["outcome"]) == ("llm.call", "denied")
    assert event["target"] == endpoint.split("/")[2] + ":80"


def test_a_malformed_tool_call_goes_back_to_the_model_which_corrects_it(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(
        Reply(calls=(Call("no_such_tool", {}),)),
        Reply(calls=(Call("text_template", "{not json"),)),
        Reply(calls=(Call("text_template", {"template": "Hi {{ name }}", "values": {"name": "Ada"}}),)),
        Reply(text="It says: Hi Ada"),
    )
    with stack.client(tenant) as api:
        task = _run(api, _agent(api, llms.config(model), ["text_template"]), "Greet Ada.")
    assert task["status"] == "succeeded" and task["result"] == {"answer": "It says: Hi Ada"}
    assert [(s["id"], s["output"]) for s in task["steps"]] == [("t3c1", {"text": "Hi Ada"})]
    told = [_openai_messages(llms, model, i)[-1] for i in (1, 2)]
    assert [m["role"] for m in told] == ["tool", "tool"]
    assert "there is no tool named 'no_such_tool'" in told[0]["content"]
    assert "must be a JSON object" in told[1]["content"]


def test_a_task_is_cancelled_while_the_model_thinks(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(Delay(8, Reply(text="too late")))
    with stack.client(tenant) as api:
        submitted = _submit(api, _agent(api, llms.config(model)), "think hard")
        deadline = time.monotonic() + 10
        while not llms.requests(model):  # the model has the question
            assert time.monotonic() < deadline, "the model was never asked"
            time.sleep(0.02)
        started = time.monotonic()
        assert api.post(f"/v1/tasks/{submitted['task_id']}/cancel").status_code == 200
        events = _events(api, submitted["task_id"])
        task = api.get(f"/v1/tasks/{submitted['task_id']}").json()
    assert time.monotonic() - started < 5
    assert task["status"] == "cancelled" and events[-1]["type"] == "task.cancelled"


def test_an_agent_without_an_llm_refuses_natural_language(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        agent = api.post("/v1/agents", json={"name": "plans-only", "tools": ["text_template"]}).json()
        refused = api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": "hello"})
        assert refused.status_code == 400
        assert "needs an agent with an llm" in refused.json()["error"]["message"]
        assert api.get("/v1/audit").json()["events"] == []


def test_the_integrator_counts_llm_calls_per_provider_and_model(stack: Stack, tenant: str, llms: Llms) -> None:
    def samples() -> dict[str, float]:
        port = stack.internal_ports["integrator-metrics"]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("altan_llm_"))
        return {name: float(value) for name, value in lines}

    ok = 'altan_llm_calls_total{model="gpt-4o",outcome="ok",provider="openai"}'
    unlisted = 'altan_llm_calls_total{model="other",outcome="ok",provider="anthropic"}'
    tokens = 'altan_llm_tokens_total{direction="output",model="gpt-4o",provider="openai"}'
    before = samples()
    llms.script("gpt-4o", Reply(text="counted", usage=(20, 7)))
    secret_name = llms.model(Reply(text="counted too"))
    with stack.client(tenant) as api:
        for config in (llms.config("gpt-4o"), llms.config(secret_name, "anthropic")):
            assert _run(api, _agent(api, config), "count me")["status"] == "succeeded"
    after = samples()
    assert after[ok] - before.get(ok, 0) == 1 and after[unlisted] - before.get(unlisted, 0) == 1
    assert after[tokens] - before.get(tokens, 0) == 7
    assert not any(secret_name in name or tenant in name for name in after)  # tenants' names stay out


def test_a_long_thread_reads_in_pages(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(*[Reply(text=f"answer {i}") for i in range(3)])
    with stack.client(tenant) as api:
        agent_id = _agent(api, llms.config(model))
        thread_id = _run(api, agent_id, "question 0")["thread_id"]
        for i in (1, 2):
            _run(api, agent_id, f"question {i}", thread_id=thread_id)
        seen, token, pages = [], "", 0
        while True:
            params = {"page_size": 4} | ({"page_token": token} if token else {})
            page = api.get(f"/v1/threads/{thread_id}", params=params).json()
            seen += [m["content"] for m in page["messages"]]
            pages += 1
            token = page.get("next_page_token", "")
            if not token:
                break
        refused = api.get(f"/v1/threads/{thread_id}", params={"page_token": "bm9wZQ=="})
    assert seen == [text for i in range(3) for text in (f"question {i}", f"answer {i}")] and pages == 2
    assert refused.status_code == 400 and "page_token" in refused.json()["error"]["message"]


def test_a_model_answer_over_the_output_limit_fails_the_task_clearly(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(Reply(text="x" * 300_000))  # the e2e stack's ALTAN_MAX_OUTPUT_BYTES is 256 KiB
    with stack.client(tenant) as api:
        task = _run(api, _agent(api, llms.config(model)), "say a lot")
    assert task["status"] == "failed" and "larger than 262144 bytes" in task["error"], task["error"]


def test_a_thread_reads_the_same_over_public_grpc(stack: Stack, tenant: str, llms: Llms) -> None:
    model = llms.model(Reply(calls=(Call("text_template", {"template": "hi"}),)), Reply(text="Said hi."))
    with stack.client(tenant) as api, grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        thread_id = _run(api, _agent(api, llms.config(model), ["text_template"]), "greet")["thread_id"]
        rest = api.get(f"/v1/threads/{thread_id}").json()
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.GetThreadRequest(thread_id=thread_id)
        answer = stub.GetThread(request, metadata=(("authorization", f"Bearer {stack.token(tenant)}"),), timeout=10)
        with pytest.raises(grpc.RpcError) as other:
            stub.GetThread(request, metadata=(("authorization", f"Bearer {stack.token(tenant + '-x')}"),), timeout=10)
    assert thread_json(answer.thread, answer.next_page_token) == rest
    assert [m["role"] for m in rest["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert rest["messages"][1]["tool_calls"][0]["name"] == "text_template"
    assert other.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_stops_the_tool_calls_in_flight(
    stack: Stack, tenant: str, llms: Llms, third_party: FakeThirdParty
) -> None:
    model = llms.model(Reply(calls=(Call("http_request", {"url": f"{third_party.base_url}/sleep/6"}),)))
    with stack.client(tenant) as api:
        submitted = _submit(api, _agent(api, llms.config(model), ["http_request"]), "wait for it")
        deadline = time.monotonic() + 10
        while not any(s["status"] == "running" for s in api.get(f"/v1/tasks/{submitted['task_id']}").json()["steps"]):
            assert time.monotonic() < deadline, "the tool call never started"
            time.sleep(0.02)
        started = time.monotonic()
        assert api.post(f"/v1/tasks/{submitted['task_id']}/cancel").status_code == 200
        events = _events(api, submitted["task_id"])
        task = api.get(f"/v1/tasks/{submitted['task_id']}").json()
    assert time.monotonic() - started < 4, "the cancel waited for the 6 s tool call"
    assert task["status"] == "cancelled" and events[-1]["type"] == "task.cancelled"
    assert len(llms.requests(model)) == 1  # the model was not asked again


def test_a_forced_tool_choice_holds_for_the_first_call_then_the_model_answers(
    stack: Stack, tenant: str, llms: Llms
) -> None:
    forced = {"type": "function", "function": {"name": "text_template"}}
    model = llms.model(
        Reply(calls=(Call("text_template", {"template": "Hi {{ name }}", "values": {"name": "Ada"}}),)),
        Reply(text="It says: Hi Ada"),
    )
    parameters = {"tool_choice": forced, "temperature": 0}
    with stack.client(tenant) as api:
        task = _run(api, _agent(api, llms.config(model, parameters=parameters), ["text_template"]), "Greet Ada.")
    assert task["status"] == "succeeded" and task["result"] == {"answer": "It says: Hi Ada"}, task
    first, second = (r.body for r in llms.requests(model))
    assert (first["tool_choice"], first["temperature"]) == (forced, 0)
    # Once the model has called the tool it may answer: forced again, it could only call the tool until max turns.
    assert "tool_choice" not in second and second["temperature"] == 0  # the API's default when tools are offered: auto
