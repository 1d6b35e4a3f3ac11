"""The LangGraph side of ``bench/agent_loop.py``: the same agent task with LangGraph's prebuilt ReAct agent, in-process.

Runs under its own virtualenv (``bench/langgraph-requirements.txt``), as a subprocess of the benchmark, so that both
sides are measured in one run against the same mock LLM and the same fake API::

    .venv-langgraph/bin/python bench/langgraph_agent.py --llm http://127.0.0.1:PORT/v1 --api http://127.0.0.1:PORT \\
        --phase 1:200:5 --phase 64:2000:10

The agent is ``create_react_agent`` over ``ChatOpenAI`` (streaming, as the stack's turns are) with two tools, each an
async HTTP GET with httpx to the fake API, which answers after its delay: the work a custom HTTP tool of the stack
does. Each ``--phase IN_FLIGHT:MAX_TASKS:MAX_SECONDS`` runs a closed loop (one task after another in each of
IN_FLIGHT slots) after a warm-up, and reports every task's latency and this process's CPU time over the phase.
Prints one JSON document on stdout. Imports nothing from the project: only LangGraph's own stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import httpx
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent

QUESTION = "Look the customer up in the CRM and in the order system, then answer."
EXPECTED_ANSWER = "Done: both lookups answered."  # bench/mock_llm.py's text answer


def build_agent(llm_base_url: str, api_url: str, api: httpx.AsyncClient) -> Any:
    """The ReAct agent: the mock LLM as an OpenAI model, and two tools reading the fake API."""

    @tool
    async def crm_lookup(customer: str) -> str:
        """Reads a customer record from the CRM."""
        response = await api.get(f"{api_url}/v1/{customer}.json")
        response.raise_for_status()
        return response.text

    @tool
    async def order_lookup(customer: str) -> str:
        """Reads a customer's orders from the order system."""
        response = await api.get(f"{api_url}/v1/{customer}.json")
        response.raise_for_status()
        return response.text

    model = ChatOpenAI(
        model="mock", base_url=llm_base_url, api_key="x", streaming=True, stream_usage=True, max_retries=0, timeout=30
    )
    return create_react_agent(model, [crm_lookup, order_lookup], prompt="Answer customers.")


async def one_task(agent: Any) -> None:
    """One task to its answer; raises unless it went LLM → both tools → LLM → the expected text."""
    state = await agent.ainvoke({"messages": [("user", QUESTION)]})
    messages = state["messages"]
    tools = [m for m in messages if isinstance(m, ToolMessage)]
    last = messages[-1]
    if len(tools) != 2 or not isinstance(last, AIMessage) or last.content != EXPECTED_ANSWER:
        raise RuntimeError(f"unexpected run: {[type(m).__name__ for m in messages]}, last {last.content!r}")


async def closed_loop(agent: Any, in_flight: int, max_tasks: int, max_seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    started = 0
    deadline = time.monotonic() + max_seconds

    async def slot() -> None:
        nonlocal started
        while started < max_tasks and time.monotonic() < deadline:
            started += 1
            t0 = time.perf_counter()
            await one_task(agent)
            latencies.append(time.perf_counter() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(in_flight)))
    return {
        "in_flight": in_flight,
        "latencies": latencies,
        "elapsed": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as api:
        agent = build_agent(args.llm, args.api, api)
        phases = []
        for spec in args.phase:
            in_flight, max_tasks, max_seconds = (float(v) for v in spec.split(":"))
            await closed_loop(agent, int(in_flight), max(int(in_flight), args.warmup), 10)
            phases.append(await closed_loop(agent, int(in_flight), int(max_tasks), max_seconds))
        return {"phases": phases}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", required=True, help="the mock LLM's base URL, ending in /v1")
    parser.add_argument("--api", required=True, help="the fake API's base URL")
    parser.add_argument("--phase", action="append", required=True, help="IN_FLIGHT:MAX_TASKS:MAX_SECONDS")
    parser.add_argument("--warmup", type=int, default=30, help="tasks run before each phase (default 30)")
    json.dump(asyncio.run(main(parser.parse_args())), sys.stdout)
