"""MCP servers end to end: the reference FastMCP server registered by a tenant, its tools listed, invoked, bound to
agents, in plans and in the agent loop; a server that is down, another tenant, a member, a private URL, and a
credential that reaches the server and nowhere else."""

from __future__ import annotations

import time
import uuid

from tests.e2e.conftest import McpServers
from tests.e2e.fake_llms import Llms
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack
from tests.e2e.test_tasks import _finished
from tests.fakes.llm import Call, Reply


def _register(api: object, name: str, url: str, **fields: str) -> dict[str, object]:
    answer = api.put(f"/v1/mcp-servers/{name}", json={"url": url, **fields})  # type: ignore[attr-defined]
    assert answer.status_code in (200, 201), answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_a_servers_tools_join_the_catalogue_and_run_as_any_tool(
    stack: Stack, tenant: str, mcp_servers: McpServers
) -> None:
    url = f"http://127.0.0.1:{mcp_servers.port}/mcp"
    with stack.client(tenant) as api:
        first = api.put("/v1/mcp-servers/ref", json={"url": url})
        assert first.status_code == 201, first.text
        server = first.json()
        assert server["name"] == "ref" and server["url"] == url and "credential" not in server
        assert "ref__add" in server["tools"] and "ref__camelcase_tool" in server["tools"]
        assert api.put("/v1/mcp-servers/ref", json={"url": url}).status_code == 200
        assert [s["name"] for s in api.get("/v1/mcp-servers").json()["mcp_servers"]] == ["ref"]
        assert api.get("/v1/mcp-servers/ref").json()["tools"] == server["tools"]

        tools = {t["tool_id"]: t for t in api.get("/v1/tools").json()["tools"]}
        assert tools["ref__add"]["type"] == "mcp"
        assert tools["ref__add"]["input_schema"]["required"] == ["a", "b"]
        assert api.get("/v1/tools/ref__echo").json()["description"] == "Echo the text back."

        added = api.post("/v1/tools/ref__add/invoke", json={"arguments": {"a": 20, "b": 22}})
        assert added.status_code == 200, added.text
        assert added.json() == {"output": {"total": 42, "terms": [20, 22]}}
        failed = api.post("/v1/tools/ref__fail/invoke", json={"arguments": {"reason": "testing"}})
        assert failed.status_code == 400
        assert failed.json()["error"]["code"] == "FAILED_PRECONDITION"
        assert "failed on purpose: testing" in failed.json()["error"]["message"]
        wrong = api.post("/v1/tools/ref__add/invoke", json={"arguments": {"a": "x", "b": 1}})
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "INVALID_ARGUMENT"

        events = api.get("/v1/audit").json()["events"]
        listed = [e for e in events if e["action"] == "mcp.list"]
        assert listed and listed[-1]["outcome"] == "ok" and listed[-1]["target"] == f"127.0.0.1:{mcp_servers.port}"
        invoked = [e for e in events if e["action"] == "tool.invoke" and e["tool_id"] == "ref__add"]
        assert [e["outcome"] for e in invoked] == ["ok", "error"]  # the call, then the arguments refused
        assert invoked[0]["target"] == f"127.0.0.1:{mcp_servers.port}"

        assert api.delete("/v1/mcp-servers/ref").status_code == 204
        assert api.get("/v1/tools/ref__add").status_code == 404
        assert api.get("/v1/mcp-servers/ref").status_code == 404


def test_mcp_tools_run_in_plans_and_the_agent_loop(
    stack: Stack, tenant: str, mcp_servers: McpServers, llms: Llms
) -> None:
    with stack.client(tenant) as api:
        _register(api, "ref", f"http://127.0.0.1:{mcp_servers.port}/mcp")
        body = {"name": "p", "instructions": "x", "tools": ["ref__add", "ref__echo"]}
        agent = api.post("/v1/agents", json=body).json()
        plan = [
            {"id": "s1", "tool": "ref__add", "arguments": {"a": 1, "b": 2}},
            {"id": "s2", "tool": "ref__echo", "arguments": {"text": "sum ${s1.output.total}"}, "depends_on": ["s1"]},
        ]
        submitted = api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": {"plan": plan}})
        task = _finished(api, submitted.json()["task_id"])
        assert task["status"] == "succeeded", task
        assert task["result"]["s2"] == {"result": "sum 3"}

        model = llms.model(Reply(calls=(Call("ref__add", {"a": 5, "b": 6}),)), Reply(text="It is 11."))
        body = {"name": "l", "instructions": "Add.", "llm": llms.config(model), "tools": ["ref__add"]}
        agent = api.post("/v1/agents", json=body).json()
        submitted = api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": "5 + 6?"})
        task = _finished(api, submitted.json()["task_id"])
        assert task["status"] == "succeeded", task
        assert task["result"] == {"answer": "It is 11."}
        first, second = llms.requests(model)
        assert "ref__add" in str(first) and '"total": 11' in str(second).replace('\\"', '"')


def test_refusals_a_member_another_tenant_a_private_url_and_a_server_that_is_down(
    stack: Stack, tenant: str, mcp_servers: McpServers, closed_port: int, third_party: FakeThirdParty
) -> None:
    url = f"http://127.0.0.1:{mcp_servers.port}/mcp"
    with stack.client(tenant, role="member") as member:
        denied = member.put("/v1/mcp-servers/ref", json={"url": url})
        assert denied.status_code == 403
    with stack.client(tenant) as api:
        private = api.put("/v1/mcp-servers/priv", json={"url": "http://10.0.0.7/mcp"})
        assert private.status_code == 403 and private.json()["error"]["code"] == "PERMISSION_DENIED"
        loopback = api.put("/v1/mcp-servers/loop", json={"url": "http://127.0.0.1:9/mcp"})
        assert loopback.status_code == 403
        # An allowed host that redirects: never followed, wherever it leads (a private address, or even another
        # allowed MCP server), so the guard's check is always of the URL actually called.
        for to in ("http://10.0.0.7/mcp", f"http://127.0.0.1:{mcp_servers.port}/mcp"):
            hop = api.put("/v1/mcp-servers/hop", json={"url": f"{third_party.base_url}/redirect?to={to}"})
            assert hop.status_code == 403 and "redirect" in hop.json()["error"]["message"], hop.text
        assert api.get("/v1/mcp-servers/hop").status_code == 404
        huge = {"url": url, "tool_options": {f"t{i}": {} for i in range(201)}}
        assert api.put("/v1/mcp-servers/huge", json=huge).status_code == 400
        down = api.put("/v1/mcp-servers/down", json={"url": f"http://127.0.0.1:{closed_port}/mcp"})
        assert down.status_code == 503 and "Retry-After" in down.headers
        assert api.get("/v1/tools").status_code == 200
        _register(api, "ref", url)
    with stack.client("other-" + tenant) as other:
        assert other.get("/v1/mcp-servers/ref").status_code == 404
        assert other.get("/v1/tools/ref__add").status_code == 404
        assert other.post("/v1/tools/ref__add/invoke", json={"arguments": {"a": 1, "b": 2}}).status_code == 404
        assert other.delete("/v1/mcp-servers/ref").status_code == 404


def test_a_credential_reaches_the_server_and_never_comes_back(
    stack: Stack, tenant: str, mcp_servers: McpServers
) -> None:
    url = f"http://127.0.0.1:{mcp_servers.locked_port}/mcp"
    with stack.client(tenant) as api:
        without = api.put("/v1/mcp-servers/locked", json={"url": url})
        assert without.status_code == 400 and "refused the credential" in without.json()["error"]["message"]
        key = {"type": "api_key", "value": mcp_servers.token}
        assert api.put("/v1/credentials/mcp-key", json=key).status_code == 201
        server = _register(api, "locked", url, credential="mcp-key")
        assert server["credential"] == "mcp-key"
        answer = api.post("/v1/tools/locked__whoami/invoke", json={"arguments": {}})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"output": {"authorization": "Bearer [redacted]"}}  # it arrived, and is redacted
        audit = api.get("/v1/audit").text
        assert mcp_servers.token not in audit and mcp_servers.token not in api.get("/v1/tools").text
    assert mcp_servers.token not in stack.logs()


def _until_status(api: object, path: str, status: int, deadline: float = 15.0) -> dict[str, object]:
    """GET ``path`` until it answers ``status`` (the server's list is followed in the background)."""
    end = time.monotonic() + deadline
    while True:
        answer = api.get(path)  # type: ignore[attr-defined]
        if answer.status_code == status:
            return answer.json()  # type: ignore[no-any-return]
        assert time.monotonic() < end, f"{path} still answers {answer.status_code}"
        time.sleep(0.05)


def test_a_servers_changed_tool_list_reaches_the_catalogue_and_a_gone_tool_fails_clearly(
    stack: Stack, tenant: str, mcp_servers: McpServers
) -> None:
    name = f"late_{uuid.uuid4().hex[:8]}"  # the reference server is shared: a name of this test's own
    url = f"http://127.0.0.1:{mcp_servers.port}/mcp"
    with stack.client(tenant) as api:
        options = {name: {"cacheable_seconds": 60, "requires_approval": True}}
        server = _register(api, "ref", url, tool_options=options)  # type: ignore[arg-type]
        assert server["tool_options"] == {name: {"cacheable_seconds": 60, "requires_approval": True}}
        assert f"ref__{name}" not in server["tools"]
        grown = api.post("/v1/tools/ref__grow/invoke", json={"arguments": {"name": name}})
        assert grown.status_code == 200 and grown.json()["output"]["result"] >= 1, grown.text

        tool = _until_status(api, f"/v1/tools/ref__{name}", 200)  # listed again on the server's notification
        assert tool["type"] == "mcp" and tool["description"] == f"Added at runtime: {name}."
        assert tool["cacheable_seconds"] == 60 and tool["requires_approval"] is True  # the options waited for it
        assert f"ref__{name}" in api.get("/v1/mcp-servers/ref").json()["tools"]
        first = api.post(f"/v1/tools/ref__{name}/invoke", json={"arguments": {"text": "hi"}})
        assert first.json() == {"output": {"result": f"{name} hi"}}, first.text
        again = api.post(f"/v1/tools/ref__{name}/invoke", json={"arguments": {"text": "hi"}})
        assert again.json() == {"output": {"result": f"{name} hi"}, "cached": True}
        agent = api.post("/v1/agents", json={"name": "a", "instructions": "x", "tools": [f"ref__{name}"]}).json()

        assert api.post("/v1/tools/ref__shrink/invoke", json={"arguments": {"name": name}}).status_code == 200
        _until_status(api, f"/v1/tools/ref__{name}", 404)
        gone = api.post(f"/v1/tools/ref__{name}/invoke", json={"arguments": {"text": "hi"}})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "NOT_FOUND"
        plan = {"plan": [{"id": "s1", "tool": f"ref__{name}", "arguments": {"text": "hi"}}]}
        submitted = api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": plan})
        assert submitted.status_code in (202, 400, 404), submitted.text
        if submitted.status_code == 202:
            task = _finished(api, submitted.json()["task_id"])
            assert task["status"] == "failed" and f"ref__{name}" in str(task["error"]), task
        else:
            assert f"ref__{name}" in submitted.json()["error"]["message"]
    with stack.client("other-" + tenant) as other:  # another tenant: the server and its options are not there
        assert other.get(f"/v1/tools/ref__{name}").status_code == 404
        assert other.get("/v1/mcp-servers/ref").status_code == 404


def test_tool_options_limit_and_cache_an_mcp_tool_as_a_custom_tools_fields_do(
    stack: Stack, tenant: str, mcp_servers: McpServers
) -> None:
    url = f"http://127.0.0.1:{mcp_servers.port}/mcp"
    with stack.client(tenant) as api:
        bad = api.put("/v1/mcp-servers/ref", json={"url": url, "tool_options": {"add": {"rate_limit": {"x": 1}}}})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_ARGUMENT"
        options = {
            "add": {"rate_limit": {"requests": 1, "per_seconds": 3600}},
            "echo": {"fallback_tool_id": "ref__add"},
        }
        _register(api, "ref", url, tool_options=options)  # type: ignore[arg-type]
        tool = api.get("/v1/tools/ref__add").json()
        assert tool["rate_limit"] == {"requests": 1, "per_seconds": 3600}
        assert api.get("/v1/tools/ref__echo").json()["fallback_tool_id"] == "ref__add"
        assert api.post("/v1/tools/ref__add/invoke", json={"arguments": {"a": 1, "b": 2}}).status_code == 200
        over = api.post("/v1/tools/ref__add/invoke", json={"arguments": {"a": 1, "b": 2}})
        assert over.status_code == 429 and "Retry-After" in over.headers
        assert api.post("/v1/tools/ref__echo/invoke", json={"arguments": {"text": "x"}}).status_code == 200


def test_a_tool_past_its_timeout_option_falls_back_as_any_tool_does(
    stack: Stack, tenant: str, mcp_servers: McpServers, third_party: FakeThirdParty
) -> None:
    url = f"http://127.0.0.1:{mcp_servers.port}/mcp"
    with stack.client(tenant) as api:
        fallback = {
            "tool_id": "slow_fallback",
            "name": "Answers at once",
            "endpoint": f"{third_party.base_url}/fallback",
            "input_schema": {"type": "object"},
        }
        assert api.post("/v1/tools", json=fallback).status_code == 201
        options = {"slow": {"timeout_seconds": 0.5, "fallback_tool_id": "slow_fallback"}}
        _register(api, "ref", url, tool_options=options)  # type: ignore[arg-type]
        fast = api.post("/v1/tools/ref__slow/invoke", json={"arguments": {"seconds": 0.01}})
        assert fast.json() == {"output": {"result": 0.01}}, fast.text
        slow = api.post("/v1/tools/ref__slow/invoke", json={"arguments": {"seconds": 5}})
        assert slow.status_code == 200, slow.text  # 0.5 s, not the stack's 10 s deadline: then the fallback
        assert slow.json()["output"]["path"] == "/fallback" and slow.json()["output"]["json"] == {"seconds": 5}
        audit = [e for e in api.get("/v1/audit").json()["events"] if e["action"] == "tool.invoke"]
        assert [(e["tool_id"], e["outcome"]) for e in audit[-2:]] == [("ref__slow", "error"), ("slow_fallback", "ok")]
