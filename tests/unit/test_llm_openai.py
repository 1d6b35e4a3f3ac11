"""The OpenAI Chat Completions wire format, against the fake API on a real socket: the exact requests, and what is
read from the answers, whole and streamed. What all providers share is proven in test_llm_providers.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from altan.outbound import GuardedHttpClient
from services.integrator.llm.base import Message, ModelRequest, ModelTurn, ProviderError, ToolCall, Usage
from tests.fakes.llm import Call, FakeOpenAI, Malformed, Received, Reply, StreamError
from tests.unit.llm_turns import NOTIFY, WEATHER, client_for, complete

KEY = "sk-proj-test-1a2b3c4d5e6f"

# A conversation with every kind of message: several tool calls in one turn, a failed tool, text beside a call, and
# arguments that are not JSON (sent back as the model wrote them).
CONVERSATION = (
    Message("user", "What is the weather in Paris and in Rome?"),
    Message(
        "assistant",
        "",
        tool_calls=(
            ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
            ToolCall("call_2", "get_weather", '{"city": "Rome"}'),
        ),
    ),
    Message("tool", '{"temp": 21}', tool_call_id="call_1", name="get_weather"),
    Message("tool", "the weather service is down", tool_call_id="call_2", name="get_weather", is_error=True),
    Message("assistant", "Paris: 21°C. Rome: unknown."),
    Message("user", "Tell Oslo."),
    Message("assistant", "Sending it.", tool_calls=(ToolCall("call_3", "notify", "{not json"),)),
    Message("tool", "sent", tool_call_id="call_3", name="notify"),
)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def http(fake: FakeOpenAI) -> AsyncIterator[GuardedHttpClient]:
    client = client_for(fake)
    yield client
    await client.aclose()


def ask(fake: FakeOpenAI, **changes: Any) -> ModelRequest:
    request = ModelRequest(model="gpt-4o", endpoint=fake.url, api_key=KEY, system="", messages=(Message("user", "Hi"),))
    return dataclasses.replace(request, **changes)


async def sent(fake: FakeOpenAI, http: GuardedHttpClient, **changes: Any) -> Received:
    await complete(fake, http, ask(fake, **changes))
    (received,) = fake.requests
    return received


# The request.


async def test_a_text_turn_is_model_and_messages_with_a_bearer_key(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http, system="Be brief.")
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.body == {
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    }


async def test_no_system_prompt_no_system_message(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http)
    assert seen.body == {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}


async def test_tools_are_offered_as_functions(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http, tools=(WEATHER, NOTIFY))
    assert seen.body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        },
        {
            "type": "function",
            "function": {
                "name": "notify",
                "description": "Send a message",
                "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
            },
        },
    ]


async def test_parameters_are_merged_but_cannot_replace_what_the_provider_writes(
    fake: FakeOpenAI, http: GuardedHttpClient
) -> None:
    parameters = {
        "temperature": 0.2,
        "max_tokens": 256,
        "tool_choice": "auto",
        "model": "gpt-3.5-turbo",
        "messages": [],
        "stream": True,
        "tools": [],
    }
    seen = await sent(fake, http, parameters=parameters, tools=(WEATHER,))
    assert seen.body["model"] == "gpt-4o" and seen.body["messages"] == [{"role": "user", "content": "Hi"}]
    assert "stream" not in seen.body and len(seen.body["tools"]) == 1
    assert (seen.body["temperature"], seen.body["max_tokens"], seen.body["tool_choice"]) == (0.2, 256, "auto")


async def test_a_conversation_with_several_tool_calls_and_results(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http, system="You are helpful.", messages=CONVERSATION, tools=(WEATHER, NOTIFY))
    assert seen.body["messages"] == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is the weather in Paris and in Rome?"},
        {
            "role": "assistant",
            "content": "",  # never null: llama.cpp's server refuses it (and so does the fake)
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "the weather service is down"},
        {"role": "assistant", "content": "Paris: 21°C. Rome: unknown."},
        {"role": "user", "content": "Tell Oslo."},
        {
            "role": "assistant",
            "content": "Sending it.",
            "tool_calls": [
                {"id": "call_3", "type": "function", "function": {"name": "notify", "arguments": "{not json"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_3", "content": "sent"},
    ]


async def test_a_streamed_request_asks_for_the_usage(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    seen = await sent(fake, http, stream=True, parameters={"stream_options": {"include_usage": False}})
    assert seen.body == {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# The answer.


async def test_text_usage_stop_reason_and_model_are_read(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    fake.script(Reply(text="Hello!", usage=(9, 3)))
    turn = await complete(fake, http, ask(fake))
    assert turn == ModelTurn(Message("assistant", "Hello!"), Usage(9, 3), stop_reason="stop", model="gpt-4o")


async def test_several_tool_calls_with_a_null_content(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    fake.script(
        Reply(calls=(Call("get_weather", {"city": "Paris"}, id="call_a"), Call("notify", "{not json", id="call_b")))
    )
    turn = await complete(fake, http, ask(fake, tools=(WEATHER, NOTIFY)))
    assert fake.requests[0].body["tools"]
    assert turn.message == Message(
        "assistant",
        "",
        tool_calls=(
            ToolCall("call_a", "get_weather", '{"city": "Paris"}'),
            ToolCall("call_b", "notify", "{not json"),  # as the model wrote it: the caller judges it
        ),
    )
    assert turn.stop_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
async def test_the_apis_own_stop_reason_is_kept(fake: FakeOpenAI, http: GuardedHttpClient, stream: bool) -> None:
    fake.script(Reply(text="Once upon a", stop_reason="length"))
    assert (await complete(fake, http, ask(fake, stream=stream))).stop_reason == "length"


async def test_arguments_sent_as_an_object_by_a_compatible_server_become_json_text(
    fake: FakeOpenAI, http: GuardedHttpClient
) -> None:
    body = b'{"model":"llama","choices":[{"message":{"content":null,"tool_calls":[{"id":"c1","function":'
    body += b'{"name":"get_weather","arguments":{"city":"Oslo"}}}]},"finish_reason":"tool_calls"}]}'
    fake.script(Malformed(body))  # not OpenAI's form, but what some servers send
    turn = await complete(fake, http, ask(fake))
    assert turn.message.tool_calls == (ToolCall("c1", "get_weather", '{"city": "Oslo"}'),)
    assert (turn.usage, turn.model) == (Usage(0, 0), "llama")


# Streaming.


async def test_text_deltas_arrive_in_order(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    fake.script(Reply(text="The sky is blue today.", usage=(4, 6)))
    deltas: list[str] = []
    turn = await complete(fake, http, ask(fake, stream=True), deltas)
    assert deltas == ["The ", "sky ", "is ", "blue ", "today."]  # the empty first delta is not passed on
    assert turn == ModelTurn(Message("assistant", "The sky is blue today."), Usage(4, 6), "stop", "gpt-4o")


async def test_tool_call_deltas_are_assembled_by_index(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    arguments = {"city": "Saint-Pierre-et-Miquelon", "days": 3}
    fake.script(Reply(calls=(Call("get_weather", arguments, id="call_x"), Call("notify", {"text": "ok"}, id="call_y"))))
    deltas: list[str] = []
    turn = await complete(fake, http, ask(fake, stream=True, tools=(WEATHER, NOTIFY)), deltas)
    assert deltas == []
    assert turn.message.tool_calls == (
        ToolCall("call_x", "get_weather", '{"city": "Saint-Pierre-et-Miquelon", "days": 3}'),
        ToolCall("call_y", "notify", '{"text": "ok"}'),
    )
    assert turn.stop_reason == "tool_calls"


async def test_a_stream_read_without_a_listener(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    fake.script(Reply(text="quietly"))
    assert (await complete(fake, http, ask(fake, stream=True))).message.content == "quietly"


async def test_an_error_chunk_keeps_the_apis_type(fake: FakeOpenAI, http: GuardedHttpClient) -> None:
    fake.script(StreamError("server_error", "The server had an error while processing your request.", after=2))
    with pytest.raises(ProviderError) as caught:
        await complete(fake, http, ask(fake, stream=True))
    assert caught.value.message == (
        "openai failed while answering (server_error): The server had an error while processing your request."
    )
    assert caught.value.transient
