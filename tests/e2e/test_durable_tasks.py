"""Durable tasks through the real processes: an agent killed mid-task (SIGKILL) is restarted by ``altan up`` and the
task goes on from where it was, its step in flight retried with the same Idempotency-Key (so a third party honouring
it performs it once); tasks run as an internal delegation that only the internal services accept, for its task and
tenant only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
import redis
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from altan.auth import issue_delegation
from altan.delegation import SIGNING_KEY_SETTING, load_public_keys, load_signing_key
from altan.v1 import agent_pb2, agent_pb2_grpc, tool_pb2, tool_pb2_grpc
from tests.e2e.fake_llms import INSTALL_KEY, Llms
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import DELEGATION_SIGNING_KEY, Stack, free_port, new_tenant, start_stack
from tests.e2e.test_supervision import wait_until
from tests.e2e.test_tasks import _events, _finished
from tests.fakes.llm import Call, Delay, Reply

ROOT = Path(__file__).resolve().parents[2]
TENANTS: list[str] = []  # this module's, whose keys it removes at its end (other modules' stacks still run)


def _tenant() -> str:
    TENANTS.append(new_tenant())
    return TENANTS[-1]


@pytest.fixture(scope="module")
def redis_stack(
    redis_url: str, third_party: FakeThirdParty, llms: Llms, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # A short lease: a killed agent's tasks are reclaimed 2 s after its last heartbeat.
    env = {
        "ALTAN_TASK_LEASE_SECONDS": "2",
        "ALTAN_OPENAI_API_KEY": INSTALL_KEY,
        "ALTAN_OPENAI_API_HOSTS": "127.0.0.1",
    }
    stack = start_stack(
        data_dir=tmp_path_factory.mktemp("durable"),
        egress_allow=f"127.0.0.1:{third_party.port},127.0.0.1:{llms.openai.port}",
        redis_url=redis_url,
        extra_env=env,
    )
    yield stack
    try:
        assert stack.stop() == 0
    finally:
        client = redis.Redis.from_url(redis_url)
        for pattern in (*(f"altan:{t}:*" for t in TENANTS), f"{stack.env['ALTAN_TASK_QUEUE']}*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
        client.close()


TERMINAL = ("succeeded", "failed", "cancelled")


def _terminal(stack: Stack, api: httpx.Client, task_id: str, timeout: float = 60) -> dict[str, Any]:
    """The task once it ended, asked again while a service is down or restarting (503)."""
    task: dict[str, Any] = {}

    def ended() -> bool:
        nonlocal task
        try:
            answer = api.get(f"/v1/tasks/{task_id}")
        except httpx.TransportError:
            return False
        assert answer.status_code in (200, 503), answer.text
        task = answer.json() if answer.status_code == 200 else {}
        return task.get("status") in TERMINAL

    wait_until(ended, f"task {task_id} ends", stack, timeout)
    return task


def test_an_agent_killed_mid_task_is_resumed_and_the_step_in_flight_is_performed_once(
    redis_stack: Stack, third_party: FakeThirdParty
) -> None:
    tenant = _tenant()
    first, second = f"/idempotent/first-{tenant}", f"/idempotent/second-{tenant}"
    plan = {
        "plan": [
            {"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}{first}"}},
            # Performed at once, answered 3 s later: the agent dies in between.
            {
                "id": "s2",
                "tool": "http_request",
                "depends_on": ["s1"],
                "arguments": {"url": f"{third_party.base_url}{second}?sleep=3"},
            },
        ]
    }
    with redis_stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "payer", "tools": ["http_request"]}).json()["id"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        wait_until(lambda: len(third_party.requests_to(second)) == 1, "step s2 reaches the third party", redis_stack)
        os.kill(redis_stack.service_pids()["agent"], signal.SIGKILL)
        task = _terminal(redis_stack, api, task_id)
        events = [e["type"] for e in _events(api, task_id)]
    assert task["status"] == "succeeded", task
    assert "task.resumed" in events
    # s1 finished before the kill: not called again. s2 was in flight: called again, with the same key.
    assert [r.headers["Idempotency-Key"] for r in third_party.requests_to(first)] == [f"{task_id}:s1"]
    keys = [r.headers["Idempotency-Key"] for r in third_party.requests_to(second)]
    assert len(keys) >= 2 and set(keys) == {f"{task_id}:s2"}
    assert third_party.performed[f"{task_id}:s2"] == 1
    assert task["result"]["s2"]["performed"] == 1


def test_an_llm_task_killed_during_a_tool_call_goes_on_after_its_recorded_turns(
    redis_stack: Stack, third_party: FakeThirdParty, llms: Llms
) -> None:
    tenant = _tenant()
    path = f"/idempotent/llm-{tenant}"
    model = llms.model(
        Reply(calls=(Call("http_request", {"url": f"{third_party.base_url}{path}?sleep=3"}),)),
        Reply(text="Paid once."),
    )
    with redis_stack.client(tenant) as api:
        body = {"name": "payer", "llm": llms.config(model), "tools": ["http_request"]}
        agent_id = api.post("/v1/agents", json=body).json()["id"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": "Pay, please."}).json()["task_id"]
        wait_until(
            lambda: len(third_party.requests_to(path)) == 1, "the tool call reaches the third party", redis_stack
        )
        os.kill(redis_stack.service_pids()["agent"], signal.SIGKILL)
        task = _terminal(redis_stack, api, task_id)
        events = [e["type"] for e in _events(api, task_id)]
        thread = api.get(f"/v1/threads/{task['thread_id']}").json()["messages"]
    assert task["status"] == "succeeded", task
    assert task["result"] == {"answer": "Paid once."} and "task.resumed" in events
    # The model was asked twice in all: its first answer was not asked for again after the restart.
    assert len(llms.requests(model)) == 2
    keys = {r.headers["Idempotency-Key"] for r in third_party.requests_to(path)}
    assert keys == {f"{task_id}:t1c1"} and third_party.performed[f"{task_id}:t1c1"] == 1
    assert [m["role"] for m in thread] == ["user", "assistant", "tool", "assistant"]
    assert [s["id"] for s in task["steps"]] == ["t1c1"]


@pytest.fixture
def second_agent(redis_stack: Stack) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Another agent replica on the stack's Redis, work queue and integrator; its process and its output lines."""
    port = free_port()
    env = {k: v for k, v in redis_stack.env.items() if k != "ALTAN_AGENT_METRICS_PORT"}
    env.update(
        ALTAN_AGENT_PORT=str(port), ALTAN_INTEGRATOR_ADDR=f"127.0.0.1:{redis_stack.internal_ports['integrator']}"
    )
    env[SIGNING_KEY_SETTING] = str(DELEGATION_SIGNING_KEY)  # an agent replica signs (stack.env leaves the key out)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.agent"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        lines.extend(process.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        yield process, lines
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        process.wait(timeout=30)
        reader.join(10)
        if process.stdout is not None:
            process.stdout.close()
        assert process.returncode == 0, "".join(lines)[-3000:]


def test_a_replica_stopped_past_its_lease_writes_nothing_after_another_finished_its_task(
    redis_stack: Stack,
    redis_url: str,
    third_party: FakeThirdParty,
    second_agent: tuple[subprocess.Popen[str], list[str]],
) -> None:
    tenant = _tenant()
    first, second = f"/idempotent/fence1-{tenant}", f"/idempotent/fence2-{tenant}"
    plan = {
        "plan": [
            # Performed at once, answered 3 s later: the replica running it is stopped (SIGSTOP) in between.
            {"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}{first}?sleep=3"}},
            {
                "id": "s2",
                "tool": "http_request",
                "depends_on": ["s1"],
                "arguments": {"url": f"{third_party.base_url}{second}"},
            },
        ]
    }
    replica, replica_lines = second_agent
    state = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = redis_stack.env["ALTAN_TASK_QUEUE"]

    def task_doc(task_id: str) -> dict[str, Any]:
        raw = state.hget(f"altan:{tenant}:agent:tasks", task_id)
        return json.loads(raw) if raw else {}

    def events(task_id: str) -> list[dict[str, Any]]:
        return [json.loads(fields["d"]) for _, fields in state.xrange(f"altan:{tenant}:agent:events:{task_id}")]

    stopped = 0
    try:
        with redis_stack.client(tenant) as api:
            agent_id = api.post("/v1/agents", json={"name": "payer", "tools": ["http_request"]}).json()["id"]
            task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
            wait_until(lambda: len(third_party.requests_to(first)) == 1, "step s1 reaches the third party", redis_stack)
            # The replica holding the task's queue entry (consumers are named <host>-<pid>-<nonce>) hangs.
            (holding,) = state.xpending_range(queue, "agents", min="-", max="+", count=10)
            stopped = int(holding["consumer"].rsplit("-", 2)[1])
            assert stopped in (replica.pid, redis_stack.service_pids()["agent"])
            os.kill(stopped, signal.SIGSTOP)
            # Past its 2 s lease, the other replica reclaims the entry and runs the task to its end (read from Redis:
            # the gateway's agent may be the one stopped).
            wait_until(
                lambda: task_doc(task_id).get("status") in TERMINAL, "the other replica ends the task", redis_stack
            )
            ended, ended_events = task_doc(task_id), events(task_id)
            os.kill(stopped, signal.SIGCONT)
            stopped = 0
            # The stopped replica wakes, gets its s1 answer, and finds the task taken over at its first write.
            woke = "a later delivery took this task over"

            def woken() -> bool:  # (or wrote something, which the assertions below refuse)
                said = woke in redis_stack.logs() or woke in "".join(replica_lines)
                return said or task_doc(task_id) != ended or len(events(task_id)) != len(ended_events)

            wait_until(woken, "the woken run stops", redis_stack)
            task, after = _terminal(redis_stack, api, task_id), task_doc(task_id)
            streamed = [e["type"] for e in _events(api, task_id)]
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        state.close()
    assert ended["status"] == "succeeded", ended
    # Nothing written after the end: no second terminal write, no status flapping.
    assert task["status"] == "succeeded" and after == ended
    kinds = [e["type"] for e in ended_events]
    assert kinds.count("task.succeeded") == 1 and kinds[-1] == "task.succeeded" and "task.resumed" in kinds
    assert streamed == kinds and [e["type"] for e in events(task_id)] == kinds
    assert [e for e in events(task_id) if e["type"] == "tool.finished"] == [
        e for e in ended_events if e["type"] == "tool.finished"
    ]
    # Each third-party effect once per key; s2 was called by the replica that finished only.
    assert {r.headers["Idempotency-Key"] for r in third_party.requests_to(first)} == {f"{task_id}:s1"}
    assert third_party.performed[f"{task_id}:s1"] == 1 and third_party.performed[f"{task_id}:s2"] == 1
    assert [r.headers["Idempotency-Key"] for r in third_party.requests_to(second)] == [f"{task_id}:s2"]


def test_an_llm_turn_whose_integrator_died_is_asked_again_and_the_task_succeeds(redis_stack: Stack, llms: Llms) -> None:
    tenant = _tenant()
    # The first request of the turn is answered 5 s late: the integrator is killed meanwhile, with the turn in flight.
    model = llms.model(Delay(5, Reply(text="Too late.")), Reply(text="Done after the restart."))
    with redis_stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "writer", "llm": llms.config(model)}).json()["id"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": "Write, please."}).json()["task_id"]
        wait_until(lambda: len(llms.requests(model)) == 1, "the turn reaches the provider", redis_stack)
        integrator = redis_stack.service_pids()["integrator"]
        os.kill(integrator, signal.SIGKILL)
        task = _terminal(redis_stack, api, task_id)
        events = [e["type"] for e in _events(api, task_id)]
    assert task["status"] == "succeeded", task
    assert task["result"] == {"answer": "Done after the restart."}
    # Asked once more for that turn, by the restarted integrator: twice in all, and one turn recorded.
    assert len(llms.requests(model)) == 2
    assert task["usage"]["llm_calls"] == 1 and events.count("llm.called") == 1
    assert redis_stack.service_pids()["integrator"] != integrator


def test_a_delegation_is_accepted_only_internally_and_only_for_its_task_and_tenant(redis_stack: Stack) -> None:
    tenant, other = _tenant(), _tenant()
    plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 1}, "path": "a"}}]}
    with redis_stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["json_extract"]}).json()["id"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        assert _finished(api, task_id)["status"] == "succeeded"

    def claims(tenant_id: str, for_task: str) -> dict[str, Any]:
        now = int(time.time())
        return {
            "tenant_id": tenant_id,
            "sub": "alice",
            "role": "member",
            "task_id": for_task,
            "aud": "altan-internal",
            "iss": "altan-internal",
            "iat": now,
            "exp": now + 60,
        }

    agent_key = load_signing_key(DELEGATION_SIGNING_KEY)  # what only the agent holds
    genuine = issue_delegation(agent_key, tenant=tenant, sub="alice", role="member", task_id=task_id, ttl=60)
    # The public gateway refuses a delegation, even a genuine one.
    public = redis_stack.client(tenant)
    public.headers["Authorization"] = f"Bearer {genuine}"
    with public:
        refused = public.get(f"/v1/tasks/{task_id}")
    assert refused.status_code == 401, refused.text

    def get_task(token: str, wanted: str) -> grpc.StatusCode:
        with grpc.insecure_channel(f"127.0.0.1:{redis_stack.internal_ports['agent']}") as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            try:
                stub.GetTask(
                    agent_pb2.GetTaskRequest(task_id=wanted),
                    metadata=[("authorization", f"Bearer {token}")],
                    timeout=10,
                )
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

    # The internal agent port accepts the genuine delegation for its own task...
    assert get_task(genuine, task_id) == grpc.StatusCode.OK
    # ...refuses one signed with the tenants' JWT secret or the old kind of symmetric key...
    for secret in (redis_stack.env["ALTAN_JWT_SECRET"], "x" * 40):
        assert get_task(jwt.encode(claims(tenant, task_id), secret), task_id) == grpc.StatusCode.UNAUTHENTICATED
    # ...and another tenant's delegation, even for this task's id, sees nothing of this tenant.
    other_tenants = issue_delegation(agent_key, tenant=other, sub="alice", role="member", task_id=task_id, ttl=60)
    assert get_task(other_tenants, task_id) == grpc.StatusCode.NOT_FOUND


def test_a_process_holding_only_the_public_key_cannot_mint_a_delegation(redis_stack: Stack) -> None:
    """What a tool container holds (the verifiers' public key file) signs nothing any internal service accepts."""
    tenant = _tenant()
    plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 1}, "path": "a"}}]}
    with redis_stack.client(tenant) as api:
        agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["json_extract"]}).json()["id"]
        task_id = api.post(f"/v1/agents/{agent_id}/tasks", json={"input": plan}).json()["task_id"]
        assert _finished(api, task_id)["status"] == "succeeded"
    public_file = Path(redis_stack.env["ALTAN_DELEGATION_PUBLIC_KEYS_FILE"])
    assert SIGNING_KEY_SETTING not in redis_stack.env
    public_pem = public_file.read_bytes()
    (kid,) = load_public_keys(public_file)
    now = int(time.time())
    claims = {
        "tenant_id": tenant,
        "sub": "mallory",
        "role": "member",
        "task_id": task_id,
        "aud": "altan-internal",
        "iss": "altan-internal",
        "iat": now,
        "exp": now + 60,
    }
    body = _b64(json.dumps(claims).encode())

    def hand_signed(alg: str, sign: Callable[[bytes], bytes]) -> str:
        head = _b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
        return f"{head}.{body}.{_b64(sign(f'{head}.{body}'.encode()))}"

    own_key = ec.generate_private_key(ec.SECP256R1())
    forgeries = {
        # A key of its own, under the install's kid.
        "own key": jwt.encode(claims, own_key, algorithm="ES256", headers={"kid": kid}),
        # The public key as an HMAC secret (algorithm confusion).
        "HS256 with the public key": hand_signed("HS256", lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()),
        "alg none": hand_signed("none", lambda m: b""),
        # A kid no verifier holds (a key rotated away, say).
        "unknown kid": jwt.encode(claims, own_key, algorithm="ES256", headers={"kid": "rotated-away"}),
    }
    request = agent_pb2.GetTaskRequest(task_id=task_id)
    with grpc.insecure_channel(f"127.0.0.1:{redis_stack.internal_ports['agent']}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        for what, token in forgeries.items():
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetTask(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
    # The tool service too; the agent's own delegation (the control) it accepts.
    genuine = issue_delegation(
        load_signing_key(DELEGATION_SIGNING_KEY), tenant=tenant, sub="alice", role="member", task_id=task_id, ttl=60
    )
    with grpc.insecure_channel(f"127.0.0.1:{redis_stack.internal_ports['tool']}") as channel:
        tools = tool_pb2_grpc.ToolServiceStub(channel)
        tools.ListTools(tool_pb2.ListToolsRequest(), metadata=[("authorization", f"Bearer {genuine}")], timeout=10)
        for what, token in forgeries.items():
            with pytest.raises(grpc.RpcError) as refused:
                tools.ListTools(
                    tool_pb2.ListToolsRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, what


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_slow_tools_and_unanswered_approvals_end_with_the_tasks_deadline(
    tmp_path: Path, third_party: FakeThirdParty
) -> None:
    stack = start_stack(
        data_dir=tmp_path / "data",
        egress_allow=f"127.0.0.1:{third_party.port}",
        redis_url=None,
        extra_env={"ALTAN_TASK_DEADLINE_SECONDS": "2"},
    )
    try:
        with stack.client(new_tenant()) as api:
            tool = {
                "tool_id": "pay",
                "name": "Pay",
                "endpoint": f"{third_party.base_url}/idempotent/deadline",
                "method": "POST",
                "auth": "none",
                "parameters": [],
                "requires_approval": True,
            }
            assert api.post("/v1/tools", json=tool).status_code == 201
            agent_id = api.post("/v1/agents", json={"name": "a", "tools": ["http_request", "pay"]}).json()["id"]
            slow = {
                "plan": [{"id": "s1", "tool": "http_request", "arguments": {"url": f"{third_party.base_url}/sleep/5"}}]
            }
            waiting = {"plan": [{"id": "s1", "tool": "pay"}]}
            ids = [
                api.post(f"/v1/agents/{agent_id}/tasks", json={"input": p}).json()["task_id"] for p in (slow, waiting)
            ]
            for task_id in ids:
                task = _finished(api, task_id)
                assert task["status"] == "failed", task
                assert task["error"].startswith("deadline exceeded: the task did not end within 2s"), task
    finally:
        assert stack.stop() == 0
