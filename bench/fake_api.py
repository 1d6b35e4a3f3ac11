"""A stand-in third-party JSON API for benchmarks: ``python bench/fake_api.py PORT [--delay-ms N]``.

It must cost next to nothing per request, so that what the benchmark measures is the platform, not the fake:
a bare ``asyncio.Protocol`` answering every request with the same small JSON body over HTTP/1.1 keep-alive.
It runs in a process of its own, so its CPU can be counted apart from the stack's and the load generator's.
With ``--delay-ms`` every answer comes that long after its request (a slow third party), without blocking any
other request: the answer is a timer on the event loop, not a sleep.
"""

from __future__ import annotations

import argparse
import asyncio

BODY = b'{"customer": "Ada", "tier": "gold"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class _Api(asyncio.Protocol):
    """Answers each complete request head with RESPONSE; request bodies are not expected (GET only)."""

    def __init__(self, delay: float) -> None:
        self._delay = delay
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        answers = self._buffer.count(b"\r\n\r\n")
        if answers and self._transport is not None:
            self._buffer = self._buffer.rpartition(b"\r\n\r\n")[2]
            if self._delay:
                # Timers of equal delay fire in the order they were set, so pipelined answers keep their order.
                asyncio.get_running_loop().call_later(self._delay, self._answer, answers)
            else:
                self._answer(answers)

    def _answer(self, answers: int) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(RESPONSE * answers)


async def serve(port: int, delay: float) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Api(delay), "127.0.0.1", port, backlog=4096)
    print(f"fake api listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="time before each answer (default 0)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms / 1000))
