"""The SDK's @tool: schemas from type hints, calls validated by the same model, return values and errors."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field

from altan.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from altan.sdk import Tool, ToolContext, ToolCredential, ToolError, tool
from altan.sdk.container import load_tools

ROOT = Path(__file__).resolve().parents[2]
CALLER = ToolContext(tenant_id="acme", user="alice", role="member")


class Address(BaseModel):
    street: str
    city: str = Field(description="The city's name.")


class Order(BaseModel):
    order_id: str
    total: float


@tool
def ship(
    address: Address,
    speed: Literal["standard", "express"] = "standard",
    note: str | None = None,
    weight: Annotated[float, Field(gt=0, description="Kilograms.")] = 1.0,
) -> Order:
    """Ship a parcel.

    Answers the order.
    """
    return Order(order_id=f"{address.city}-{speed}-{note or ''}-{weight}", total=9.5)


@tool
async def whoami(greeting: str, ctx: ToolContext) -> dict[str, str]:
    """Says who called."""
    await asyncio.sleep(0)
    return {"greeting": greeting, "tenant": ctx.tenant_id, "user": ctx.user, "role": ctx.role}


async def call(t: Tool[..., Any], arguments: Any, timeout: float | None = None) -> Any:
    return json.loads(await t.invoke(json.dumps(arguments).encode(), CALLER, timeout))


def test_name_docstring_and_schema_come_from_the_function() -> None:
    assert ship.tool_id == "ship"
    assert ship.description == "Ship a parcel.\n\nAnswers the order."
    schema = ship.input_schema
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == ["address"]
    props = schema["properties"]
    assert props["speed"]["enum"] == ["standard", "express"] and props["speed"]["default"] == "standard"
    assert {"type": "null"} in props["note"]["anyOf"] and props["note"]["default"] is None
    assert props["weight"]["exclusiveMinimum"] == 0 and props["weight"]["description"] == "Kilograms."
    # A pydantic model is a $ref into $defs, with its own required fields and descriptions.
    assert props["address"] == {"$ref": "#/$defs/Address"}
    address = schema["$defs"]["Address"]
    assert address["required"] == ["street", "city"] and address["properties"]["city"]["description"]
    assert "title" not in schema  # the generated model's name is not the tool's


def test_the_context_parameter_is_injected_not_an_argument() -> None:
    assert set(whoami.input_schema["properties"]) == {"greeting"}
    assert whoami.input_schema["required"] == ["greeting"]


def test_a_tool_stays_callable_as_written() -> None:
    assert ship(Address(street="1 Main St", city="Oslo")).total == 9.5


def test_the_definition_is_a_container_tool() -> None:
    definition = ship.definition()
    assert definition.tool_id == "ship" and definition.type == 3 and definition.name == "ship"
    assert definition.input_schema.fields["required"].list_value.values[0].string_value == "address"


async def test_a_sync_tool_runs_with_validated_arguments_and_its_model_is_dumped() -> None:
    output = await call(ship, {"address": {"street": "1 Main St", "city": "Oslo"}, "speed": "express"})
    assert output == {"order_id": "Oslo-express--1.0", "total": 9.5}


async def test_a_sync_tool_runs_in_a_worker_thread() -> None:
    @tool
    def slow_sync() -> str:
        """Blocks."""
        time.sleep(0.3)
        return "done"

    started = time.monotonic()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while time.monotonic() - started < 0.25:
            ticks += 1
            await asyncio.sleep(0.01)

    output, _ = await asyncio.gather(call(slow_sync, {}), tick())
    assert output == "done" and ticks > 5  # the event loop went on while the function blocked


async def test_an_async_tool_receives_its_caller() -> None:
    output = await call(whoami, {"greeting": "hi"})
    assert output == {"greeting": "hi", "tenant": "acme", "user": "alice", "role": "member"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "address: required"),
        ({"address": {"street": "x", "city": "y"}, "speed": "teleport"}, "speed: Input should be 'standard' or"),
        ({"address": {"street": "x", "city": "y"}, "weight": 0}, "weight: Input should be greater than 0"),
        ({"address": {"street": "x"}}, "address.city: required"),
        ({"address": {"street": "x", "city": "y"}, "colour": "crimson"}, "colour: unknown field"),
        ([1, 2], "arguments: Input should be an object"),
    ],
)
async def test_arguments_the_schema_refuses_are_invalid_without_their_values(arguments: Any, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await call(ship, arguments)
    assert caught.value.message.startswith(message), caught.value.message
    assert "teleport" not in caught.value.message and "crimson" not in caught.value.message


async def test_a_value_error_of_the_function_is_an_invalid_argument_with_its_message() -> None:
    @tool
    def divide(a: float, b: float) -> float:
        """a / b."""
        if b == 0:
            raise ValueError("b must not be zero")
        return a / b

    assert await call(divide, {"a": 1, "b": 4}) == 0.25
    with pytest.raises(InvalidArgument, match=r"^tool 'divide': b must not be zero$"):
        await call(divide, {"a": 1, "b": 0})


async def test_a_tool_error_fails_the_call_with_its_message() -> None:
    @tool
    async def refuse() -> None:
        """Always refuses."""
        raise ToolError("the channel is archived")

    with pytest.raises(FailedPrecondition, match=r"^tool 'refuse': the channel is archived$"):
        await call(refuse, {})


async def test_any_other_error_fails_clearly_without_its_message_or_a_trace(caplog: pytest.LogCaptureFixture) -> None:
    @tool
    def leaky() -> None:
        """Fails with a secret in its message."""
        raise RuntimeError("https://api.example.com/?key=sk-secret")

    with pytest.raises(FailedPrecondition) as caught:
        await call(leaky, {})
    assert caught.value.message == "tool 'leaky' failed (RuntimeError); the tool container's log has the details"
    assert "Traceback" not in caught.value.message
    # The developer finds the trace in the container's log.
    assert any("Traceback" in r.getMessage() and "RuntimeError" in r.getMessage() for r in caplog.records)


async def test_a_value_that_is_not_json_fails_clearly() -> None:
    @tool
    def opaque() -> object:
        """Returns something JSON cannot hold."""
        return object()

    with pytest.raises(FailedPrecondition, match="returned a object, which is not JSON-serialisable"):
        await call(opaque, {})


async def test_a_tool_past_its_time_budget_is_a_deadline_exceeded() -> None:
    @tool
    async def sleepy() -> None:
        """Sleeps too long."""
        await asyncio.sleep(5)

    with pytest.raises(DeadlineExceeded, match=r"tool 'sleepy' did not finish within 0.1s"):
        await call(sleepy, {}, timeout=0.1)


def test_tool_id_and_description_can_be_given() -> None:
    @tool(tool_id="send-report", description="Sends the report.")
    def sendReport() -> None:
        """Internal notes."""

    assert sendReport.tool_id == "send-report" and sendReport.description == "Sends the report."


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def getWeather() -> None: ...", "the tool id 'getWeather' must match"),
        ("def f(*args: int) -> None: ...", "parameter 'args' must be a named parameter"),
        ("def f(a: int, /) -> None: ...", "parameter 'a' must be a named parameter"),
        ("def f() -> Iterator[int]:\n    yield 1", "a generator cannot be a tool"),
    ],
)
def test_functions_that_cannot_be_tools_are_refused_at_import(source: str, message: str) -> None:
    namespace: dict[str, Any] = {"Iterator": Any}
    exec(source, namespace)
    function = next(v for k, v in namespace.items() if callable(v) and k != "Iterator")
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        tool(function)


def test_load_tools_finds_every_tool_of_a_file(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("SUFFIX = '!'\n")
    (tmp_path / "several.py").write_text(
        "from altan.sdk import tool\nfrom helpers import SUFFIX\n\n"
        "@tool\ndef first() -> str:\n    return 'a' + SUFFIX\n\n"
        "@tool\nasync def second() -> str:\n    return 'b'\n\n"
        "def not_a_tool() -> None: ...\n"
    )
    assert [t.tool_id for t in load_tools(str(tmp_path / "several.py"))] == ["first", "second"]


def test_load_tools_says_why_it_cannot(tmp_path: Path) -> None:
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no @tool functions"):
        load_tools(str(tmp_path / "empty.py"))
    with pytest.raises(ValueError, match="no such file"):
        load_tools(str(tmp_path / "missing.py"))


def test_the_weather_example_is_the_one_the_readme_prints() -> None:
    example = (ROOT / "examples" / "weather.py").read_text()
    assert f"```python\n{example}```" in (ROOT / "README.md").read_text()
    [forecast] = load_tools(str(ROOT / "examples" / "weather.py"))
    assert forecast.tool_id == "forecast" and forecast.description == "Forecast for a city."
    assert forecast.input_schema["required"] == ["city"]
    assert forecast.input_schema["properties"]["days"] == {"default": 1, "title": "Days", "type": "integer"}


SECRET = "xoxb-unit-secret-4242"
GRANTED = ToolContext("acme", "alice", "admin", ToolCredential(name="slack", value=SECRET))


@tool(credential="slack")
def notify(ctx: ToolContext, how: str = "ok") -> dict[str, Any]:
    """Uses its credential."""
    assert ctx.credential is not None
    if how == "error":
        raise ToolError(f"Slack said no to {ctx.credential.value}")
    if how == "crash":
        raise RuntimeError(f"crashed holding {ctx.credential.value}")
    return {"headers": dict(ctx.credential.headers)}


async def test_a_declared_credential_is_in_the_definition_and_reaches_the_function() -> None:
    assert notify.definition().credential == "slack" and ship.definition().credential == ""
    answer = json.loads(await notify.invoke(b"{}", GRANTED))
    assert answer == {"headers": {"Authorization": f"Bearer {SECRET}"}}  # the Tool Service redacts what comes back
    assert SECRET not in repr(GRANTED)  # a context logged by mistake does not show the value


async def test_a_tool_without_its_credential_fails_clearly_and_one_without_a_declaration_gets_none() -> None:
    with pytest.raises(FailedPrecondition, match=r"needs credential 'slack'.*\"tools\": \[\"notify\"\]"):
        await notify.invoke(b"{}", CALLER)
    other = ToolContext("acme", "alice", "admin", ToolCredential(name="github", value="ghp"))
    with pytest.raises(FailedPrecondition, match="needs credential 'slack'"):
        await notify.invoke(b"{}", other)

    @tool
    def plain(ctx: ToolContext) -> str:
        """Declares nothing."""
        return repr(ctx.credential)

    assert json.loads(await plain.invoke(b"{}", GRANTED)) == "None"


async def test_a_task_steps_idempotency_key_reaches_the_function_with_or_without_a_credential() -> None:
    @tool
    def keyed(ctx: ToolContext) -> str:
        """Answers its call's idempotency key."""
        return ctx.idempotency_key

    step = ToolContext("acme", "alice", "member", idempotency_key="tsk_1:s1")
    assert json.loads(await keyed.invoke(b"{}", step)) == "tsk_1:s1"
    granted = ToolContext("acme", "alice", "admin", GRANTED.credential, "tsk_1:s2")
    assert json.loads(await keyed.invoke(b"{}", granted)) == "tsk_1:s2"  # its credential dropped, not its key
    assert json.loads(await keyed.invoke(b"{}", CALLER)) == ""  # a call that is no task's step


async def test_a_secret_in_a_failure_is_redacted_from_the_message_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FailedPrecondition, match=r"^tool 'notify': Slack said no to \[redacted\]$"):
        await notify.invoke(b'{"how": "error"}', GRANTED)
    with pytest.raises(FailedPrecondition) as caught:
        await notify.invoke(b'{"how": "crash"}', GRANTED)
    assert SECRET not in caught.value.message
    assert caplog.records and all(SECRET not in r.getMessage() for r in caplog.records)
    assert any("crashed holding [redacted]" in r.getMessage() for r in caplog.records)


def test_a_credential_is_declared_by_name_and_read_from_the_context() -> None:
    def badly_named(ctx: ToolContext) -> None:
        """Names no credential."""

    with pytest.raises(ValueError, match="credential 'no spaces allowed'"):
        tool(credential="no spaces allowed")(badly_named)

    def without_context() -> None:
        """Cannot read it."""

    with pytest.raises(TypeError, match="ToolContext"):
        tool(credential="slack")(without_context)
