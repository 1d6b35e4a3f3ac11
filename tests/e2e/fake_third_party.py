"""A fake third-party HTTP API on 127.0.0.1, speaking plain HTTP/1.1 like any SaaS endpoint.

It records every request it receives (headers included) so tests can check what left the platform, and it
never echoes credentials back.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # time.monotonic() on arrival


@dataclass
class FakeThirdParty:
    server: ThreadingHTTPServer
    received: list[Received] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    # /idempotent/...: Idempotency-Key -> how many times the side effect was performed (1, if the key is honoured)
    performed: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        """``host:port``, as a credential's ``hosts`` names it."""
        return f"127.0.0.1:{self.port}"

    def requests_to(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


def _handler(fake: FakeThirdParty) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            query = parse_qs(parts.query)
            with fake.lock:
                fake.received.append(
                    Received(self.command, parts.path, query, dict(self.headers.items()), body, time.monotonic())
                )
            path = parts.path
            if path.startswith("/sleep/"):
                seconds = float(path.split("/")[2])
                time.sleep(seconds)
                self._answer(200, {"slept": seconds, "at": time.time()})
            elif path.startswith("/status/"):
                self._answer(int(path.split("/")[2]), {"error": "as asked"})
            elif path.startswith("/flaky/"):
                # /flaky/<key>/<failures>[/<retry-after>]: answers 503 that many times, then 200.
                _, _, key, failures, *wait = path.split("/")
                with fake.lock:
                    fake.counters[key] = fake.counters.get(key, 0) + 1
                    count = fake.counters[key]
                if count <= int(failures):
                    self._answer(503, {"error": "busy"}, {"Retry-After": wait[0] if wait else "0"})
                else:
                    self._answer(200, {"attempts": count})
            elif path.startswith("/idempotent/"):
                # /idempotent/<name>[?lose=N&sleep=S]: a side effect honouring Idempotency-Key, as Stripe's API does:
                # the first request with a key performs it, a later one with that key replays the first answer.
                # ``lose=N``: the first N requests with a key perform it and then answer 503, as if the answer
                # were lost on its way back; ``sleep=S``: the effect takes S seconds before the answer.
                idem = self.headers.get("Idempotency-Key") or ""
                with fake.lock:
                    seen = fake.counters.get(f"idem:{idem}", 0) + 1
                    fake.counters[f"idem:{idem}"] = seen
                    if not idem:
                        fake.performed[""] = fake.performed.get("", 0) + 1  # no key: every request performs it
                    elif idem not in fake.performed:
                        fake.performed[idem] = 1
                if "sleep" in query:
                    time.sleep(float(query["sleep"][0]))
                if seen <= int(query.get("lose", ["0"])[0]):
                    self._answer(503, {"error": "the answer was lost"}, {"Retry-After": "0"})
                else:
                    self._answer(200, {"key": idem, "performed": fake.performed.get(idem, 0), "requests": seen})
            elif path.startswith("/big/"):
                # /big/<n>: a JSON object holding n characters.
                self._answer(200, {"data": "x" * int(path.split("/")[2])})
            elif path == "/echo-headers":
                # A debugging endpoint that answers every header it was sent, as some APIs' error pages do.
                self._answer(200, {"headers": dict(self.headers.items())})
            elif path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                parsed: Any = None
                if body:
                    try:
                        parsed = json.loads(body)
                    except ValueError:
                        parsed = body.decode(errors="replace")
                self._answer(
                    200,
                    {
                        "method": self.command,
                        "path": path,
                        "query": query,
                        "json": parsed,
                        "authenticated": "Authorization" in self.headers or "X-Api-Key" in self.headers,
                    },
                )

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    return Handler


def start_fake_third_party() -> FakeThirdParty:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    fake = FakeThirdParty(server)
    server.RequestHandlerClass = _handler(fake)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return fake
