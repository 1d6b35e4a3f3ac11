"""services.tool.executor.ToolExecutor: built-ins in-process, ``http_request`` and custom tools through the egress
guard to a real HTTP server, the credential of one call, what a third party's body becomes, and argument checks.

The third parties are :class:`tests.unit.test_egress.FakeApi` servers on 127.0.0.1 that record every request; the
egress policy allows two of them (``api`` and ``other``, for redirects between origins) and not the third
(``private``). The registry is real, on a TenantStore over the in-process MemoryBackend.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from altan import context
from altan.api.tools import parse_tool_spec
from altan.context import RequestContext
from altan.egress import EgressGuard, EgressPolicy
from altan.errors import EgressRefused, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from altan.outbound import GuardedHttpClient
from altan.store import MemoryBackend, TenantStore
from altan.wire import MAX_JSON_DEPTH
from services.tool.executor import REDACTED, Credential, Execution, ToolExecutor, redact
from services.tool.registry import ToolRegistry
from services.tool.schema import ArgumentValidator
from tests.unit.test_egress import FakeApi

API_KEY = Credential(name="crm-key", header="X-Api-Key", prefix="", value="key-123-secret")
BEARER = Credential(name="github", header="Authorization", prefix="Bearer ", value="gh-token-secret")
JSON = {"Content-Type": "application/json"}


def as_admin() -> None:
    """Bind a verified admin of tenant acme to the running test (as the server interceptor does)."""
    context.bind(RequestContext(tenant_id="acme", user="alice", role="admin", token="t"))


@dataclass
class Rig:
    executor: ToolExecutor
    registry: ToolRegistry
    api: FakeApi  # allowed
    other: FakeApi  # allowed, another origin
    private: FakeApi  # on loopback and not allowed: the guard refuses it

    def bound(self, credential: Credential, *hosts: str) -> Credential:
        """``credential`` with ``hosts`` (``api``'s origin when none are given)."""
        return replace(credential, hosts=hosts or (self.api.origin,))

    async def custom_tool(self, **fields: Any) -> str:
        """Store a custom tool (endpoint on ``api`` unless given) and return its id."""
        spec = {"tool_id": "crm", "name": "CRM", "endpoint": f"http://{self.api.origin}/contacts"} | fields
        return str((await self.registry.create(parse_tool_spec(spec)))["tool_id"])


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    servers = [await FakeApi().start() for _ in range(3)]
    api, other, private = servers
    http = GuardedHttpClient(EgressGuard(EgressPolicy.parse(f"{api.origin},{other.origin}")))
    registry = ToolRegistry(TenantStore(MemoryBackend(), "tool"))
    try:
        yield Rig(ToolExecutor(registry, http, ArgumentValidator()), registry, api, other, private)
    finally:
        await http.aclose()
        for server in servers:
            await server.stop()


# --- built-ins ------------------------------------------------------------------------------------------------------


async def test_self_contained_built_ins_run_in_process(rig: Rig) -> None:
    data = {"orders": [{"id": 7}, {"id": 9}]}
    extracted = await rig.executor.execute("json_extract", {"data": data, "path": "orders[1].id"}, None, None)
    assert extracted == Execution(output={"value": 9, "found": True}, http_status=0, target="", retry_after=None)
    filled = await rig.executor.execute(
        "text_template", {"template": "Hi {{ name }}, {{ n }}", "values": {"name": "Ada", "n": [1]}}, API_KEY, 5
    )
    assert filled.output == {"text": "Hi Ada, [1]"}
    assert rig.api.seen == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"data": {}}, "arguments: 'path' is a required property"),
        ({"data": {}, "path": 5}, "arguments.path: 5 is not of type 'string'"),
        ({"data": {}, "path": "a", "extra": 1}, "arguments: Additional properties are not allowed ('extra' was "),
        ([{"data": {}, "path": "a"}], "arguments: must be a JSON object"),
    ],
    ids=["missing", "wrong-type", "unknown", "not-an-object"],
)
async def test_built_in_arguments_are_checked_against_their_schema(rig: Rig, arguments: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await rig.executor.execute("json_extract", arguments, None, None)
    assert caught.value.message.startswith(message)


async def test_an_unknown_tool_is_not_found(rig: Rig) -> None:
    as_admin()
    with pytest.raises(NotFound, match="tool 'nope' not found"):
        await rig.executor.execute("nope", {}, None, None)


# --- http_request ---------------------------------------------------------------------------------------------------


async def test_http_request_sends_what_its_arguments_say_and_answers_the_parsed_body(rig: Rig) -> None:
    rig.api.routes["/v1/items"] = (201, {**JSON, "Retry-After": "7"}, b'{"id": "it_1", "ok": true}')
    arguments = {
        "url": f"http://{rig.api.origin}/v1/items?existing=1",
        "method": "POST",
        "headers": {"X-Trace": "abc"},
        "query": {"page": 2, "tags": ["a", "b"]},
        "json": {"name": "Ada", "n": [1, 2]},
    }
    result = await rig.executor.execute("http_request", arguments, None, 5)
    assert result == Execution(output={"id": "it_1", "ok": True}, http_status=201, target=rig.api.origin, retry_after=7)
    (seen,) = rig.api.seen
    assert (seen.method, seen.path) == ("POST", "/v1/items?existing=1&page=2&tags=a&tags=b")
    assert json.loads(seen.body) == {"name": "Ada", "n": [1, 2]}
    assert (seen.headers["content-type"], seen.headers["x-trace"]) == ("application/json", "abc")
    assert "x-api-key" not in seen.headers and "authorization" not in seen.headers


async def test_http_request_sends_a_raw_body_and_reports_error_statuses_as_answers(rig: Rig) -> None:
    rig.api.routes["/upload"] = (503, {**JSON, "Retry-After": "3"}, b'{"error": "busy"}')
    arguments = {"url": f"http://{rig.api.origin}/upload", "method": "PUT", "body": "raw text ü"}
    result = await rig.executor.execute("http_request", arguments, None, 5)
    assert (result.output, result.http_status, result.retry_after) == ({"error": "busy"}, 503, 3)
    assert (rig.api.seen[0].method, rig.api.seen[0].body) == ("PUT", "raw text ü".encode())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"method": "GET"}, "arguments: 'url' is a required property"),
        ({"url": "URL", "method": "FETCH"}, "arguments.method: 'FETCH' is not one of ['GET', "),
        ({"url": "URL", "headers": {"X-Count": 1}}, "arguments.headers['X-Count']: 1 is not of type 'string'"),
        ({"url": "URL", "json": {"a": 1}, "body": "b"}, "arguments: give 'json' or 'body', not both"),
    ],
    ids=["no-url", "bad-method", "header-not-a-string", "json-and-body"],
)
async def test_http_request_arguments_failing_the_schema_are_refused_naming_the_path(
    rig: Rig, arguments: dict[str, Any], message: str
) -> None:
    if "url" in arguments:
        arguments["url"] = f"http://{rig.api.origin}/"
    with pytest.raises(InvalidArgument) as caught:
        await rig.executor.execute("http_request", arguments, None, 5)
    assert caught.value.message.startswith(message)
    assert rig.api.seen == []


async def test_http_request_naming_a_credential_that_did_not_arrive_fails_clearly(rig: Rig) -> None:
    arguments = {"url": f"http://{rig.api.origin}/", "credential": "github"}
    with pytest.raises(FailedPrecondition, match="credential 'github' was not provided"):
        await rig.executor.execute("http_request", arguments, None, 5)
    assert rig.api.seen == []


async def test_the_credential_is_sent_with_its_call_only(rig: Rig) -> None:
    rig.api.routes["/me"] = (200, JSON, b'{"login": "ada"}')
    url = f"http://{rig.api.origin}/me"
    result = await rig.executor.execute("http_request", {"url": url, "credential": "github"}, rig.bound(BEARER), 5)
    assert result.output == {"login": "ada"}
    await rig.executor.execute("http_request", {"url": url}, None, 5)
    with_it, without = rig.api.seen
    assert with_it.headers["authorization"] == "Bearer gh-token-secret"
    assert "authorization" not in without.headers
    # The secret never comes back in what the call answers.
    assert "gh-token-secret" not in repr(result)


async def test_the_credential_header_is_kept_on_the_same_origin_and_dropped_across_origins(rig: Rig) -> None:
    rig.api.routes["/start"] = (302, {"Location": "/moved"}, b"")
    rig.api.routes["/moved"] = (307, {"Location": f"http://{rig.other.origin}/end"}, b"")
    rig.other.routes["/end"] = (200, JSON, b'{"done": true}')
    arguments = {"url": f"http://{rig.api.origin}/start", "headers": {"X-Trace": "abc"}, "credential": "crm-key"}
    result = await rig.executor.execute("http_request", arguments, rig.bound(API_KEY), 5)
    assert (result.output, result.target) == ({"done": True}, rig.other.origin)
    assert [s.headers.get("x-api-key") for s in rig.api.seen] == ["key-123-secret", "key-123-secret"]
    (final,) = rig.other.seen
    assert "x-api-key" not in final.headers
    assert final.headers["x-trace"] == "abc"  # only the credential is dropped


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        ((), "http://{api}/"),  # no hosts: http_request may not use it at all
        (("{other}",), "http://{api}/"),
        (("127.0.0.1",), "http://{api}/"),  # no port: https on 443 only
        (("{api}",), "http://{other}/"),
        (("{api}",), "http://{api}@{other}/"),  # userinfo is not the host
        (("{api}",), "http://{other}/?{api}"),
    ],
    ids=["no-hosts", "another-host", "no-port-means-443", "another-port", "userinfo", "in-the-query"],
)
async def test_http_request_sends_a_credential_only_to_its_hosts(rig: Rig, hosts: tuple[str, ...], url: str) -> None:
    origins = {"api": rig.api.origin, "other": rig.other.origin}
    credential = replace(API_KEY, hosts=tuple(h.format(**origins) for h in hosts))
    with pytest.raises(EgressRefused, match=r"the credential may not be sent to 127\.0\.0\.1:") as caught:
        await rig.executor.execute("http_request", {"url": url.format(**origins), "credential": "k"}, credential, 5)
    assert caught.value.target in (rig.api.origin, rig.other.origin)
    assert rig.api.seen == [] and rig.other.seen == []


async def test_http_request_credential_hosts_match_every_spelling_of_the_host(rig: Rig) -> None:
    rig.api.routes["/"] = (200, JSON, b"{}")
    credential = rig.bound(API_KEY, f"127.0.0.1.:{rig.api.port}")
    for spelling in ("127.0.0.1", "0x7f000001", "2130706433", "127.1", "[::ffff:127.0.0.1]"):
        url = f"http://{spelling}:{rig.api.port}/"
        await rig.executor.execute("http_request", {"url": url, "credential": "k"}, credential, 5)
    assert [s.headers["x-api-key"] for s in rig.api.seen] == ["key-123-secret"] * 5


async def test_a_secret_the_third_party_echoes_is_redacted_from_the_output(rig: Rig) -> None:
    echoed = {"headers": {"X-Api-Key": "key-123-secret"}, "key-123-secret": ["a key-123-secret b", 1, None]}
    rig.api.routes["/echo"] = (401, JSON, json.dumps(echoed).encode())
    rig.api.routes["/text"] = (200, {}, b"you sent key-123-secret")
    credential = rig.bound(API_KEY)
    for path in ("/echo", "/text"):
        result = await rig.executor.execute("http_request", {"url": f"http://{rig.api.origin}{path}"}, credential, 5)
        assert "key-123-secret" not in json.dumps(result.output) and REDACTED in json.dumps(result.output)
    as_admin()
    tool_id = await rig.custom_tool(endpoint=f"http://{rig.api.origin}/echo", auth="api_key", credential="crm-key")
    result = await rig.executor.execute(tool_id, {}, API_KEY, 5)
    assert result.output == {"headers": {"X-Api-Key": REDACTED}, REDACTED: [f"a {REDACTED} b", 1, None]}
    assert result.http_status == 401
    # Without a credential nothing is rewritten.
    assert redact({"a": ["x"]}, "y") == {"a": ["x"]}


async def test_http_request_goes_through_the_egress_guard(rig: Rig) -> None:
    with pytest.raises(EgressRefused, match="loopback") as caught:
        await rig.executor.execute("http_request", {"url": f"http://{rig.private.origin}/"}, None, 5)
    assert caught.value.target == rig.private.origin
    assert rig.private.seen == []


async def test_the_timeout_bounds_the_whole_call(rig: Rig) -> None:
    rig.api.routes["/slow"] = "hang"
    with pytest.raises(Unavailable, match="timed out"):
        await rig.executor.execute("http_request", {"url": f"http://{rig.api.origin}/slow"}, None, 0.2)


# --- what a body becomes --------------------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("content_type", "body", "output"),
    [
        ("application/json", b'{"a": [1, 2.5, null]}', {"a": [1, 2.5, None]}),
        ("application/problem+json; charset=utf-8", b'{"title": "Nope"}', {"title": "Nope"}),
        ("text/plain", b"hello \xc3\xbc", "hello ü"),
        ("text/plain", b'{"a": 1}', '{"a": 1}'),  # JSON only when it says it is
        ("application/json", b"{not json", "{not json"),
        ("application/json", b'{"n": NaN}', '{"n": NaN}'),
        ("application/json", nested(MAX_JSON_DEPTH + 1), nested(MAX_JSON_DEPTH + 1).decode()),
        ("application/json", nested(MAX_JSON_DEPTH), json.loads(nested(MAX_JSON_DEPTH))),
        ("application/octet-stream", b"\xff\xfeok", "\ufffd\ufffdok"),
        ("application/json", b"", None),
        ("Application/JSON", b'{"a": 1}', {"a": 1}),  # media types are case-insensitive (RFC 9110 8.3.1)
    ],
    ids=[
        "json",
        "json-suffix",
        "text",
        "json-as-text",
        "malformed",
        "nan",
        "too-deep",
        "deep-enough",
        "binary",
        "empty",
        "json-in-capitals",
    ],
)
async def test_a_json_body_is_parsed_and_anything_else_is_text(
    rig: Rig, content_type: str, body: bytes, output: Any
) -> None:
    rig.api.routes["/body"] = (200, {"Content-Type": content_type}, body)
    result = await rig.executor.execute("http_request", {"url": f"http://{rig.api.origin}/body"}, None, 5)
    assert result.output == output
    assert result.http_status == 200


# --- custom tools ---------------------------------------------------------------------------------------------------


async def test_a_custom_tool_fills_its_path_and_sends_the_rest_as_a_json_body(rig: Rig) -> None:
    as_admin()
    tool_id = await rig.custom_tool(
        endpoint=f"http://{rig.api.origin}/contacts/{{contact_id}}",
        method="PATCH",
        parameters=[
            {"name": "contact_id", "type": "string", "required": True},
            {"name": "name", "type": "string"},
        ],
    )
    rig.api.routes["/contacts/c%2F..%3F1"] = (200, JSON, b'{"updated": true}')
    result = await rig.executor.execute(tool_id, {"contact_id": "c/..?1", "name": "Ada"}, None, 5)
    assert (result.output, result.http_status, result.target) == ({"updated": True}, 200, rig.api.origin)
    (seen,) = rig.api.seen
    assert (seen.method, seen.path, json.loads(seen.body)) == ("PATCH", "/contacts/c%2F..%3F1", {"name": "Ada"})


async def test_a_custom_get_tool_sends_its_arguments_as_the_query(rig: Rig) -> None:
    as_admin()
    tool_id = await rig.custom_tool(
        method="GET",
        parameters=[{"name": "q", "type": "string"}, {"name": "limit", "type": "integer"}],
    )
    rig.api.routes["/contacts"] = (200, JSON, b"[]")
    await rig.executor.execute(tool_id, {"q": "a b", "limit": 3}, None, 5)
    (seen,) = rig.api.seen
    assert (seen.method, seen.path, seen.body) == ("GET", "/contacts?q=a+b&limit=3", b"")


async def test_a_custom_tool_with_auth_gets_its_credential_and_fails_clearly_without_it(rig: Rig) -> None:
    as_admin()
    tool_id = await rig.custom_tool(auth="api_key", credential="crm-key", parameters=[{"name": "q", "type": "string"}])
    rig.api.routes["/contacts"] = (200, JSON, b'{"ok": 1}')
    with pytest.raises(FailedPrecondition, match="tool 'crm' needs credential 'crm-key'"):
        await rig.executor.execute(tool_id, {"q": "x"}, None, 5)
    assert rig.api.seen == []

    await rig.executor.execute(tool_id, {"q": "x"}, API_KEY, 5)
    (seen,) = rig.api.seen
    assert seen.headers["x-api-key"] == "key-123-secret"
    assert json.loads(seen.body) == {"q": "x"}  # the credential travels in its header only


async def test_a_custom_tool_drops_its_credential_when_redirected_to_another_origin(rig: Rig) -> None:
    as_admin()
    tool_id = await rig.custom_tool(auth="api_key", credential="crm-key")
    rig.api.routes["/contacts"] = (308, {"Location": f"http://{rig.other.origin}/landing"}, b"")
    rig.other.routes["/landing"] = (200, JSON, b'{"landed": true}')
    result = await rig.executor.execute(tool_id, {}, API_KEY, 5)
    assert (result.output, result.target) == ({"landed": True}, rig.other.origin)
    assert rig.api.seen[0].headers["x-api-key"] == "key-123-secret"
    assert "x-api-key" not in rig.other.seen[0].headers


async def test_a_custom_tool_without_auth_sends_no_credential(rig: Rig) -> None:
    as_admin()
    tool_id = await rig.custom_tool()
    rig.api.routes["/contacts"] = (200, JSON, b"{}")
    await rig.executor.execute(tool_id, {}, None, 5)
    assert "x-api-key" not in rig.api.seen[0].headers


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"items": [{"sku": "a", "qty": "two"}]}, "arguments.items[0].qty: 'two' is not of type 'integer'"),
        ({"items": [], "note": 5}, "arguments.note: 5 is not of type 'string'"),
        ({}, "arguments: 'items' is a required property"),
    ],
    ids=["nested", "top-level", "missing"],
)
async def test_custom_tool_arguments_failing_its_schema_are_refused_naming_the_path(
    rig: Rig, arguments: dict[str, Any], message: str
) -> None:
    as_admin()
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"],
                },
            },
            "note": {"type": "string"},
        },
        "required": ["items"],
    }
    tool_id = await rig.custom_tool(input_schema=schema)
    with pytest.raises(InvalidArgument) as caught:
        await rig.executor.execute(tool_id, arguments, None, 5)
    assert caught.value.message == message
    assert rig.api.seen == []


async def test_a_custom_tool_goes_through_the_egress_guard(rig: Rig) -> None:
    as_admin()
    tool_id = await rig.custom_tool(endpoint=f"http://{rig.private.origin}/contacts")
    with pytest.raises(EgressRefused, match="loopback"):
        await rig.executor.execute(tool_id, {}, None, 5)
    assert rig.private.seen == []
