"""The fake LLM APIs themselves: usable from plain sync code, strict where the real APIs are strict (so the provider
tests prove something), and runnable as a command for the README and the benchmarks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.llm import DEFAULT_TEXT, FakeAnthropic, FakeOpenAI, Reply

ROOT = Path(__file__).resolve().parents[2]
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # the fake is on 127.0.0.1
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def openai_messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages)}


def anthropic_messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 10, "messages": list(messages)}


def test_a_fake_serves_sync_code_scripted_then_by_default() -> None:
    with FakeOpenAI() as fake:
        fake.script(Reply(text="scripted"))
        first = post(fake.url, openai_messages({"role": "user", "content": "Hi"}))
        second = post(fake.url, openai_messages({"role": "user", "content": "Hi"}))
        assert [answer["choices"][0]["message"]["content"] for _, answer in (first, second)] == [
            "scripted",
            DEFAULT_TEXT,
        ]
        assert [r.body["messages"][0]["content"] for r in fake.requests] == ["Hi", "Hi"]
        assert post(fake.url.replace("/chat/completions", "/embeddings"), {})[0] == 404


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "model parameter"),
        (openai_messages(), "too short"),
        (openai_messages({"role": "assistant", "content": None, "tool_calls": [CALL]}), "must be a string"),
        (openai_messages({"role": "tool", "tool_call_id": "call_1", "content": "ok"}), "must be a response"),
        (
            openai_messages(
                {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "user", "content": "?"}
            ),
            "call_1",
        ),
        ({**openai_messages({"role": "user", "content": "Hi"}), "tools": [{"name": "f"}]}, "tools[0].function"),
    ],
)
def test_the_openai_fake_refuses_what_a_real_server_refuses(body: dict[str, Any], refusal: str) -> None:
    with FakeOpenAI() as fake:
        status, answer = post(fake.url, body)
    assert status == 400 and refusal in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens: Field required"),
        (anthropic_messages({"role": "assistant", "content": "Hi"}), "first message"),
        (anthropic_messages({"role": "user", "content": "a"}, {"role": "user", "content": "b"}), "must alternate"),
        (
            anthropic_messages(
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [TOOL_USE]},
                {"role": "user", "content": "?"},
            ),
            "without `tool_result`",
        ),
        (anthropic_messages({"role": "user", "content": [RESULT]}), "unexpected `tool_use_id`"),
        (
            anthropic_messages(
                {"role": "user", "content": "a"}, {"role": "assistant", "content": [{**TOOL_USE, "input": []}]}
            ),
            "valid dictionary",
        ),
        (
            anthropic_messages(
                {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "a"}]}
            ),
            "non-empty",
        ),
    ],
)
def test_the_anthropic_fake_refuses_what_the_api_refuses(body: dict[str, Any], refusal: str) -> None:
    with FakeAnthropic() as fake:
        status, answer = post(fake.url, body, {"anthropic-version": "2023-06-01"})
    assert status == 400 and refusal in answer["error"]["message"]
    assert answer == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": answer["error"]["message"]},
    }


def test_the_anthropic_fake_requires_its_version_header_and_the_key_it_was_given() -> None:
    hello = anthropic_messages({"role": "user", "content": "Hi"})
    with FakeAnthropic(api_key="sk-ant-right") as fake:
        assert post(fake.url, hello, {"x-api-key": "sk-ant-right"})[1]["error"]["message"] == (
            "anthropic-version: header is required"
        )
        status, answer = post(fake.url, hello, {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-wrong"})
        assert (status, answer["error"]["type"]) == (401, "authentication_error")
        status, answer = post(fake.url, hello, {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-right"})
        assert (status, answer["content"]) == (200, [{"type": "text", "text": DEFAULT_TEXT}])


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_the_command_calls_an_offered_tool_then_answers_text(provider: str) -> None:
    command = [sys.executable, "-m", "tests.fakes.llm", "--port", "0", "--provider", provider]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().split(" at ")[1].strip()
            schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
            if provider == "openai":
                tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
                asked = {**openai_messages({"role": "user", "content": "Paris?"}), "tools": tools}
                _, answer = post(url, asked)
                (call,) = answer["choices"][0]["message"]["tool_calls"]
                assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == (
                    "get_weather",
                    {"city": "example"},
                )
                result = {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}
                asked["messages"] += [answer["choices"][0]["message"] | {"content": ""}, result]
                assert post(url, asked)[1]["choices"][0]["message"]["content"] == DEFAULT_TEXT
            else:
                tools = [{"name": "get_weather", "input_schema": schema}]
                asked = {**anthropic_messages({"role": "user", "content": "Paris?"}), "tools": tools}
                version = {"anthropic-version": "2023-06-01"}
                _, answer = post(url, asked, version)
                (block,) = answer["content"]
                assert (block["name"], block["input"]) == ("get_weather", {"city": "example"})
                result = {"type": "tool_result", "tool_use_id": block["id"], "content": "sunny"}
                asked["messages"] += [{"role": "assistant", "content": [block]}, {"role": "user", "content": [result]}]
                assert post(url, asked, version)[1]["content"][0]["text"] == DEFAULT_TEXT
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0
