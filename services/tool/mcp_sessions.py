"""MCP client sessions kept open between calls: one per tenant and server, for the life of the Tool Service.

Opening a session is most of what a call costs (initialize, ``notifications/initialized``, the GET stream, and the
DELETE that ends it: four HTTP exchanges around the one ``tools/call``), so a session is opened once and reused.
Many calls may share one session at once: MCP requests carry ids.

A session is bound to what it was opened with: the URL and the credential's value. A call with another of either
(a rotated credential, a replaced server) retires the old session and opens a new one. A retired session is closed
once its last call has returned. A session that broke (the server restarted, its session expired) is dropped and a
call that found it so is sent again, once, on a new session.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

import anyio
import httpx
from mcp import ClientSession, McpError
from mcp.client.session import MessageHandlerFnT
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CONNECTION_CLOSED

from altan.outbound import GuardedTransport

__all__ = ["KeptSession", "McpSessions", "SessionBroken", "SessionUnopened"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_CLOSE_SECONDS = 5.0  # the closing DELETE; a server that does not answer it is cut off
_SESSION_TERMINATED = 32600  # the code the SDK gives a request answered 404 (sic: not -32600)
# What is read of an answer the SDK closes early, so that its connection can be used again (see _DrainOnClose).
_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 64 * 1024


class _DrainOnClose(httpx.AsyncByteStream):
    """A response body whose end is read when it is closed early, so that its connection goes back to the pool.

    The SDK closes an SSE answer as soon as the JSON-RPC response is in it, a moment before the server ends the
    stream (the chunked body's last chunk). httpcore cannot reuse a connection whose answer was not read to the end,
    so it closed it: every call opened a new TCP connection (on both sides). Reading that end is a few bytes; an
    answer that goes on (the long-lived GET stream, a server that keeps talking) is cut off after
    ``_DRAIN_SECONDS`` or ``_DRAIN_BYTES`` as before. The read happens in the SDK's task for that request, after the
    response was handed on, so no call waits for it.
    """

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner
        self._chunks = inner.__aiter__()  # one iterator, so that closing goes on where reading stopped
        self._ended = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk
        self._ended = True

    async def aclose(self) -> None:
        try:
            if not self._ended:
                await self._drain()
        except Exception as exc:  # whatever ended the answer, closing it is all that is left to do
            log.debug("an MCP answer failed while its end was read", extra={"error": type(exc).__name__})
        finally:
            await self._inner.aclose()

    async def _drain(self) -> None:
        drained = 0
        with anyio.move_on_after(_DRAIN_SECONDS):
            async for chunk in self._chunks:
                drained += len(chunk)
                if drained > _DRAIN_BYTES:
                    return


class _DrainingTransport(httpx.AsyncBaseTransport):
    """Wraps the session's guarded transport: each answer's body is a :class:`_DrainOnClose`."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _DrainOnClose(response.stream)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class SessionBroken(Exception):
    """The kept session ended under a call: the call did not reach the server's tool, so it may be sent again."""


class SessionUnopened(Exception):
    """A session could not be opened; ``cause`` is what the SDK raised, ``transport`` the one it went through."""

    def __init__(self, cause: BaseException, transport: GuardedTransport) -> None:
        super().__init__("the MCP session could not be opened")
        self.cause = cause
        self.transport = transport


class KeptSession:
    """One initialized session, held open by a task of its own (the SDK's task groups must be left by the task that
    entered them, and calls come from many tasks) until :meth:`aclose` or until it breaks.

    The task is started from the call that opens the session, so it runs in that caller's context: whatever the
    server sends on its own (a changed tool list) is handled as that tenant.
    """

    def __init__(
        self,
        url: str,
        transport: GuardedTransport,
        headers: Mapping[str, str] | None,
        *,
        fingerprint: str,
        call_timeout: float,
        message_handler: MessageHandlerFnT | None = None,
    ) -> None:
        self.url = url
        self.transport = transport
        self.fingerprint = fingerprint
        self.error: BaseException | None = None
        self._headers = dict(headers or {})
        # No read timeout on the client: the GET stream is idle by design. Every call has a deadline of its own.
        self._timeout = httpx.Timeout(call_timeout, read=None)
        self._handler = message_handler
        self._ready: asyncio.Future[ClientSession] = asyncio.get_running_loop().create_future()
        self._closing = asyncio.Event()
        self._users = 0
        self._retired = False
        self._broken = False
        self._task = asyncio.create_task(self._hold(), name=f"mcp-session {url}")

    async def _hold(self) -> None:
        try:
            async with (
                httpx.AsyncClient(
                    transport=_DrainingTransport(self.transport),
                    headers=self._headers,
                    timeout=self._timeout,
                    follow_redirects=False,
                    trust_env=False,
                ) as client,
                streamable_http_client(self.url, http_client=client) as (read, write, _),
                ClientSession(read, write, message_handler=self._handler) as session,
            ):
                await session.initialize()
                self._ready.set_result(session)
                await self._closing.wait()
        except (Exception, BaseExceptionGroup) as exc:
            self.error = exc
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            if not self._ready.done():
                self._ready.set_exception(SessionBroken(None))

    @property
    def alive(self) -> bool:
        return not (self._task.done() or self._retired or self._broken)

    async def session(self) -> ClientSession:
        """The initialized session; raises what opening it raised."""
        return await asyncio.shield(self._ready)

    async def call(self, operation: Callable[[ClientSession], Awaitable[T]]) -> T:
        """Run ``operation`` on the session; :class:`SessionBroken` when the session ended under it."""
        session = await self.session()
        self._users += 1
        try:
            return await operation(session)
        except McpError as exc:
            # The SDK answers a request its session could not finish with errors of its own: the connection closed
            # under it (the server went away), or the server no longer knows the session (404: restarted, expired).
            if exc.error.code == CONNECTION_CLOSED or (
                exc.error.code == _SESSION_TERMINATED and exc.error.message == "Session terminated"
            ):
                self._broken = True
                raise SessionBroken() from exc
            raise
        finally:
            self._users -= 1
            if self._retired and self._users == 0:
                self._closing.set()

    def retire(self) -> None:
        """No new calls; closed once the calls under way have returned."""
        self._retired = True
        if self._users == 0:
            self._closing.set()

    async def aclose(self) -> None:
        self.retire()
        self._closing.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), _CLOSE_SECONDS)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_closed(self) -> None:
        """Until the holder's task has ended (for a retired session closing in the background)."""
        await asyncio.gather(self._task, return_exceptions=True)


def fingerprint(url: str, headers: Mapping[str, str] | None) -> str:
    """What a session is bound to, without keeping the credential's value in the clear."""
    material = "\n".join([url, *(f"{k}: {v}" for k, v in sorted((headers or {}).items()))])
    return hashlib.sha256(material.encode()).hexdigest()


class McpSessions:
    """The kept sessions, by (tenant, server)."""

    def __init__(
        self,
        transport: Callable[[], GuardedTransport],
        *,
        call_timeout: float,
        message_handler: Callable[[str, str], MessageHandlerFnT] | None = None,
    ) -> None:
        self._transport = transport
        self._call_timeout = call_timeout
        self._handler = message_handler
        self._sessions: dict[tuple[str, str], KeptSession] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._retiring: dict[KeptSession, asyncio.Task[None]] = {}

    async def kept(self, tenant: str, server: str, url: str, headers: Mapping[str, str] | None) -> KeptSession:
        """The session for this tenant's server, opened (or re-opened) unless a live one matches URL and credential.

        :class:`SessionUnopened` when it cannot be opened; the caller holds the deadline."""
        key = (tenant, server)
        wanted = fingerprint(url, headers)
        kept = self._sessions.get(key)
        if kept is not None and kept.alive and kept.fingerprint == wanted:
            return kept
        async with self._locks.setdefault(key, asyncio.Lock()):
            kept = self._sessions.get(key)
            if kept is None or not kept.alive or kept.fingerprint != wanted:
                if kept is not None:
                    self._retire(key, kept)
                handler = self._handler(tenant, server) if self._handler is not None else None
                kept = KeptSession(
                    url,
                    self._transport(),
                    headers,
                    fingerprint=wanted,
                    call_timeout=self._call_timeout,
                    message_handler=handler,
                )
                self._sessions[key] = kept
        try:
            await kept.session()
        except (Exception, BaseExceptionGroup) as exc:
            self.drop(tenant, server, kept)
            raise SessionUnopened(kept.error or exc, kept.transport) from None
        return kept

    def live(self, tenant: str, server: str) -> KeptSession | None:
        """The kept session of this tenant's server, if one is open and not retired."""
        kept = self._sessions.get((tenant, server))
        return kept if kept is not None and kept.alive else None

    def items(self) -> list[tuple[tuple[str, str], KeptSession]]:
        """Every live session, by (tenant, server)."""
        return [(key, kept) for key, kept in self._sessions.items() if kept.alive]

    def drop(self, tenant: str, server: str, kept: KeptSession | None = None) -> None:
        """Forget the session of this server (only ``kept``, when given: a newer one stays), closing it."""
        key = (tenant, server)
        current = self._sessions.get(key)
        if current is not None and (kept is None or current is kept):
            self._retire(key, current)

    def _retire(self, key: tuple[str, str], kept: KeptSession) -> None:
        if self._sessions.get(key) is kept:
            del self._sessions[key]
        kept.retire()
        closing = asyncio.create_task(kept.wait_closed())
        self._retiring[kept] = closing
        closing.add_done_callback(lambda _: self._retiring.pop(kept, None))

    async def aclose(self) -> None:
        """Close every session (at shutdown)."""
        every = [*self._sessions.values(), *self._retiring]
        self._sessions.clear()
        await asyncio.gather(*(kept.aclose() for kept in every), return_exceptions=True)
