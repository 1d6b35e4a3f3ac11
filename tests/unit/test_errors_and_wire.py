"""altan.errors (one mapping from domain errors to gRPC status and to API.md's REST errors) and altan.wire."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import grpc
import pytest

from altan.errors import (
    AlreadyExists,
    AltanError,
    DeadlineExceeded,
    EgressRefused,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_from_status,
    http_status_for,
)
from altan.wire import dump_json, json_bytes, json_depth, new_id, paginate, parse_json

# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        # API.md "Errors"
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        # the rest of the usual gRPC-HTTP mapping
        (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.UNIMPLEMENTED, 501),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
        (grpc.StatusCode.DATA_LOSS, 500),
    ],
)
def test_http_status_for(code: grpc.StatusCode, status: int) -> None:
    assert http_status_for(code) == status


@pytest.mark.parametrize(
    ("cls", "code", "status"),
    [
        (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 400),
        (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, 401),
        (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, 403),
        (NotFound, grpc.StatusCode.NOT_FOUND, 404),
        (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, 409),
        (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 400),
        (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (Unavailable, grpc.StatusCode.UNAVAILABLE, 503),
        (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (InternalError, grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_each_error_class_round_trips_through_its_status(
    cls: type[AltanError], code: grpc.StatusCode, status: int
) -> None:
    err = cls("something is off", retry_after=2.5)
    assert err.code == code
    assert http_status_for(err.code) == status
    again = error_from_status(err.code, err.message, err.retry_after)
    assert type(again) is cls
    assert (again.message, again.retry_after, str(again)) == ("something is off", 2.5, "something is off")
    assert err.to_body() == {"error": {"code": code.name, "message": "something is off"}}


def test_to_body_is_the_public_error_shape() -> None:
    body = NotFound("agent 'a1' not found").to_body()
    assert body == {"error": {"code": "NOT_FOUND", "message": "agent 'a1' not found"}}
    assert json.loads(json.dumps(body)) == body


def test_egress_refused_is_a_permission_denied() -> None:
    err = EgressRefused("destination 10.0.0.1:80 is private", target="10.0.0.1:80")
    assert isinstance(err, PermissionDenied)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.target == "10.0.0.1:80"
    assert http_status_for(err.code) == 403
    assert type(error_from_status(err.code, err.message)) is PermissionDenied


def test_unmapped_status_keeps_its_code() -> None:
    err = error_from_status(grpc.StatusCode.ABORTED, "try again")
    assert type(err) is AltanError
    assert err.code == grpc.StatusCode.ABORTED and err.message == "try again" and err.retry_after is None
    assert err.to_body() == {"error": {"code": "ABORTED", "message": "try again"}}
    assert http_status_for(err.code) == 409
    # ...without changing the class attribute for everyone else.
    assert AltanError.code == grpc.StatusCode.UNKNOWN
    assert AltanError("x").to_body()["error"]["code"] == "UNKNOWN"


def test_errors_default_to_no_retry_after() -> None:
    assert ResourceExhausted("slow down").retry_after is None
    assert error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down").retry_after is None
    assert error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", 3.0).retry_after == 3.0


# --- paginate -----------------------------------------------------------------------------------------------------

ITEMS = list(range(25))


def pages(page_size: int, *, default: int = 10, maximum: int = 100) -> list[list[int]]:
    seen: list[list[int]] = []
    token = ""
    while True:
        page, token = paginate(ITEMS, page_size, token, default=default, maximum=maximum)
        seen.append(page)
        if not token:
            return seen


def test_pages_cover_everything_once() -> None:
    assert pages(10) == [list(range(10)), list(range(10, 20)), list(range(20, 25))]
    assert pages(7) == [ITEMS[0:7], ITEMS[7:14], ITEMS[14:21], ITEMS[21:25]]
    assert pages(25) == [ITEMS]
    assert pages(1000) == [ITEMS]


def test_zero_page_size_means_the_default_and_the_maximum_caps() -> None:
    assert paginate(ITEMS, 0, "", default=4, maximum=10)[0] == [0, 1, 2, 3]
    page, token = paginate(ITEMS, 1000, "", default=4, maximum=10)
    assert page == list(range(10)) and token


def test_last_page_has_no_token_and_empty_list_has_one_empty_page() -> None:
    assert paginate(ITEMS, 5, "", default=10, maximum=100)[1] != ""
    assert paginate(list(range(5)), 5, "", default=10, maximum=100) == ([0, 1, 2, 3, 4], "")
    assert paginate([], 5, "", default=10, maximum=100) == ([], "")


def test_tokens_are_opaque_urlsafe_strings() -> None:
    _, token = paginate(ITEMS, 10, "", default=10, maximum=100)
    assert re.fullmatch(r"[A-Za-z0-9_\-=]+", token)
    assert paginate(ITEMS, 10, token, default=10, maximum=100)[0] == list(range(10, 20))


def test_token_past_the_end_gives_an_empty_page() -> None:
    token = base64.urlsafe_b64encode(b"1000").decode()
    assert paginate(ITEMS, 10, token, default=10, maximum=100) == ([], "")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token!",
        "%%%",
        "MQ",  # "1" without padding
        base64.urlsafe_b64encode(b"abc").decode(),
        base64.urlsafe_b64encode(b"-5").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"").decode() + "=",
        "\u00e9\u00e9\u00e9\u00e9",
    ],
)
def test_bad_token_is_invalid_argument(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        paginate(ITEMS, 10, token, default=10, maximum=100)


def test_negative_page_size_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="page_size"):
        paginate(ITEMS, -1, "", default=10, maximum=100)


# --- JSON fields, ids and times -----------------------------------------------------------------------------------


def test_parse_json_parses_and_defaults() -> None:
    assert parse_json('{"a": [1, "ü"]}', "spec") == {"a": [1, "ü"]}
    assert parse_json(b'{"a": [1, "\xc3\xbc"]}', "spec") == {"a": [1, "ü"]}
    assert parse_json("", "arguments", default={}) == {}
    assert parse_json("null", "spec", default={}) is None
    # A surrogate pair is one character, not a lone surrogate.
    assert parse_json('"\\ud83d\\ude00"', "text") == "\U0001f600"


@pytest.mark.parametrize(
    "text", ["", "{", "{'a': 1}", "[1,]", "undefined", "\x00", '{"a": 1} trailing', '"\ud800', "NaN", "[Infinity]"]
)
def test_parse_json_errors_are_invalid_argument_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_json(text, "agent")
    assert caught.value.message == "agent: not valid JSON"
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_parse_json_refuses_invalid_utf8() -> None:
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        parse_json(b'{"a": "\xff"}', "body")


@pytest.mark.parametrize("text", ['"\\ud800"', '{"\\udc00": 1}', '["a", {"b": ["\\ud83d x"]}]'])
def test_parse_json_refuses_lone_surrogates(text: str) -> None:
    # Valid JSON whose strings are not Unicode: they could never be serialized again (a 500 later on).
    with pytest.raises(InvalidArgument, match="lone surrogates"):
        parse_json(text, "body")


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ("s", 0), ([], 1), ({}, 1), ([1, "a"], 1), ([[]], 2), ({"a": [{"b": {}}], "c": 1}, 4), ([[1], [[2]]], 3)],
)
def test_json_depth(value: Any, depth: int) -> None:
    assert json_depth(value) == depth


def test_parse_json_deeply_nested_input_is_invalid_argument_not_a_crash() -> None:
    # API.md: "No request, however malformed, gets a 500" - json.loads raises RecursionError here.
    with pytest.raises(InvalidArgument):
        parse_json("[" * 100_000 + "]" * 100_000, "input")
    with pytest.raises(InvalidArgument, match="nested deeper than 64"):
        parse_json("[" * 65 + "]" * 65, "input")
    assert parse_json("[" * 64 + "]" * 64, "input") is not None


def test_dump_json_is_compact_and_keeps_unicode() -> None:
    assert dump_json({"a": [1, 2], "b": "ü"}) == '{"a":[1,2],"b":"ü"}'
    assert json_bytes({"b": "ü"}) == '{"b":"ü"}'.encode()


def test_new_id_is_prefixed_unique_and_time_ordered() -> None:
    ids = [new_id("agt") for _ in range(200)]
    assert len(set(ids)) == 200
    assert all(re.fullmatch(r"agt_[0-9a-f]{12}[0-9a-f]{16}", i) for i in ids)
    assert [i[:16] for i in ids] == sorted(i[:16] for i in ids)
