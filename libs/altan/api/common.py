"""What every resource module shares: the model base, validation with 400s, field types and the error shape."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from altan.api.convert import MAX_SAFE_INTEGER
from altan.errors import InvalidArgument
from altan.wire import count_json_values

__all__ = [
    "ABSENT",
    "MAX_STRUCT_BYTES",
    "MAX_STRUCT_DEPTH",
    "ApiModel",
    "ErrorBody",
    "ErrorDetail",
    "HttpUrl",
    "JsonObject",
    "Name",
    "Timestamp",
    "check_struct_bytes",
    "describe_error",
    "exact_numbers",
    "first_error",
    "validate",
]

M = TypeVar("M", bound=BaseModel)

# How many bytes of Structs one request may carry: turning a Struct into Python costs about 3 µs per value, so a
# message is measured (in C, at once) before anything converts it.
MAX_STRUCT_BYTES = 64 * 1024

# How deep a document carried as a Struct may nest (schemas, LLM parameters, parameter enum/default/items).
MAX_STRUCT_DEPTH = 20

# The default of a field that may be left out but not given as null (``name: str = Field(default=ABSENT)``): the
# schema says "string", and mypy reads the default as Any. ``model_fields_set`` tells whether it was given.
ABSENT: Any = None
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.+)$", re.DOTALL)
T = TypeVar("T")


class ApiModel(BaseModel):
    """A tenant's JSON, checked exactly: unknown fields and wrong types are refused, nothing is coerced.

    A model that sets ``max_values`` refuses a document of more JSON values (objects, arrays and scalars) before
    anything else looks at it: validating and converting a document costs time in its size, and the body limit
    alone would let one request hold the gateway for a quarter of a second.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    max_values: ClassVar[int | None] = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if cls.max_values is not None and count_json_values(data, cls.max_values) is None:
            raise ValueError(f"more than {cls.max_values} JSON values in all")
        return data


def check_struct_bytes(size: int, what: str) -> None:
    """Refuse a message whose Structs together exceed :data:`MAX_STRUCT_BYTES`, before they are converted."""
    if size > MAX_STRUCT_BYTES:
        raise InvalidArgument(f"{what}: its JSON objects take more than {MAX_STRUCT_BYTES} bytes")


def first_error(exc: ValidationError, what: str) -> str:
    """``field.path: what is wrong`` for the first problem; never the submitted value (it may be a secret)."""
    return describe_error(exc.errors(include_url=False, include_input=False)[0], what)


def describe_error(error: Mapping[str, Any], what: str, skip: tuple[str, ...] = ()) -> str:
    """One pydantic error as ``field.path: what is wrong``; ``skip`` drops location parts (FastAPI's "body").

    A model's own checks raise ``ValueError("field: what is wrong")``; that field joins the path.
    """
    parts = [part for part in error.get("loc", ()) if part not in skip]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")
    template = _MESSAGES.get(error.get("type", ""))
    message = template.format(**error.get("ctx", {})) if template else str(error.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    named = _FIELD_PREFIX.match(message)
    if named:
        where = f"{where}.{named[1]}" if where else named[1]
        message = named[2]
    return f"{where or what}: {message}"


# Plainer words than pydantic's for the commonest problems.
_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown field",
    "string_pattern_mismatch": "must match {pattern}",
}


def validate(model: type[M], data: Any, what: str, *, output_only: tuple[str, ...] = ()) -> M:
    """Validate a tenant's JSON with ``model``; the first problem is a 400 naming the field.

    ``output_only`` names fields of the resource that only the platform sets: given, they are refused as such.
    """
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what}: must be a JSON object")
    for name in output_only:
        if name in data:
            raise InvalidArgument(f"{name}: output only; the platform sets it")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(first_error(exc, what)) from None


def exact_numbers(value: T) -> T:
    """Refuse what a ``google.protobuf.Struct`` cannot carry unchanged: integers beyond ±2^53 (its numbers are
    doubles), and nesting deeper than :data:`MAX_STRUCT_DEPTH` (each level costs protobuf about three message
    levels, and it refuses more than 100); and what it carries but JSON cannot: NaN and the infinities."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_STRUCT_DEPTH:
                raise ValueError(f"nested deeper than {MAX_STRUCT_DEPTH} levels")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_SAFE_INTEGER:
            raise ValueError(f"integers must be within ±2^53 (got one of {len(str(abs(item)))} digits)")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite (JSON has no NaN or Infinity)")  # a Struct can carry them
    return value


# A free-form JSON object carried as a Struct (schemas, LLM parameters).
JsonObject = Annotated[dict[str, JsonValue], AfterValidator(exact_numbers)]
# A name a tenant gives a resource: letters, digits, '_', '.', '-'.
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]
# An absolute http(s) URL without spaces or control characters (no \s: its meaning differs between regex engines).
HttpUrl = Annotated[str, Field(pattern=r"^https?://[^\x00-\x20\x7f]+$", max_length=2048)]
# RFC 3339 UTC with milliseconds, as every time in the API.
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="The gRPC status name, for example INVALID_ARGUMENT or NOT_FOUND.")
    message: str = Field(description="Why, safe to show: it never holds a secret.")


class ErrorBody(BaseModel):
    """The one shape of every error."""

    error: ErrorDetail
