"""A stand-in third-party JSON API for benchmarks: ``python bench/fake_api.py PORT``.

It must cost next to nothing per request, so that what the benchmark measures is the platform, not the fake:
a bare ``asyncio.Protocol`` answering every request with the same small JSON body over HTTP/1.1 keep-alive.
It runs in a process of its own, so its CPU can be counted apart from the stack's and the load generator's.
"""

from __future__ import annotations

import asyncio
import sys

BODY = b'{"customer": "Ada", "tier": "gold"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class _Api(asyncio.Protocol):
    """Answers each complete request head with RESPONSE; request bodies are not expected (GET only)."""

    def __init__(self) -> None:
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
            self._transport.write(RESPONSE * answers)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Api, "127.0.0.1", port, backlog=1024)
    print(f"fake api listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
