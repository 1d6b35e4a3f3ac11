"""Conversions between the protos and the JSON of the public API: free-form JSON, enums and timestamps.

Free-form JSON (arguments, outputs, schemas) is ``google.protobuf.Struct``/``Value`` on the public wire and plain
Python (``dict``/``list``/``str``/``int``/``float``/``bool``/``None``) everywhere else. Numbers in a Struct are
doubles: integral values come back as ``int``, and the REST edge refuses integers a double cannot hold exactly, so
nothing changes silently on the way.

Enums are ``PREFIX_NAME`` on the wire and ``"name"`` in JSON (``AUTH_TYPE_API_KEY`` is ``"api_key"``); the zero value
``*_UNSPECIFIED`` means "not given". Times are ``google.protobuf.Timestamp`` on the wire, integer milliseconds since
the epoch in the stores, and RFC 3339 UTC with milliseconds (``2026-12-01T10:00:00.000Z``) in JSON.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.struct_pb2 import ListValue, Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "MAX_SAFE_INTEGER",
    "enum_name",
    "enum_value",
    "list_to_python",
    "now_ms",
    "python_to_list",
    "python_to_struct",
    "python_to_value",
    "rfc3339",
    "struct_to_dict",
    "timestamp",
    "value_to_python",
]

# The largest integer a double (and so a JSON number in most languages, and a Struct number) holds exactly.
MAX_SAFE_INTEGER = 2**53


# --- free-form JSON ---------------------------------------------------------------------------------------


def value_to_python(value: Value) -> Any:
    """The plain Python of a ``Value``; an unset Value is ``None``."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and -MAX_SAFE_INTEGER <= number <= MAX_SAFE_INTEGER else number
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return list_to_python(value.list_value)
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    return {key: value_to_python(item) for key, item in struct.fields.items()}


def list_to_python(values: ListValue) -> list[Any]:
    return [value_to_python(item) for item in values.values]


def python_to_value(data: Any, out: Value | None = None) -> Value:
    """Fill ``out`` (or a new Value) from plain Python JSON; anything else is a ``TypeError``."""
    target = Value() if out is None else out
    if data is None:
        target.null_value = 0  # type: ignore[assignment]
    elif isinstance(data, bool):
        target.bool_value = data
    elif isinstance(data, str):
        target.string_value = data
    elif isinstance(data, int | float):
        target.number_value = data
    elif isinstance(data, Mapping):
        target.struct_value.SetInParent()  # an empty object is still an object, not an unset value
        python_to_struct(data, target.struct_value)
    elif isinstance(data, list | tuple):
        target.list_value.SetInParent()
        python_to_list(data, target.list_value)
    else:
        raise TypeError(f"not JSON: {type(data).__name__}")
    return target


def python_to_struct(data: Mapping[str, Any], out: Struct | None = None) -> Struct:
    target = Struct() if out is None else out
    fields = target.fields
    for key, item in data.items():
        python_to_value(item, fields[key])
    return target


def python_to_list(data: list[Any] | tuple[Any, ...], out: ListValue | None = None) -> ListValue:
    target = ListValue() if out is None else out
    for item in data:
        python_to_value(item, target.values.add())
    return target


# --- enums ------------------------------------------------------------------------------------------------


@cache
def _enum_tables(descriptor: EnumDescriptor) -> tuple[dict[int, str], dict[str, int]]:
    prefix = descriptor.values[0].name.removesuffix("UNSPECIFIED")
    names = {v.number: v.name.removeprefix(prefix).lower() for v in descriptor.values if v.number != 0}
    return names, {name: number for number, name in names.items()}


def enum_name(descriptor: EnumDescriptor, number: int) -> str | None:
    """``"api_key"`` for ``AUTH_TYPE_API_KEY``; ``None`` for the unspecified zero or a number this build lacks."""
    return _enum_tables(descriptor)[0].get(number)


def enum_value(descriptor: EnumDescriptor, name: str | None) -> int:
    """The number of ``"api_key"`` in ``AuthType``; 0 (unspecified) for ``None``; ``KeyError`` for an unknown name."""
    return 0 if name is None else _enum_tables(descriptor)[1][name]


# --- time -------------------------------------------------------------------------------------------------


def now_ms() -> int:
    """Now, in milliseconds since the epoch: how the stores keep times."""
    return time.time_ns() // 1_000_000


def timestamp(ms: int) -> Timestamp:
    """The Timestamp of a stored time (milliseconds since the epoch)."""
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def rfc3339(ts: Timestamp) -> str:
    """RFC 3339 in UTC with milliseconds, the one form every time takes in JSON."""
    moment = datetime.fromtimestamp(ts.seconds, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ts.nanos // 1_000_000:03d}Z"
