"""A stand-in OpenTelemetry Collector for benchmarks: ``python bench/otlp_sink.py PORT``.

It receives OTLP/HTTP trace exports (``POST /v1/traces``, protobuf) over HTTP/1.1 keep-alive, counts the spans in
each and answers 200. It runs in a process of its own, so its CPU is counted apart from the stack's: a collector
runs elsewhere in a real install. ``GET /count`` answers the number of spans received so far.
"""

from __future__ import annotations

import argparse
import asyncio

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

_EMPTY = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()


class _Sink(asyncio.Protocol):
    """Reads each request (head, then Content-Length bytes of body) and answers it."""

    spans = 0

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head, found, rest = self._buffer.partition(b"\r\n\r\n")
            if not found:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(rest) < length:
                return
            body, self._buffer = rest[:length], rest[length:]
            self._answer(head.split(b" ", 2)[1], body)

    def _answer(self, path: bytes, body: bytes) -> None:
        if path == b"/count":
            payload, kind = str(_Sink.spans).encode(), b"text/plain"
        else:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            _Sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            payload, kind = _EMPTY, b"application/x-protobuf"
        assert self._transport is not None
        self._transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: "
            + kind
            + b"\r\ncontent-length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Sink, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    asyncio.run(serve(parser.parse_args().port))
