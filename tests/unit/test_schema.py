"""Custom tool definitions, argument validation and the HTTP request a custom tool call becomes."""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlsplit

import pytest

from altan.errors import InvalidArgument
from services.tool.schema import ArgumentValidator, build_http_request, parse_custom_tool


def slack_tool(**changes: Any) -> dict[str, Any]:
    """The seed's example tool, with ``changes`` applied (a value of ``...`` removes the field)."""
    body: dict[str, Any] = {
        "tool_id": "slack_notify",
        "name": "Send Slack Notification",
        "description": "Post a message to a channel.",
        "parameters": [
            {"name": "channel_id", "type": "string", "required": True, "description": "Channel"},
            {"name": "text", "type": "string", "required": True},
            {"name": "urgent", "type": "boolean", "default": False},
        ],
        "endpoint": "https://slack.com/api/chat.postMessage",
        "method": "POST",
        "auth": "oauth2",
        "credential": "slack",
    }
    for key, value in changes.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def schema_tool(schema: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return slack_tool(parameters=..., input_schema=schema, **changes)


def refused(body: Any) -> str:
    with pytest.raises(InvalidArgument) as caught:
        parse_custom_tool(body)
    return caught.value.message


# --- parse_custom_tool: the seed's form -------------------------------------------------------------------


def test_parameters_become_a_closed_object_schema() -> None:
    tool = parse_custom_tool(slack_tool())
    assert tool["type"] == "custom"
    assert tool["input_schema"] == {
        "type": "object",
        "properties": {
            "channel_id": {"type": "string", "description": "Channel"},
            "text": {"type": "string"},
            "urgent": {"type": "boolean", "default": False},
        },
        "required": ["channel_id", "text"],
        "additionalProperties": False,
    }
    assert [p["required"] for p in tool["parameters"]] == [True, True, False]
    assert tool["method"] == "POST"
    assert tool["credential"] == "slack"
    assert tool["cacheable_seconds"] == 0
    assert "fallback_tool_id" not in tool


def test_defaults_are_filled_in() -> None:
    tool = parse_custom_tool(
        {"tool_id": "ping", "name": "Ping", "endpoint": "https://example.com/ping", "parameters": []}
    )
    assert tool["description"] == ""
    assert tool["method"] == "POST"
    assert tool["auth"] == "none"
    assert tool["cacheable_seconds"] == 0
    assert tool["input_schema"] == {"type": "object", "properties": {}, "required": [], "additionalProperties": False}


def test_method_is_upper_case_as_in_api_md() -> None:
    # The OpenAPI document says GET, POST, ...: anything else is refused rather than silently normalized.
    assert refused(slack_tool(method="get")).startswith("method: Input should be 'GET'")


def test_enum_items_and_defaults_are_kept() -> None:
    tool = parse_custom_tool(
        slack_tool(
            method="GET",
            parameters=[
                {"name": "color", "type": "string", "enum": ["red", "blue"], "default": "red"},
                {"name": "ids", "type": "array", "items": {"type": "integer"}},
            ],
            cacheable_seconds=60,
            fallback_tool_id="http_request",
        )
    )
    assert tool["method"] == "GET"
    assert tool["input_schema"]["properties"] == {
        "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
        "ids": {"type": "array", "items": {"type": "integer"}},
    }
    assert tool["cacheable_seconds"] == 60
    assert tool["fallback_tool_id"] == "http_request"


def test_the_result_does_not_share_structure_with_the_input() -> None:
    body = slack_tool(parameters=[{"name": "ids", "type": "array", "items": {"type": "integer"}}])
    tool = parse_custom_tool(body)
    body["parameters"][0]["items"]["type"] = "string"
    assert tool["input_schema"]["properties"]["ids"]["items"] == {"type": "integer"}


def test_a_tool_read_back_with_type_custom_is_accepted() -> None:
    assert parse_custom_tool(slack_tool(type="custom"))["type"] == "custom"
    assert refused(slack_tool(type="builtin")).startswith("type:")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "tool:"),
        ("slack", "tool:"),
        (slack_tool(tool_id=...), "tool_id:"),
        (slack_tool(tool_id="Slack"), "tool_id: must match ^[a-z]"),
        (slack_tool(tool_id="1slack"), "tool_id:"),
        (slack_tool(tool_id="slack\n"), "tool_id:"),
        (slack_tool(tool_id="s" * 65), "tool_id:"),
        (slack_tool(name=...), "name:"),
        (slack_tool(name="  "), "name:"),
        (slack_tool(description=3), "description:"),
        (slack_tool(color="red"), "color: unknown field"),
        (slack_tool(input_schema={"type": "object"}), "parameters: give either"),
        (slack_tool(parameters={"channel_id": "string"}), "parameters: Input should be a valid list"),
        (slack_tool(parameters=["channel_id"]), "parameters[0]:"),
        (slack_tool(parameters=[{"name": "a b", "type": "string"}]), "parameters[0].name:"),
        (slack_tool(parameters=[{"name": "a", "type": "str"}]), "parameters[0].type:"),
        (slack_tool(parameters=[{"name": "a", "type": "string", "required": "yes"}]), "parameters[0].required:"),
        (slack_tool(parameters=[{"name": "a", "type": "string", "format": "x"}]), "parameters[0].format: unknown"),
        (slack_tool(parameters=[{"name": "a", "type": "string"}] * 2), "parameters: a parameter name is used twice"),
        (slack_tool(parameters=[{"name": "a", "type": "string", "enum": []}]), "parameters[0].enum:"),
        (slack_tool(parameters=[{"name": "a", "type": "integer", "default": "x"}]), "parameters[0].default:"),
        (
            slack_tool(parameters=[{"name": "a", "type": "string", "enum": ["x"], "default": "y"}]),
            "parameters[0].default:",
        ),
        (slack_tool(parameters=[{"name": "a", "type": "string", "items": {}}]), "parameters[0].items:"),
        (slack_tool(parameters=[{"name": "a", "type": "array", "items": {"type": 3}}]), "parameters"),
        (slack_tool(endpoint=...), "endpoint:"),
        (slack_tool(endpoint="ftp://example.com/x"), "endpoint:"),
        (slack_tool(endpoint="https:///x"), "endpoint:"),
        (slack_tool(endpoint="https://example.com:99999/x"), "endpoint:"),
        (slack_tool(endpoint="https://example.com/a b"), "endpoint:"),
        (slack_tool(endpoint="https://user:pw@example.com/x"), "endpoint: must not carry user credentials"),
        (slack_tool(endpoint="https://example.com/{nope}"), "endpoint: placeholder {nope}"),
        (slack_tool(endpoint="https://{channel_id}.example.com/x"), "endpoint: {name} placeholders are only"),
        (slack_tool(endpoint="https://example.com/x?c={channel_id}"), "endpoint: {name} placeholders are only"),
        (slack_tool(method="TRACE"), "method:"),
        (slack_tool(auth="basic"), "auth:"),
        (slack_tool(credential=...), "credential: required when auth is oauth2"),
        (slack_tool(auth="api_key", credential=""), "credential:"),
        (slack_tool(cacheable_seconds=-1), "cacheable_seconds:"),
        (slack_tool(cacheable_seconds=True), "cacheable_seconds:"),
        (slack_tool(cacheable_seconds=1.5), "cacheable_seconds:"),
        (slack_tool(fallback_tool_id="Other"), "fallback_tool_id:"),
        (slack_tool(fallback_tool_id="slack_notify"), "fallback_tool_id: a tool cannot be its own fallback"),
    ],
)
def test_problems_are_named_by_field(body: Any, field: str) -> None:
    assert refused(body).startswith(field)


def test_credential_is_optional_without_auth() -> None:
    tool = parse_custom_tool(slack_tool(auth="none", credential=...))
    assert "credential" not in tool


# --- parse_custom_tool: a full JSON Schema ----------------------------------------------------------------


def test_input_schema_is_accepted_with_local_references() -> None:
    schema = {
        "type": "object",
        "$defs": {"channel": {"type": "string", "minLength": 1}},
        "properties": {"channel_id": {"$ref": "#/$defs/channel"}, "blocks": {"type": "array"}},
        "required": ["channel_id"],
    }
    tool = parse_custom_tool(schema_tool(schema))
    assert tool["input_schema"] == schema
    assert "parameters" not in tool


def test_references_resolve_against_a_nested_id() -> None:
    schema = {
        "$id": "https://tools.example/root",
        "type": "object",
        "$defs": {"a": {"$id": "sub", "$defs": {"b": {"type": "string"}}, "properties": {"x": {"$ref": "#/$defs/b"}}}},
        "properties": {"p": {"$ref": "#/$defs/a"}, "q": {"$anchor": "q", "type": "string"}, "r": {"$ref": "#q"}},
    }
    assert parse_custom_tool(schema_tool(schema))["input_schema"] == schema


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ("object", "input_schema: Input should be a valid dictionary"),
        ({"type": "array"}, 'input_schema: must have "type": "object"'),
        ({"properties": {}}, 'input_schema: must have "type": "object"'),
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "input_schema"),
        ({"type": "object", "required": "a"}, "input_schema"),
        (
            {"type": "object", "$schema": "http://json-schema.org/draft-07/schema#"},
            "input_schema: $schema must be",
        ),
        (
            {"type": "object", "properties": {"a": {"$ref": "https://evil.example/schema.json"}}},
            "input_schema: $ref 'https://evil.example/schema.json' is remote",
        ),
        ({"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}}, "input_schema: $ref 'other.json#/x'"),
        ({"type": "object", "$dynamicRef": "https://evil.example/x"}, "input_schema: $dynamicRef"),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
            "input_schema: $ref '#/$defs/missing' does not resolve",
        ),
    ],
)
def test_bad_input_schemas_are_refused(schema: Any, message: str) -> None:
    assert refused(schema_tool(schema)).startswith(message)


def test_a_ref_inside_data_is_not_a_reference() -> None:
    schema = {"type": "object", "properties": {"a": {"const": {"$ref": "https://not.a.reference"}}}}
    assert parse_custom_tool(schema_tool(schema))["input_schema"] == schema


def test_placeholders_must_name_input_schema_properties() -> None:
    schema = {"type": "object", "properties": {"user": {"type": "string"}}}
    assert parse_custom_tool(schema_tool(schema, endpoint="https://api.example/users/{user}"))["endpoint"].endswith(
        "{user}"
    )
    assert refused(schema_tool(schema, endpoint="https://api.example/users/{id}")).startswith("endpoint:")


# --- ArgumentValidator ------------------------------------------------------------------------------------

SCHEMA = parse_custom_tool(slack_tool())["input_schema"]


def test_valid_arguments_pass() -> None:
    ArgumentValidator().validate("slack_notify", SCHEMA, {"channel_id": "C1", "text": "hi"})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"text": "hi"}, "arguments: 'channel_id' is a required property"),
        ({"channel_id": 5, "text": "hi"}, "arguments.channel_id: 5 is not of type 'string'"),
        ({"channel_id": "C", "text": "hi", "extra": 1}, "arguments: Additional properties are not allowed"),
        (["channel_id"], "arguments: must be a JSON object"),
        (None, "arguments: must be a JSON object"),
    ],
)
def test_invalid_arguments_name_the_path(arguments: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ArgumentValidator().validate("slack_notify", SCHEMA, arguments)
    assert caught.value.message.startswith(message)


def test_nested_error_paths() -> None:
    schema = {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}}
        },
    }
    with pytest.raises(InvalidArgument) as caught:
        ArgumentValidator().validate("t", schema, {"user": {"tags": ["a", 7]}})
    assert caught.value.message == "arguments.user.tags[1]: 7 is not of type 'string'"


def test_long_messages_are_bounded() -> None:
    with pytest.raises(InvalidArgument) as caught:
        ArgumentValidator().validate("slack_notify", SCHEMA, {"channel_id": ["x" * 5000], "text": "hi"})
    assert len(caught.value.message) < 400


def test_validators_are_compiled_once_per_schema() -> None:
    validator = ArgumentValidator()
    first = validator.validator_for("slack_notify", SCHEMA)
    assert validator.validator_for("slack_notify", copy.deepcopy(SCHEMA)) is first
    for _ in range(50):
        validator.validate("slack_notify", SCHEMA, {"channel_id": "C1", "text": "hi"})
    assert len(validator) == 1
    changed = copy.deepcopy(SCHEMA)
    changed["properties"]["text"]["maxLength"] = 3
    assert validator.validator_for("slack_notify", changed) is not first
    assert validator.validator_for("other_tool", SCHEMA) is not first
    assert len(validator) == 3


def test_the_cache_is_bounded_and_keeps_recent_entries() -> None:
    validator = ArgumentValidator(max_entries=2)
    a = validator.validator_for("a", SCHEMA)
    validator.validator_for("b", SCHEMA)
    assert validator.validator_for("a", SCHEMA) is a  # "a" is now the most recent
    validator.validator_for("c", SCHEMA)  # drops "b"
    assert len(validator) == 2
    assert validator.validator_for("a", SCHEMA) is a


def test_the_cached_validator_does_not_see_later_changes_to_the_schema() -> None:
    schema = copy.deepcopy(SCHEMA)
    validator = ArgumentValidator()
    validator.validate("t", schema, {"channel_id": "C", "text": "hi"})
    schema["required"].append("urgent")  # a new fingerprint, so a new validator
    with pytest.raises(InvalidArgument, match="'urgent' is a required property"):
        validator.validate("t", schema, {"channel_id": "C", "text": "hi"})


def test_an_unresolvable_reference_is_an_invalid_argument() -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    with pytest.raises(InvalidArgument, match="does not resolve"):
        ArgumentValidator().validate("t", schema, {"a": 1})


# --- build_http_request -----------------------------------------------------------------------------------


def test_post_sends_the_arguments_as_json() -> None:
    tool = parse_custom_tool(slack_tool())
    assert build_http_request(tool, {"channel_id": "C1", "text": "hi"}) == (
        "POST",
        "https://slack.com/api/chat.postMessage",
        None,
        {"channel_id": "C1", "text": "hi"},
    )


def test_get_sends_the_arguments_as_query_parameters() -> None:
    tool = parse_custom_tool(
        slack_tool(
            method="GET",
            endpoint="https://api.example/users/{user}/items?fixed=1",
            parameters=[
                {"name": "user", "type": "string", "required": True},
                {"name": "limit", "type": "integer"},
                {"name": "active", "type": "boolean"},
                {"name": "tags", "type": "array"},
                {"name": "filter", "type": "object"},
            ],
        )
    )
    arguments = {"user": "u1", "limit": 10, "active": True, "tags": ["a", 2], "filter": {"x": 1}}
    method, url, params, body = build_http_request(tool, arguments)
    assert (method, url, body) == ("GET", "https://api.example/users/u1/items?fixed=1", None)
    assert params == {"limit": "10", "active": "true", "tags": ["a", "2"], "filter": '{"x":1}'}
    assert build_http_request(tool, {"user": "u1"})[2] is None


def test_placeholders_are_filled_and_removed_from_the_body() -> None:
    tool = parse_custom_tool(
        slack_tool(
            method="PATCH",
            endpoint="https://api.example/v1/channels/{channel_id}/messages/{n}",
            parameters=[
                {"name": "channel_id", "type": "string", "required": True},
                {"name": "n", "type": "integer", "required": True},
                {"name": "text", "type": "string"},
            ],
        )
    )
    method, url, params, body = build_http_request(tool, {"channel_id": "C 1", "n": 7, "text": "hi"})
    assert (method, url, params, body) == (
        "PATCH",
        "https://api.example/v1/channels/C%201/messages/7",
        None,
        {"text": "hi"},
    )
    assert build_http_request(tool, {"channel_id": "C", "n": 1})[3] == {}


@pytest.mark.parametrize("value", ["../admin?x=1", "a/b#frag", "..", ".", "%2e%2e", "a?b=c&d", "x\r\nHost: evil"])
def test_placeholder_values_cannot_change_the_url_structure(value: str) -> None:
    tool = parse_custom_tool(
        slack_tool(
            method="DELETE",
            endpoint="https://api.example/v1/files/{name}/meta",
            parameters=[{"name": "name", "type": "string", "required": True}],
        )
    )
    _, url, params, _ = build_http_request(tool, {"name": value})
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.query, parts.fragment) == ("https", "api.example", "", "")
    segments = parts.path.split("/")
    assert len(segments) == 5
    assert segments[:4] == ["", "v1", "files", segments[3]] and segments[4] == "meta"
    assert segments[3] not in (".", "..")
    assert not {"/", "?", "#", "\r", "\n"} & set(segments[3])
    assert params is None


def test_a_missing_or_structured_placeholder_argument_is_refused() -> None:
    tool = parse_custom_tool(
        slack_tool(
            endpoint="https://api.example/{name}",
            parameters=[{"name": "name", "type": "object"}],
        )
    )
    with pytest.raises(InvalidArgument, match="'name' is required to fill"):
        build_http_request(tool, {})
    with pytest.raises(InvalidArgument, match="must be a string or a number"):
        build_http_request(tool, {"name": {"a": 1}})


async def test_a_large_check_can_leave_the_event_loop_free() -> None:
    """Offloaded, a costly check runs in a worker thread: the event loop keeps serving others meanwhile."""
    import asyncio
    import threading

    schema = {"type": "object", "properties": {"rows": {"type": "array", "items": {"type": "integer"}}}}
    arguments = {"rows": list(range(20_000))}
    validator = ArgumentValidator()
    seen_threads: list[int] = []
    original = validator.validator_for(  # compile once, on this thread
        "rows", schema
    ).best_error

    def spying(document: Any) -> Any:
        seen_threads.append(threading.get_ident())
        return original(document)

    validator.validator_for("rows", schema).best_error = spying  # type: ignore[method-assign]
    ticks = 0
    check = asyncio.create_task(validator.check("rows", schema, arguments, offload=True))
    while not check.done():
        ticks += 1
        await asyncio.sleep(0)
    with pytest.raises(InvalidArgument, match="too costly"):
        check.result()
    assert seen_threads and seen_threads[0] != threading.get_ident()
    assert ticks > 1  # the loop ran other work while the check was in progress
    with pytest.raises(InvalidArgument, match="too costly"):
        await validator.check("rows", schema, arguments)  # inline: the same answer
