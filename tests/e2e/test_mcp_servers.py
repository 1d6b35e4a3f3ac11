"""MCP servers end to end: the reference FastMCP server registered by a tenant, its tools listed, invoked, bound to
agents, in plans and in the agent loop; a server that is down, another tenant, a member, a private URL, and a
credential that reaches the server and nowhere else."""

from __future__ import annotations

from tests.e2e.conftest import McpServers
from tests.e2e.fake_llms import Llms
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
    stack: Stack, tenant: str, mcp_servers: McpServers, closed_port: int
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
