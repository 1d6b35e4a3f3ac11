"""What mutual TLS costs one internal gRPC hop: ``python bench/tls_hop.py``.

One process holds a grpc.aio server and its client on 127.0.0.1 (as a service and its caller would be, less the
other process), and sends unary calls of a few sizes, first in plaintext, then with the services' mTLS (a certificate
per side from a throwaway CA, the server's certificate fetcher, the client's channel that follows its files, and the
server's check of the caller's name). It reports CPU per call of the whole process (client and server together), at
1 and at 32 in flight, alternating plaintext and TLS rounds so that the machine's load falls on both alike. The
stack's cost is about this times the hops of an operation (a builtin tool invoke crosses two, gateway → integrator →
tool; a 3-step plan task about twenty). Prints a markdown table; bench/run.py --tls measures the whole stack.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/tls_hop.py` from anywhere

from altan.devca import DevelopmentCa
from altan.tls import PeerAllowList, ReloadingChannel, TlsFiles, server_credentials

SIZES = (256, 4096, 65536)


def _handler(peers: PeerAllowList | None) -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: Any) -> bytes:
        if peers is not None:
            peers.check(context)
        return request

    return grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})


async def _round(tls: bool, files: tuple[TlsFiles, TlsFiles] | None, size: int, in_flight: int, calls: int) -> float:
    """CPU milliseconds per call of this process over ``calls`` calls."""
    server = grpc.aio.server()
    if tls and files is not None:
        server.add_generic_rpc_handlers([_handler(PeerAllowList(["client.bench"]))])
        port = server.add_secure_port("127.0.0.1:0", server_credentials(files[0]))
    else:
        server.add_generic_rpc_handlers([_handler(None)])
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    channel: Any = ReloadingChannel(target, files[1], ()) if tls and files else grpc.aio.insecure_channel(target)
    echo = channel.unary_unary("/bench.Echo/Echo")
    payload = b"x" * size
    for _ in range(200):
        await echo(payload, timeout=10)

    async def worker(count: int) -> None:
        for _ in range(count):
            await echo(payload, timeout=10)

    started = time.process_time()
    await asyncio.gather(*(worker(calls // in_flight) for _ in range(in_flight)))
    cpu = time.process_time() - started
    await channel.close()
    await server.stop(0)
    return cpu / (calls // in_flight * in_flight) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode (default: %(default)s)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="altan-tls-hop-"))
    ca = DevelopmentCa()
    server, client = ca.write(workdir / "server", "server.bench"), ca.write(workdir / "client", "client.bench")
    files = (TlsFiles(*server), TlsFiles(*client))
    print("| message | in flight | plaintext CPU per call (ms) | mTLS CPU per call (ms) | added (ms) | added |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in SIZES:
        for in_flight in (1, 32):
            plain, tls = [], []
            for _ in range(args.rounds):
                plain.append(asyncio.run(_round(False, None, size, in_flight, args.calls)))
                tls.append(asyncio.run(_round(True, files, size, in_flight, args.calls)))
            p, t = statistics.median(plain), statistics.median(tls)
            print(f"| {size:,} B | {in_flight} | {p:.3f} | {t:.3f} | {t - p:+.3f} | {(t - p) / p:+.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
