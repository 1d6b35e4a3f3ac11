"""One tenant's most hostile schemas and arguments cannot stall another tenant's requests.

While a hostile tenant creates tools with the costliest input schemas the bounds admit (and the ones they refuse),
invokes them with the costliest arguments and feeds the built-ins their costliest input, another tenant's requests
are timed from a concurrent thread. Before the bounds, a single call could hold the tool service for seconds (4.5 s
measured for another tenant's GET /v1/tools) or hours; now each call of the hostile tenant costs it at most ~50 ms
of CPU. And a plan hands a megabyte of arguments to a tool whose schema would take minutes to check them.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack

# A victim request may wait for one hostile call in progress (~50 ms of CPU at most here, twice that on a slower CI
# machine) while two cores are shared by five stack processes, the test's threads and the fake third party. The stalls
# this guards against lasted seconds to hours; 0.1 s failed on CI at 108 ms with every bound in place.
MARGIN_SECONDS = 0.3


def obj(properties: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **more}


def ladder(levels: int, top: Callable[[dict[str, Any]], dict[str, Any]] = lambda ref: ref) -> dict[str, Any]:
    """Each level references the next one twice: 2^levels evaluations at one place, in a few hundred bytes."""
    defs: dict[str, Any] = {
        f"l{i}": {"allOf": [{"$ref": f"#/$defs/l{i + 1}"}, {"$ref": f"#/$defs/l{i + 1}"}]} for i in range(levels)
    }
    defs[f"l{levels}"] = {"type": "string", "minLength": 1}
    return obj({"x": top({"$ref": "#/$defs/l0"})}, **{"$defs": defs})


REFUSED = {
    "exponential $ref expansion": ladder(30),
    "$ref cycle at one place": obj({}, allOf=[{"$ref": "#"}]),
    "lookahead": obj({"x": {"type": "string", "pattern": "^(?=.*\\d)"}}),
    "backreference": obj({}, patternProperties={"^(a)\\1$": {}}),
    "$schema in a subschema": obj({"x": {"$schema": "http://json-schema.org/draft-07/schema#"}}),
    "too many JSON values": obj({f"p{i}": {} for i in range(600)}),  # 603 of the 600 allowed
    "too deep": obj({"x": json.loads('{"not": ' * 33 + "{}" + "}" * 33)}),
}

ADMITTED = {
    # The costliest of each kind that the bounds still admit.
    "catastrophic_pattern": obj({"x": {"type": "string", "pattern": "^(a+)+$"}}),
    "ladder_per_item": ladder(6, top=lambda ref: {"type": "array", "items": ref}),
    "many_subschemas": obj({f"p{i}": {"type": "string"} for i in range(298)}),  # 599 of the 600 JSON values
    "patterns_at_the_cap": obj({f"p{i}": {"type": "string", "pattern": f"\\w{{5}}x{i}"} for i in range(3)}),
    "unique_rows": obj(
        {"rows": {"type": "array", "uniqueItems": True, "items": obj({"id": {"type": "integer"}})}},
        unevaluatedProperties=False,
    ),
}


def hostile_arguments() -> dict[str, list[dict[str, Any]]]:
    """Arguments that stayed under the 64 KiB body limit of the test stack, each costly for its tool."""
    return {
        "catastrophic_pattern": [{"x": "a" * 60_000 + "!"}, {"x": "a" * 60_000}],
        "ladder_per_item": [{"x": ["x"] * 8_000}, {"x": ["x"] * 3}],
        "many_subschemas": [{f"p{i}": "v" * 100 for i in range(298)}, {f"p{i}": i for i in range(298)}],
        "patterns_at_the_cap": [{"p0": "é" * 8_000}, {"p0": "abcdex0"}],
        "unique_rows": [{"rows": [{"id": i} for i in range(2_000)]}, {"rows": [{"id": 1}, {"id": 1.0}]}],
    }


HOSTILE_BUILTINS = [
    ("parse_email", {"raw": "To: " + ", ".join(f"u{i} <u{i}@e.com>" for i in range(3_000)) + "\r\n\r\nx"}),
    ("parse_email", {"raw": "Content-Type: text/html\r\n\r\n" + "<p><b>x</b></p>" * 4_000}),
    ("parse_email", {"raw": "Content-Type: text/plain; " + "p=v; " * 1_500 + "\r\n\r\nx"}),
    ("text_template", {"template": "{{ a.b.c.d.e.f.g.h }}" * 2_000, "values": {"a": {"b": {"c": {"d": {}}}}}}),
    ("text_template", {"template": "{{ a }}" * 2_000, "values": {"a": list(range(3_000))}}),
    ("json_extract", {"data": [list(range(100))] * 60, "path": "[0]" * 333}),
]


class Victim(threading.Thread):
    """Another tenant's ordinary requests, one after the other, each timed, until told to stop."""

    def __init__(self, stack: Stack, tenant: str) -> None:
        super().__init__(daemon=True)
        self.api = stack.client(tenant)
        self.running = threading.Event()
        self.stop = threading.Event()
        self.timed: list[tuple[float, float, str]] = []  # (start, end, kind)
        self.failures: list[str] = []

    def request(self, kind: str) -> float:
        started = time.perf_counter()
        answer = self.api.get("/v1/tools" if kind == "list tools" else "/v1/tools/text_template")
        ended = time.perf_counter()
        if answer.status_code != 200:
            self.failures.append(f"{kind}: {answer.status_code} {answer.text[:200]}")
        self.timed.append((started, ended, kind))
        return ended - started

    def unloaded_medians(self, rounds: int = 25) -> dict[str, float]:
        for kind in KINDS:
            self.request(kind)  # warm the connection and caches
        medians = {kind: statistics.median(self.request(kind) for _ in range(rounds)) for kind in KINDS}
        self.timed.clear()
        return medians

    def run(self) -> None:
        self.running.set()
        while not self.stop.is_set():
            for kind in KINDS:
                self.request(kind)


# Requests the tool service answers (through the gateway); the issue saw GET /v1/tools wait 4.5 s.
KINDS = ("list tools", "get a tool")


class Hostile:
    """The hostile tenant's client, each request timed so that a slow victim request can be explained."""

    def __init__(self, stack: Stack, tenant: str) -> None:
        self.api = stack.client(tenant)
        self.timed: list[tuple[float, float, str]] = []

    def request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        started = time.perf_counter()
        answer = self.api.request(method, path, json=body)
        self.timed.append((started, time.perf_counter(), f"{method} {path} {answer.status_code}"))
        return answer


def assert_not_stalled(victim: Victim, unloaded: dict[str, float], hostile: Hostile) -> None:
    assert victim.failures == []
    for kind in KINDS:
        samples = [(end - start, start, end) for start, end, each in victim.timed if each == kind]
        assert len(samples) >= 20, (kind, len(samples))
        worst, start, end = max(samples)
        during = [f"{label} ({(e - b) * 1e3:.0f} ms)" for b, e, label in hostile.timed if b < end and e > start]
        summary = (
            f"{kind}: unloaded median {unloaded[kind] * 1e3:.0f} ms; {len(samples)} samples under load, median "
            f"{statistics.median(s[0] for s in samples) * 1e3:.0f} ms, worst {worst * 1e3:.0f} ms, during {during}"
        )
        assert worst <= unloaded[kind] + MARGIN_SECONDS, summary


def _error(answer: httpx.Response) -> str:
    assert answer.status_code == 400, answer.text[:300]
    assert answer.json()["error"]["code"] == "INVALID_ARGUMENT"
    return str(answer.json()["error"]["message"])


def _tool(tool_id: str, schema: dict[str, Any], third_party: FakeThirdParty) -> dict[str, Any]:
    return {"tool_id": tool_id, "name": tool_id, "endpoint": f"{third_party.base_url}/echo", "input_schema": schema}


def _hostile_round(hostile: Hostile, third_party: FakeThirdParty, round_number: int) -> None:
    for name, schema in REFUSED.items():
        answer = hostile.request("POST", "/v1/tools", _tool(f"refused_{round_number}", schema, third_party))
        assert _error(answer).startswith("input_schema"), name
    for name, schema in ADMITTED.items():
        answer = hostile.request("POST", "/v1/tools", _tool(f"{name}_{round_number}", schema, third_party))
        assert answer.status_code == 201, (name, answer.text[:300])
    for name, arguments_list in hostile_arguments().items():
        for arguments in arguments_list:
            answer = hostile.request("POST", f"/v1/tools/{name}_{round_number}/invoke", {"arguments": arguments})
            assert answer.status_code in (200, 400), (name, answer.text[:300])
    for tool_id, arguments in HOSTILE_BUILTINS:
        answer = hostile.request("POST", f"/v1/tools/{tool_id}/invoke", {"arguments": arguments})
        assert answer.status_code in (200, 400), (tool_id, answer.text[:300])


def test_hostile_schemas_and_arguments_do_not_stall_other_tenants(
    stack: Stack, tenant: str, third_party: FakeThirdParty
) -> None:
    victim, hostile = Victim(stack, f"{tenant}-victim"), Hostile(stack, tenant)
    unloaded = victim.unloaded_medians()
    victim.start()
    assert victim.running.wait(10)
    try:
        for round_number in range(3):
            _hostile_round(hostile, third_party, round_number)
    finally:
        victim.stop.set()
        victim.join(30)
        victim.api.close()
        hostile.api.close()
    assert_not_stalled(victim, unloaded, hostile)


def _megabyte_plan(tool_id: str) -> dict[str, Any]:
    """Each json_extract doubles the previous document: the last step gets ~1 MB of arguments."""
    rows = [{"id": i, "name": "n" * 50} for i in range(500)]  # ~30 KB
    plan = [{"id": "s1", "tool": "json_extract", "arguments": {"data": rows, "path": ""}}]
    for step in range(2, 7):
        previous = f"${{s{step - 1}.output.value}}"
        plan.append(
            {
                "id": f"s{step}",
                "tool": "json_extract",
                "arguments": {"data": [previous, previous], "path": ""},
                "depends_on": [f"s{step - 1}"],
            }
        )
    plan.append({"id": "big", "tool": tool_id, "arguments": {"rows": "${s6.output.value}"}, "depends_on": ["s6"]})
    return {"plan": plan}


def _events(api: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    events = []
    with api.stream("GET", f"/v1/tasks/{task_id}/events", timeout=60) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():  # the server closes the stream after the terminal event
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def test_a_plan_cannot_build_a_megabyte_of_arguments(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    """Each json_extract step doubles the previous document, aiming a megabyte of rows at a tool whose uniqueItems
    jsonschema would check pair by pair (minutes of CPU). The agent stops the plan where a step's references would
    expand past ALTAN_MAX_EXPANSION_BYTES (128 KiB in the test stack): the costly tool never runs."""
    with stack.client(tenant) as api:
        created = api.post("/v1/tools", json=_tool("megabyte", ADMITTED["unique_rows"], third_party))
        assert created.status_code == 201, created.text[:300]
        agent = api.post("/v1/agents", json={"name": "hostile", "tools": ["json_extract", "megabyte"]}).json()
        submitted = api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": _megabyte_plan("megabyte")})
        assert submitted.status_code == 202, submitted.text[:300]
        _events(api, submitted.json()["task_id"])
        task = api.get(f"/v1/tasks/{submitted.json()['task_id']}").json()
    steps = {step["id"]: step for step in task["steps"]}
    assert task["status"] == "failed"
    failed = [step for step in task["steps"] if step["status"] == "failed"]
    assert len(failed) == 1 and "(ALTAN_MAX_EXPANSION_BYTES)" in failed[0]["error"], failed
    assert steps["big"]["status"] == "skipped"
    assert api_audit_has_no_call_of(stack, tenant, "megabyte")


def api_audit_has_no_call_of(stack: Stack, tenant: str, tool_id: str) -> bool:
    with stack.client(tenant) as api:
        return all(event["tool_id"] != tool_id for event in api.get("/v1/audit").json()["events"])
