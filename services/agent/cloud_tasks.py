"""The work queue on Google Cloud Tasks (``ALTAN_WORK_QUEUE=cloud-tasks``): Cloud Tasks holds each accepted task and
pushes it to an agent replica's push port over HTTPS, with an OIDC token of the configured service account.

- :meth:`CloudTasksWorkQueue.put` creates an HTTP task with the library's asyncio client. Its name is derived from
  the tenant and the task id, so a second create of the same item (a retried submission, a retried RPC whose first
  attempt got through) is ALREADY_EXISTS, and harmless: one task, one push.
- :class:`PushApp` (served by uvicorn on ``ALTAN_AGENT_PUSH_PORT``) verifies the token (RS256 against Google's JWKS,
  issuer ``https://accounts.google.com``, the configured audience and service-account email) and refuses anything
  else with 401/403 before anything runs. It then runs the item through the same handler as the other queues and
  answers 200 once the task ended (or had already ended), 503 when it could not (a service it needs was down, or this
  replica is stopping): Cloud Tasks retries with the queue's backoff. A replica that dies mid-task breaks the
  connection; Cloud Tasks retries it, and the run goes on from its last saved step.
- A task that waits for a person's approval does not hold its push for hours: after :attr:`park_after_seconds` the
  run *parks* (its progress saved, the push answered 200) and two wake-ups are queued as tasks of their own: one
  created when the call is decided, one scheduled at the task's deadline (see services/agent/tasks.py).
- :meth:`depth` reads the queue's statistics (``tasks_count`` less ``concurrent_dispatches_count``), Google's own
  estimate, from the v2beta3 ``GetQueue`` (v2 has no statistics).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import uvicorn
from google.api_core import exceptions as google_errors
from google.api_core.retry_async import AsyncRetry
from google.auth import exceptions as auth_errors
from google.cloud import tasks_v2, tasks_v2beta3
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcAsyncIOTransport
from google.cloud.tasks_v2beta3.services.cloud_tasks.transports import (
    CloudTasksGrpcAsyncIOTransport as BetaTransport,
)
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from altan.config import ConfigurationError, Settings
from altan.errors import Unavailable
from altan.listen import CannotListen, listen_socket
from services.agent.work_queue import Handler, WorkItem

__all__ = ["GOOGLE_ISSUER", "CloudTasksWorkQueue", "PushApp", "PushAuth", "task_id_for"]

log = logging.getLogger(__name__)

GOOGLE_ISSUER = "https://accounts.google.com"
PUSH_PATH = "/v1/work"
_MAX_BODY = 16 * 1024  # a pushed body is a WorkItem: a few hundred bytes
_RETRY_AFTER = "5"
# A run waiting for approval parks after this long (a decision made at once is acted on without a round trip).
_PARK_AFTER_SECONDS = 2.0
# How long a signing key of Google's is used without fetching the JWKS again (Google rotates keys over days).
_KEY_SECONDS = 900.0
# After an outage a channel waits its reconnect backoff before it tries again (up to 120 s by default): capped.
_CHANNEL_OPTIONS = [("grpc.max_reconnect_backoff_ms", 1000)]
_TRANSIENT = (google_errors.ServiceUnavailable, google_errors.DeadlineExceeded, google_errors.InternalServerError)
_GOOGLE_ERRORS = (google_errors.GoogleAPIError, auth_errors.GoogleAuthError)


def task_id_for(item: WorkItem, wake: str = "") -> str:
    """The Cloud Tasks task id of an item (``[A-Za-z0-9_-]``): a hash of tenant and task id, so Google's task names
    tell nothing of either and spread over the key space (sequential names make hot spots); ``wake`` names a
    wake-up of a parked run."""
    digest = hashlib.sha256(f"{item.tenant_id}\0{item.task_id}".encode()).hexdigest()[:40]
    return f"t{digest}-{wake}" if wake else f"t{digest}"


class PushAuth:
    """Checks the OIDC token of a push: RS256 by a key of ``jwks_url``, Google's issuer, ``audience``, and the email
    of ``service_account`` (verified). Keys are cached; an unknown ``kid`` fetches the set again at most every 30 s
    (pyjwt's cooldown), so forged tokens cannot make us hammer Google."""

    def __init__(self, jwks_url: str, audience: str, service_account: str, leeway_seconds: int = 30) -> None:
        self._jwks = jwt.PyJWKClient(jwks_url, cache_jwk_set=True, lifespan=_KEY_SECONDS, timeout=5)
        self._keys: dict[str, tuple[jwt.PyJWK, float]] = {}  # kid -> key, until (a retired key goes within that)
        self._audience = audience
        self._email = service_account
        self._leeway = leeway_seconds

    async def check(self, authorization: str) -> tuple[int, str] | None:
        """None when the push may run; else the HTTP status (401, 403, 503) and why (for the log, no token)."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return 401, "no bearer token"
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return 401, "a malformed token"
        if header.get("alg") != "RS256" or not isinstance(header.get("kid"), str):
            return 401, f"a token signed with {header.get('alg')!r} (only RS256 with a kid)"
        key = self._keys.get(header["kid"])
        if key is None or key[1] < time.monotonic():
            try:
                # pyjwt fetches with urllib (blocking): in a thread, and only for a key not seen lately.
                found = await asyncio.to_thread(self._jwks.get_signing_key, header["kid"])
            except jwt.PyJWKClientConnectionError:
                return 503, "Google's signing keys are unreachable"
            except jwt.PyJWKClientError:
                return 401, "a token signed by an unknown key"
            if len(self._keys) > 64:
                self._keys.clear()
            key = self._keys[header["kid"]] = (found, time.monotonic() + _KEY_SECONDS)
        try:
            claims = jwt.decode(
                token,
                key[0].key,
                algorithms=["RS256"],
                audience=self._audience,
                issuer=GOOGLE_ISSUER,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            return 401, f"an invalid token ({type(exc).__name__})"
        if claims.get("email") != self._email or claims.get("email_verified") is not True:
            return 403, "a token of another identity"
        return None


class PushApp:
    """The ASGI app of the push port: ``POST /v1/work`` (Cloud Tasks' pushes) and ``GET /healthz``."""

    def __init__(self, handler: Handler, auth: PushAuth) -> None:
        self._handler = handler
        self._auth = auth
        self.running: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.stopping = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ("/", "/healthz") and method in ("GET", "HEAD"):  # "/": what a Google load balancer checks
            await _answer(send, 503 if self.stopping else 200, "stopping" if self.stopping else "ok")
        elif path != PUSH_PATH:
            await _answer(send, 404, "not found")
        elif method != "POST":
            await _answer(send, 405, "POST only", [(b"allow", b"POST")])
        else:
            await self._push(scope, receive, send)

    async def _push(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = await self._auth.check(headers.get("authorization", ""))
        if refused is not None:
            status, why = refused
            log.warning("push refused: %s", why, extra={"status": status})
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            if status == 503:
                extra.append((b"retry-after", _RETRY_AFTER.encode()))
            await _answer(send, status, "refused" if status != 503 else "try again", extra)
            return
        body = await _body(receive)
        try:
            if body is None:
                raise ValueError("too large")
            item = WorkItem.decode(body.decode())
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.error("push refused: its body is not a work item")
            await _answer(send, 400, "the body is not a work item")
            return
        attempt = headers.get("x-cloudtasks-taskretrycount", "")
        status = await self._run(item)
        log.info("push of a task answered %d", status, extra={"task": item.task_id, "status": status, "retry": attempt})
        extra = [(b"retry-after", _RETRY_AFTER.encode())] if status == 503 else []
        await _answer(send, status, "done" if status == 200 else "try again", extra)

    async def _run(self, item: WorkItem) -> int:
        key = (item.tenant_id, item.task_id)
        if self.stopping or key in self.running:
            # Stopping; or it runs here already (a retry of a push whose connection broke, a wake-up while the run
            # parks): Cloud Tasks comes back once it ended, and is then answered at once.
            return 503
        run: asyncio.Future[None] = asyncio.ensure_future(self._handler(item))
        self.running[key] = run
        try:
            await asyncio.wait({run})
        finally:
            self.running.pop(key, None)
        if run.cancelled():
            # Stopping: its progress is saved, and the retry resumes it. Otherwise a caller cancelled the task,
            # and its ending is recorded: done.
            return 503 if self.stopping else 200
        error = run.exception()
        if error is None:
            return 200
        if not isinstance(error, Unavailable):
            log.error("running a pushed task failed; Cloud Tasks retries it", exc_info=error)
        return 503

    async def stop(self) -> None:
        """Stop what runs here (each keeps its progress, and its push is answered 503 to be retried)."""
        self.stopping = True
        for run in list(self.running.values()):
            run.cancel()
        await asyncio.gather(*self.running.values(), return_exceptions=True)


async def _body(receive: Any) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Any, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"status": text}).encode()
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    """Uvicorn without its own signal handling: the agent's shutdown stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class CloudTasksWorkQueue:
    """Accepted tasks as Cloud Tasks HTTP tasks, pushed to the agents' push port (see the module's docstring)."""

    durable = True
    park_after_seconds = _PARK_AFTER_SECONDS

    def __init__(
        self,
        *,
        queue: str,
        push_url: str,
        service_account: str,
        audience: str,
        dispatch_deadline_seconds: float,
        timeout_seconds: float,
        push_socket: socket.socket,
        auth: PushAuth,
        emulator_host: str | None = None,
        grace_seconds: float = 5.0,
    ) -> None:
        self._queue = queue
        self._url = push_url
        self._account = service_account
        self._audience = audience
        self._deadline = dispatch_deadline_seconds
        self._timeout = timeout_seconds
        self._socket = push_socket
        self._auth = auth
        self._emulator = emulator_host
        self._grace = grace_seconds
        self._client: tasks_v2.CloudTasksAsyncClient | None = None
        self._beta: tasks_v2beta3.CloudTasksAsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> CloudTasksWorkQueue:
        """The queue of ``ALTAN_CLOUD_TASKS_*`` (checked by :class:`Settings`), its push port bound now (a port in use
        stops the agent at start with one line)."""
        assert settings.cloud_tasks_queue and settings.cloud_tasks_push_url and settings.cloud_tasks_service_account
        assert settings.agent_push_port is not None
        try:
            sock = listen_socket(settings.bind_host, settings.agent_push_port)
        except CannotListen as exc:
            raise ConfigurationError(exc.line("agent's push endpoint", "ALTAN_AGENT_PUSH_PORT")) from None
        audience = settings.cloud_tasks_audience or settings.cloud_tasks_push_url
        return cls(
            queue=settings.cloud_tasks_queue,
            push_url=settings.cloud_tasks_push_url,
            service_account=settings.cloud_tasks_service_account,
            audience=audience,
            dispatch_deadline_seconds=settings.cloud_tasks_dispatch_deadline_seconds,
            timeout_seconds=settings.gcp_timeout_seconds,
            push_socket=sock,
            auth=PushAuth(settings.cloud_tasks_jwks_url, audience, settings.cloud_tasks_service_account),
            emulator_host=settings.gcp_emulator_host,
            grace_seconds=settings.shutdown_grace_seconds,
        )

    def open(self) -> None:
        """Make the clients; call inside the running loop (their channel belongs to it). A missing Google identity
        stops the agent at start with one line rather than failing every submission."""
        try:
            self._clients()
        except auth_errors.DefaultCredentialsError:
            raise ConfigurationError(
                "ALTAN_WORK_QUEUE=cloud-tasks: no Google credentials found (Workload Identity on GKE, or "
                "GOOGLE_APPLICATION_CREDENTIALS)"
            ) from None

    def _clients(self) -> tuple[tasks_v2.CloudTasksAsyncClient, tasks_v2beta3.CloudTasksAsyncClient]:
        """The asyncio clients (v2 for tasks, v2beta3 for the queue's statistics), made in the running loop."""
        if self._client is None or self._beta is None:
            if self._emulator:
                channel = grpc.aio.insecure_channel(self._emulator, options=_CHANNEL_OPTIONS)
                self._client = tasks_v2.CloudTasksAsyncClient(transport=CloudTasksGrpcAsyncIOTransport(channel=channel))
                self._beta = tasks_v2beta3.CloudTasksAsyncClient(transport=BetaTransport(channel=channel))
            else:
                # Application Default Credentials: on GKE the Workload Identity of the agent's service account.
                self._client = tasks_v2.CloudTasksAsyncClient(
                    transport=CloudTasksGrpcAsyncIOTransport(channel=_channel_factory(CloudTasksGrpcAsyncIOTransport))
                )
                self._beta = tasks_v2beta3.CloudTasksAsyncClient(
                    transport=BetaTransport(channel=_channel_factory(BetaTransport))
                )
        return self._client, self._beta

    def _options(self) -> dict[str, Any]:
        # Transient failures retried with backoff, all within the timeout (a call's timeout alone does not bound the
        # library's retries). Retrying a create is safe: the task's name makes a second one ALREADY_EXISTS.
        retry = AsyncRetry(
            predicate=lambda exc: isinstance(exc, _TRANSIENT),
            initial=0.1,
            maximum=1.0,
            multiplier=2.0,
            timeout=self._timeout,
        )
        return {"retry": retry, "timeout": self._timeout}

    async def put(self, item: WorkItem) -> None:
        await self._create(item, task_id_for(item), None)

    async def wake(self, item: WorkItem, reason: str, *, at_ms: int | None = None) -> None:
        """Queue a wake-up of a parked task: ``reason`` names it (one per reason, so it is created once), ``at_ms``
        when it is due (None: now)."""
        safe = hashlib.sha256(reason.encode()).hexdigest()[:16] if not reason.isalnum() else reason
        await self._create(item, task_id_for(item, safe), at_ms)

    async def _create(self, item: WorkItem, task_id: str, at_ms: int | None) -> None:
        client, _ = self._clients()
        task = tasks_v2.Task(
            name=f"{self._queue}/tasks/{task_id}",
            http_request=tasks_v2.HttpRequest(
                url=self._url,
                http_method=tasks_v2.HttpMethod.POST,
                headers={"Content-Type": "application/json"},
                body=item.encode().encode(),
                oidc_token=tasks_v2.OidcToken(service_account_email=self._account, audience=self._audience),
            ),
            dispatch_deadline=duration_pb2.Duration(seconds=int(self._deadline)),
        )
        if at_ms is not None:
            task.schedule_time = timestamp_pb2.Timestamp(seconds=at_ms // 1000, nanos=(at_ms % 1000) * 1_000_000)
        try:
            await client.create_task(parent=self._queue, task=task, **self._options())
        except google_errors.AlreadyExists:
            return  # created before (a retried submission, or a retried create whose first try got through)
        except _GOOGLE_ERRORS as exc:
            log.warning("Cloud Tasks refused or could not take a task: %s", _code(exc), extra={"task": item.task_id})
            raise Unavailable("the work queue is unreachable; try again shortly", retry_after=1.0) from None

    async def depth(self) -> int:
        """Google's estimate of the tasks waiting: those in the queue less those being pushed now. It counts the
        scheduled deadline wake-ups of parked tasks too (docs/decisions.md)."""
        _, beta = self._clients()
        request = tasks_v2beta3.GetQueueRequest(name=self._queue, read_mask=field_mask_pb2.FieldMask(paths=["stats"]))
        queue = await beta.get_queue(request=request, **self._options())
        return max(0, int(queue.stats.tasks_count) - int(queue.stats.concurrent_dispatches_count))

    async def serve(self, handler: Handler) -> None:
        """Answer Cloud Tasks' pushes on the push port until cancelled; then stop what runs (each push answered
        503, to be retried elsewhere) and close the port."""
        app = PushApp(handler, self._auth)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(self._grace) or 1,
        )
        server = _Server(config)
        serving = asyncio.create_task(server.serve([self._socket]), name="push-port")
        try:
            await asyncio.shield(serving)
        finally:
            await app.stop()
            server.should_exit = True
            await asyncio.gather(serving, return_exceptions=True)

    async def aclose(self) -> None:
        for client in (self._client, self._beta):
            if client is not None:
                await client.transport.close()
        self._client = self._beta = None
        self._socket.close()


def _channel_factory(transport: type[Any]) -> Any:
    def create_channel(*args: Any, options: list[tuple[str, Any]] | None = None, **kwargs: Any) -> grpc.aio.Channel:
        return transport.create_channel(*args, options=[*(options or []), *_CHANNEL_OPTIONS], **kwargs)  # type: ignore[no-any-return]

    return create_channel


def _code(exc: BaseException) -> str:
    status = getattr(exc, "grpc_status_code", None)
    return status.name if isinstance(status, grpc.StatusCode) else type(exc).__name__
