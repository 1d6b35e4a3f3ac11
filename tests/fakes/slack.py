"""A fake Slack Web API on a real socket: ``POST /api/chat.postMessage`` as Slack answers it.

Slack answers 200 with ``{"ok": false, "error": "<code>"}`` for a refused call (``not_authed`` without a token,
``invalid_auth`` with another token, ``channel_not_found``), and ``{"ok": true, "channel", "ts", "message"}`` for a
posted message. Every request is kept (path, headers, JSON body) for the tests to read.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeSlack", "Posted", "start_fake_slack"]


@dataclass(frozen=True)
class Posted:
    """One request as the fake received it."""

    path: str
    authorization: str
    body: dict[str, Any]


@dataclass
class FakeSlack:
    token: str
    server: ThreadingHTTPServer | None = None
    received: list[Posted] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def api_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/api"

    def posted(self) -> list[Posted]:
        with self.lock:
            return list(self.received)

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


def _handler(fake: FakeSlack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _answer(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            authorization = self.headers.get("Authorization", "")
            with fake.lock:
                fake.received.append(Posted(self.path, authorization, body))
            if self.path != "/api/chat.postMessage":
                return self._answer({"ok": False, "error": "unknown_method"})
            if not authorization:
                return self._answer({"ok": False, "error": "not_authed"})
            if authorization != f"Bearer {fake.token}":
                return self._answer({"ok": False, "error": "invalid_auth"})
            channel = body.get("channel")
            if not isinstance(channel, str) or not channel.startswith(("C", "G", "D")):
                return self._answer({"ok": False, "error": "channel_not_found"})
            ts = f"1700000000.{len(fake.received):06d}"
            message = {"type": "message", "text": body.get("text", ""), "ts": ts, "bot_id": "B0FAKE"}
            if "blocks" in body:
                message["blocks"] = body["blocks"]
            return self._answer({"ok": True, "channel": channel, "ts": ts, "message": message})

    return Handler


def start_fake_slack(token: str) -> FakeSlack:
    """The fake, listening on a free loopback port until :meth:`FakeSlack.stop`."""
    fake = FakeSlack(token)
    fake.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    threading.Thread(target=fake.server.serve_forever, daemon=True, name="fake-slack").start()
    return fake
