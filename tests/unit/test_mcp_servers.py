"""MCP servers as tool providers (services/tool/mcp.py) against the reference FastMCP server, a real process on a
real socket: listing into the catalogue, calls and their outputs, errors, credentials, and the egress guard."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import pytest

from altan import context, outbound
from altan.api.mcp import McpServerSpec, parse_mcp_server_spec
from altan.api.tools import tool_to_proto
from altan.context import RequestContext
from altan.egress import EgressGuard, EgressPolicy
from altan.errors import (
    DeadlineExceeded,
    EgressRefused,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from altan.outbound import GuardedHttpClient
from altan.store import MemoryBackend, TenantStore
from services.tool.executor import Credential, ToolExecutor
from services.tool.mcp import McpServers, mcp_tool_id
from services.tool.registry import ToolRegistry
from services.tool.schema import ArgumentValidator
from tests.fakes.mcp_server import start_process, stop_process

TOKEN = "mcp-token-secret-42"
CREDENTIAL = Credential(name="mcp-key", header="Authorization", prefix="Bearer ", value=TOKEN)


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    """The reference server without and with a required token."""
    open_server, open_port = start_process()
    locked_server, locked_port = start_process(token=TOKEN)
    try:
        yield open_port, locked_port
    finally:
        stop_process(open_server)
        stop_process(locked_server)


def as_role(role: str = "admin", tenant: str = "acme") -> None:
    context.bind(RequestContext(tenant_id=tenant, user="alice", role=role, token="t"))


@dataclass
class Rig:
    mcp: McpServers
    registry: ToolRegistry
    executor: ToolExecutor
    url: str
    locked_url: str


@pytest.fixture
async def rig(ports: tuple[int, int]) -> AsyncIterator[Rig]:
    open_port, locked_port = ports
    policy = EgressPolicy.parse(f"127.0.0.1:{open_port},127.0.0.1:{locked_port}")
    http = GuardedHttpClient(EgressGuard(policy), max_response_bytes=64 * 1024)
    store = TenantStore(MemoryBackend(), "tool")
    mcp = McpServers(store, http.transport, default_timeout=10)
    registry = ToolRegistry(store, mcp=mcp)
    executor = ToolExecutor(registry, http, ArgumentValidator(), mcp=mcp, default_timeout=10)
    as_role()
    try:
        yield Rig(mcp, registry, executor, f"http://127.0.0.1:{open_port}/mcp", f"http://127.0.0.1:{locked_port}/mcp")
    finally:
        await mcp.aclose()
        await http.aclose()


def test_tool_ids_join_server_and_tool_names_within_the_id_rules() -> None:
    assert mcp_tool_id("ref", "add") == "ref__add"
    assert mcp_tool_id("ref", "camelCase.Tool") == "ref__camelcase_tool"


async def test_a_servers_tools_join_the_tenants_catalogue_with_their_schemas(rig: Rig) -> None:
    server, created = await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    assert created
    assert sorted(server["tools"]) == [
        "ref__add",
        "ref__camelcase_tool",
        "ref__echo",
        "ref__fail",
        "ref__grow",
        "ref__remember",
        "ref__sessions",
        "ref__shrink",
        "ref__slow",
        "ref__whoami",
    ]
    listed = {t["tool_id"]: t for t in await rig.registry.all() if t["type"] == "mcp"}
    assert listed["ref__add"]["input_schema"]["required"] == ["a", "b"]
    assert listed["ref__add"]["description"] == "Add two integers."
    assert (await rig.registry.get("ref__echo"))["mcp_tool"] == "echo"
    assert [t["tool_id"] for t in await rig.registry.some(["ref__add", "nope__x", "json_extract"])] == [
        "ref__add",
        "json_extract",
    ]
    _, created = await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    assert not created


async def test_calls_answer_structured_content_or_text_and_error_results_fail_clearly(rig: Rig) -> None:
    await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    added = await rig.executor.execute("ref__add", {"a": 2, "b": 3}, None, None)
    assert added.output == {"total": 5, "terms": [2, 3]}
    assert added.target == rig.url.split("/")[2]
    assert (await rig.executor.execute("ref__camelcase_tool", {"x": 4}, None, None)).output == {"result": 8}
    with pytest.raises(FailedPrecondition, match=r"ref__fail': .*failed on purpose: why"):
        await rig.executor.execute("ref__fail", {"reason": "why"}, None, None)
    with pytest.raises(InvalidArgument, match="arguments"):
        await rig.executor.execute("ref__add", {"a": "two"}, None, None)  # the schema, checked before the call


async def test_a_task_steps_idempotency_key_goes_in_the_calls_meta(rig: Rig) -> None:
    await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    tool = await rig.registry.get("ref__remember")
    name = f"keys-{uuid.uuid4().hex[:8]}"
    assert await rig.mcp.invoke(tool, {"name": name}, None, None, "tsk_1:s1") == {"result": ["tsk_1:s1"]}
    assert await rig.mcp.invoke(tool, {"name": name}, None, None) == {"result": ["tsk_1:s1", ""]}  # no task's step


async def test_a_credential_reaches_the_server_and_is_redacted_from_outputs(rig: Rig) -> None:
    with pytest.raises(FailedPrecondition, match="refused the credential"):
        await rig.mcp.sync("locked", McpServerSpec(url=rig.locked_url, credential="mcp-key"), None, None)
    spec = McpServerSpec(url=rig.locked_url, credential="mcp-key")
    await rig.mcp.sync("locked", spec, CREDENTIAL, None)
    with pytest.raises(FailedPrecondition, match="needs credential 'mcp-key'"):
        await rig.executor.execute("locked__whoami", {}, None, None)
    answer = await rig.executor.execute("locked__whoami", {}, CREDENTIAL, None)
    assert answer.output == {"authorization": "Bearer [redacted]"}  # it arrived, and does not come back


async def test_a_server_that_is_down_is_unavailable_and_the_catalogue_still_answers(rig: Rig) -> None:
    await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    tool = await rig.registry.get("ref__echo")
    down = {**tool, "mcp_url": rig.url.replace(rig.url.split(":")[2].split("/")[0], "1")}  # nothing listens on 1
    policy = EgressPolicy.parse("127.0.0.1:1")
    http = GuardedHttpClient(EgressGuard(policy))
    try:
        with pytest.raises(Unavailable, match="MCP server 'ref' is unavailable"):
            await McpServers(TenantStore(MemoryBackend(), "tool"), http.transport).invoke(down, {"text": "x"}, None, 5)
    finally:
        await http.aclose()
    assert "ref__echo" in {t["tool_id"] for t in await rig.registry.all()}


async def test_the_egress_guard_refuses_a_private_address_that_is_not_allowed(rig: Rig) -> None:
    with pytest.raises(EgressRefused, match="loopback"):
        await rig.mcp.sync("private", McpServerSpec(url="http://127.0.0.1:9/mcp"), None, None)
    with pytest.raises(EgressRefused):
        await rig.mcp.sync("meta", McpServerSpec(url="http://169.254.169.254/mcp"), None, None)


async def test_servers_are_per_tenant_and_only_admins_change_them(rig: Rig) -> None:
    await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    as_role(tenant="globex")
    with pytest.raises(NotFound):
        await rig.mcp.get("ref")
    with pytest.raises(NotFound):
        await rig.registry.get("ref__add")
    as_role("member")
    with pytest.raises(PermissionDenied):
        await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    as_role()
    with pytest.raises(PermissionDenied, match="delete the server"):
        await rig.registry.delete("ref__add")
    await rig.mcp.delete("ref")
    with pytest.raises(NotFound):
        await rig.registry.get("ref__add")


async def test_calls_share_one_session_opened_once(rig: Rig) -> None:
    await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    before = (await rig.executor.execute("ref__sessions", {}, None, None)).output["result"]
    calls = [rig.executor.execute("ref__add", {"a": i, "b": 1}, None, None) for i in range(20)]
    assert [c.output["total"] for c in await asyncio.gather(*calls)] == [i + 1 for i in range(20)]
    assert (await rig.executor.execute("ref__sessions", {}, None, None)).output["result"] == before


async def test_another_credential_value_opens_another_session(rig: Rig) -> None:
    spec = McpServerSpec(url=rig.url, credential="mcp-key")
    await rig.mcp.sync("ref", spec, CREDENTIAL, None)
    first = await rig.executor.execute("ref__whoami", {}, CREDENTIAL, None)
    assert first.output == {"authorization": "Bearer [redacted]"}
    rotated = replace(CREDENTIAL, value="rotated-token-7")
    second = await rig.executor.execute("ref__whoami", {}, rotated, None)
    assert second.output == {"authorization": "Bearer [redacted]"}  # redacted: this call's value, not the first one
    again = await rig.executor.execute("ref__whoami", {}, CREDENTIAL, None)
    assert again.output == {"authorization": "Bearer [redacted]"}
    as_role(tenant="globex")  # another tenant never shares the session
    await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    assert (await rig.executor.execute("ref__echo", {"text": "hi"}, None, None)).output == {"result": "hi"}


async def test_a_restarted_server_is_reconnected_and_a_deleted_one_forgotten(rig: Rig) -> None:
    server, port = start_process()
    url = f"http://127.0.0.1:{port}/mcp"
    http = GuardedHttpClient(EgressGuard(EgressPolicy.parse(f"127.0.0.1:{port}")))
    mcp = McpServers(TenantStore(MemoryBackend(), "tool"), http.transport, default_timeout=10)
    try:
        await mcp.sync("ref", McpServerSpec(url=url), None, None)
        tool = await mcp.tool("ref__sessions")
        assert tool is not None
        assert await mcp.invoke(tool, {}, None, None) == {"result": 1}  # the listing's session is kept for calls
        assert await mcp.invoke(tool, {}, None, None) == {"result": 1}
        stop_process(server)
        server, _ = start_process(port=port)  # a new process: it knows no session
        assert await mcp.invoke(tool, {}, None, None) == {"result": 1}
        await mcp.sync("ref", McpServerSpec(url=url), None, None)  # replaced: its calls start afresh
        assert await mcp.invoke(tool, {}, None, None) == {"result": 2}
        await mcp.delete("ref")
        await mcp.sync("ref", McpServerSpec(url=url), None, None)
        assert await mcp.invoke(tool, {}, None, None) == {"result": 3}
    finally:
        await mcp.aclose()
        await http.aclose()
        stop_process(server)


async def _until_listed(mcp: McpServers, tool_id: str, present: bool, deadline: float = 10.0) -> None:
    """Until the re-listing (in the background) has put ``tool_id`` in the catalogue or taken it out."""
    end = asyncio.get_running_loop().time() + deadline
    while (await mcp.tool(tool_id) is not None) != present:
        assert asyncio.get_running_loop().time() < end, f"{tool_id} {'never came' if present else 'never left'}"
        await asyncio.sleep(0.02)


@pytest.fixture(params=[300.0])
async def changing(request: pytest.FixtureRequest) -> AsyncIterator[tuple[McpServers, str]]:
    """A reference server of its own (its tool list changes), and MCP servers re-listing every ``param`` seconds
    (by default too seldom to matter: what changes then was heard)."""
    server, port = start_process()
    http = GuardedHttpClient(EgressGuard(EgressPolicy.parse(f"127.0.0.1:{port}")))
    mcp = McpServers(
        TenantStore(MemoryBackend(), "tool"), http.transport, default_timeout=10, relist_seconds=request.param
    )
    as_role()
    try:
        yield mcp, f"http://127.0.0.1:{port}/mcp"
    finally:
        await mcp.aclose()
        await http.aclose()
        stop_process(server)


async def test_tools_list_changed_adds_and_removes_tools(changing: tuple[McpServers, str]) -> None:
    mcp, url = changing
    await mcp.sync("ref", McpServerSpec(url=url), None, None)
    grow = await mcp.tool("ref__grow")
    assert grow is not None and await mcp.tool("ref__late") is None
    assert await mcp.invoke(grow, {"name": "late"}, None, None) == {"result": 1}  # one session told: ours
    await _until_listed(mcp, "ref__late", present=True)
    late = await mcp.tool("ref__late")
    assert late is not None and late["description"] == "Added at runtime: late."
    assert await mcp.invoke(late, {"text": "hi"}, None, None) == {"result": "late hi"}
    shrink = await mcp.tool("ref__shrink")
    assert shrink is not None
    await mcp.invoke(shrink, {"name": "late"}, None, None)
    await _until_listed(mcp, "ref__late", present=False)
    assert "ref__late" not in (await mcp.get("ref"))["tools"]
    as_role(tenant="globex")  # another tenant's catalogue never saw it
    assert await mcp.tool("ref__late") is None


@pytest.mark.parametrize("changing", [0.5], indirect=True)
async def test_a_server_that_changes_without_saying_so_is_listed_again(changing: tuple[McpServers, str]) -> None:
    mcp, url = changing
    await mcp.sync("ref", McpServerSpec(url=url), None, None)
    grow = await mcp.tool("ref__grow")
    assert grow is not None
    assert await mcp.invoke(grow, {"name": "quiet", "notify": False}, None, None) == {"result": 0}
    await _until_listed(mcp, "ref__quiet", present=True)


async def test_tool_options_apply_to_the_servers_tools(rig: Rig) -> None:
    options = {
        "add": {"rate_limit": {"requests": 2, "per_seconds": 60}, "cacheable_seconds": 30, "fallback_tool_id": "x"},
        "echo": {"requires_approval": True, "timeout_seconds": 2.5},
        "later": {"cacheable_seconds": 5},  # not listed (yet): kept for when it is
    }
    server, _ = await rig.mcp.sync(
        "ref", McpServerSpec.model_validate({"url": rig.url, "tool_options": options}), None, None
    )
    assert set(server["tool_options"]) == {"add", "echo", "later"}
    add = await rig.registry.get("ref__add")
    assert add["rate_limit"] == {"requests": 2, "per_seconds": 60}
    assert add["cacheable_seconds"] == 30 and add["fallback_tool_id"] == "x"
    proto = tool_to_proto(await rig.registry.get("ref__echo"))
    assert proto.requires_approval and proto.cacheable_seconds == 0
    assert (await rig.registry.get("ref__echo"))["timeout_seconds"] == 2.5
    assert "rate_limit" not in await rig.registry.get("ref__fail")
    itself = {"url": rig.url, "tool_options": {"add": {"fallback_tool_id": "ref__add"}}}
    server, _ = await rig.mcp.sync("ref", McpServerSpec.model_validate(itself), None, None)
    assert "ref__add" not in server["tools"]  # refused (logged), like a tool whose schema fails


def test_tool_options_are_bounded() -> None:
    with pytest.raises(InvalidArgument):
        parse_mcp_server_spec({"url": "https://mcp.example.com/mcp", "tool_options": {"a b": {}}})
    with pytest.raises(InvalidArgument):
        parse_mcp_server_spec({"url": "https://mcp.example.com/mcp", "tool_options": {"add": {"timeout_seconds": -1}}})
    many: dict[str, dict[str, object]] = {f"t{i}": {} for i in range(201)}
    with pytest.raises(InvalidArgument):
        parse_mcp_server_spec({"url": "https://mcp.example.com/mcp", "tool_options": many})
    with pytest.raises(InvalidArgument):
        parse_mcp_server_spec({"url": "https://mcp.example.com/mcp", "tool_options": {"add": {"retries": 3}}})


async def test_a_hostile_servers_long_list_and_evil_output_schema_stay_bounded() -> None:
    server, port = start_process(hostile=True)
    http = GuardedHttpClient(EgressGuard(EgressPolicy.parse(f"127.0.0.1:{port}")))
    mcp = McpServers(TenantStore(MemoryBackend(), "tool"), http.transport, default_timeout=10)
    as_role()
    try:
        stored, _ = await mcp.sync("evil", McpServerSpec(url=f"http://127.0.0.1:{port}/mcp"), None, None)
        assert len(stored["tools"]) == 200  # of the 311 it lists
        tool = await mcp.tool("evil__evil_output")
        assert tool is not None
        # Its output schema is never evaluated here (the SDK's call_tool would backtrack for minutes on it): the
        # answer is the server's, as it gave it, well within the call's budget.
        assert await mcp.invoke(tool, {}, None, 5) == {"s": "a" * 40 + "!"}
    finally:
        await mcp.aclose()
        await http.aclose()
        stop_process(server)


async def test_calls_reuse_their_connections(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK closes each SSE answer before the server's last chunk; the session reads that chunk so that httpcore
    can use the connection again instead of opening one per call."""
    opened: list[str] = []
    connect = outbound._PinnedBackend.connect_tcp

    async def counting(self: object, host: str, port: int, *args: object, **kwargs: object) -> object:
        opened.append(f"{host}:{port}")
        return await connect(self, host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(outbound._PinnedBackend, "connect_tcp", counting)
    await rig.mcp.sync("ref", McpServerSpec(url=rig.url), None, None)
    tool = await rig.mcp.tool("ref__add")
    assert tool is not None

    async def calls() -> None:
        for i in range(5):
            assert (await rig.mcp.invoke(tool, {"a": i, "b": 1}, None, None))["total"] == i + 1

    await asyncio.gather(*(calls() for _ in range(8)))
    assert len(opened) <= 8 + 2, opened  # one per call in flight at most, and the session's own (GET stream)


async def test_a_tools_timeout_option_bounds_its_calls_within_the_deadline(rig: Rig) -> None:
    spec = McpServerSpec.model_validate({"url": rig.url, "tool_options": {"slow": {"timeout_seconds": 0.3}}})
    await rig.mcp.sync("ref", spec, None, None)
    tool = await rig.mcp.tool("ref__slow")
    assert tool is not None
    assert await rig.mcp.invoke(tool, {"seconds": 0.01}, None, 10) == {"result": 0.01}
    started = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceeded, match=r"within 0\.3s"):
        await rig.mcp.invoke(tool, {"seconds": 5}, None, 10)  # the option, not the call's 10 s
    assert asyncio.get_running_loop().time() - started < 4
    with pytest.raises(DeadlineExceeded, match=r"within 0\.2s"):
        await rig.mcp.invoke(tool, {"seconds": 5}, None, 0.2)  # the call's deadline, when it is the shorter
