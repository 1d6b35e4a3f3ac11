from altan.v1 import tool_pb2 as _tool_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CredentialInfo(_message.Message):
    __slots__ = ("name", "type", "header", "prefix", "created_at", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    header: str
    prefix: str
    created_at: str
    updated_at: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., header: _Optional[str] = ..., prefix: _Optional[str] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ...) -> None: ...

class PutCredentialRequest(_message.Message):
    __slots__ = ("name", "spec_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_json: str
    def __init__(self, name: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class PutCredentialResponse(_message.Message):
    __slots__ = ("credential", "created")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    credential: CredentialInfo
    created: bool
    def __init__(self, credential: _Optional[_Union[CredentialInfo, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ListCredentialsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCredentialsResponse(_message.Message):
    __slots__ = ("credentials", "next_page_token")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    credentials: _containers.RepeatedCompositeFieldContainer[CredentialInfo]
    next_page_token: str
    def __init__(self, credentials: _Optional[_Iterable[_Union[CredentialInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteCredentialRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteCredentialResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InvokeToolRequest(_message.Message):
    __slots__ = ("tool_id", "arguments_json", "agent_id", "bound_tool_ids", "task_id", "step_id")
    TOOL_ID_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    BOUND_TOOL_IDS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    tool_id: str
    arguments_json: str
    agent_id: str
    bound_tool_ids: _containers.RepeatedScalarFieldContainer[str]
    task_id: str
    step_id: str
    def __init__(self, tool_id: _Optional[str] = ..., arguments_json: _Optional[str] = ..., agent_id: _Optional[str] = ..., bound_tool_ids: _Optional[_Iterable[str]] = ..., task_id: _Optional[str] = ..., step_id: _Optional[str] = ...) -> None: ...

class InvokeToolResponse(_message.Message):
    __slots__ = ("output_json", "http_status")
    OUTPUT_JSON_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    output_json: str
    http_status: int
    def __init__(self, output_json: _Optional[str] = ..., http_status: _Optional[int] = ...) -> None: ...

class DescribeToolsRequest(_message.Message):
    __slots__ = ("tool_ids",)
    TOOL_IDS_FIELD_NUMBER: _ClassVar[int]
    tool_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tool_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DescribeToolsResponse(_message.Message):
    __slots__ = ("tools", "missing")
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[_tool_pb2.Tool]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tools: _Optional[_Iterable[_Union[_tool_pb2.Tool, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("time", "tenant_id", "user", "action", "tool_id", "task_id", "target", "outcome", "latency_ms", "reason", "credential")
    TIME_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TOOL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    time: str
    tenant_id: str
    user: str
    action: str
    tool_id: str
    task_id: str
    target: str
    outcome: str
    latency_ms: int
    reason: str
    credential: str
    def __init__(self, time: _Optional[str] = ..., tenant_id: _Optional[str] = ..., user: _Optional[str] = ..., action: _Optional[str] = ..., tool_id: _Optional[str] = ..., task_id: _Optional[str] = ..., target: _Optional[str] = ..., outcome: _Optional[str] = ..., latency_ms: _Optional[int] = ..., reason: _Optional[str] = ..., credential: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("task_id", "limit")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    limit: int
    def __init__(self, task_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...
