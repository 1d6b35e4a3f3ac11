"""``python -m services.agent``: the Agent Service."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from altan import context, metrics
from altan.api.convert import now_ms, struct_to_dict
from altan.auth import issue_delegation
from altan.bootstrap import run_service
from altan.clients import IntegratorClient
from altan.config import ConfigurationError, Settings
from altan.delegation import agent_signing_key
from altan.errors import DeadlineExceeded, Unavailable
from altan.server import GrpcService
from altan.store import TenantStore, open_state
from altan.tls import tls_files
from altan.v1 import agent_pb2_grpc, runtime_pb2
from altan.wire import json_bytes
from services.agent.agents import AgentCatalog
from services.agent.conversation import LoopLimits
from services.agent.plan import Step
from services.agent.servicer import AgentServicer
from services.agent.tasks import Delegate, LlmBackend, TaskLimits, TaskRunner, ToolAnswer
from services.agent.work_queue import ImmediateQueue, WorkQueue, open_work_queue, report_depth

log = logging.getLogger("services.agent")

# How long a task step waits for the integrator to come back (a restart takes seconds; supervision backs off to 30 s).
_HOP_RETRY_SECONDS = 120.0
# A delegation outlives its task's deadline by this much, so that the run that notices the deadline can record it.
_DELEGATION_MARGIN_SECONDS = 60


def _platform_unavailable(exc: BaseException) -> bool:
    """A hop between services that failed (a service down, restarting or dying during the call). What a service
    raised itself (a third party, Secret Manager or the state store out of reach) fails the step as before: the
    integrator has retried it already."""
    return isinstance(exc, Unavailable) and exc.hop_failed


def _hop_failed(exc: BaseException) -> bool:
    """A model turn's hop that failed: the integrator unreachable or gone during the turn, or the hop's own deadline
    passed. The provider's errors (5xx, 429, its timeouts) were handled by the integrator (retries, fallbacks) and
    come back raised by it: they end the turn as before."""
    return isinstance(exc, Unavailable | DeadlineExceeded) and exc.hop_failed


def _hop_retrying(retry_on: Callable[[BaseException], bool]) -> AsyncRetrying:
    """Try a call to the integrator again while the hop fails, with backoff, for up to _HOP_RETRY_SECONDS (the
    task's deadline cancels the run sooner, when it comes first)."""
    return AsyncRetrying(
        retry=retry_if_exception(retry_on),
        wait=wait_exponential_jitter(initial=0.2, max=2.0),
        stop=stop_after_delay(_HOP_RETRY_SECONDS),
        reraise=True,
    )


def delegation(settings: Settings) -> Delegate | None:
    """Who a queued task runs as: its submitter, by a delegation signed with the agent's private key, narrowed
    to that task and to the member role (running a task needs no more), valid until the task's deadline."""
    key = agent_signing_key(settings)
    if key is None:
        return None

    def delegate(task: dict[str, Any], tenant: str) -> context.RequestContext:
        sub = str(task.get("owner", {}).get("sub", ""))
        ttl = (task.get("deadline_at", 0) - now_ms()) / 1000 + _DELEGATION_MARGIN_SECONDS
        token = issue_delegation(key, tenant=tenant, sub=sub, role="member", task_id=task["task_id"], ttl=ttl)
        return context.RequestContext(
            tenant_id=tenant, user=sub, role="member", token=token, task_id=task["task_id"], delegated=True
        )

    return delegate


async def wire(settings: Settings, stack: AsyncExitStack) -> list[GrpcService]:
    backend = open_state(settings)
    stack.push_async_callback(backend.aclose)
    integrator = IntegratorClient(settings.integrator_addr, settings.call_deadline_seconds, tls_files(settings))
    stack.push_async_callback(integrator.aclose)

    async def missing_tools(tool_ids: list[str]) -> list[str]:
        request = runtime_pb2.DescribeToolsRequest(tool_ids=tool_ids)
        return list((await integrator.call(integrator.runtime.DescribeTools, request)).missing)

    async def invoke(
        agent: dict[str, Any], step: Step, arguments: dict[str, Any], task_id: str, approved: bool
    ) -> ToolAnswer:
        request = runtime_pb2.RunToolRequest(
            tool_id=step.tool,
            arguments_json=json_bytes(arguments),
            agent_id=agent["id"],
            bound_tool_ids=agent.get("tools", []),
            task_id=task_id,
            step_id=step.id,
            approved=approved,
        )
        # The integrator retries within its own deadline; allow it that long plus the hop. When the platform itself
        # was unavailable (see _platform_unavailable) the step is tried again: its Idempotency-Key makes the third
        # party perform it once whatever the first attempt got to do.
        async for attempt in _hop_retrying(_platform_unavailable):
            with attempt:
                answer = await integrator.call(
                    integrator.runtime.RunTool, request, timeout=settings.call_deadline_seconds + 5
                )
        # Written by the Tool Service after it checked what the third party sent (altan.wire.parse_json).
        if answer.approval_required:
            return ToolAnswer(None, 0, 0, approval_required=True)
        output = json.loads(answer.output_json) if answer.output_json else None
        return ToolAnswer(output, answer.http_status, len(answer.output_json))

    async def model_turn(
        request: runtime_pb2.CompleteRequest, on_delta: Callable[[str], Awaitable[None]]
    ) -> runtime_pb2.ModelAnswer:
        # A turn whose hop failed (the integrator restarting, or dying mid-turn) is asked again, as a tool step's call
        # is: the task goes on instead of failing. The provider is asked again only by an attempt that reached the
        # integrator; what was streamed before the failure may be streamed again (message.delta events).
        async for attempt in _hop_retrying(_hop_failed):
            with attempt:
                timeout = settings.llm_deadline_seconds + 10
                stream = integrator.stream(integrator.runtime.Complete, request, timeout=timeout)
                async for item in stream:
                    if item.WhichOneof("kind") == "delta":
                        await on_delta(item.delta)
                    else:
                        return item.answer
                raise Unavailable("the integrator ended a model turn without its answer")
        raise AssertionError("unreachable: the retrying above returns or raises")

    async def describe(tool_ids: list[str]) -> list[runtime_pb2.ModelTool]:
        """The bound tools as the model sees them: name, description, JSON Schema."""
        if not tool_ids:
            return []
        answer = await integrator.call(
            integrator.runtime.DescribeTools, runtime_pb2.DescribeToolsRequest(tool_ids=tool_ids)
        )
        return [
            runtime_pb2.ModelTool(
                name=tool.tool_id,
                description=tool.description or tool.name,
                input_schema_json=json_bytes(struct_to_dict(tool.input_schema)),
            )
            for tool in answer.tools
        ]

    async def audit_decision(task_id: str, call_id: str, tool_id: str, approved: bool, comment: str) -> None:
        request = runtime_pb2.RecordApprovalRequest(
            task_id=task_id, call_id=call_id, tool_id=tool_id, approved=approved, comment=comment
        )
        await integrator.call(integrator.runtime.RecordApproval, request)

    llm = LlmBackend(
        model=model_turn,
        describe=describe,
        loop=LoopLimits(
            max_turns=settings.max_llm_turns,
            max_tool_result_chars=settings.max_tool_result_chars,
            max_tool_call_errors=settings.max_tool_call_errors,
        ),
        context_budget_tokens=settings.context_budget_tokens,
        tool_concurrency=settings.tool_concurrency,
    )
    store = TenantStore(backend, "agent")
    agents = AgentCatalog(store, missing_tools)
    limits = TaskLimits(
        expansion_bytes=settings.max_expansion_bytes,
        task_bytes=settings.max_task_bytes,
        deadline_seconds=settings.task_deadline_seconds,
    )
    queue: WorkQueue = ImmediateQueue()
    delegate = delegation(settings)
    if settings.work_queue == "cloud-tasks":
        # Pushed by Cloud Tasks to the push port (services/agent/cloud_tasks.py); settings checked at start.
        from services.agent.cloud_tasks import CloudTasksWorkQueue

        if delegate is None:
            raise ConfigurationError(
                "ALTAN_WORK_QUEUE=cloud-tasks needs ALTAN_DELEGATION_SIGNING_KEY_FILE (a pushed task runs as a "
                "delegation)"
            )

        cloud_tasks = CloudTasksWorkQueue.from_settings(settings)
        cloud_tasks.open()
        queue = cloud_tasks
    elif delegate is not None:
        queue = open_work_queue(
            backend,
            settings.redis_url,
            key=settings.task_queue,
            concurrency=settings.task_concurrency,
            lease_seconds=settings.task_lease_seconds,
            redis_max_connections=settings.redis_max_connections,
        )
    else:
        # No replica but the accepting one may act for a task's submitter: tasks run there, and are not durable.
        log.warning(
            "ALTAN_DELEGATION_SIGNING_KEY_FILE is not set: tasks run in the replica that accepted them, and die with it"
        )
    tasks = TaskRunner(
        store,
        agents,
        missing_tools,
        invoke,
        limits,
        llm,
        queue=queue,
        delegate=delegate,
        audit_decision=audit_decision,
    )
    tasks.start()  # resumes what a process that died left in the queue
    stack.push_async_callback(tasks.aclose)  # before the store and channel close (the stack unwinds in reverse)
    # altan_task_queue_depth, sampled in the background (the alert AltanTaskQueueBacklog reads it).
    sampling = asyncio.create_task(report_depth(queue, metrics.set_task_queue_depth), name="task-queue-depth")

    async def stop_sampling() -> None:
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)

    stack.push_async_callback(stop_sampling)  # before the queue closes
    servicer = AgentServicer(agents, tasks)
    return [
        GrpcService(
            agent_pb2_grpc.add_AgentServiceServicer_to_server, servicer, "altan.v1.AgentService", ready=backend.ping
        )
    ]


if __name__ == "__main__":
    run_service("agent", lambda s: s.agent_port, wire)
