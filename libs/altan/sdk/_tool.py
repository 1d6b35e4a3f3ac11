"""``@tool``: a plain function becomes a tool, its signature the JSON Schema of its arguments.

The schema and the validation of arguments both come from one pydantic model built from the signature
(``create_model``), so a call is checked by exactly the rules the schema announces. Errors become the domain errors
of :mod:`altan.errors`, which the container's server turns into gRPC status codes like every service's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, ParamSpec, TypeVar, cast, get_type_hints, overload

import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from altan.api.common import first_error
from altan.api.convert import python_to_struct
from altan.errors import AltanError, DeadlineExceeded, FailedPrecondition, InvalidArgument
from altan.v1 import tool_pb2

__all__ = ["Tool", "ToolContext", "ToolCredential", "ToolError", "tool"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# The Tool Service's rule for every tool id (altan.api.tools.TOOL_ID_PATTERN): refused here, at import, rather than
# at discovery.
_TOOL_ID = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
# A credential's name, as the tenant names it (altan.api.common.Name).
_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
REDACTED = "[redacted]"


@dataclass(frozen=True)
class ToolCredential:
    """The tenant's secret for this one call, injected by the platform because the tool declared it
    (``@tool(credential=...)``) and the tenant's admin granted it to the tool. Never log it or return it: an
    echoed value is redacted from the output, but a copy kept elsewhere is beyond reach."""

    name: str
    value: str = field(repr=False)
    header: str = "Authorization"
    prefix: str = "Bearer "

    @property
    def headers(self) -> Mapping[str, str]:
        """The header that carries it, as its admin described it (``Authorization: Bearer <value>`` by default)."""
        return {self.header: f"{self.prefix}{self.value}"}


@dataclass(frozen=True)
class ToolContext:
    """Who called the tool, as proven by the bearer token the container verified, and the credential the tool
    declared (``None`` for a tool that declares none).

    ``idempotency_key``: when the call is a step of a task, ``<task_id>:<step_id>``, the same for every attempt of
    that step (a task resumed after a crash calls its step in flight again, with this key); empty otherwise. Pass it
    on to a third party that honours one (an ``Idempotency-Key`` header), or deduplicate with it.

    A tool receives it by declaring a parameter annotated ``ToolContext`` (any name); that parameter is not part of
    the tool's arguments or schema.
    """

    tenant_id: str
    user: str
    role: Literal["admin", "member"]
    credential: ToolCredential | None = None
    idempotency_key: str = ""


class ToolError(Exception):
    """Raise it to fail a call with a message meant for the caller (the model reads it, a plan step fails with it).

    Any other exception fails the call too, but its message stays in the container's log: it may hold what the
    caller should not see (a URL with a key, a path). ``ValueError`` and ``TypeError`` say that the arguments were
    wrong, and their message is shown as an invalid argument.
    """


class Tool(Generic[P, R]):
    """A function served as a tool. Calling it calls the function, so it stays testable as it was written."""

    def __init__(
        self,
        function: Callable[P, R],
        *,
        tool_id: str | None = None,
        description: str | None = None,
        credential: str | None = None,
    ) -> None:
        if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
            raise TypeError(f"@tool {function.__name__}: a generator cannot be a tool; return the whole value")
        self.function = function
        self.tool_id = tool_id or function.__name__
        if not _TOOL_ID.match(self.tool_id):
            raise ValueError(
                f"@tool {function.__name__}: the tool id {self.tool_id!r} must match {_TOOL_ID.pattern} "
                "(name the function in snake_case, or give @tool(tool_id=...))"
            )
        if credential is not None and not _CREDENTIAL_NAME.match(credential):
            raise ValueError(
                f"@tool {function.__name__}: credential {credential!r} must match {_CREDENTIAL_NAME.pattern}"
            )
        self.credential = credential or ""
        self.description = description if description is not None else inspect.getdoc(function) or ""
        self._is_async = inspect.iscoroutinefunction(function)
        self._context_parameter, self.arguments = _arguments_model(function, self.tool_id)
        if self.credential and not self._context_parameter:
            raise TypeError(
                f"@tool {function.__name__}: a tool that declares a credential reads it from a parameter annotated "
                "ToolContext (ctx.credential)"
            )
        self.input_schema = _schema(self.arguments)
        self.__doc__ = function.__doc__
        self.__name__ = function.__name__
        self.__wrapped__ = function

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<tool {self.tool_id}>"

    def definition(self) -> tool_pb2.Tool:
        """What the container's ListTools answers for this tool."""
        return tool_pb2.Tool(
            tool_id=self.tool_id,
            type=tool_pb2.TOOL_TYPE_CONTAINER,
            name=self.tool_id,
            description=self.description,
            input_schema=python_to_struct(self.input_schema),
            credential=self.credential,
        )

    async def invoke(self, arguments_json: bytes, caller: ToolContext, timeout: float | None = None) -> bytes:
        """Validate the arguments, run the function (a sync one in a worker thread), answer its value as JSON.

        Raises :class:`~altan.errors.InvalidArgument` for arguments the schema refuses or a ``ValueError`` /
        ``TypeError`` of the function, :class:`~altan.errors.DeadlineExceeded` past ``timeout`` seconds, and
        :class:`~altan.errors.FailedPrecondition` for any other failure (the message of a :class:`ToolError` only).
        """
        try:
            arguments = self.arguments.model_validate_json(arguments_json or b"{}")
        except ValidationError as exc:
            raise InvalidArgument(first_error(exc, "arguments")) from None
        kwargs: dict[str, Any] = dict(arguments)  # shallow: a parameter typed with a model receives the model
        if self.credential and (caller.credential is None or caller.credential.name != self.credential):
            raise FailedPrecondition(
                f"tool '{self.tool_id}' needs credential '{self.credential}': the tenant's admin grants it with "
                f'"tools": ["{self.tool_id}"] on that credential'
            )
        if not self.credential:
            caller = replace(caller, credential=None)  # nothing it did not ask for
        if self._context_parameter:
            kwargs[self._context_parameter] = caller
        secret = caller.credential.value if caller.credential is not None else ""
        result = await self._run(kwargs, timeout, secret)
        try:
            return pydantic_core.to_json(result)
        except pydantic_core.PydanticSerializationError:
            log.warning("a tool returned a value that is not JSON", extra={"tool_id": self.tool_id})
            raise FailedPrecondition(
                f"tool '{self.tool_id}' returned a {type(result).__name__}, which is not JSON-serialisable"
            ) from None

    async def _run(self, kwargs: dict[str, Any], timeout: float | None, secret: str = "") -> Any:
        call: Awaitable[Any]
        if self._is_async:
            call = cast("Awaitable[Any]", self.function(**kwargs))  # type: ignore[call-arg]
        else:
            # A worker thread keeps the event loop (other calls, health checks) free; it copies the context.
            call = asyncio.to_thread(self.function, **kwargs)  # type: ignore[call-arg]
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                return await call
        except TimeoutError:
            if not deadline.expired():
                raise self._failure(TimeoutError()) from None  # the function's own timeout, not ours
            # A sync function's thread cannot be stopped: it runs on, but nobody waits for it.
            raise DeadlineExceeded(f"tool '{self.tool_id}' did not finish within {timeout:g}s") from None
        except Exception as exc:
            raise self._failure(exc, secret) from None

    def _failure(self, exc: Exception, secret: str = "") -> AltanError:
        def said(text: str) -> str:  # a message that quotes the injected secret does not carry it further
            return text.replace(secret, REDACTED) if secret else text

        if isinstance(exc, AltanError):
            return exc
        if isinstance(exc, ToolError):
            return FailedPrecondition(said(f"tool '{self.tool_id}': {exc}"))
        if isinstance(exc, ValidationError):  # the function validated something itself: no input in the message
            return InvalidArgument(f"tool '{self.tool_id}': {first_error(exc, 'value')}")
        if isinstance(exc, ValueError | TypeError):
            return InvalidArgument(said(f"tool '{self.tool_id}': {exc}"))
        trace = said("".join(traceback.format_exception(exc)))
        log.error("a tool failed: %s", trace, extra={"tool_id": self.tool_id})
        return FailedPrecondition(
            f"tool '{self.tool_id}' failed ({type(exc).__name__}); the tool container's log has the details"
        )


def _arguments_model(function: Callable[..., Any], tool_id: str) -> tuple[str, type[BaseModel]]:
    """The parameter that receives the :class:`ToolContext` (or ""), and the model of the others."""
    hints = _hints(function)
    context_parameter = ""
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
            raise TypeError(f"@tool {function.__name__}: parameter {name!r} must be a named parameter")
        annotation = hints.get(name, Any)
        if annotation is ToolContext:
            context_parameter = name
            continue
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (annotation, default)
    # Unknown arguments are refused (additionalProperties: false), as a custom tool's parameters are.
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)
    return context_parameter, create_model(f"{tool_id}_arguments", __config__=config, **fields)


def _hints(function: Callable[..., Any]) -> dict[str, Any]:
    try:
        return get_type_hints(function, include_extras=True)
    except NameError as exc:  # an annotation names something the module does not define
        raise TypeError(f"@tool {function.__name__}: cannot resolve a type hint ({exc})") from None


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)  # the model's generated name, not the tool's
    schema.setdefault("properties", {})
    return schema


@overload
def tool(function: Callable[P, R], /) -> Tool[P, R]: ...


@overload
def tool(
    *, tool_id: str | None = None, description: str | None = None, credential: str | None = None
) -> Callable[[Callable[P, R]], Tool[P, R]]: ...


def tool(
    function: Callable[P, R] | None = None,
    /,
    *,
    tool_id: str | None = None,
    description: str | None = None,
    credential: str | None = None,
) -> Tool[P, R] | Callable[[Callable[P, R]], Tool[P, R]]:
    """Make a tool of a sync or async function: ``@tool`` or ``@tool(tool_id=..., description=..., credential=...)``.

    The function's name is the ``tool_id``, its docstring the description, its type hints (pydantic models,
    ``Literal``, ``Optional``, ``Annotated[..., Field(description=...)]``, defaults) the JSON Schema of its
    arguments, and its return value (JSON-serialisable; pydantic models are dumped) the output.

    ``credential`` names the tenant's credential the tool needs (``"slack"``): each call receives it in
    ``ctx.credential`` once the tenant's admin has granted it to the tool, and fails clearly until then.
    """
    if function is not None:
        return Tool(function, tool_id=tool_id, description=description, credential=credential)

    def decorate(fn: Callable[P, R]) -> Tool[P, R]:
        return Tool(fn, tool_id=tool_id, description=description, credential=credential)

    return decorate
