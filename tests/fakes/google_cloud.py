"""In-process fakes of Google Secret Manager and Cloud Logging, spoken to by the real client libraries.

Each is a real gRPC server on 127.0.0.1 serving the API's real method paths (``/google.cloud.secretmanager.v1.
SecretManagerService/AddSecretVersion``, ...) with the request and response messages the client libraries ship, so
the code under test runs its real client over a real channel. They keep what the real API checks that our code relies
on: names with project numbers, ``latest``, version states, payload checksums, secret id and label rules, and the
real status codes (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT). ``fail`` makes an RPC answer a
chosen status (PERMISSION_DENIED, UNAVAILABLE, ...); ``stop()`` makes the endpoint unreachable.

python -m tests.fakes.google_cloud --port 8085  serves both on one port, for trying a stack by hand.
"""

from __future__ import annotations

import argparse
import re
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import grpc
from google.cloud import secretmanager_v1 as sm
from google.cloud.logging_v2 import types as logging_types
from google.protobuf import empty_pb2, timestamp_pb2

__all__ = ["FakeCloudLogging", "FakeGoogleCloud", "FakeSecretManager"]

PROJECT_NUMBER = "314159265358"
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_State = sm.SecretVersion.State


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Secret:
    secret: sm.Secret
    versions: list[tuple[sm.SecretVersion, bytes]] = field(default_factory=list)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class FakeSecretManager:
    """``google.cloud.secretmanager.v1.SecretManagerService``: the RPCs the secret backend uses."""

    SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"

    def __init__(self) -> None:
        self.secrets: dict[str, _Secret] = {}  # by secret id
        self.fail: dict[str, grpc.StatusCode] = {}  # RPC name (or "*") -> the status it answers
        self.calls: list[str] = []
        self._lock = threading.Lock()

    # --- RPCs --------------------------------------------------------------------------------------------------

    def CreateSecret(self, request: sm.CreateSecretRequest) -> sm.Secret:
        _parse(request.parent, r"projects/([^/]+)")
        if not _SECRET_ID.match(request.secret_id):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "secret_id does not match [A-Za-z0-9_-]{1,255}")
        if "replication" not in request.secret:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "Secret.replication is required")
        for key, value in request.secret.labels.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid label {key!r}")
        if request.secret_id in self.secrets:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"Secret [{request.secret_id}] already exists.")
        secret = sm.Secret(request.secret)
        secret.name = f"projects/{PROJECT_NUMBER}/secrets/{request.secret_id}"
        secret.create_time = _now()
        self.secrets[request.secret_id] = _Secret(secret)
        return secret

    def AddSecretVersion(self, request: sm.AddSecretVersionRequest) -> sm.SecretVersion:
        entry = self._secret(_parse(request.parent, r"projects/([^/]+)/secrets/([^/]+)")[1])
        data = request.payload.data
        if "data_crc32c" in request.payload and request.payload.data_crc32c != google_crc32c.value(data):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "data_crc32c does not match the payload")
        number = len(entry.versions) + 1
        version = sm.SecretVersion(
            name=f"{entry.secret.name}/versions/{number}", state=_State.ENABLED, create_time=_now()
        )
        entry.versions.append((version, data))
        return version

    def AccessSecretVersion(self, request: sm.AccessSecretVersionRequest) -> sm.AccessSecretVersionResponse:
        version, data = self._version(request.name)
        if version.state != _State.ENABLED:
            state = _State(version.state).name
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"{version.name} is in {state} state.")
        payload = sm.SecretPayload(data=data, data_crc32c=google_crc32c.value(data))
        return sm.AccessSecretVersionResponse(name=version.name, payload=payload)

    def ListSecretVersions(self, request: sm.ListSecretVersionsRequest) -> sm.ListSecretVersionsResponse:
        entry = self._secret(_parse(request.parent, r"projects/([^/]+)/secrets/([^/]+)")[1])
        versions = [v for v, _ in reversed(entry.versions)]  # newest first, as Google lists them
        if request.filter:
            if request.filter not in ("state:ENABLED", "state:DISABLED", "state:DESTROYED"):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "this fake filters by state only")
            versions = [v for v in versions if _State(v.state).name == request.filter.split(":")[1]]
        return sm.ListSecretVersionsResponse(versions=versions, total_size=len(versions))

    def DestroySecretVersion(self, request: sm.DestroySecretVersionRequest) -> sm.SecretVersion:
        version, _ = self._version(request.name)
        if version.state == _State.DESTROYED:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"{version.name} is already destroyed.")
        entry = self.secrets[version.name.split("/")[3]]
        index = next(i for i, (v, _) in enumerate(entry.versions) if v.name == version.name)
        version.state = _State.DESTROYED
        version.destroy_time = _now()
        entry.versions[index] = (version, b"")
        return version

    def DeleteSecret(self, request: sm.DeleteSecretRequest) -> empty_pb2.Empty:
        secret_id = _parse(request.name, r"projects/([^/]+)/secrets/([^/]+)")[1]
        self._secret(secret_id)
        del self.secrets[secret_id]
        return empty_pb2.Empty()

    # --- what the tests read -----------------------------------------------------------------------------------

    def payloads(self, secret_id: str) -> list[tuple[str, bytes]]:
        """``(state, data)`` of every version of a secret, oldest first."""
        return [(_State(v.state).name, data) for v, data in self.secrets[secret_id].versions]

    def _secret(self, secret_id: str) -> _Secret:
        entry = self.secrets.get(secret_id)
        if entry is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Secret [{secret_id}] not found or has no versions.")
        return entry

    def _version(self, name: str) -> tuple[sm.SecretVersion, bytes]:
        _, secret_id, wanted = _parse(name, r"projects/([^/]+)/secrets/([^/]+)/versions/([^/]+)")
        entry = self._secret(secret_id)
        if not entry.versions:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Secret [{secret_id}] not found or has no versions.")
        if wanted == "latest":
            return entry.versions[-1]
        if not wanted.isdigit() or not 0 < int(wanted) <= len(entry.versions):
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Secret Version [{name}] not found.")
        return entry.versions[int(wanted) - 1]

    def handler(self) -> grpc.GenericRpcHandler:
        rpcs = {
            "CreateSecret": (sm.CreateSecretRequest, sm.Secret),
            "AddSecretVersion": (sm.AddSecretVersionRequest, sm.SecretVersion),
            "AccessSecretVersion": (sm.AccessSecretVersionRequest, sm.AccessSecretVersionResponse),
            "ListSecretVersions": (sm.ListSecretVersionsRequest, sm.ListSecretVersionsResponse),
            "DestroySecretVersion": (sm.DestroySecretVersionRequest, sm.SecretVersion),
            "DeleteSecret": (sm.DeleteSecretRequest, None),
        }
        return _generic_handler(self, self.SERVICE, rpcs)


class FakeCloudLogging:
    """``google.logging.v2.LoggingServiceV2``: WriteLogEntries, keeping every entry it accepted."""

    SERVICE = "google.logging.v2.LoggingServiceV2"

    def __init__(self) -> None:
        self.entries: list[logging_types.LogEntry] = []
        self.fail: dict[str, grpc.StatusCode] = {}
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def WriteLogEntries(self, request: logging_types.WriteLogEntriesRequest) -> logging_types.WriteLogEntriesResponse:
        accepted = []
        for entry in request.entries:
            merged = logging_types.LogEntry(entry)
            merged.log_name = merged.log_name or request.log_name
            if "resource" not in merged and "resource" in request:
                merged.resource = request.resource
            for key, value in request.labels.items():
                merged.labels.setdefault(key, value)
            if not re.fullmatch(r"projects/[^/]+/logs/[A-Za-z0-9_./%-]{1,512}", merged.log_name):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "log_name must be projects/P/logs/LOG_ID")
            if not merged.resource.type:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a log entry needs a monitored resource")
            accepted.append(merged)
        self.entries.extend(accepted)  # all or nothing, as without partial_success
        return logging_types.WriteLogEntriesResponse()

    def payloads(self) -> list[dict[str, Any]]:
        """The jsonPayload of every entry, as Python values, oldest first."""
        return [dict(entry.json_payload) for entry in self.entries]

    def handler(self) -> grpc.GenericRpcHandler:
        rpcs = {"WriteLogEntries": (logging_types.WriteLogEntriesRequest, logging_types.WriteLogEntriesResponse)}
        return _generic_handler(self, self.SERVICE, rpcs)


def _parse(name: str, pattern: str) -> tuple[str, ...]:
    match = re.fullmatch(pattern, name)
    if match is None:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed resource name {name!r}")
    return match.groups()


def _generic_handler(fake: Any, service: str, rpcs: dict[str, tuple[Any, Any]]) -> grpc.GenericRpcHandler:
    def method(name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            with fake._lock:
                fake.calls.append(name)
                code = fake.fail.get(name) or fake.fail.get("*")
                if code is not None:
                    context.abort(code, f"{name} refused by the fake ({code.name})")
                try:
                    return getattr(fake, name)(request)
                except _Abort as exc:
                    context.abort(exc.code, exc.message)

        return call

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            method(name),
            request_deserializer=request_type.deserialize,
            response_serializer=(lambda m: m.SerializeToString()) if response_type is None else response_type.serialize,
        )
        for name, (request_type, response_type) in rpcs.items()
    }
    return grpc.method_handlers_generic_handler(service, handlers)


class FakeGoogleCloud:
    """Both fakes behind one real gRPC server on 127.0.0.1 (a free port unless one is given)."""

    def __init__(self, port: int = 0) -> None:
        self.secret_manager = FakeSecretManager()
        self.logging = FakeCloudLogging()
        self._wanted_port = port
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeGoogleCloud:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((self.secret_manager.handler(), self.logging.handler()))
        self.port = server.add_insecure_port(f"127.0.0.1:{self._wanted_port or self.port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Unreachable from now on (connections refused); ``start()`` again serves the same port and state."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> FakeGoogleCloud:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8085)
    fake = FakeGoogleCloud(parser.parse_args().port).start()
    print(f"fake Secret Manager and Cloud Logging on {fake.address}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
