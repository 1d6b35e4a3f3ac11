"""The ``altan`` command: ``altan up`` runs the whole stack locally, ``altan token`` prints a development token.

``altan up`` starts the gateway and the agent, tool and integrator services as separate processes that talk gRPC
over loopback, prefixes their log lines, waits until all are healthy, stops them all on Ctrl-C or SIGTERM, and
exits non-zero if one of them dies.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from altan.config import default_data_dir, development_secret

__all__ = ["main"]

SERVICES = ("tool", "integrator", "agent", "gateway")
_PIPE_LIMIT = 1024 * 1024
_DEFAULT_PORTS = {"agent": 50061, "tool": 50062, "integrator": 50063}
_COLORS = {"tool": "36", "integrator": "35", "agent": "33", "gateway": "32"}


def _development_env(env: dict[str, str]) -> dict[str, str]:
    """Fill in what a laptop has no one to configure: a data directory and a generated HS256 secret."""
    env = dict(env)
    data_dir = Path(env.get("ALTAN_DATA_DIR") or default_data_dir())
    env["ALTAN_DATA_DIR"] = str(data_dir)
    if not (env.get("ALTAN_JWT_SECRET") or env.get("ALTAN_JWT_JWKS_URL") or env.get("ALTAN_JWT_JWKS_FILE")):
        env["ALTAN_JWT_SECRET"] = development_secret(data_dir, "jwt.secret")
    return env


def _stack_env(args: argparse.Namespace) -> dict[str, str]:
    env = _development_env(dict(os.environ))
    env["ALTAN_HTTP_PORT"] = str(args.http_port)
    env["ALTAN_GRPC_PORT"] = str(args.grpc_port)
    for name in ("agent", "tool", "integrator"):
        port = env.setdefault(f"ALTAN_{name.upper()}_PORT", str(_DEFAULT_PORTS[name]))
        env[f"ALTAN_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


async def _pipe(name: str, stream: asyncio.StreamReader, color: bool) -> None:
    label = f"\x1b[{_COLORS[name]}m{name:>10} |\x1b[0m " if color else f"{name:>10} | "
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line over the reader's limit: pass on what there is, keep draining
            line = await stream.read(_PIPE_LIMIT)
        if not line:
            return
        sys.stdout.write(label + line.decode(errors="replace"))
        sys.stdout.flush()


async def _wait_ready(url: str, procs: dict[str, asyncio.subprocess.Process], timeout: float) -> bool:
    """Wait until the gateway's /readyz answers 200 (which means every service answers its health check)."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        while time.monotonic() < deadline:
            if any(p.returncode is not None for p in procs.values()):
                return False
            try:
                if (await client.get(url)).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(delay)  # start-up only: back off until the stack answers
            delay = min(delay * 2, 0.5)
    return False


async def _up(args: argparse.Namespace) -> int:
    env = _stack_env(args)
    color = sys.stdout.isatty()
    procs: dict[str, asyncio.subprocess.Process] = {}
    for name in SERVICES:
        procs[name] = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"services.{name}",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=_PIPE_LIMIT,
        )
    pipes = [asyncio.create_task(_pipe(n, p.stdout, color)) for n, p in procs.items() if p.stdout]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exits = {name: asyncio.create_task(p.wait()) for name, p in procs.items()}
    stopper = asyncio.create_task(stop.wait())

    ready_url = f"http://127.0.0.1:{args.http_port}/readyz"
    if await _wait_ready(ready_url, procs, args.startup_timeout):
        print(f"altan is up: REST http://127.0.0.1:{args.http_port}  gRPC 127.0.0.1:{args.grpc_port}", flush=True)
        if "ALTAN_JWT_SECRET" in env and not os.environ.get("ALTAN_JWT_SECRET"):
            print("a development token: altan token --tenant <tenant> --sub <user> --role admin", flush=True)
    elif not stop.is_set():
        print("altan: the stack did not become ready", file=sys.stderr, flush=True)
        stop.set()

    await asyncio.wait([stopper, *exits.values()], return_when=asyncio.FIRST_COMPLETED)
    died = [n for n, t in exits.items() if t.done()] if not stop.is_set() else []
    for name in died:
        print(f"altan: {name} exited with status {procs[name].returncode}; stopping the others", file=sys.stderr)
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    _, pending = await asyncio.wait(exits.values(), timeout=args.stop_timeout)
    for name, task in exits.items():
        if task in pending:
            print(f"altan: {name} did not stop in time; killing it", file=sys.stderr)
            procs[name].kill()
    await asyncio.gather(*exits.values(), *pipes, return_exceptions=True)
    stopper.cancel()
    failed = died or [n for n, p in procs.items() if p.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0


def _token(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from altan.auth import issue_development_token
    from altan.config import Settings

    env = _development_env(dict(os.environ))
    try:
        settings = Settings(jwt_secret=env["ALTAN_JWT_SECRET"], jwt_algorithms=("HS256",))
    except (ValidationError, KeyError) as exc:
        print(f"altan token: {exc}", file=sys.stderr)
        return 2
    print(issue_development_token(settings, tenant=args.tenant, sub=args.sub, role=args.role, ttl=args.ttl))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="altan", description="Self-hosted multi-tenant agent infrastructure")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run the gateway and the three services locally, in the foreground")
    up.add_argument("--http-port", type=int, default=int(os.environ.get("ALTAN_HTTP_PORT", "8080")))
    up.add_argument("--grpc-port", type=int, default=int(os.environ.get("ALTAN_GRPC_PORT", "50051")))
    up.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for readiness")
    up.add_argument("--stop-timeout", type=float, default=15.0, help="seconds to wait for a clean stop")
    token = commands.add_parser("token", help="print a development token signed with ALTAN_JWT_SECRET")
    token.add_argument("--tenant", required=True)
    token.add_argument("--sub", default="dev")
    token.add_argument("--role", choices=("admin", "member"), default="admin")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    return asyncio.run(_up(args))


if __name__ == "__main__":
    sys.exit(main())
