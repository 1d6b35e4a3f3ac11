"""altan.tls over real grpc.aio servers on 127.0.0.1: a client follows its rotated certificate without a new
ServiceChannel, a server its rotated certificate and CA without a restart, and the health-only port answers probes
in plaintext and nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from altan.auth import TokenVerifier
from altan.clients import ServiceChannel
from altan.config import ConfigurationError, Settings
from altan.devca import DevelopmentCa
from altan.server import ServerTls, serve_until_stopped
from altan.tls import ReloadingChannel, TlsFiles, server_credentials
from tests.e2e.stack import free_port

SECRET = "unit-test-hs256-secret-that-is-long-enough-for-sha256-and-then-some"
WHO = "/test.Echo/Who"


def _who_handler() -> grpc.GenericRpcHandler:
    async def who(request: bytes, context: Any) -> bytes:
        return b",".join(sorted(context.auth_context().get("x509_subject_alternative_name", ())))

    return grpc.method_handlers_generic_handler("test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)})


async def _echo_server(files: TlsFiles) -> AsyncIterator[int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_who_handler()])
    port = server.add_secure_port("127.0.0.1:0", server_credentials(files))
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_client_follows_its_rotated_certificate(tmp_path: Path) -> None:
    ca = DevelopmentCa()
    server_files = TlsFiles(*ca.write(tmp_path / "server", "server.test"))
    client_files = TlsFiles(*ca.write(tmp_path / "client", "first.test"))
    async for port in _echo_server(server_files):
        clock = Clock()
        channel = ReloadingChannel(f"127.0.0.1:{port}", client_files, (), clock=clock)
        who = channel.unary_unary(WHO)
        assert b"first.test" in await who(b"", timeout=5)
        ca.write(tmp_path / "client", "second.test")
        assert b"first.test" in await who(b"", timeout=5)  # looked at again at most once a second
        clock.now += 1.5
        answer = await who(b"", timeout=5)
        assert b"second.test" in answer and b"first.test" not in answer
        await channel.close()


async def test_a_server_follows_its_rotated_certificate_and_ca(tmp_path: Path) -> None:
    old, new = DevelopmentCa("old CA"), DevelopmentCa("new CA")
    server_files = TlsFiles(*old.write(tmp_path / "server", "server.test"))
    async for port in _echo_server(server_files):
        old_client = ServiceChannel(f"127.0.0.1:{port}", 5, tls=TlsFiles(*old.write(tmp_path / "a", "a.test")))
        assert await old_client.channel.unary_unary(WHO)(b"", timeout=5) == b"127.0.0.1,a.test,localhost"
        new.write(tmp_path / "server", "server.test")  # a new CA and key: the next connection uses them
        new_client = ServiceChannel(f"127.0.0.1:{port}", 5, tls=TlsFiles(*new.write(tmp_path / "b", "b.test")))
        assert b"b.test" in await new_client.channel.unary_unary(WHO)(b"", timeout=5)
        stale = ServiceChannel(f"127.0.0.1:{port}", 5, tls=TlsFiles(*old.write(tmp_path / "c", "c.test")))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stale.channel.unary_unary(WHO)(b"", timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for client in (old_client, new_client, stale):
            await client.aclose()


async def test_the_health_port_answers_probes_in_plaintext_and_nothing_else(tmp_path: Path) -> None:
    settings = Settings(jwt_secret=SECRET, jwt_algorithms=("HS256",))
    files = TlsFiles(*DevelopmentCa().write(tmp_path / "s", "s.test"))
    port, health_port, stop = free_port(), free_port(), asyncio.Event()
    serving = asyncio.create_task(
        serve_until_stopped(
            [],
            verifier=TokenVerifier(settings),
            address=f"127.0.0.1:{port}",
            grace_seconds=0,
            stop=stop,
            generic_handlers=[_who_handler()],
            tls=ServerTls(files, ("s.test",)),
            health_address=f"127.0.0.1:{health_port}",
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as probe:
            health = health_pb2_grpc.HealthStub(probe)
            for _ in range(50):
                try:
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await probe.unary_unary(WHO)(b"", timeout=2)
            assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop.set()
        await serving


@pytest.mark.parametrize(
    "given",
    [
        {"tls_cert_file": "/c"},
        {"tls_cert_file": "/c", "tls_key_file": "/k"},
        {"tls_allowed_clients": "gateway.altan.local"},
    ],
)
def test_tls_settings_go_together(given: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="ALTAN_TLS"):
        Settings(jwt_secret=SECRET, **given)  # type: ignore[arg-type]


def test_allowed_clients_are_a_list() -> None:
    settings = Settings(
        jwt_secret=SECRET,
        tls_cert_file="/c",  # type: ignore[arg-type]
        tls_key_file="/k",  # type: ignore[arg-type]
        tls_ca_file="/a",  # type: ignore[arg-type]
        tls_allowed_clients=" a.svc , b.svc ",  # type: ignore[arg-type]
    )
    assert settings.tls_allowed_clients == ("a.svc", "b.svc")


def test_unreadable_or_mismatched_files_stop_the_process_with_one_line(tmp_path: Path) -> None:
    ca = DevelopmentCa()
    cert, key, ca_file = ca.write(tmp_path / "a", "a.test")
    with pytest.raises(ConfigurationError, match=r"ALTAN_TLS_CERT_FILE.*cannot read .*missing\.crt"):
        server_credentials(TlsFiles(tmp_path / "missing.crt", key, ca_file))
    _, other_key, _ = ca.write(tmp_path / "b", "b.test")
    with pytest.raises(ConfigurationError, match="is not the key of"):
        ReloadingChannel("127.0.0.1:1", TlsFiles(cert, other_key, ca_file), ())
