"""services.agent.cloud_tasks: the Cloud Tasks work queue with the real ``google-cloud-tasks`` asyncio client against
the in-process fake of the API (tests/fakes/cloud_tasks.py), which pushes to the queue's real push port over HTTP
with OIDC tokens it signs; and the push endpoint's refusals of every token that is not exactly ours."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from altan.config import Settings, configuration_problems
from altan.errors import Unavailable
from altan.listen import listen_socket
from services.agent.cloud_tasks import PUSH_PATH, CloudTasksWorkQueue, PushAuth, task_id_for
from services.agent.work_queue import WorkItem
from tests.fakes.cloud_tasks import QUEUE, SERVICE_ACCOUNT, FakeCloudTasks

WAIT = 15.0


@pytest.fixture
def fake() -> Iterator[FakeCloudTasks]:
    with FakeCloudTasks(min_backoff=0.05, max_backoff=0.2) as running:
        yield running


class Served:
    """A queue serving its push port, with a handler the test scripts."""

    def __init__(self, fake: FakeCloudTasks, timeout: float = 5.0) -> None:
        self.socket = listen_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}{PUSH_PATH}"
        self.queue = CloudTasksWorkQueue(
            queue=QUEUE,
            push_url=self.url,
            service_account=SERVICE_ACCOUNT,
            audience=self.url,
            dispatch_deadline_seconds=60,
            timeout_seconds=timeout,
            push_socket=self.socket,
            auth=PushAuth(fake.jwks_url, self.url, SERVICE_ACCOUNT),
            emulator_host=fake.address,
            grace_seconds=1,
        )
        self.ran: list[WorkItem] = []
        self.failures = 0  # the first deliveries that raise
        self.block: asyncio.Event | None = None  # set: the handler waits for it
        self.serving: asyncio.Task[None] | None = None

    async def handler(self, item: WorkItem) -> None:
        self.ran.append(item)
        if self.failures:
            self.failures -= 1
            raise Unavailable("the state store is unreachable")
        if self.block is not None:
            await self.block.wait()

    async def start(self) -> Served:
        self.queue.open()
        self.serving = asyncio.create_task(self.queue.serve(self.handler))
        async with httpx.AsyncClient(trust_env=False) as client:
            async with asyncio.timeout(WAIT):
                while True:
                    try:
                        if (await client.get(self.url.replace(PUSH_PATH, "/healthz"))).status_code == 200:
                            return self
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.serving is not None:
            self.serving.cancel()
            await asyncio.gather(self.serving, return_exceptions=True)
        await self.queue.aclose()


@pytest.fixture
async def served(fake: FakeCloudTasks) -> AsyncIterator[Served]:
    queue = await Served(fake).start()
    yield queue
    await queue.stop()


async def until(condition: Callable[[], object], what: str) -> None:
    """Until ``condition`` holds (what the fake's threads and the queue's tasks do is observed, not slept on)."""
    try:
        async with asyncio.timeout(WAIT):
            for _ in itertools.count():
                if condition():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT}s: {what}") from None


async def test_put_creates_one_named_http_task_with_an_oidc_token_and_its_push_runs_the_item(
    fake: FakeCloudTasks, served: Served
) -> None:
    item = WorkItem("tenant-a", "tsk_1")
    await served.queue.put(item)
    await served.queue.put(item)  # a retried submission: ALREADY_EXISTS, harmless
    await until(lambda: fake.finished, "the push succeeded")
    assert served.ran == [item]
    assert fake.calls.count("CreateTask") == 2 and len(fake.created) == 1
    task = fake.created[0]
    assert task.name == f"{QUEUE}/tasks/{task_id_for(item)}"
    # The name tells nothing of the tenant or the task.
    assert "tenant-a" not in task.name and "tsk_1" not in task.name
    assert task.http_request.url == served.url
    assert task.http_request.oidc_token.service_account_email == SERVICE_ACCOUNT
    assert task.http_request.oidc_token.audience == served.url
    assert task.dispatch_deadline.total_seconds() == 60
    assert [(a.status, a.retry) for a in fake.attempts] == [(200, 0)]
    # Delivered again after it ran (the item of a task that ended): still a create, still one task.
    await served.queue.put(item)
    assert len(fake.created) == 1


async def test_a_delivery_that_fails_is_answered_503_and_retried_by_cloud_tasks(
    fake: FakeCloudTasks, served: Served
) -> None:
    served.failures = 2
    await served.queue.put(WorkItem("tenant-a", "tsk_2"))
    await until(lambda: fake.finished, "the push succeeded")
    assert [a.status for a in fake.attempts] == [503, 503, 200]
    assert [a.retry for a in fake.attempts] == [0, 1, 2]
    assert len(served.ran) == 3


async def test_a_wake_up_is_created_once_per_reason_and_not_pushed_before_it_is_due(
    fake: FakeCloudTasks, served: Served
) -> None:
    item = WorkItem("tenant-a", "tsk_3")
    due = int(time.time() * 1000) + 1500
    await served.queue.wake(item, "deadline", at_ms=due)
    await served.queue.wake(item, "deadline", at_ms=due)
    await served.queue.wake(item, "decided-s1")
    assert len(fake.created) == 2
    await until(lambda: len(fake.finished) == 2, "both pushed")
    deadline = next(a for a in fake.attempts if a.task.endswith("-deadline"))
    assert deadline.at >= due / 1000
    assert served.ran == [item, item]


async def test_depth_is_the_queues_tasks_less_those_being_pushed(fake: FakeCloudTasks, served: Served) -> None:
    assert await served.queue.depth() == 0
    served.block = asyncio.Event()
    far = int(time.time() * 1000) + 600_000
    await served.queue.wake(WorkItem("tenant-a", "tsk_4"), "deadline", at_ms=far)
    await served.queue.wake(WorkItem("tenant-a", "tsk_5"), "deadline", at_ms=far)
    await served.queue.put(WorkItem("tenant-a", "tsk_6"))
    await until(lambda: served.ran, "the push is running")
    assert await served.queue.depth() == 2
    served.block.set()
    await until(lambda: fake.finished, "the push ended")
    assert await served.queue.depth() == 2


async def test_an_unreachable_api_refuses_the_put_within_its_timeout(fake: FakeCloudTasks) -> None:
    queue = await Served(fake, timeout=1.0).start()
    try:
        fake.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="work queue is unreachable"):
            await queue.queue.put(WorkItem("tenant-a", "tsk_7"))
        assert time.monotonic() - started < 5
        fake.fail["CreateTask"] = grpc.StatusCode.PERMISSION_DENIED
        fake.start()
        with pytest.raises(Unavailable):
            await queue.queue.put(WorkItem("tenant-a", "tsk_7"))
        assert not fake.created
    finally:
        await queue.stop()


async def test_a_replica_that_stops_mid_task_answers_503_and_cloud_tasks_delivers_it_again(
    fake: FakeCloudTasks,
) -> None:
    first = await Served(fake).start()
    first.block = asyncio.Event()  # never set: the run is in flight when the replica stops
    await first.queue.put(WorkItem("tenant-a", "tsk_8"))
    await until(lambda: first.ran, "the push is running")
    await first.stop()
    await until(lambda: fake.attempts, "the push was answered")
    assert fake.attempts[0].status == 503 or fake.attempts[0].error
    second = await Served(fake).start()
    try:
        # Cloud Tasks pushes to the same URL: give the task to the new replica's port.
        for entry in fake.tasks.values():
            entry.task.http_request.url = second.url
            entry.task.http_request.oidc_token.audience = second.url
        await until(lambda: fake.finished, "delivered again")
        assert second.ran == [WorkItem("tenant-a", "tsk_8")]
    finally:
        await second.stop()


# --- the push endpoint's authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no token", 401),
        ("not a bearer", 401),
        ("garbage", 401),
        ("wrong audience", 401),
        ("wrong issuer", 401),
        ("expired", 401),
        ("no expiry", 401),
        ("unsigned", 401),
        ("another key", 401),
        ("an unknown kid", 401),
        ("HS256 with the public key", 401),
        ("wrong email", 403),
        ("email not verified", 403),
    ],
)
async def test_the_push_endpoint_refuses_every_token_but_ours_and_runs_nothing(
    fake: FakeCloudTasks, served: Served, case: str, expected: int
) -> None:
    claims = fake.claims(served.url)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tokens = {
        "no token": None,
        "not a bearer": "Basic dXNlcjpwYXNz",
        "garbage": "Bearer not.a.jwt",
        "wrong audience": f"Bearer {fake.sign({**claims, 'aud': 'https://elsewhere.example/v1/work'})}",
        "wrong issuer": f"Bearer {fake.sign({**claims, 'iss': 'https://evil.example'})}",
        "expired": f"Bearer {fake.sign({**claims, 'iat': int(time.time()) - 7200, 'exp': int(time.time()) - 3600})}",
        "no expiry": f"Bearer {fake.sign({k: v for k, v in claims.items() if k != 'exp'})}",
        "unsigned": f"Bearer {fake.sign(claims, algorithm='none')}",
        "another key": f"Bearer {fake.sign(claims, key=other)}",
        "an unknown kid": f"Bearer {fake.sign(claims, key=other, kid='another-kid')}",
        "HS256 with the public key": f"Bearer {_hs256_with_public_key(fake, claims)}",
        "wrong email": f"Bearer {fake.sign(fake.claims(served.url, email='other@altan-test.iam.gserviceaccount.com'))}",
        "email not verified": f"Bearer {fake.sign({**claims, 'email_verified': False})}",
    }
    headers = {"Authorization": tokens[case]} if tokens[case] else {}
    body = WorkItem("tenant-a", "tsk_9").encode()
    async with httpx.AsyncClient(trust_env=False) as client:
        answer = await client.post(served.url, content=body, headers=headers)
        genuine = {"Authorization": f"Bearer {fake.sign(claims)}"}
        assert answer.status_code == expected, answer.text
        assert served.ran == []
        # The same request with our token runs (so each refusal above is the token's doing).
        assert (await client.post(served.url, content=body, headers=genuine)).status_code == 200
    assert served.ran == [WorkItem("tenant-a", "tsk_9")]


async def test_the_push_endpoint_refuses_a_body_that_is_not_a_work_item(fake: FakeCloudTasks, served: Served) -> None:
    genuine = {"Authorization": f"Bearer {fake.sign(fake.claims(served.url))}"}
    async with httpx.AsyncClient(trust_env=False) as client:
        for body in (b"{}", b"not json", b"x" * 20_000):
            assert (await client.post(served.url, content=body, headers=genuine)).status_code == 400
        assert (await client.get(served.url, headers=genuine)).status_code == 405
    assert served.ran == []


def _hs256_with_public_key(fake: FakeCloudTasks, claims: dict[str, object]) -> str:
    """The algorithm-confusion forgery: an HS256 token whose HMAC key is our RSA public key (PEM), public to all."""
    pem = fake.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": fake.kid, "typ": "JWT"}
    signing_input = b".".join(_b64(json.dumps(part).encode()) for part in (header, claims))
    return (signing_input + b"." + _b64(hmac.new(pem, signing_input, hashlib.sha256).digest())).decode()


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


# --- settings ----------------------------------------------------------------------------------------------------


@pytest.fixture
def problems(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """The start-up problems of settings from exactly these variables (and a JWT secret)."""
    for name in list(os.environ):
        if name.startswith("ALTAN_") or name == "REDIS_URL":
            monkeypatch.delenv(name)

    def check(**env: str) -> list[str]:
        with monkeypatch.context() as scoped:
            for name, value in {"ALTAN_JWT_SECRET": "x" * 40, **env}.items():
                scoped.setenv(name, value)
            try:
                Settings()
            except ValidationError as exc:
                return configuration_problems(exc)
            return []

    return check


def test_cloud_tasks_settings_are_checked_at_start_with_one_line_naming_what_is_missing(
    problems: Callable[..., list[str]],
) -> None:
    complete = {
        "ALTAN_WORK_QUEUE": "cloud-tasks",
        "ALTAN_CLOUD_TASKS_QUEUE": QUEUE,
        "ALTAN_CLOUD_TASKS_PUSH_URL": "https://agents.example.com/v1/work",
        "ALTAN_CLOUD_TASKS_SERVICE_ACCOUNT": SERVICE_ACCOUNT,
        "ALTAN_AGENT_PUSH_PORT": "8081",
        "ALTAN_INTERNAL_KEY": "k" * 40,
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    assert problems(**complete) == []
    assert problems(**{k: v for k, v in complete.items() if k != "ALTAN_CLOUD_TASKS_QUEUE"}) == [
        "ALTAN_WORK_QUEUE=cloud-tasks needs ALTAN_CLOUD_TASKS_QUEUE"
    ]
    without = {k: v for k, v in complete.items() if k not in ("ALTAN_AGENT_PUSH_PORT", "ALTAN_CLOUD_TASKS_PUSH_URL")}
    assert problems(**without) == [
        "ALTAN_WORK_QUEUE=cloud-tasks needs ALTAN_CLOUD_TASKS_PUSH_URL, ALTAN_AGENT_PUSH_PORT"
    ]
    assert problems(**{**complete, "ALTAN_CLOUD_TASKS_PUSH_URL": "http://agents.example.com/v1/work"}) == [
        "ALTAN_CLOUD_TASKS_PUSH_URL: must be https:// (plain http only to a loopback address)"
    ]
    assert problems(**{**complete, "ALTAN_CLOUD_TASKS_JWKS_URL": "ftp://keys.example.com"}) == [
        "ALTAN_CLOUD_TASKS_JWKS_URL: must be an https:// URL"
    ]
    (queue_problem,) = problems(**{**complete, "ALTAN_CLOUD_TASKS_QUEUE": "projects/p/queues/q"})
    assert queue_problem.startswith("ALTAN_CLOUD_TASKS_QUEUE: String should match pattern")
    assert problems(**{k: v for k, v in complete.items() if k != "REDIS_URL"}) == [
        "ALTAN_WORK_QUEUE=cloud-tasks needs REDIS_URL (every agent replica must read every task)"
    ]
    assert problems(**{**complete, "ALTAN_CLOUD_TASKS_DISPATCH_DEADLINE_SECONDS": "3600"})[0].startswith(
        "ALTAN_CLOUD_TASKS_DISPATCH_DEADLINE_SECONDS"
    )
