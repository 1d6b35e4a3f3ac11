"""The HTTP server both fake LLM APIs share: its thread, the script, the record, and how answers are sent."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self

from tests.fakes.llm.script import (
    DEFAULT_TEXT,
    Answer,
    Call,
    CutShort,
    Delay,
    HttpError,
    Linger,
    Malformed,
    Received,
    Reply,
    StreamError,
)

__all__ = ["FakeLlm", "arguments_text", "call_id", "dumps", "pieces", "usage_of"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):  # a client that left is normal
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeLlm

    def log_message(self, format: str, *args: Any) -> None:
        return

    def setup(self) -> None:
        super().setup()
        self.fake._connections.add(self.connection)

    def finish(self) -> None:
        self.fake._connections.discard(self.connection)
        super().finish()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in self.headers.items()}
        received = Received(self.command, self.path, headers, body, raw, tuple(self.client_address[:2]))
        self.fake._answer(self, received)

    do_GET = do_PUT = do_DELETE = do_POST

    def send_whole(self, status: int, body: bytes, headers: dict[str, str], *, cut: bool = False) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)
        if cut:
            self.close_connection = True

    def send_stream(self, events: list[bytes], *, cut: bool = False, linger: float = 0.0) -> None:
        """Server-Sent Events in chunked encoding, one event a chunk, as the APIs send them; the body ends ``linger``
        seconds after the last event."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        if cut:
            self.close_connection = True  # no last chunk: the body ends in the middle
            return
        if linger:
            self.wfile.flush()
            if self.fake._closing.wait(linger):
                self.close_connection = True
                return
        self.wfile.write(b"0\r\n\r\n")


class FakeLlm:
    """What both fakes share: the server, its thread, the script and the record. Use as a context manager, or call
    :meth:`close`."""

    path: ClassVar[str]
    provider: ClassVar[str]

    def __init__(
        self, *, api_key: str | None = None, responder: Callable[[Received], Answer] | None = None, port: int = 0
    ) -> None:
        self.api_key = api_key  # set: a request without it is refused, as the API refuses it
        self._responder = responder or (lambda _: Reply(text=DEFAULT_TEXT))
        self._script: deque[Answer] = deque()
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", port), handler)
        # A short poll interval: close() waits for one, and a test closes its fake at every teardown.
        serve = lambda: self._server.serve_forever(poll_interval=0.05)  # noqa: E731
        self._thread = threading.Thread(target=serve, name=f"fake-{self.provider}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The endpoint, as an agent's ``llm.endpoint`` names it."""
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def script(self, *answers: Answer) -> None:
        """Answer the next requests with these, in order."""
        with self._lock:
            self._script.extend(answers)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        for connection in list(self._connections):  # kept-alive connections would hold their threads
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self, handler: _Handler, received: Received) -> None:
        with self._lock:
            self._received.append(received)
        if received.method != "POST" or received.path.partition("?")[0] != self.path:
            status = 404 if received.method == "POST" else 405
            return self._send_error(handler, HttpError(status, f"no route for {received.method} {received.path}"))
        refusal = self.check(received)
        if refusal is not None:
            return self._send_error(handler, refusal)
        with self._lock:
            answer = self._script.popleft() if self._script else None
        if answer is None:
            answer = self._responder(received)
        while isinstance(answer, Delay):
            if self._closing.wait(answer.seconds):
                handler.close_connection = True
                return None
            answer = answer.then
        body = received.body
        streamed = body.get("stream") is True
        if isinstance(answer, HttpError):
            self._send_error(handler, answer)
        elif isinstance(answer, Malformed):
            if streamed:
                handler.send_stream([self.raw_event(answer.body)])
            else:
                handler.send_whole(answer.status, answer.body, {"Content-Type": answer.content_type})
        elif isinstance(answer, StreamError):
            if streamed:
                events = self.events(answer.reply, body)[: answer.after]
                handler.send_stream([*events, self.error_event(answer.error_type, answer.message)])
            else:
                status = 529 if answer.error_type == "overloaded_error" else 500
                self._send_error(handler, HttpError(status, answer.message, answer.error_type))
        elif streamed:
            reply = answer.reply if isinstance(answer, CutShort | Linger) else answer
            events = self.events(reply, body)
            if isinstance(answer, CutShort):
                handler.send_stream(events[: answer.after], cut=not answer.clean)
            else:
                handler.send_stream(events, linger=answer.seconds if isinstance(answer, Linger) else 0.0)
        else:
            reply = answer.reply if isinstance(answer, CutShort | Linger) else answer
            whole = dumps(self.whole(reply, body))
            handler.send_whole(200, whole, {"Content-Type": "application/json"}, cut=isinstance(answer, CutShort))
        return None

    def _send_error(self, handler: _Handler, error: HttpError) -> None:
        body = dumps(self.error_body(error.status, error.message, error.error_type))
        handler.send_whole(error.status, body, {"Content-Type": "application/json", **error.headers})

    # What each API does its own way.

    def check(self, received: Received) -> HttpError | None:
        """The error the real API would answer to this request, or None."""
        raise NotImplementedError

    def error_body(self, status: int, message: str, error_type: str) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, reply: Reply, request: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def events(self, reply: Reply, request: dict[str, Any]) -> list[bytes]:
        raise NotImplementedError

    def error_event(self, error_type: str, message: str) -> bytes:
        raise NotImplementedError

    def raw_event(self, data: bytes) -> bytes:
        raise NotImplementedError


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()  # compact, as the APIs write it


def call_id(prefix: str, call: Call, position: int) -> str:
    if call.id:
        return call.id
    seed = f"{position}:{call.name}:{arguments_text(call)}".encode()
    return prefix + hashlib.sha256(seed).hexdigest()[:24]


def arguments_text(call: Call) -> str:
    return call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)


def pieces(text: str, size: int = 0) -> list[str]:
    """Text as a model streams it: word by word, or ``size`` characters at a time."""
    if size:
        return [text[i : i + size] for i in range(0, len(text), size)]
    return re.findall(r"\S+\s*|\s+", text)


def usage_of(reply: Reply, request: dict[str, Any]) -> tuple[int, int]:
    if reply.usage is not None:
        return reply.usage
    asked = len(json.dumps(request.get("messages", []))) + len(json.dumps(request.get("tools", [])))
    answered = len(reply.text) + sum(len(call.name) + len(arguments_text(call)) for call in reply.calls)
    return max(1, asked // 4), max(1, answered // 4)
