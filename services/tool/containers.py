"""Tool containers (``ALTAN_TOOL_CONTAINERS``): their tools in every tenant's catalogue, and calls to them.

Each container is listed at start-up, then every ``refresh_seconds``, and again soon after it failed (unreachable,
or a call found a tool it no longer serves). A container that cannot be reached keeps the tools it listed last:
they stay in the catalogue and their calls fail with UNAVAILABLE, so an agent bound to one fails clearly and
recovers when the container is back, instead of the tool vanishing. A container's tools come and go with its list.

Containers found through the Kubernetes API (``services/tool/kubernetes_discovery.py``) join and leave while the
service runs (``discovered``): one that joins is listed at once, one that leaves takes its tools along.

Which container a tool id belongs to is decided here, once per listing: a built-in's id is refused (logged), and of
two containers offering one id the one named first in ``ALTAN_TOOL_CONTAINERS`` keeps it (the other is logged);
discovered containers come after those, by address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

from altan.api.convert import struct_to_dict
from altan.api.tools import TOOL_ID_PATTERN
from altan.clients import ToolContainerClient
from altan.errors import (
    AltanError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from altan.v1 import container_pb2, tool_pb2
from altan.wire import json_bytes, parse_json
from services.tool.executor import REDACTED, Credential, redact

__all__ = ["ContainerTools"]

log = logging.getLogger(__name__)

_TOOL_ID = re.compile(TOOL_ID_PATTERN)
_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")  # altan.api.common.Name
_MAX_DESCRIPTION = 10_000
# How long one listing may take; a container slower than this is treated as unreachable.
_LIST_TIMEOUT_SECONDS = 5.0
# Retries of an unreachable container start here and double up to the refresh period.
_RETRY_FIRST_SECONDS = 0.25


class _Container:
    """One container: its client, what it listed last, and the event that asks for a new listing."""

    def __init__(self, address: str, client: ToolContainerClient) -> None:
        self.address = address
        self.client = client
        self.listed: dict[str, dict[str, Any]] = {}  # tool_id -> tool, as last listed
        self.digest = b""  # of the last listing, so that an unchanged one is neither checked nor logged again
        self.reachable: bool | None = None  # None: never tried
        self.wake = asyncio.Event()


class ContainerTools:
    """The tools of the install's containers, the same for every tenant."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        reserved: Collection[str],
        refresh_seconds: float,
        max_output_bytes: int,
        connect: Callable[[str], ToolContainerClient],
    ) -> None:
        self._connect = connect
        self._listed = [_Container(address, connect(address)) for address in addresses]
        self._found: list[_Container] = []  # discovered, by address
        self._containers = list(self._listed)  # in the order that decides who keeps a tool id
        self._reserved = frozenset(reserved)
        self._refresh_seconds = refresh_seconds
        self._max_output_bytes = max_output_bytes
        self._tools: dict[str, dict[str, Any]] = {}
        self._owner: dict[str, _Container] = {}
        self._followers: dict[str, asyncio.Task[None]] = {}
        self._discovery = asyncio.Lock()  # changes from discovery apply one after the other, in their order
        self._closed = False

    # --- the catalogue ------------------------------------------------------------------------------------------

    def get(self, tool_id: str) -> dict[str, Any] | None:
        return self._tools.get(tool_id)

    def all(self) -> list[dict[str, Any]]:
        """Every container tool, by tool id."""
        return [self._tools[tool_id] for tool_id in sorted(self._tools)]

    async def start(self) -> None:
        """List every container once (each within a few seconds), then keep the lists fresh in the background."""
        await asyncio.gather(*(self._refresh(c) for c in self._containers))
        for container in self._containers:
            self._followers[container.address] = asyncio.create_task(self._follow(container))

    async def discovered(self, addresses: Collection[str]) -> None:
        """Make the discovered containers exactly these: a new one is listed at once (as at start-up), one that is
        gone leaves with its tools. An address that ``ALTAN_TOOL_CONTAINERS`` names already is ignored."""
        async with self._discovery:
            if self._closed:
                return
            wanted = set(addresses) - {c.address for c in self._listed}
            known = {c.address for c in self._found}
            gone = [c for c in self._found if c.address not in wanted]
            new = [_Container(address, self._connect(address)) for address in sorted(wanted - known)]
            if not gone and not new:
                return
            log.info(
                "tool containers discovered",
                extra={"added": [c.address for c in new], "removed": [c.address for c in gone]},
            )
            self._found = sorted([c for c in self._found if c.address in wanted] + new, key=lambda c: c.address)
            self._containers = self._listed + self._found
            self._merge()  # the tools of the containers that left are gone from here on
            await asyncio.gather(*(self._stop(c) for c in gone))
            await asyncio.gather(*(self._refresh(c) for c in new))
            for container in new:
                self._followers[container.address] = asyncio.create_task(self._follow(container))

    async def _stop(self, container: _Container) -> None:
        task = self._followers.pop(container.address, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await container.client.aclose()

    async def aclose(self) -> None:
        async with self._discovery:
            self._closed = True
        await asyncio.gather(*(self._stop(c) for c in self._containers))

    async def _follow(self, container: _Container) -> None:
        retry = _RETRY_FIRST_SECONDS
        while True:
            wait = self._refresh_seconds if container.reachable else retry
            retry = _RETRY_FIRST_SECONDS if container.reachable else min(retry * 2, self._refresh_seconds)
            # Woken early by a failed call. (Not wait_for: on 3.11 it may swallow a cancellation that comes together
            # with the wake-up, and the follower would outlive aclose.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await container.wake.wait()
            container.wake.clear()
            await self._refresh(container)

    async def _refresh(self, container: _Container) -> None:
        try:
            definitions = await container.client.list_tools(_LIST_TIMEOUT_SECONDS)
        except AltanError as exc:
            if container.reachable is not False:
                log.warning(
                    "tool container unreachable; its tools fail with UNAVAILABLE until it answers",
                    extra={"container": container.address, "error": exc.message, "tools": sorted(container.listed)},
                )
            container.reachable = False
            return
        digest = hashlib.sha256(b"".join(d.SerializeToString(deterministic=True) for d in definitions)).digest()
        changed = digest != container.digest
        if changed:
            container.digest = digest
            container.listed = self._accept(container.address, definitions)
            if container in self._containers:  # not one that discovery dropped while it was being listed
                self._merge()
        if changed or not container.reachable:
            log.info("tool container listed", extra={"container": container.address, "tools": sorted(container.listed)})
        container.reachable = True

    def _accept(self, address: str, definitions: list[tool_pb2.Tool]) -> dict[str, dict[str, Any]]:
        """The container's tools the catalogue can take, each as the Tool Service stores a tool."""
        accepted: dict[str, dict[str, Any]] = {}
        for definition in definitions:
            tool_id = definition.tool_id
            refused = ""
            if not _TOOL_ID.match(tool_id):
                refused = f"the tool id must match {TOOL_ID_PATTERN}"
            elif tool_id in self._reserved:
                refused = "a built-in tool has that id"
            elif tool_id in accepted:
                refused = "the container lists it twice"
            elif definition.credential and not _CREDENTIAL_NAME.match(definition.credential):
                refused = "its credential is not a credential's name"
            if refused:
                log.warning(
                    "tool of a container refused", extra={"container": address, "tool_id": tool_id, "why": refused}
                )
                continue
            schema = struct_to_dict(definition.input_schema) if definition.HasField("input_schema") else {}
            accepted[tool_id] = {
                "tool_id": tool_id,
                "type": "container",
                "name": definition.name or tool_id,
                "description": definition.description[:_MAX_DESCRIPTION],
                "input_schema": schema or {"type": "object", "properties": {}},
                "container": address,
                # The tenant's credential it declares: injected into a call only where the tenant's admin granted it.
                "credential": definition.credential,
                # Tells one definition from the next (the catalogue's proto cache keys on it); never shown.
                "revision": hashlib.sha256(
                    address.encode() + definition.SerializeToString(deterministic=True)
                ).hexdigest()[:16],
            }
        return accepted

    def _merge(self) -> None:
        tools: dict[str, dict[str, Any]] = {}
        owner: dict[str, _Container] = {}
        for container in self._containers:  # ALTAN_TOOL_CONTAINERS in its order, then discovered: the first keeps an id
            for tool_id, tool in container.listed.items():
                if tool_id in owner:
                    log.warning(
                        "tool of a container refused",
                        extra={
                            "container": container.address,
                            "tool_id": tool_id,
                            "why": f"tool container {owner[tool_id].address} serves a tool of that id",
                        },
                    )
                    continue
                tools[tool_id], owner[tool_id] = tool, container
        self._tools, self._owner = tools, owner

    # --- calls --------------------------------------------------------------------------------------------------

    async def invoke(
        self,
        tool: dict[str, Any],
        arguments: dict[str, Any],
        timeout: float,
        credential: Credential | None = None,
        idempotency_key: str = "",
    ) -> Any:
        """Run a container tool as the current caller (whose token goes along), with the credential the integrator
        injected for this call when the tool declares one, and a task step's idempotency key; its output, parsed,
        the secret redacted from it."""
        secret = credential.value if credential is not None else ""
        try:
            output = await self._invoke(tool, arguments, timeout, credential, idempotency_key)
        except AltanError as exc:
            if secret and secret in exc.message:  # a failure that quotes the secret does not carry it further
                exc.message = exc.message.replace(secret, REDACTED)
                exc.args = (exc.message,)
            raise
        return redact(output, secret) if secret else output

    async def _invoke(
        self,
        tool: dict[str, Any],
        arguments: dict[str, Any],
        timeout: float,
        credential: Credential | None,
        idempotency_key: str,
    ) -> Any:
        tool_id, address = tool["tool_id"], tool["container"]
        container = self._owner.get(tool_id)
        if container is None or container.address != address:
            raise Unavailable(f"tool '{tool_id}' is no longer served by tool container {address}")
        request = container_pb2.InvokeContainerToolRequest(
            tool_id=tool_id,
            arguments_json=json_bytes(arguments),
            timeout_seconds=timeout,
            idempotency_key=idempotency_key,
        )
        if credential is not None:
            request.credential.CopyFrom(
                container_pb2.ContainerCredential(
                    name=credential.name, header=credential.header, prefix=credential.prefix, value=credential.value
                )
            )
        try:
            # A little longer than the tool's own budget, so that the container's clear answer arrives first.
            answer = await container.client.call(container.client.container.InvokeTool, request, timeout=timeout + 0.5)
        except Unavailable:
            container.wake.set()
            raise Unavailable(f"tool container {address} is unavailable (tool '{tool_id}')") from None
        except NotFound:
            container.wake.set()
            raise Unavailable(f"tool '{tool_id}' is no longer served by tool container {address}") from None
        except DeadlineExceeded:
            raise DeadlineExceeded(f"tool '{tool_id}' did not finish within {timeout:g}s") from None
        except ResourceExhausted:  # the answer was over the channel's 16 MiB
            raise self._too_large(tool_id, None) from None
        except (InvalidArgument, FailedPrecondition):
            raise  # the tool's own words: its arguments were wrong, or it failed
        except AltanError as exc:  # e.g. UNAUTHENTICATED: the container verifies tokens with other keys
            log.warning(
                "tool container refused a call",
                extra={"container": address, "tool_id": tool_id, "code": exc.code.name, "error": exc.message},
            )
            raise FailedPrecondition(f"tool container {address} refused the call ({exc.code.name})") from None
        if len(answer.output_json) > self._max_output_bytes:
            raise self._too_large(tool_id, len(answer.output_json))
        try:
            return parse_json(answer.output_json, "output")
        except InvalidArgument:
            raise FailedPrecondition(f"tool '{tool_id}' answered an output that is not JSON") from None

    def _too_large(self, tool_id: str, size: int | None) -> FailedPrecondition:
        what = f"{size} bytes" if size is not None else "too large"
        return FailedPrecondition(
            f"the output of tool '{tool_id}' is {what}, over the limit of {self._max_output_bytes} "
            "(ALTAN_MAX_OUTPUT_BYTES)"
        )
