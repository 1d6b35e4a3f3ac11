"""A fake Kubernetes API server for Services, on a real socket, speaking the list/watch protocol.

``GET /api/v1/namespaces/{ns}/services`` answers a ServiceList with its ``resourceVersion`` (``labelSelector`` with
``key=value`` terms is honoured); with ``watch=true`` and a ``resourceVersion`` it streams the events after that
version as JSON lines in chunks (ADDED, MODIFIED, DELETED, and BOOKMARK when asked), until ``timeoutSeconds``. A
version older than the history kept (``compact``) gets what the API server sends: an ERROR event with a 410 Status,
or (``expire_next_watch``) the 410 as the answer's status. Every request needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "fake-service-account-token"


@dataclass
class Request:
    path: str
    query: dict[str, str]
    authorization: str


@dataclass
class FakeKubernetes:
    """The state of the fake: Services by namespace and name, their history, and the requests it answered."""

    token: str = TOKEN
    version: int = 100
    services: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)  # (version, type, object)
    oldest: int = 100  # a watch from before this version is 410 Gone
    requests: list[Request] = field(default_factory=list)
    expire_as_status: int = 0  # how many coming watches get 410 as their HTTP status
    closing: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    # --- changes, as a controller would make them --------------------------------------------------------------

    def put(
        self,
        namespace: str,
        name: str,
        ports: list[dict[str, Any]],
        *,
        labels: dict[str, str] | None = None,
        cluster_ip: str = "127.0.0.1",
    ) -> None:
        """Create or update a Service (ADDED or MODIFIED)."""
        labels = {"altan.io/tool-container": "true"} if labels is None else labels
        with self.changed:
            self.version += 1
            kind = "MODIFIED" if (namespace, name) in self.services else "ADDED"
            service = {
                "kind": "Service",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": labels,
                    "resourceVersion": str(self.version),
                    "uid": f"uid-{namespace}-{name}",
                },
                "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "ports": ports},
            }
            self.services[(namespace, name)] = service
            self.history.append((self.version, kind, service))
            self.changed.notify_all()

    def delete(self, namespace: str, name: str) -> None:
        with self.changed:
            self.version += 1
            service = self.services.pop((namespace, name))
            service = {**service, "metadata": {**service["metadata"], "resourceVersion": str(self.version)}}
            self.history.append((self.version, "DELETED", service))
            self.changed.notify_all()

    def compact(self) -> None:
        """Forget the history: a watch from an older version is told 410 Gone (an ERROR event)."""
        with self.changed:
            self.version += 1
            self.oldest = self.version
            self.history.clear()
            self.changed.notify_all()

    def expire_next_watch(self) -> None:
        """The next watch is refused with the HTTP status 410 itself."""
        with self.changed:
            self.expire_as_status += 1

    def lists(self) -> int:
        return sum(1 for r in self.requests if r.query.get("watch") not in ("true", "1"))

    def watches(self) -> int:
        return sum(1 for r in self.requests if r.query.get("watch") in ("true", "1"))

    def wait_for_watches(self, count: int, timeout: float = 10) -> None:
        """Until ``count`` watches were asked for (blocking: call it in a thread from async code)."""
        with self.changed:
            assert self.changed.wait_for(lambda: self.watches() >= count, timeout), f"{self.watches()} watches"

    def close(self) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # --- answers ---------------------------------------------------------------------------------------------------

    def selected(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [
            s
            for (ns, _), s in sorted(self.services.items())
            if ns == namespace and all(s["metadata"]["labels"].get(k) == v for k, v in _terms(selector))
        ]


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeKubernetes

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.fake.changed:
            self.fake.requests.append(Request(url.path, query, self.headers.get("Authorization", "")))
            self.fake.changed.notify_all()
        if self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            self._json(HTTPStatus.UNAUTHORIZED, _status(401, "Unauthorized", "Unauthorized"))
            return
        parts = url.path.strip("/").split("/")
        if len(parts) != 5 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "services":
            self._json(HTTPStatus.NOT_FOUND, _status(404, "NotFound", f"no route {url.path}"))
            return
        namespace, selector = parts[3], query.get("labelSelector", "")
        if query.get("watch") in ("true", "1"):
            self._watch(namespace, selector, query)
            return
        with self.fake.changed:
            items = self.fake.selected(namespace, selector)
            version = self.fake.version
        self._json(
            HTTPStatus.OK,
            {"kind": "ServiceList", "apiVersion": "v1", "metadata": {"resourceVersion": str(version)}, "items": items},
        )

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _watch(self, namespace: str, selector: str, query: dict[str, str]) -> None:
        fake = self.fake
        since = int(query.get("resourceVersion") or fake.version)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        with fake.changed:
            if fake.expire_as_status:
                fake.expire_as_status -= 1
                self._json(HTTPStatus.GONE, _status(410, "Expired", f"too old resource version: {since}"))
                return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                with fake.changed:
                    if since < fake.oldest:
                        message = f"too old resource version: {since} ({fake.oldest})"
                        events = [{"type": "ERROR", "object": _status(410, "Expired", message)}]
                        stop = True
                    else:
                        events = [
                            {"type": kind, "object": obj}
                            for version, kind, obj in fake.history
                            if version > since
                            and obj["metadata"]["namespace"] == namespace
                            and all(obj["metadata"]["labels"].get(k) == v for k, v in _terms(selector))
                        ]
                        since = fake.version
                        stop = False
                        if not events:
                            left = deadline - time.monotonic()
                            if fake.closing or left <= 0:
                                break
                            fake.changed.wait(left)  # woken by the next change
                            continue
                for event in events:
                    self._chunk(event)
                if stop:
                    break
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped watching


def _terms(selector: str) -> list[list[str]]:
    return [t.split("=", 1) for t in selector.split(",") if t]


def start_fake_kubernetes() -> FakeKubernetes:
    fake = FakeKubernetes()
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    fake.server = server
    threading.Thread(target=server.serve_forever, name="fake-kubernetes", daemon=True).start()
    return fake


def kubeconfig(fake: FakeKubernetes, namespace: str) -> str:
    """A kubeconfig (YAML is a superset of JSON) pointing a client at the fake with its bearer token."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
            "users": [{"name": "tool", "user": {"token": fake.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tool", "namespace": namespace}}],
            "current-context": "fake",
        }
    )
