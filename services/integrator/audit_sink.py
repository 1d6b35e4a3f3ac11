"""The ``gcp`` audit sink: every audit event as a Cloud Logging entry of its own log (``altan-audit``).

An entry's ``jsonPayload`` is the audit event as ``GET /v1/audit`` shows it (never a secret); its labels name the
tenant and the action, so a log view or a sink can be restricted to one tenant; ``operation`` links a call's
``started`` entry (``first``) to its outcome (``last``); ``insertId`` makes the library's retries write an entry
once. Each write is one ``WriteLogEntries`` call, awaited: the audit trail fails closed (services/integrator/audit.py),
so an entry is not batched for later.
"""

from __future__ import annotations

import uuid
from typing import Any

from google.api import monitored_resource_pb2
from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2AsyncClient
from google.cloud.logging_v2.services.logging_service_v2.transports import LoggingServiceV2GrpcAsyncIOTransport
from google.cloud.logging_v2.types import LogEntry, LogEntryOperation
from google.logging.type import log_severity_pb2
from google.protobuf import timestamp_pb2

from altan.config import Settings
from services.integrator.google_cloud import GOOGLE_ERRORS, call_options, google_error, open_client

__all__ = ["CloudLoggingSink"]

_SEVERITY = {"denied": log_severity_pb2.WARNING, "error": log_severity_pb2.ERROR}
_PRODUCER = "altan.io/integrator"
_NEEDS = "roles/logging.logWriter on the project"


class CloudLoggingSink:
    """Writes audit events to ``projects/<project>/logs/<log_name>``."""

    def __init__(self, client: LoggingServiceV2AsyncClient, project: str, log_name: str, timeout: float) -> None:
        self._client = client
        self._log_name = f"projects/{project}/logs/{log_name}"
        self._resource = monitored_resource_pb2.MonitoredResource(type="global", labels={"project_id": project})
        self._options = call_options(timeout)

    @classmethod
    def open(cls, settings: Settings) -> CloudLoggingSink:
        client = open_client(
            settings, LoggingServiceV2AsyncClient, LoggingServiceV2GrpcAsyncIOTransport, "ALTAN_AUDIT_SINK"
        )
        assert settings.gcp_project is not None  # Settings requires it with this sink
        return cls(client, settings.gcp_project, settings.gcp_audit_log_name, settings.gcp_timeout_seconds)

    async def aclose(self) -> None:
        await self._client.transport.close()

    async def write(self, event: dict[str, Any], *, call: str, first: bool, last: bool) -> None:
        timestamp = timestamp_pb2.Timestamp()
        timestamp.FromMilliseconds(int(event["time"]))
        entry = LogEntry(
            log_name=self._log_name,
            resource=self._resource,
            json_payload=event,
            labels={"altan_tenant": event["tenant_id"], "altan_action": event["action"]},
            severity=_SEVERITY.get(event["outcome"], log_severity_pb2.INFO),
            timestamp=timestamp,
            insert_id=uuid.uuid4().hex,
            operation=LogEntryOperation(id=call, producer=_PRODUCER, first=first, last=last),
        )
        try:
            await self._client.write_log_entries(entries=[entry], **self._options)
        except GOOGLE_ERRORS as exc:
            raise google_error(exc, "writing the audit entry to Cloud Logging", needs=_NEEDS) from None
