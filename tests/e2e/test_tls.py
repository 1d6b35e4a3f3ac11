"""``altan up --tls``: mutual TLS between the real service processes, with the throwaway CA it makes.

A task crosses the gateway, agent, integrator and tool service over mTLS; every internal port refuses a client
without a valid certificate (plaintext, no certificate, another CA's) and a valid certificate of a service that its
NetworkPolicy does not let in; a rotated certificate is served without a restart.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from altan.cli import TLS_CALLERS
from altan.devca import DevelopmentCa, local_identity
from tests.e2e.stack import Stack, new_tenant, start_stack

# One RPC of each internal service, its request an empty message (raw bytes: the client needs no stubs).
INTERNAL_RPC = {
    "agent": "/altan.v1.AgentService/ListAgents",
    "tool": "/altan.v1.ToolService/ListTools",
    "integrator": "/altan.v1.IntegratorService/ListCredentials",
}
SERVICES = ("gateway", "agent", "tool", "integrator")


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(data_dir=tmp_path_factory.mktemp("data-tls"), egress_allow="", redis_url=None, tls=True)
    yield running
    assert running.stop() == 0, running.logs()[-5000:]


def _tls_dir(stack: Stack) -> Path:
    return Path(stack.env["ALTAN_DATA_DIR"]) / "tls"


def _call(port: int, rpc: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of one call to 127.0.0.1:port (plaintext when ``credentials`` is None)."""

    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
    with channel:
        try:
            channel.unary_unary(rpc)(b"", timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _credentials(ca: bytes, issuer: DevelopmentCa | None, identity: str = "") -> grpc.ChannelCredentials:
    if issuer is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    cert, key = issuer.issue(identity)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def test_a_task_crosses_every_service_over_mutual_tls(tls_stack: Stack) -> None:
    tenant = new_tenant()
    with tls_stack.client(tenant) as api:
        agent = api.post("/v1/agents", json={"name": "planner", "tools": ["json_extract"]})
        assert agent.status_code == 201, agent.text
        plan = {"plan": [{"id": "s1", "tool": "json_extract", "arguments": {"data": {"a": 7}, "path": "a"}}]}
        task_id = api.post(f"/v1/agents/{agent.json()['id']}/tasks", json={"input": plan}).json()["task_id"]
        deadline = time.monotonic() + 30
        while (task := api.get(f"/v1/tasks/{task_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, task
            time.sleep(0.1)
        assert task["status"] == "succeeded", task
        invoked = api.post("/v1/tools/json_extract/invoke", json={"arguments": {"data": {"b": 1}, "path": "b"}})
        assert invoked.status_code == 200 and invoked.json()["output"]["value"] == 1, invoked.text
    # The stack really runs TLS: each service was given its files and the callers it admits.
    assert all((_tls_dir(tls_stack) / name / "tls.crt").is_file() for name in SERVICES)


@pytest.mark.parametrize("service", sorted(INTERNAL_RPC))
def test_every_internal_port_refuses_a_client_without_a_valid_certificate(tls_stack: Stack, service: str) -> None:
    port, rpc = tls_stack.internal_ports[service], INTERNAL_RPC[service]
    ca = DevelopmentCa.load(_tls_dir(tls_stack))
    allowed = TLS_CALLERS[service][0]
    assert _call(port, rpc, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert _call(port, rpc, _credentials(ca.pem, None)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    stranger = DevelopmentCa("another CA")  # the right name, the wrong CA
    assert _call(port, rpc, _credentials(ca.pem, stranger, local_identity(allowed))) == grpc.StatusCode.UNAVAILABLE
    # A certificate of this CA, but of a service the NetworkPolicies do not let in: refused by the server.
    for other in SERVICES:
        status = _call(port, rpc, _credentials(ca.pem, ca, local_identity(other)))
        if other in TLS_CALLERS[service]:
            assert status == grpc.StatusCode.UNAUTHENTICATED, other  # admitted; then it needs a token, as always
        else:
            assert status == grpc.StatusCode.PERMISSION_DENIED, other


def _served_certificate(port: int, tls_dir: Path) -> x509.Certificate:
    """The certificate the server at ``port`` presents to a new connection (with the gateway's own certificate)."""
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    context.check_hostname = False
    context.load_cert_chain(tls_dir / "gateway" / "tls.crt", tls_dir / "gateway" / "tls.key")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_rotated_certificate_is_served_without_a_restart(tls_stack: Stack) -> None:
    tls_dir = _tls_dir(tls_stack)
    pids = tls_stack.service_pids()
    port = tls_stack.internal_ports["tool"]
    before = _served_certificate(port, tls_dir)
    DevelopmentCa.load(tls_dir).write(tls_dir / "tool", local_identity("tool"))
    after = _served_certificate(port, tls_dir)
    assert after.serial_number != before.serial_number
    on_disk = x509.load_pem_x509_certificate((tls_dir / "tool" / "tls.crt").read_bytes())
    assert after.serial_number == on_disk.serial_number
    # The services keep calling each other (the integrator's channel to the tool service, new connections too).
    with tls_stack.client(new_tenant()) as api:
        invoked = api.post("/v1/tools/json_extract/invoke", json={"arguments": {"data": {"c": 2}, "path": "c"}})
        assert invoked.status_code == 200, invoked.text
    assert tls_stack.service_pids() == pids  # nothing restarted


def test_a_client_follows_its_rotated_certificate_without_a_restart(tls_stack: Stack) -> None:
    """The gateway's client certificate, rotated to a name the services do not admit and back: its calls follow."""
    tls_dir, pids = _tls_dir(tls_stack), tls_stack.service_pids()
    ca = DevelopmentCa.load(tls_dir)

    def invoke() -> int:
        with tls_stack.client(new_tenant()) as api:
            answer = api.post("/v1/tools/json_extract/invoke", json={"arguments": {"data": {"d": 3}, "path": "d"}})
            return answer.status_code

    def eventually(status: int) -> None:
        deadline = time.monotonic() + 15
        while (got := invoke()) != status:
            assert time.monotonic() < deadline, f"still {got}, not {status}"
            time.sleep(0.2)

    assert invoke() == 200
    try:
        ca.write(tls_dir / "gateway", "intruder.altan.local")
        eventually(403)  # the integrator refuses the gateway's new certificate: the gateway uses it
    finally:
        ca.write(tls_dir / "gateway", local_identity("gateway"))
    eventually(200)
    assert tls_stack.service_pids() == pids
