"""The ``altan`` command: ``altan up`` runs the whole stack locally, ``altan token`` prints a development token,
``altan serve-tools module.py --port N`` serves a module's ``@tool`` functions as a tool container.

``altan up`` starts the gateway and the agent, tool and integrator services as separate processes that talk gRPC
over loopback, prefixes their log lines, waits until all are healthy, restarts one that dies with backoff (as
Kubernetes restarts a pod; ``altan.supervisor``), and stops them all on Ctrl-C or SIGTERM. A service that cannot
start at all (bad settings) ends it with a non-zero status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from altan.config import (
    ConfigurationError,
    Settings,
    configuration_problems,
    default_data_dir,
    development_secret,
    setting_name,
)
from altan.delegation import PUBLIC_KEYS_SETTING, SIGNING_KEY_SETTING, generate_key_pair
from altan.listen import CannotListen, bind_problem, join_address
from altan.supervisor import Backoff, ServiceProcess, describe_exit

if TYPE_CHECKING:
    import httpx

__all__ = ["main"]

SERVICES = ("tool", "integrator", "agent", "gateway")
DEFAULT_TOOL_CONTAINER_PORT = 7000
_KEY_VARIABLES = ("ALTAN_JWT_SECRET", "ALTAN_JWT_JWKS_URL", "ALTAN_JWT_JWKS_FILE")
# The flags of ``altan up``, each the override of one setting: (flag, Settings field, type, help).
_UP_FLAGS: tuple[tuple[str, str, type[int] | type[float], str], ...] = (
    ("--http-port", "http_port", int, "REST port of the gateway"),
    ("--grpc-port", "grpc_port", int, "public gRPC port of the gateway"),
    ("--startup-timeout", "startup_timeout_seconds", float, "seconds to wait until the stack is ready"),
    ("--stop-timeout", "stop_timeout_seconds", float, "seconds to wait for a clean stop before killing"),
)
_FLAG_OF = {field: flag for flag, field, _, _ in _UP_FLAGS}
# Who may call whom over the internal ports, as the chart's NetworkPolicies say it (`altan up --tls` enforces it
# with certificates; the gateway's public ports are not internal and stay as they are).
TLS_CALLERS = {"agent": ("gateway",), "tool": ("gateway", "integrator"), "integrator": ("gateway", "agent")}


class _Refused(Exception):
    """``altan`` cannot start as configured; the message is the one line the operator reads."""

    def __init__(self, line: str, status: int = 2) -> None:
        super().__init__(line)
        self.status = status


def _development_settings(overrides: Mapping[str, Any]) -> tuple[Settings, bool]:
    """The validated settings, with what a laptop has no one to configure filled in: the data directory and a
    generated HS256 secret when no key is configured. Also says whether the secret was generated."""
    generated = not any(os.environ.get(name) for name in _KEY_VARIABLES)
    values = dict(overrides)
    try:
        data_dir = Path(os.environ.get("ALTAN_DATA_DIR") or default_data_dir())
        if generated:
            values.update(data_dir=data_dir, jwt_secret=development_secret(data_dir, "jwt.secret"))
        if not (os.environ.get(SIGNING_KEY_SETTING) or os.environ.get(PUBLIC_KEYS_SETTING)):
            # The key pair of task delegations: the agent signs with the private key, the services (and the tool
            # containers `altan serve-tools` runs next to a local stack) verify with the public one; kept with the
            # data like the JWT secret. Without a writable data directory there is none: tasks then run where they
            # were accepted.
            with contextlib.suppress(ConfigurationError):
                private, public = generate_key_pair(data_dir)
                values.update(delegation_signing_key_file=private, delegation_public_keys_file=public)
        return Settings(**values), generated
    except ConfigurationError as exc:
        raise _Refused(f"invalid configuration: {exc}") from None
    except ValidationError as exc:
        names = {field: f"{_FLAG_OF[field]} / {setting_name(field)}" for field in overrides}
        lines = [f"invalid configuration: {line}" for line in configuration_problems(exc, names)]
        raise _Refused("\n".join(lines)) from None


def _check_state_file(settings: Settings) -> None:
    """The embedded state's file, created now (schema and all) or refused in one line, before any service starts."""
    state_file = settings.state_file()
    if state_file is None:
        return
    from altan.store_sqlite import StateFileError, prepare_state_file  # here: `altan token` needs no SQLite

    try:
        prepare_state_file(state_file)
    except StateFileError as exc:
        raise _Refused(f"invalid configuration: ALTAN_DATA_DIR: {exc}") from None


def _listeners(settings: Settings) -> list[tuple[str, str, int, str]]:
    """What the stack will listen on: (who, host, port, setting)."""
    return [
        *(
            (f"{name} service", settings.bind_host, getattr(settings, f"{name}_port"), setting_name(f"{name}_port"))
            for name in ("agent", "tool", "integrator")
        ),
        ("gateway's REST server", settings.http_host, settings.http_port, "--http-port / ALTAN_HTTP_PORT"),
        ("gateway's public gRPC server", settings.bind_host, settings.grpc_port, "--grpc-port / ALTAN_GRPC_PORT"),
    ]


def _check_ports(settings: Settings) -> None:
    """Refuse, before anything starts, ports given twice or held by another server (another stack, say)."""
    seen: dict[int, str] = {}
    for who, _, port, setting in _listeners(settings):
        if port in seen:
            raise _Refused(f"invalid configuration: {setting}: {port} is also the port of the {seen[port]}")
        seen[port] = who
    for who, host, port, setting in _listeners(settings):
        problem = bind_problem(host, port)
        if problem is not None:
            raise _Refused(f"the {who} cannot listen on {join_address(host, port)}: {problem} ({setting})", 1)


def _stack_env(settings: Settings, generated_secret: bool) -> dict[str, str]:
    """The environment of every service: ours, with the validated settings the stack depends on made explicit."""
    env = dict(os.environ)
    env["ALTAN_DATA_DIR"] = str(settings.data_dir)
    if generated_secret and settings.jwt_secret:
        env["ALTAN_JWT_SECRET"] = settings.jwt_secret
    # The delegation keys: set per service by _service_env (the private key reaches the agent only).
    env.pop(SIGNING_KEY_SETTING, None)
    env.pop(PUBLIC_KEYS_SETTING, None)
    env["ALTAN_HTTP_PORT"] = str(settings.http_port)
    env["ALTAN_GRPC_PORT"] = str(settings.grpc_port)
    for name in ("agent", "tool", "integrator"):
        port = getattr(settings, f"{name}_port")
        env[f"ALTAN_{name.upper()}_PORT"] = str(port)
        env[f"ALTAN_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _service_env(settings: Settings, name: str) -> dict[str, str]:
    """What one service gets of the delegation keys: the agent signs and verifies, the tool and integrator
    services verify, the gateway (which never accepts a delegation) gets neither."""
    env = {}
    if name != "gateway" and settings.delegation_public_keys_file is not None:
        env[PUBLIC_KEYS_SETTING] = str(settings.delegation_public_keys_file)
    if name == "agent" and settings.delegation_signing_key_file is not None:
        env[SIGNING_KEY_SETTING] = str(settings.delegation_signing_key_file)
    return env


def _tls_env(settings: Settings) -> dict[str, dict[str, str]]:
    """``altan up --tls``: a new throwaway CA under the data directory, a certificate per service, and each service's
    environment for it (its files and the callers it admits)."""
    from altan.devca import DevelopmentCa, local_identity

    directory = settings.data_dir / "tls"
    ca = DevelopmentCa()
    try:
        ca.write_ca(directory)
        envs = {}
        for name in SERVICES:
            cert, key, ca_file = ca.write(directory / name, local_identity(name))
            env = {"ALTAN_TLS_CERT_FILE": str(cert), "ALTAN_TLS_KEY_FILE": str(key), "ALTAN_TLS_CA_FILE": str(ca_file)}
            if name in TLS_CALLERS:
                env["ALTAN_TLS_ALLOWED_CLIENTS"] = ",".join(local_identity(c) for c in TLS_CALLERS[name])
            envs[name] = env
    except OSError as exc:
        raise _Refused(f"invalid configuration: ALTAN_DATA_DIR: cannot write {directory}: {exc.strerror}") from None
    return envs


async def _wait_ready(url: str, alive: Callable[[], bool], timeout: float | None) -> tuple[bool, str]:
    """Wait until the gateway's /readyz answers 200 (which means every service answers its health check).

    Gives up at the deadline (``None``: none) or once ``alive()`` is false, and then says why not: what the gateway
    answered last ("agent not serving"), or "" when it never answered.
    """
    import httpx  # here: a tool container's image runs `altan serve-tools` without the stack's packages

    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.05
    why = ""
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        while deadline is None or time.monotonic() < deadline:
            if not alive():
                return False, why
            try:
                answer = await client.get(url)
                if answer.status_code == 200:
                    return True, ""
                why = _not_ready_reason(answer)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(delay)  # back off until the stack answers
            delay = min(delay * 2, 0.5)
    return False, why


def _not_ready_reason(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"]["message"]).removeprefix("not ready: ")
    except (ValueError, KeyError, TypeError):
        return f"/readyz answered {answer.status_code}"


async def _up(args: argparse.Namespace) -> int:
    overrides = {field: getattr(args, field) for _, field, _, _ in _UP_FLAGS if getattr(args, field) is not None}
    settings, generated_secret = _development_settings(overrides)
    try:
        settings.master_key_bytes()  # the integrator's development key: a data directory that cannot hold it
    except ConfigurationError as exc:  # is refused now, before anything starts
        raise _Refused(f"invalid configuration: {exc}") from None
    _check_state_file(settings)
    _check_ports(settings)
    env = _stack_env(settings, generated_secret)
    tls = _tls_env(settings) if args.tls else {}
    color = sys.stdout.isatty()
    services = [
        ServiceProcess(
            name,
            (sys.executable, "-m", f"services.{name}"),
            env | _service_env(settings, name) | tls.get(name, {}),
            color=color,
            backoff=Backoff(),
        )
        for name in SERVICES
    ]
    for service in services:
        await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def announce() -> None:
        rest, public_grpc = f"http://127.0.0.1:{settings.http_port}", f"127.0.0.1:{settings.grpc_port}"
        print(f"altan is up: REST {rest}  gRPC {public_grpc}", flush=True)
        if tls:
            print(f"internal gRPC: mutual TLS, throwaway CA {settings.data_dir / 'tls' / 'ca.crt'}", flush=True)
        if generated_secret:
            print("a development token: altan token --tenant <tenant> --sub <user> --role admin", flush=True)

    async def announce_once_ready() -> None:
        if (await _wait_ready(ready_url, lambda: not stop.is_set(), None))[0]:
            announce()

    def all_running() -> bool:
        return not stop.is_set() and all(s.running for s in services)

    ready_url = f"http://127.0.0.1:{settings.http_port}/readyz"
    follower: asyncio.Task[None] | None = None
    ready, why = await _wait_ready(ready_url, all_running, settings.startup_timeout_seconds)
    if ready:
        announce()
    elif why and all_running():
        # Every process runs but something they need does not answer (Redis, say): they recover by themselves
        # once it does, so keep running, as Kubernetes keeps an unready pod.
        hint = " (is the Redis at REDIS_URL reachable?)" if settings.redis_url else ""
        timeout = settings.startup_timeout_seconds
        print(f"altan: not ready after {timeout:g} s: {why}{hint}; waiting for it", file=sys.stderr, flush=True)
        follower = asyncio.create_task(announce_once_ready())

    # A service that cannot start at all (bad settings, say) ends the stack; once the stack has started,
    # supervision restarts any service that exits, and only a stop that was asked for ends it.
    died: list[ServiceProcess] = []
    if ready or follower is not None:
        await asyncio.gather(*(s.supervise(stop) for s in services))
    elif not stop.is_set():
        died = [s for s in services if not s.running]
        for service in died:
            print(f"altan: {service.name} {_exit_of(service)}; stopping the others", file=sys.stderr, flush=True)
        if not died:
            print("altan: the stack did not become ready", file=sys.stderr, flush=True)
            return max(await _stop_all(services, settings.stop_timeout_seconds, died, follower), 1)
    return await _stop_all(services, settings.stop_timeout_seconds, died, follower)


def _exit_of(service: ServiceProcess) -> str:
    assert service.process is not None and service.process.returncode is not None
    return describe_exit(service.process.returncode)


async def _stop_all(
    services: list[ServiceProcess], timeout: float, died: list[ServiceProcess], follower: asyncio.Task[None] | None
) -> int:
    """SIGTERM every running service, kill those still running after ``timeout``; the exit status of ``altan up``:
    0 when every service stopped cleanly, 2 when one that died refused its configuration, else 1."""
    # A service waiting to be restarted has nothing to stop: its last exit was reported when it happened.
    stopping = [s for s in services if s.running]
    for service in stopping:
        service.terminate()
    closing = [asyncio.create_task(s.closed()) for s in services]
    _, pending = await asyncio.wait(closing, timeout=timeout)
    for service, task in zip(services, closing, strict=True):
        if task in pending:
            print(f"altan: {service.name} did not stop in time; killing it", file=sys.stderr, flush=True)
            service.kill()
    await asyncio.gather(*closing, return_exceptions=True)
    if follower is not None:
        follower.cancel()
    clean = (None, 0, -signal.SIGTERM)
    failed = died or [s for s in stopping if s.process is not None and s.process.returncode not in clean]
    if any(s.process is not None and s.process.returncode == 2 for s in failed):
        return 2  # a service refused its configuration: so does the stack
    return 1 if failed else 0


def _token(args: argparse.Namespace) -> int:
    from altan.auth import issue_development_token

    settings, _ = _development_settings({})
    if not settings.jwt_secret:
        raise _Refused("ALTAN_JWT_SECRET is not set: development tokens are signed with it (a JWKS is configured)")
    settings = settings.model_copy(update={"jwt_algorithms": ("HS256",)})
    print(issue_development_token(settings, tenant=args.tenant, sub=args.sub, role=args.role, ttl=args.ttl))
    return 0


def _serve_tools(args: argparse.Namespace) -> int:
    from altan.logging import configure_logging
    from altan.sdk.container import load_tools, serve_tools
    from altan.server import shutdown_event

    # As `altan up`: without configured keys, the development secret of the data directory, so that the tokens of a
    # local stack are accepted.
    settings, _ = _development_settings({})
    # A tool container verifies delegations with the public key; the agent's private key is not its to hold.
    if not os.environ.get(SIGNING_KEY_SETTING):
        settings = settings.model_copy(update={"delegation_signing_key_file": None})
    configure_logging("tool-container", settings.log_level)
    try:
        tools = load_tools(args.module)
    except (ValueError, TypeError, ImportError) as exc:
        raise _Refused(f"cannot serve {args.module}: {exc}") from None
    address = join_address(args.host or settings.bind_host, args.port)

    async def serve() -> None:
        await serve_tools(tools, settings, address, shutdown_event())

    try:
        asyncio.run(serve())
    except ConfigurationError as exc:
        raise _Refused(f"invalid configuration: {exc}") from None
    except CannotListen as exc:
        raise _Refused(exc.line("tool container", "--port"), 1) from None
    return 0


def _version() -> str:
    try:
        return version("altan")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="altan", description="Self-hosted multi-tenant agent infrastructure")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "up",
        help="run the gateway and the three services locally, in the foreground",
        description="Run the gateway and the agent, tool and integrator services as separate processes. "
        "Each flag overrides its environment variable; every other setting is read from the environment.",
    )
    for flag, field, kind, text in _UP_FLAGS:
        # No argparse default: an absent flag leaves the value to the environment, read and validated by Settings.
        up.add_argument(
            flag,
            dest=field,
            type=kind,
            metavar="PORT" if kind is int else "SECONDS",
            help=f"{text} (default: {Settings.model_fields[field].default:g}; environment: {setting_name(field)})",
        )
    up.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS between the services, with a throwaway CA made for this run under ALTAN_DATA_DIR/tls",
    )
    token = commands.add_parser("token", help="print a development token signed with ALTAN_JWT_SECRET")
    token.add_argument("--tenant", required=True)
    token.add_argument("--sub", default="dev")
    token.add_argument("--role", choices=("admin", "member"), default="admin")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    serve = commands.add_parser(
        "serve-tools",
        help="serve the @tool functions of a module as a tool container (gRPC)",
        description="Serve every @tool of a module (a .py file or a dotted module name) over gRPC, for the Tool "
        "Service to find through ALTAN_TOOL_CONTAINERS. Tokens are verified with the ALTAN_JWT_* settings (without "
        "them, the development secret that `altan up` uses).",
    )
    serve.add_argument("module", help="weather.py, or a dotted module name")
    serve.add_argument("--port", type=int, default=DEFAULT_TOOL_CONTAINER_PORT, help="gRPC port (default: %(default)s)")
    serve.add_argument("--host", help="address to bind (default: ALTAN_BIND_HOST, 127.0.0.1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "token":
            return _token(args)
        if args.command == "serve-tools":
            return _serve_tools(args)
        return asyncio.run(_up(args))
    except _Refused as exc:
        print("".join(f"altan: {line}\n" for line in str(exc).splitlines()), end="", file=sys.stderr, flush=True)
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
