"""Tool containers found through the Kubernetes API (``ALTAN_TOOL_DISCOVERY=kubernetes``).

The Services labelled ``altan.io/tool-container: "true"`` of one namespace are listed, then watched from the list's
``resourceVersion``; each change of the set of their addresses goes to ``ContainerTools.discovered``, which lists a
new container at once and drops one that is gone with its tools. A watch that ends (the server's timeout) resumes
from the last version seen; one the server no longer has (410 Gone) is replaced by a new list; any other failure is
retried with a growing pause, and the containers found so far stay as they are meanwhile: the API server being away
changes nothing in the catalogue.

The official ``kubernetes`` client is synchronous, so the list and watch run in one thread of their own: its
in-cluster configuration re-reads the service account's token as the kubelet rotates it, and a stop shuts the watch's
socket down (urllib3's ``HTTPResponse.shutdown``), which ends a blocked read at once. Changes reach the event loop
with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, Literal

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

__all__ = ["LABEL_SELECTOR", "ServiceWatch", "core_api", "service_address", "service_namespace"]

log = logging.getLogger(__name__)

LABEL_SELECTOR = "altan.io/tool-container=true"
# The service account's namespace, as the kubelet mounts it beside the token.
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The server ends each watch after this long (it is resumed from the last version); the client gives up on a read
# that long past it, in case the connection died without a word.
_WATCH_SECONDS = 240
_READ_MARGIN_SECONDS = 30
_CONNECT_SECONDS = 5
_LIST_SECONDS = 10
# Pauses after a failure start here and double up to the last.
_RETRY_FIRST_SECONDS = 0.5
_RETRY_MAX_SECONDS = 30.0
# How long a stop waits for the thread (a list in flight ends within _LIST_SECONDS at the latest; it is a daemon).
_JOIN_SECONDS = 2.0

AddressMode = Literal["dns", "cluster-ip"]


class _Stopped(Exception):
    """The watch was about to start after a stop."""


def core_api() -> client.CoreV1Api:
    """A client of the API server: the pod's service account in a cluster, else KUBECONFIG (or ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.CoreV1Api(client.ApiClient(configuration))


def service_namespace(configured: str, namespace_file: Path = NAMESPACE_FILE) -> str:
    """The namespace to watch: the setting, else the pod's own (the downward API's file of the service account)."""
    if configured:
        return configured
    try:
        return namespace_file.read_text().strip()
    except OSError:
        raise ValueError(
            f"ALTAN_TOOL_DISCOVERY_NAMESPACE is not set and {namespace_file} cannot be read: name the namespace"
        ) from None


def service_address(service: dict[str, Any], mode: AddressMode = "dns") -> str | None:
    """``<service>.<namespace>.svc:<port>`` of a Service (as the API serves it), its port named ``grpc`` or else its
    first; with ``cluster-ip``, ``<clusterIP>:<port>``. None when it has no port or (cluster-ip) no address."""
    metadata, spec = service.get("metadata") or {}, service.get("spec") or {}
    ports = [p for p in spec.get("ports") or [] if isinstance(p.get("port"), int)]
    if not ports or not metadata.get("name"):
        return None
    port = next((p for p in ports if p.get("name") == "grpc"), ports[0])["port"]
    if mode == "cluster-ip":
        host = spec.get("clusterIP") or ""
        if not host or host == "None":
            return None
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{metadata['name']}.{metadata.get('namespace') or ''}.svc:{port}"


class ServiceWatch:
    """Follows the labelled Services of a namespace and hands each new set of their addresses to ``on_change``."""

    def __init__(
        self,
        api: client.CoreV1Api,
        namespace: str,
        on_change: Callable[[Collection[str]], Awaitable[None]],
        *,
        address_mode: AddressMode = "dns",
        watch_seconds: int = _WATCH_SECONDS,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._on_change = on_change
        self._mode: AddressMode = address_mode
        self._watch_seconds = watch_seconds
        self._services: dict[str, str] = {}  # Service name -> address (thread only)
        self._published: frozenset[str] | None = None  # thread only
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # between a stop and the watch's response being opened
        self._response: Any = None  # the open watch's urllib3 response
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._applying: set[asyncio.Task[None]] = set()
        self._first = asyncio.Event()  # set once the first list has been applied

    async def start(self, wait_seconds: float) -> None:
        """Start following; wait up to ``wait_seconds`` for the first list to be applied, so that the containers
        that are up are in the catalogue when the service first answers (it goes on in the background anyway)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tool-discovery", daemon=True)
        self._thread.start()
        try:
            async with asyncio.timeout(wait_seconds):
                await self._first.wait()
        except TimeoutError:
            log.warning(
                "tool discovery: no list of Services yet; going on without",
                extra={"namespace": self._namespace, "waited_seconds": wait_seconds},
            )

    async def aclose(self) -> None:
        with self._lock:
            self._stopping.set()
            if self._response is not None:
                self._response.shutdown()  # the blocked read returns at once; the thread then sees the stop
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _JOIN_SECONDS)
        for task in list(self._applying):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- the thread -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        pause = _RETRY_FIRST_SECONDS
        while not self._stopping.is_set():
            try:
                version = self._list()
                pause = _RETRY_FIRST_SECONDS
                while not self._stopping.is_set():
                    version = self._follow(version)
            except _Stopped:
                break
            except ApiException as exc:
                if exc.status == 410:  # the version is too old for the server: list again, at once
                    log.info("tool discovery: watch expired, listing again", extra={"namespace": self._namespace})
                    continue
                self._failed(f"{exc.status} {exc.reason}")
            except Exception as exc:  # the thread must outlive any failure: it is retried, and logged once each
                if self._stopping.is_set():
                    break
                self._failed(f"{type(exc).__name__}: {exc}")
            self._stopping.wait(pause)
            pause = min(pause * 2, _RETRY_MAX_SECONDS)

    def _failed(self, error: str) -> None:
        log.warning(
            "tool discovery: the Kubernetes API failed; the containers found so far stay",
            extra={"namespace": self._namespace, "error": error},
        )

    def _list(self) -> str:
        answer = self._api.list_namespaced_service(
            self._namespace, label_selector=LABEL_SELECTOR, _request_timeout=(_CONNECT_SECONDS, _LIST_SECONDS)
        )
        serialize = self._api.api_client.sanitize_for_serialization  # the model back to the API's JSON
        services: dict[str, str] = {}
        for item in answer.items or []:
            service = serialize(item)
            address = service_address(service, self._mode)
            if address is None:
                self._unusable(service)
                continue
            services[service["metadata"]["name"]] = address
        self._services = services
        self._publish()
        return str((answer.metadata.resource_version if answer.metadata else None) or "")

    def _follow(self, version: str) -> str:
        """One watch from ``version``, until the server ends it; the last version seen."""
        # Events stay the API's JSON (no model type given): only names, ports and versions are read.
        events = watch.Watch().stream(
            self._open,
            self._namespace,
            label_selector=LABEL_SELECTOR,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_seconds,
            _request_timeout=(_CONNECT_SECONDS, self._watch_seconds + _READ_MARGIN_SECONDS),
        )
        try:
            for event in events:
                service = event["raw_object"]
                version = str((service.get("metadata") or {}).get("resourceVersion") or version)
                self._apply(event["type"], service)
        finally:
            with self._lock:
                self._response = None
        return version

    def _open(self, *args: Any, **kwargs: Any) -> Any:
        """The watch request, its response kept where a stop can shut it down."""
        # With _preload_content=False (set by Watch) the answer is urllib3's response, not a V1ServiceList.
        response: Any = self._api.list_namespaced_service(*args, **kwargs)
        with self._lock:
            if self._stopping.is_set():
                response.close()
                raise _Stopped
            self._response = response
        return response

    def _apply(self, kind: str, service: dict[str, Any]) -> None:
        name = (service.get("metadata") or {}).get("name")
        if kind == "BOOKMARK" or not name:
            return
        if kind == "DELETED":
            self._services.pop(name, None)
        else:  # ADDED, MODIFIED
            address = service_address(service, self._mode)
            if address is None:
                self._services.pop(name, None)
                self._unusable(service)
            else:
                self._services[name] = address
        self._publish()

    def _unusable(self, service: dict[str, Any]) -> None:
        log.warning(
            "tool discovery: a labelled Service has no port (or no cluster IP) to reach; it is skipped",
            extra={"service": (service.get("metadata") or {}).get("name"), "namespace": self._namespace},
        )

    def _publish(self) -> None:
        addresses = frozenset(self._services.values())
        if addresses == self._published:
            return
        self._published = addresses
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._schedule, addresses)

    # --- back on the event loop -----------------------------------------------------------------------------------

    def _schedule(self, addresses: frozenset[str]) -> None:
        task = asyncio.create_task(self._deliver(addresses))
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _deliver(self, addresses: frozenset[str]) -> None:
        try:
            await self._on_change(addresses)
        finally:
            self._first.set()
