"""Runs one tool call: validate the arguments, then run a built-in, call the tool's HTTP endpoint, or call the
tool container that serves it.

Every outbound request goes through the :class:`GuardedHttpClient` (the egress guard). A credential arrives with
the call from the Integrator Engine and lives only in this call's headers; a tool container receives one only for a
tool that declares it by that name (the integrator injects it only where the tenant's admin granted it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from altan.egress import HostBinding, destination
from altan.errors import FailedPrecondition, InvalidArgument
from altan.outbound import GuardedHttpClient, HttpResult
from altan.wire import parse_json
from services.tool.builtins import run_builtin
from services.tool.registry import ToolRegistry
from services.tool.schema import ArgumentValidator, build_http_request

__all__ = [
    "OFFLOAD_CHECK_BYTES",
    "REDACTED",
    "ContainerCalls",
    "Credential",
    "Execution",
    "McpCalls",
    "ToolExecutor",
    "redact",
]

# Arguments larger than this are checked against the tool's schema in a worker thread (ArgumentValidator.check).
OFFLOAD_CHECK_BYTES = 16 * 1024


@dataclass(frozen=True)
class Credential:
    """A secret injected for one call: ``header: prefix + value``."""

    name: str
    header: str
    prefix: str
    value: str
    hosts: tuple[str, ...] = ()

    def as_headers(self) -> dict[str, str]:
        return {self.header: f"{self.prefix}{self.value}"}


@dataclass(frozen=True)
class Execution:
    """What a tool call produced."""

    output: Any
    http_status: int = 0
    target: str = ""
    retry_after: float | None = None


def _sensitive(credential: Credential | None) -> tuple[str, ...]:
    """The credential's header, like Authorization, is dropped when a redirect leaves the origin."""
    return (credential.header,) if credential is not None else ()


REDACTED = "[redacted]"


def redact(value: Any, secret: str) -> Any:
    """``value`` with every occurrence of ``secret`` in its strings (object keys included) replaced by [redacted].

    For a third party that echoes the credential it was sent (a debugging endpoint, an error page quoting the
    request): the output goes on to the caller, a task, its events, an LLM prompt. Only the secret as sent is
    recognised, not an encoding of it (base64, percent-encoding).
    """
    if isinstance(value, str):
        return value.replace(secret, REDACTED) if secret in value else value
    if isinstance(value, dict):
        return {redact(k, secret): redact(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(item, secret) for item in value]
    return value


def _decode(result: HttpResult) -> Any:
    """The body parsed when it says it is JSON and is (within our limits), else its text."""
    if not result.body:
        return None
    if "json" in result.headers.get("content-type", "").lower():
        try:
            return parse_json(result.body, "response")
        except InvalidArgument:
            pass
    return result.body.decode("utf-8", errors="replace")


def _with_idempotency_key(headers: dict[str, str], key: str) -> dict[str, str]:
    """``headers`` with a task step's key as its one ``Idempotency-Key``: the platform's key wins over one in an
    http_request's arguments, so that a model cannot make a retried step look like a new operation."""
    if not key:
        return headers
    return {k: v for k, v in headers.items() if k.lower() != "idempotency-key"} | {"Idempotency-Key": key}


class ContainerCalls(Protocol):
    """Runs a tool of a tool container (services.tool.containers.ContainerTools)."""

    async def invoke(
        self,
        tool: dict[str, Any],
        arguments: dict[str, Any],
        timeout: float,
        credential: Credential | None = None,
        idempotency_key: str = "",
    ) -> Any: ...


class McpCalls(Protocol):
    """Runs a tool of a tenant's MCP server (services.tool.mcp.McpServers)."""

    async def invoke(
        self,
        tool: dict[str, Any],
        arguments: dict[str, Any],
        credential: Credential | None,
        timeout: float | None,
        idempotency_key: str = "",
    ) -> Any: ...


class ToolExecutor:
    """Executes tools of the current tenant."""

    def __init__(
        self,
        registry: ToolRegistry,
        http: GuardedHttpClient,
        validator: ArgumentValidator,
        *,
        containers: ContainerCalls | None = None,
        mcp: McpCalls | None = None,
        default_timeout: float = 30.0,
    ) -> None:
        self._mcp = mcp
        self._registry = registry
        self._http = http
        self._validator = validator
        self._containers = containers
        self._default_timeout = default_timeout

    async def execute(
        self,
        tool_id: str,
        arguments: Any,
        credential: Credential | None,
        timeout: float | None,
        *,
        arguments_size: int = 0,
        idempotency_key: str = "",
    ) -> Execution:
        """Run one call; ``arguments_size`` (bytes of their JSON) says whether checking them is worth a thread.

        ``idempotency_key`` (a task's ``<task_id>:<step_id>``) goes out as the HTTP request's ``Idempotency-Key``,
        to a tool container in its request (the SDK's ``ctx.idempotency_key``), to an MCP server in the call's
        ``_meta`` (``io.altan/idempotency-key``).
        """
        tool = await self._registry.get(tool_id)
        if not isinstance(arguments, dict):
            raise InvalidArgument("arguments: must be a JSON object")
        if tool["type"] == "builtin" and tool_id != "http_request":
            return Execution(output=await run_builtin(tool_id, arguments))  # validates the arguments itself
        if tool["type"] == "container" and self._containers is not None:
            # The container checks the arguments with the model its schema was made from: one set of rules.
            declared = tool.get("credential") or ""
            if credential is not None and credential.name != declared:
                credential = None  # only the credential the tool declares, never another one sent by mistake
            output = await self._containers.invoke(
                tool, arguments, timeout or self._default_timeout, credential, idempotency_key
            )
            return Execution(output=output, target=tool["container"])
        offload = arguments_size > OFFLOAD_CHECK_BYTES
        await self._validator.check(tool_id, tool["input_schema"], arguments, offload=offload)
        if tool["type"] == "mcp" and self._mcp is not None:
            # Its arguments were checked above, against a schema bounded as any tenant's: a bad call never leaves.
            output = await self._mcp.invoke(
                tool, arguments, credential, timeout or self._default_timeout, idempotency_key
            )
            return Execution(output=output, target=destination(tool["mcp_url"]))
        if tool_id == "http_request":
            return await self._http_request(arguments, credential, timeout, idempotency_key)
        return await self._custom(tool, arguments, credential, timeout, idempotency_key)

    async def _http_request(
        self, args: dict[str, Any], credential: Credential | None, timeout: float | None, idempotency_key: str
    ) -> Execution:
        if args.get("credential") and credential is None:
            raise FailedPrecondition(f"credential '{args['credential']}' was not provided")
        if args.get("json") is not None and args.get("body") is not None:
            raise InvalidArgument("arguments: give 'json' or 'body', not both")
        headers = _with_idempotency_key(dict(args.get("headers") or {}), idempotency_key)
        bound_to = None
        if credential is not None:
            headers.update(credential.as_headers())
            bound_to = HostBinding.parse(credential.hosts)  # the integrator checked; this is where it is sent
        body = args.get("body")
        result = await self._http.request(
            args.get("method", "GET"),
            args["url"],
            headers=headers,
            params=args.get("query"),
            json=args.get("json"),
            content=body.encode() if isinstance(body, str) else None,
            timeout=timeout,
            sensitive_headers=_sensitive(credential),
            bound_to=bound_to,
        )
        return self._execution(result, credential)

    async def _custom(
        self,
        tool: dict[str, Any],
        args: dict[str, Any],
        credential: Credential | None,
        timeout: float | None,
        idempotency_key: str,
    ) -> Execution:
        if tool.get("auth", "none") != "none" and credential is None:
            raise FailedPrecondition(f"tool '{tool['tool_id']}' needs credential '{tool.get('credential')}'")
        method, url, params, body = build_http_request(tool, args)
        headers = _with_idempotency_key(credential.as_headers() if credential is not None else {}, idempotency_key)
        sensitive = _sensitive(credential)
        result = await self._http.request(
            method, url, headers=headers, params=params, json=body, timeout=timeout, sensitive_headers=sensitive
        )
        return self._execution(result, credential)

    @staticmethod
    def _execution(result: HttpResult, credential: Credential | None) -> Execution:
        output = _decode(result)
        if credential is not None:
            output = redact(output, credential.value)
        return Execution(output=output, http_status=result.status, target=result.target, retry_after=result.retry_after)
