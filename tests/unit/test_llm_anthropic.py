"""The Anthropic Messages wire format, against the fake API on a real socket: the exact requests (tool results
merged into one user message), and what is read from the answers, whole and streamed as named events. What all
providers share is proven in test_llm_providers.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from altan.outbound import GuardedHttpClient
from services.integrator.llm.anthropic import wire_messages
from services.integrator.llm.base import Message, ModelRequest, ModelTurn, ProviderError, ToolCall, Usage
from tests.fakes.llm import Call, FakeAnthropic, HttpError, Malformed, Received, Reply, StreamError
from tests.unit.llm_turns import NOTIFY, WEATHER, client_for, complete

KEY = "sk-ant-api03-test-9z8y7x6w5v"

CONVERSATION = (
    Message("user", "What is the weather in Paris and in Rome?"),
    Message(
        "assistant",
        "",
        tool_calls=(
            ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),
            ToolCall("toolu_2", "get_weather", '{"city": "Rome"}'),
        ),
    ),
    Message("tool", '{"temp": 21}', tool_call_id="toolu_1", name="get_weather"),
    Message("tool", "the weather service is down", tool_call_id="toolu_2", name="get_weather", is_error=True),
    Message("assistant", "Paris: 21°C. Rome: unknown."),
    Message("user", "Tell Oslo."),
    Message(
        "assistant",
        "Sending it.",
        tool_calls=(ToolCall("toolu_3", "notify", "{not json"), ToolCall("toolu_4", "notify", '["a list"]')),
    ),
    Message("tool", "sent", tool_call_id="toolu_3", name="notify"),
    Message("tool", "sent", tool_call_id="toolu_4", name="notify"),
    Message("user", "Thanks!"),
)


@pytest.fixture
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def http(fake: FakeAnthropic) -> AsyncIterator[GuardedHttpClient]:
    client = client_for(fake)
    yield client
    await client.aclose()


def ask(fake: FakeAnthropic, **changes: Any) -> ModelRequest:
    request = ModelRequest(
        model="claude-sonnet-4-5", endpoint=fake.url, api_key=KEY, system="", messages=(Message("user", "Hi"),)
    )
    return dataclasses.replace(request, **changes)


async def sent(fake: FakeAnthropic, http: GuardedHttpClient, **changes: Any) -> Received:
    await complete(fake, http, ask(fake, **changes))
    (received,) = fake.requests
    return received


# The request.


async def test_a_text_turn_with_the_key_and_version_headers(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http, system="Be brief.")
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    assert (seen.headers["x-api-key"], seen.headers["anthropic-version"]) == (KEY, "2023-06-01")
    assert seen.headers["content-type"] == "application/json" and "authorization" not in seen.headers
    assert seen.body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}],
    }


async def test_no_system_prompt_no_system_field(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http)
    assert seen.body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Hi"}],
    }


async def test_tools_are_offered_with_their_input_schema(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http, tools=(WEATHER, NOTIFY))
    assert seen.body["tools"] == [
        {
            "name": "get_weather",
            "description": "The current weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
        {
            "name": "notify",
            "description": "Send a message",
            "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
    ]


async def test_parameters_are_merged_and_may_set_max_tokens(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    parameters = {"max_tokens": 1024, "temperature": 0.7, "top_k": 5, "model": "claude-2", "system": "ignored"}
    seen = await sent(fake, http, parameters=parameters, system="Be brief.", stream=False)
    assert seen.body == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.7,
        "top_k": 5,
    }


async def test_a_streamed_request_says_so(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http, stream=True)
    assert seen.body["stream"] is True


async def test_a_conversation_merges_consecutive_tool_results_into_one_user_message(
    fake: FakeAnthropic, http: GuardedHttpClient
) -> None:
    seen = await sent(fake, http, messages=CONVERSATION, tools=(WEATHER, NOTIFY))
    assert seen.body["messages"] == [
        {"role": "user", "content": "What is the weather in Paris and in Rome?"},
        {
            "role": "assistant",
            "content": [  # no empty text block: the API refuses one
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"temp": 21}', "is_error": False},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": "the weather service is down",
                    "is_error": True,
                },
            ],
        },
        {"role": "assistant", "content": "Paris: 21°C. Rome: unknown."},
        {"role": "user", "content": "Tell Oslo."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Sending it."},
                {"type": "tool_use", "id": "toolu_3", "name": "notify", "input": {}},  # not JSON: {}
                {"type": "tool_use", "id": "toolu_4", "name": "notify", "input": {}},  # not an object: {}
            ],
        },
        {
            "role": "user",
            "content": [  # results, then the user's next words: the roles must alternate
                {"type": "tool_result", "tool_use_id": "toolu_3", "content": "sent", "is_error": False},
                {"type": "tool_result", "tool_use_id": "toolu_4", "content": "sent", "is_error": False},
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]


def test_an_empty_message_stays_a_plain_empty_content() -> None:
    assert wire_messages((Message("user", "Hi"), Message("assistant", ""))) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
    ]


# The answer.


async def test_text_usage_stop_reason_and_model_are_read(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    fake.script(Reply(text="Hello!", usage=(9, 3)))
    turn = await complete(fake, http, ask(fake))
    assert turn == ModelTurn(Message("assistant", "Hello!"), Usage(9, 3), "end_turn", "claude-sonnet-4-5")


async def test_text_and_several_tool_use_blocks(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    calls = (Call("get_weather", {"city": "Paris"}, id="toolu_a"), Call("notify", {"text": "é ☃"}, id="toolu_b"))
    fake.script(Reply(text="Checking.", calls=calls))
    turn = await complete(fake, http, ask(fake, tools=(WEATHER, NOTIFY)))
    assert turn.message == Message(
        "assistant",
        "Checking.",
        tool_calls=(
            ToolCall("toolu_a", "get_weather", '{"city": "Paris"}'),
            ToolCall("toolu_b", "notify", '{"text": "\\u00e9 \\u2603"}'),
        ),
    )
    assert turn.stop_reason == "tool_use"


@pytest.mark.parametrize("stream", [False, True])
async def test_the_apis_own_stop_reason_is_kept(fake: FakeAnthropic, http: GuardedHttpClient, stream: bool) -> None:
    fake.script(Reply(text="Once upon a", stop_reason="max_tokens"))
    assert (await complete(fake, http, ask(fake, stream=stream))).stop_reason == "max_tokens"


async def test_unknown_blocks_are_ignored(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    body = b'{"model":"claude-x","content":[{"type":"thinking","thinking":"hmm","signature":"s"},'
    body += b'{"type":"text","text":"Done."},{"type":"tool_use","id":"t1","name":"notify"}],'
    body += b'"stop_reason":"tool_use","usage":{"input_tokens":5,"output_tokens":2,"cache_read_input_tokens":3}}'
    fake.script(Malformed(body))  # what the API may send beside what we read
    turn = await complete(fake, http, ask(fake))
    assert turn.message == Message("assistant", "Done.", tool_calls=(ToolCall("t1", "notify", "{}"),))
    assert (turn.usage, turn.model) == (Usage(5, 2), "claude-x")


async def test_overloaded_529_is_transient(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    fake.script(HttpError(529, "Overloaded"))
    with pytest.raises(ProviderError) as caught:
        await complete(fake, http, ask(fake))
    assert caught.value.message == "anthropic answered 529 (overloaded_error): Overloaded"
    assert (caught.value.status, caught.value.transient) == (529, True)


# Streaming.


async def test_text_deltas_arrive_in_order_and_pings_are_ignored(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    fake.script(Reply(text="The sky is blue today.", usage=(4, 6)))
    deltas: list[str] = []
    turn = await complete(fake, http, ask(fake, stream=True), deltas)
    assert deltas == ["The ", "sky ", "is ", "blue ", "today."]
    assert turn == ModelTurn(
        Message("assistant", "The sky is blue today."), Usage(4, 6), "end_turn", "claude-sonnet-4-5"
    )


async def test_tool_use_input_is_assembled_from_its_pieces(fake: FakeAnthropic, http: GuardedHttpClient) -> None:
    arguments = {"city": "Saint-Pierre-et-Miquelon", "days": 3}
    fake.script(Reply(text="One moment.", calls=(Call("get_weather", arguments, id="toolu_x"), Call("notify", id="t"))))
    deltas: list[str] = []
    turn = await complete(fake, http, ask(fake, stream=True, tools=(WEATHER, NOTIFY)), deltas)
    assert deltas == ["One ", "moment."]
    assert turn.message.tool_calls == (
        ToolCall("toolu_x", "get_weather", '{"city": "Saint-Pierre-et-Miquelon", "days": 3}'),
        ToolCall("t", "notify", "{}"),
    )
    assert turn.stop_reason == "tool_use"


@pytest.mark.parametrize(
    ("error_type", "transient"),
    [("overloaded_error", True), ("api_error", True), ("rate_limit_error", True), ("invalid_request_error", False)],
)
async def test_an_error_event_is_transient_unless_asking_again_cannot_help(
    fake: FakeAnthropic, http: GuardedHttpClient, error_type: str, transient: bool
) -> None:
    fake.script(StreamError(error_type, "it went wrong", after=2))
    with pytest.raises(ProviderError) as caught:
        await complete(fake, http, ask(fake, stream=True))
    assert caught.value.message == f"anthropic failed while answering ({error_type}): it went wrong"
    assert caught.value.transient is transient
