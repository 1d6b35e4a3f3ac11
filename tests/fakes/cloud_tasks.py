"""An in-process fake of Google Cloud Tasks, spoken to by the real client library, that pushes its tasks over HTTP.

A real gRPC server on 127.0.0.1 serves the API's method paths (``/google.cloud.tasks.v2.CloudTasks/CreateTask``,
``GetTask``, ``DeleteTask``, and ``/google.cloud.tasks.v2beta3.CloudTasks/GetQueue`` for the queue's statistics) with
the request and response classes ``google-cloud-tasks`` ships. What it keeps of the real service:

- tasks by name; a create with the name of a task that exists, ran, or was deleted is ALREADY_EXISTS (Google keeps
  names of finished tasks for about an hour; this fake for its lifetime); unknown queues are NOT_FOUND; names,
  URLs and dispatch deadlines (15 s to 30 min) are checked as Google checks them;
- each task is pushed to its ``http_request.url`` (POST, its body and headers, ``X-CloudTasks-*`` headers) with an
  OIDC token for its ``oidc_token`` (RS256, issuer ``https://accounts.google.com``, ``aud`` the audience or the URL,
  ``email`` the service account) signed with a key of the fake's, whose JWKS it serves over HTTP (:attr:`jwks_url`);
- not before its ``schedule_time``; an attempt ends at its dispatch deadline; a non-2xx answer or a connection
  failure is retried with exponential backoff (``min_backoff`` doubling up to ``max_backoff``) until it succeeds,
  or ``max_attempts`` (0: no limit).

What it did is there for assertions: :attr:`attempts` (every push and its outcome), :attr:`created` (every task
created), :attr:`calls`. ``fail`` makes an RPC answer a status; ``stop()`` makes the API unreachable (pushes go on).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from google.cloud import tasks_v2, tasks_v2beta3
from google.protobuf import duration_pb2, empty_pb2, timestamp_pb2

__all__ = ["QUEUE", "SERVICE_ACCOUNT", "Attempt", "FakeCloudTasks"]

QUEUE = "projects/altan-test/locations/europe-west1/queues/altan-tasks"
SERVICE_ACCOUNT = "altan-tasks@altan-test.iam.gserviceaccount.com"
ISSUER = "https://accounts.google.com"
_TASK_NAME = re.compile(r"^(projects/[^/]+/locations/[^/]+/queues/[^/]+)/tasks/([A-Za-z0-9_-]{1,500})$")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Attempt:
    """One push: the task's name, the status answered (None: no answer), the error, when, its retry count."""

    task: str
    status: int | None
    error: str
    at: float
    retry: int
    audience: str


@dataclass
class _Entry:
    task: tasks_v2.Task
    due: float
    retries: int = 0
    in_flight: bool = False
    created_at: float = field(default_factory=time.time)


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class FakeCloudTasks:
    """The Cloud Tasks API (gRPC) and its pushes (HTTP), with a JWKS endpoint for the tokens it signs."""

    SERVICE = "google.cloud.tasks.v2.CloudTasks"
    BETA_SERVICE = "google.cloud.tasks.v2beta3.CloudTasks"

    def __init__(
        self,
        queues: tuple[str, ...] = (QUEUE,),
        *,
        min_backoff: float = 0.2,
        max_backoff: float = 2.0,
        max_attempts: int = 0,
    ) -> None:
        self.queues = set(queues)
        self.min_backoff, self.max_backoff, self.max_attempts = min_backoff, max_backoff, max_attempts
        self.tasks: dict[str, _Entry] = {}  # waiting or being pushed
        self.finished: dict[str, str] = {}  # name -> how it ended: "succeeded", "deleted", "gave up"
        self.created: list[tasks_v2.Task] = []
        self.attempts: list[Attempt] = []
        self.calls: list[str] = []
        self.fail: dict[str, grpc.StatusCode] = {}
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex
        self._lock = threading.Condition()
        self._server: grpc.Server | None = None
        self._jwks: ThreadingHTTPServer | None = None
        self._pushes = futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="fake-cloud-tasks-push")
        self._dispatcher: threading.Thread | None = None
        self._closing = False
        self.port = 0

    # --- what tests use ------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        assert self._jwks is not None
        return f"http://127.0.0.1:{self._jwks.server_address[1]}/oauth2/v3/certs"

    def sign(self, claims: dict[str, Any], key: Any = None, kid: str | None = None, algorithm: str = "RS256") -> str:
        """A token as this fake signs it (or with another key / kid / algorithm, to forge one)."""
        if algorithm == "none":
            return jwt.encode(claims, None, algorithm="none", headers={"kid": kid or self.kid})
        return jwt.encode(
            claims, self.key if key is None else key, algorithm=algorithm, headers={"kid": kid or self.kid}
        )

    def claims(self, audience: str, email: str = SERVICE_ACCOUNT, **overrides: Any) -> dict[str, Any]:
        """The claims of the OIDC token Google sends for ``email`` to ``audience``."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": audience,
            "azp": "104395723512497865401",
            "email": email,
            "email_verified": True,
            "exp": now + 3600,
            "iat": now,
            "iss": ISSUER,
            "sub": "104395723512497865401",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def attempts_of(self, task_id_prefix: str) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.task.rsplit("/", 1)[1].startswith(task_id_prefix)]

    def pending(self) -> list[str]:
        with self._lock:
            return list(self.tasks)

    # --- RPCs ----------------------------------------------------------------------------------------------------

    def CreateTask(self, request: tasks_v2.CreateTaskRequest) -> tasks_v2.Task:
        if request.parent not in self.queues:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Requested entity was not found. ({request.parent})")
        task = tasks_v2.Task(request.task)
        if not task.name:
            task.name = f"{request.parent}/tasks/{uuid.uuid4().int}"
        match = _TASK_NAME.match(task.name)
        if match is None or match.group(1) != request.parent:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "Task.name is not a valid task name of the parent queue")
        if task.name in self.tasks or task.name in self.finished:
            raise _Abort(grpc.StatusCode.ALREADY_EXISTS, "Requested entity already exists")
        if "http_request" not in task:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "this fake serves HTTP targets only")
        if not re.match(r"^https?://[^/]+", task.http_request.url):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "HttpRequest.url must be an http(s) URL")
        if "dispatch_deadline" in task:
            seconds = task.dispatch_deadline.total_seconds()
            if not 15 <= seconds <= 1800:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "dispatch_deadline must be within [15s, 30m]")
        else:
            task.dispatch_deadline = duration_pb2.Duration(seconds=600)
        now = time.time()
        due = task.schedule_time.timestamp() if "schedule_time" in task else now
        task.schedule_time = _stamp(due)
        task.create_time = _stamp(now)
        task.view = tasks_v2.Task.View.BASIC
        self.tasks[task.name] = _Entry(task, due)
        self.created.append(task)
        self._lock.notify_all()
        return _basic(task)

    def GetTask(self, request: tasks_v2.GetTaskRequest) -> tasks_v2.Task:
        entry = self.tasks.get(request.name)
        if entry is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, "Requested entity was not found.")
        return _basic(entry.task)

    def DeleteTask(self, request: tasks_v2.DeleteTaskRequest) -> empty_pb2.Empty:
        if self.tasks.pop(request.name, None) is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, "Requested entity was not found.")
        self.finished[request.name] = "deleted"
        return empty_pb2.Empty()

    def GetQueue(self, request: tasks_v2beta3.GetQueueRequest) -> tasks_v2beta3.Queue:
        if request.name not in self.queues:
            raise _Abort(grpc.StatusCode.NOT_FOUND, "Requested entity was not found.")
        queue = tasks_v2beta3.Queue(name=request.name, state=tasks_v2beta3.Queue.State.RUNNING)
        if "stats" in request.read_mask.paths:
            queue.stats = tasks_v2beta3.QueueStats(
                tasks_count=len(self.tasks),
                concurrent_dispatches_count=sum(1 for e in self.tasks.values() if e.in_flight),
            )
        return queue

    # --- pushes --------------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        with self._lock:
            while not self._closing:
                now = time.time()
                due = [e for e in self.tasks.values() if not e.in_flight and e.due <= now]
                for entry in due:
                    entry.in_flight = True
                    self._pushes.submit(self._push, entry)
                later = [e.due for e in self.tasks.values() if not e.in_flight and e.due > now]
                self._lock.wait(min([*later, now + 1.0]) - now)

    def _push(self, entry: _Entry) -> None:
        task = entry.task
        request = task.http_request
        audience = request.oidc_token.audience or request.url
        headers = dict(request.headers)
        headers.update(
            {
                "User-Agent": "Google-Cloud-Tasks",
                "X-CloudTasks-QueueName": task.name.split("/")[5],
                "X-CloudTasks-TaskName": task.name.rsplit("/", 1)[1],
                "X-CloudTasks-TaskRetryCount": str(entry.retries),
                "X-CloudTasks-TaskExecutionCount": str(sum(1 for a in self.attempts if a.task == task.name)),
                "X-CloudTasks-TaskETA": f"{entry.due:.6f}",
            }
        )
        if request.oidc_token.service_account_email:
            token = self.sign(self.claims(audience, request.oidc_token.service_account_email))
            headers["Authorization"] = f"Bearer {token}"
        status: int | None = None
        error = ""
        try:
            deadline = task.dispatch_deadline.total_seconds()
            with httpx.Client(timeout=httpx.Timeout(deadline, connect=5.0), trust_env=False) as client:
                method = tasks_v2.HttpMethod(request.http_method or tasks_v2.HttpMethod.POST).name
                status = client.request(method, request.url, headers=headers, content=request.body).status_code
        except httpx.TimeoutException:
            error = "DEADLINE_EXCEEDED"
        except httpx.TransportError as exc:
            error = f"UNAVAILABLE: {type(exc).__name__}"
        with self._lock:
            self.attempts.append(Attempt(task.name, status, error, time.time(), entry.retries, audience))
            entry.in_flight = False
            if self.tasks.get(task.name) is not entry:
                pass  # deleted meanwhile
            elif status is not None and 200 <= status < 300:
                del self.tasks[task.name]
                self.finished[task.name] = "succeeded"
            elif self.max_attempts and entry.retries + 1 >= self.max_attempts:
                del self.tasks[task.name]
                self.finished[task.name] = "gave up"
            else:
                entry.due = time.time() + min(self.max_backoff, self.min_backoff * 2**entry.retries)
                entry.retries += 1
            self._lock.notify_all()

    # --- serving -------------------------------------------------------------------------------------------------

    def handler(self) -> list[grpc.GenericRpcHandler]:
        v2 = {
            "CreateTask": (tasks_v2.CreateTaskRequest, tasks_v2.Task),
            "GetTask": (tasks_v2.GetTaskRequest, tasks_v2.Task),
            "DeleteTask": (tasks_v2.DeleteTaskRequest, None),
        }
        beta = {"GetQueue": (tasks_v2beta3.GetQueueRequest, tasks_v2beta3.Queue)}
        return [_generic_handler(self, self.SERVICE, v2), _generic_handler(self, self.BETA_SERVICE, beta)]

    def start(self) -> FakeCloudTasks:
        """Serve the API (on the same port as before after a ``stop()``), the JWKS and the pushes."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers(self.handler())
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        server.start()
        self._server = server
        if self._jwks is None:
            self._jwks = _serve_jwks(self)
        if self._dispatcher is None:
            self._dispatcher = threading.Thread(target=self._dispatch, name="fake-cloud-tasks", daemon=True)
            self._dispatcher.start()
        return self

    def stop(self) -> None:
        """The API unreachable from now on; tasks already created are still pushed."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def close(self) -> None:
        self.stop()
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._dispatcher is not None:
            self._dispatcher.join(5)
        self._pushes.shutdown(wait=False, cancel_futures=True)
        if self._jwks is not None:
            self._jwks.shutdown()
            self._jwks.server_close()

    def __enter__(self) -> FakeCloudTasks:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()


def _basic(task: tasks_v2.Task) -> tasks_v2.Task:
    """The task as the BASIC view returns it: without the request's body and headers."""
    shown = tasks_v2.Task(task)
    shown.http_request.body = b""
    shown.http_request.headers.clear()
    return shown


def _serve_jwks(fake: FakeCloudTasks) -> ThreadingHTTPServer:
    public = jwt.algorithms.RSAAlgorithm.to_jwk(fake.key.public_key(), as_dict=True)
    body = json.dumps({"keys": [{**public, "kid": fake.kid, "alg": "RS256", "use": "sig"}]}).encode()

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/oauth2/v3/certs":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, name="fake-jwks", daemon=True).start()
    return server


def _generic_handler(fake: FakeCloudTasks, service: str, rpcs: dict[str, tuple[Any, Any]]) -> grpc.GenericRpcHandler:
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
