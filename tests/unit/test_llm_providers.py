"""What every model provider does alike, proven for each against its fake API on a real socket: refusals become
ProviderError (transient or not, with Retry-After), malformed and cut-short answers are errors, a streamed turn equals
the whole one, the deadline holds, and the key never leaves its header.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from altan.errors import InvalidArgument, Unavailable
from altan.outbound import GuardedHttpClient
from services.integrator.llm.base import Message, ModelRequest, ModelTurn, ProviderError
from services.integrator.llm.registry import PROVIDERS, provider_for
from tests.fakes.llm import (
    Call,
    CutShort,
    Delay,
    FakeAnthropic,
    FakeLlm,
    FakeOpenAI,
    HttpError,
    Linger,
    Malformed,
    Reply,
    StreamError,
)
from tests.unit.llm_turns import WEATHER, client_for, complete

KEY = "sk-live-7Qm2x9Lp4Rt8Vz3Kc6Nb1Hd5"
FAKES: dict[str, type[FakeLlm]] = {"openai": FakeOpenAI, "anthropic": FakeAnthropic}
# Whether asking again may help, by status: a timeout, a conflict, too many requests, the server's failure.
TRANSIENT = {400: False, 401: False, 403: False, 404: False, 422: False}
TRANSIENT |= {408: True, 409: True, 429: True, 500: True, 502: True, 503: True, 529: True}


@pytest.fixture(params=sorted(FAKES))
def fake(request: pytest.FixtureRequest) -> Iterator[FakeLlm]:
    with FAKES[request.param]() as fake:
        yield fake


@pytest.fixture
async def http(fake: FakeLlm) -> AsyncIterator[GuardedHttpClient]:
    client = client_for(fake)
    yield client
    await client.aclose()


def ask(fake: FakeLlm, **changes: Any) -> ModelRequest:
    request = ModelRequest(
        model="test-model",
        endpoint=fake.url,
        api_key=KEY,
        system="Answer briefly.",
        messages=(Message("user", "What is the weather in Paris?"),),
        tools=(WEATHER,),
    )
    return dataclasses.replace(request, **changes)


async def refused(fake: FakeLlm, http: GuardedHttpClient, *, stream: bool = False) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await complete(fake, http, ask(fake, stream=stream))
    return caught.value


def test_registry_names_each_provider_by_its_own_name() -> None:
    assert sorted(PROVIDERS) == ["anthropic", "openai"]
    assert all(provider_for(name).name == name for name in PROVIDERS)


def test_an_unknown_provider_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown model provider 'gemini' \(known: anthropic, openai\)"):
        provider_for("gemini")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_streamed_turn_equals_the_whole_one(fake: FakeLlm, http: GuardedHttpClient, stream: bool) -> None:
    reply = Reply(
        text="Let me check two cities at once.",
        calls=(Call("get_weather", {"city": "Paris", "unit": "celsius"}), Call("get_weather", {"city": "Rome"})),
        usage=(31, 17),
    )
    fake.script(reply, reply)
    whole = await complete(fake, http, ask(fake))
    deltas: list[str] = []
    streamed = await complete(fake, http, ask(fake, stream=True), deltas)
    assert streamed == whole
    assert "".join(deltas) == whole.message.content and len(deltas) > 1
    assert len(whole.message.tool_calls) == 2 and whole.usage.input_tokens == 31


async def test_a_streamed_turn_leaves_its_connection_to_the_next(fake: FakeLlm, http: GuardedHttpClient) -> None:
    # The parser stops at the answer's last event; the rest of the body must still be read, or the connection is
    # closed instead of pooled and every turn pays for a new one (a TLS handshake, on a real endpoint).
    for _ in range(3):
        await complete(fake, http, ask(fake, stream=True))
    assert len({received.peer for received in fake.requests}) == 1


async def test_a_stream_that_stays_open_after_its_last_event_still_answers_at_once(
    fake: FakeLlm, http: GuardedHttpClient
) -> None:
    fake.script(Linger(Reply(text="Sunny."), seconds=5))
    started = time.monotonic()
    turn = await complete(fake, http, ask(fake, stream=True))
    assert turn.message.content == "Sunny."
    assert time.monotonic() - started < 1.5  # a moment's wait for the body's end, then the connection is given up
    assert (await complete(fake, http, ask(fake, stream=True))).message.content  # on a new connection


@pytest.mark.parametrize(("status", "transient"), TRANSIENT.items())
@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_status_is_transient_only_when_asking_again_can_help(
    fake: FakeLlm, http: GuardedHttpClient, status: int, transient: bool, stream: bool
) -> None:
    fake.script(HttpError(status, "Something went wrong on purpose"))
    error = await refused(fake, http, stream=stream)
    assert (error.status, error.transient, error.retry_after) == (status, transient, None)
    assert error.message.startswith(f"{fake.provider} answered {status} (")
    assert error.message.endswith("): Something went wrong on purpose")


@pytest.mark.parametrize("stream", [False, True])
async def test_429_carries_retry_after(fake: FakeLlm, http: GuardedHttpClient, stream: bool) -> None:
    fake.script(HttpError(429, "Rate limit reached", headers={"Retry-After": "7"}))
    error = await refused(fake, http, stream=stream)
    assert (error.transient, error.retry_after) == (True, 7.0)


async def test_retry_after_ms_is_the_more_precise(fake: FakeLlm, http: GuardedHttpClient) -> None:
    fake.script(HttpError(429, "slow down", headers={"Retry-After": "2", "retry-after-ms": "1500"}))
    assert (await refused(fake, http)).retry_after == 1.5


async def test_the_apis_own_message_is_quoted_on_one_line_and_at_most_300_characters(
    fake: FakeLlm, http: GuardedHttpClient
) -> None:
    fake.script(HttpError(400, "first line\nsecond line " + "x" * 1000))
    error = await refused(fake, http)
    quoted = error.message.split("): ", 1)[1]
    assert quoted.startswith("first line second line x") and quoted.endswith("…") and len(quoted) == 300


async def test_an_error_body_that_is_not_the_apis_json_is_not_quoted(fake: FakeLlm, http: GuardedHttpClient) -> None:
    page = f"<html>Bad gateway. You sent: Authorization: Bearer {KEY}</html>".encode()
    fake.script(Malformed(page, status=502, content_type="text/html"))
    error = await refused(fake, http)
    assert (error.message, error.transient) == (f"{fake.provider} answered 502", True)


@pytest.mark.parametrize(
    "body", [b'{"choices": [ this is not JSON', b"[]", b'{"content": "not a list", "choices": []}', b""]
)
async def test_a_body_that_is_not_the_expected_json_is_a_permanent_error(
    fake: FakeLlm, http: GuardedHttpClient, body: bytes
) -> None:
    fake.script(Malformed(body))
    error = await refused(fake, http)
    assert error.message.startswith(f"{fake.provider} answered something that is not a")
    assert not error.transient


async def test_a_malformed_event_is_a_permanent_error(fake: FakeLlm, http: GuardedHttpClient) -> None:
    fake.script(Malformed(b'{"type": "message_start", "choices": [ broken'))
    error = await refused(fake, http, stream=True)
    assert "answered something that is not a" in error.message and not error.transient


async def test_a_stream_whose_body_ends_early_is_a_transient_error(fake: FakeLlm, http: GuardedHttpClient) -> None:
    fake.script(CutShort(after=5, clean=True))
    deltas: list[str] = []
    with pytest.raises(ProviderError, match="stream ended before it was complete") as caught:
        await complete(fake, http, ask(fake, stream=True), deltas)
    assert caught.value.transient and deltas  # what did arrive was delivered


@pytest.mark.parametrize("stream", [False, True])
async def test_a_dropped_connection_is_the_clients_unavailable(
    fake: FakeLlm, http: GuardedHttpClient, stream: bool
) -> None:
    fake.script(CutShort(after=3))
    with pytest.raises(Unavailable, match=f"could not reach 127.0.0.1:{fake.port}"):
        await complete(fake, http, ask(fake, stream=stream))


async def test_an_error_event_in_the_stream_is_a_transient_error(fake: FakeLlm, http: GuardedHttpClient) -> None:
    fake.script(StreamError("overloaded_error", "Overloaded", after=4))
    deltas: list[str] = []
    with pytest.raises(ProviderError) as caught:
        await complete(fake, http, ask(fake, stream=True), deltas)
    assert caught.value.message == f"{fake.provider} failed while answering (overloaded_error): Overloaded"
    assert caught.value.transient


@pytest.mark.parametrize("stream", [False, True])
async def test_the_turn_has_a_deadline(fake: FakeLlm, http: GuardedHttpClient, stream: bool) -> None:
    fake.script(Delay(5))
    started = time.monotonic()
    with pytest.raises(Unavailable, match="timed out"):
        await complete(fake, http, ask(fake, stream=stream, timeout=0.3))
    assert time.monotonic() - started < 2


async def test_a_server_that_is_not_there_is_the_clients_unavailable(fake: FakeLlm) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = client_for(port)
    try:
        with pytest.raises(Unavailable, match="could not reach"):
            await complete(fake, client, ask(fake, endpoint=f"http://127.0.0.1:{port}{fake.path}"))
    finally:
        await client.aclose()


# The key: only ever in its one header.


def _assert_no_key(error: BaseException) -> None:
    for text in (str(error), repr(error), repr(error.args), getattr(error, "message", "")):
        assert KEY not in text
        assert KEY[:12] not in text and KEY[-12:] not in text  # nor a recognisable piece of it
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_key_is_not_in_an_error_even_when_the_api_echoes_it(
    fake: FakeLlm, http: GuardedHttpClient, stream: bool
) -> None:
    echo = f"Incorrect API key provided: {KEY}. You sent Authorization: Bearer {KEY}, x-api-key: {KEY[:14]}..."
    fake.script(HttpError(401, echo, error_type=f"bad key {KEY}"))
    error = await refused(fake, http, stream=stream)
    _assert_no_key(error)
    assert "Incorrect API key provided: [redacted]" in error.message


async def test_the_key_is_not_in_an_error_event_that_echoes_it(fake: FakeLlm, http: GuardedHttpClient) -> None:
    fake.script(StreamError("api_error", f"internal error while using key {KEY}"))
    error = await refused(fake, http, stream=True)
    _assert_no_key(error)


async def test_the_key_is_not_in_a_malformed_answer_error(fake: FakeLlm, http: GuardedHttpClient) -> None:
    fake.script(Malformed(f'{{"echo": "{KEY}", "choices": 1, "content": 2}}'.encode()))
    _assert_no_key(await refused(fake, http))


@pytest.mark.parametrize("stream", [False, True])
async def test_the_key_is_sent_only_in_its_header(fake: FakeLlm, http: GuardedHttpClient, stream: bool) -> None:
    await complete(fake, http, ask(fake, stream=stream))
    (seen,) = fake.requests
    assert KEY not in seen.raw.decode() and KEY not in seen.path
    holders = {name for name, value in seen.headers.items() if KEY in value}
    assert holders == {"authorization" if fake.provider == "openai" else "x-api-key"}


async def test_no_key_no_key_header(fake: FakeLlm, http: GuardedHttpClient) -> None:
    await complete(fake, http, ask(fake, api_key=None))
    (seen,) = fake.requests
    assert not {"authorization", "x-api-key"} & set(seen.headers)


async def test_the_fakes_own_key_check_refuses_a_wrong_key_permanently(fake: FakeLlm) -> None:
    with FAKES[fake.provider](api_key="sk-the-right-one-0000") as guarded:
        client = client_for(guarded)
        try:
            with pytest.raises(ProviderError) as caught:
                await complete(guarded, client, ask(guarded))
        finally:
            await client.aclose()
    assert (caught.value.status, caught.value.transient) == (401, False)
    _assert_no_key(caught.value)


async def test_what_the_api_answers_is_what_the_turn_says(fake: FakeLlm, http: GuardedHttpClient) -> None:
    fake.script(Reply(text="Sunny, 24°C.", usage=(12, 5)))
    turn: ModelTurn = await complete(fake, http, ask(fake))
    assert turn.message == Message("assistant", "Sunny, 24°C.")
    assert (turn.usage.input_tokens, turn.usage.output_tokens, turn.model) == (12, 5, "test-model")
