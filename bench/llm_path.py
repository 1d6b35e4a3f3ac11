"""The integrator's LLM path next to a direct call and a LiteLLM proxy: ``python bench/llm_path.py [--quick]``.

Three ways to one mock LLM (``bench/mock_llm.py``, its own process), with the same conversation (instructions, one
user message, two tools offered, so that the mock answers with two parallel tool calls):

``direct``: the benchmark process POSTs the Chat Completions body to the mock with httpx: what a call costs at least.
``integrator``: the benchmark process calls the integrator's internal ``Complete`` RPC exactly as the agent service
does (``IntegratorClient.stream``, one channel, the tenant's token forwarded); the integrator resolves the install's
key, checks the endpoint against the egress rules, sends the same body through its guarded client, parses the answer
and writes the ``llm.call`` audit event.
``litellm``: the benchmark process POSTs the same body to a LiteLLM proxy (``.venv-litellm``, see
``bench/litellm-requirements.txt``; ``make bench-llm`` installs it) configured with one model at the mock, a master
key and no database.

Each path is measured at 1, 32 and 128 in flight, streamed (as the agent loop asks) and whole, interleaved so that
all three see the same machine. CPU per request is read from ``/proc`` for the proxy's own process: the integrator
for the integrator path, LiteLLM's for the LiteLLM path. Prints markdown tables and writes them into
docs/benchmarks.md between this benchmark's markers; about 2 minutes, ``--quick`` a quarter of that (never writes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/llm_path.py` from anywhere

from altan import context
from altan.api.agents import llm_to_proto
from altan.api.tasks import message_to_proto
from altan.clients import IntegratorClient
from altan.v1 import runtime_pb2
from altan.wire import json_bytes
from bench.harness import (
    REPO,
    CpuMeter,
    Phase,
    Processes,
    closed_loop,
    cpu_model,
    cpu_ticks,
    free_port,
    start_processes,
)
from bench.hotspots import find_py_spy, start_sampler, summarize
from services.integrator.llm.base import Message, ModelRequest, ToolSpec
from services.integrator.llm.openai import request_body

DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- bench:llm-path:start -->", "<!-- bench:llm-path:end -->"
LITELLM = REPO / ".venv-litellm" / "bin" / "litellm"

MODEL = "mock-model"  # the model id the integrator sends, and the name LiteLLM serves the mock under
INSTALL_KEY = "sk-bench-install-key"  # the install's OpenAI key: the integrator and LiteLLM both send it to the mock
MASTER_KEY = "sk-bench-litellm-master"  # LiteLLM's own key, as a deployment without a database would set one
TENANT = "bench-llm"
TASK_ID = "task_bench"

SYSTEM = "You answer customers' questions about their orders. Use the tools; answer in one sentence."
USER = "Where is order 1042, placed by ada@example.com, and which support tier is she on?"
TOOLS = (
    ToolSpec(
        "lookup_order",
        "Reads an order: status, carrier, tracking number",
        {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
    ),
    ToolSpec(
        "lookup_customer",
        "Reads a customer record by e-mail address",
        {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]},
    ),
)

PATHS = {
    "direct": "direct: httpx → mock",
    "integrator": "integrator: gRPC `Complete` → mock",
    "litellm": "LiteLLM proxy: httpx → LiteLLM → mock",
}
MODES = ("stream", "whole")
TARGET = 0.1  # the integrator's CPU per request and added latency, as a share of LiteLLM's (issue 7)

Operation = Callable[[], Awaitable[None]]
Phases = dict[tuple[str, int, str], Phase]


@dataclass(frozen=True)
class Bounds:
    """One level of load: ``in_flight`` at once, a warm-up of ``warmup`` calls per slot, then at most ``ops`` calls
    or ``seconds``."""

    in_flight: int
    warmup: int
    ops: int
    seconds: float


LEVELS = (Bounds(1, 30, 800, 3.0), Bounds(32, 3, 6000, 4.0), Bounds(128, 2, 10000, 5.0))


class UnexpectedAnswer(RuntimeError):
    """A call did not answer what it should: the numbers would mean nothing."""


def chat_body(stream: bool) -> bytes:
    """The Chat Completions body, built by the integrator's own OpenAI provider: the same bytes on every path."""
    request = ModelRequest(
        model=MODEL,
        endpoint="",
        api_key=None,
        system=SYSTEM,
        messages=(Message("user", USER),),
        tools=TOOLS,
        stream=stream,
    )
    return json.dumps(request_body(request)).encode()


def complete_request(llm: dict[str, Any], stream: bool) -> runtime_pb2.CompleteRequest:
    """The ``Complete`` request the agent service would send for this conversation's first turn."""
    return runtime_pb2.CompleteRequest(
        llm=llm_to_proto(llm),
        system=SYSTEM,
        messages=[message_to_proto({"role": "user", "content": USER, "task_id": TASK_ID})],
        tools=[
            runtime_pb2.ModelTool(name=t.name, description=t.description, input_schema_json=json_bytes(t.input_schema))
            for t in TOOLS
        ],
        stream=stream,
        task_id=TASK_ID,
    )


def _tool_names(body: bytes, stream: bool) -> list[str]:
    """The names of the tool calls in a Chat Completions answer, whole or as Server-Sent Events."""
    if not stream:
        message = json.loads(body)["choices"][0]["message"]
        return [call["function"]["name"] for call in message.get("tool_calls") or ()]
    names = []
    for line in body.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices") or ():
                for call in (choice.get("delta") or {}).get("tool_calls") or ():
                    if (call.get("function") or {}).get("name"):
                        names.append(call["function"]["name"])
    return names


def _expect_two_calls(path: str, names: list[str]) -> None:
    if sorted(names) != sorted(t.name for t in TOOLS):
        raise UnexpectedAnswer(f"{path}: expected one call of each tool, got {names}")


class HttpSlot:
    """One in-flight slot of an HTTP path: its own client, so its own keep-alive connection."""

    def __init__(self, url: str, key: str) -> None:
        self._url = url
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._client = httpx.AsyncClient(timeout=60, trust_env=False)

    async def post(self, body: bytes) -> bytes:
        """The whole answer's body (a stream is read to its end)."""
        async with self._client.stream("POST", self._url, content=body, headers=self._headers) as response:
            answer = await response.aread()
        if response.status_code != 200:
            raise UnexpectedAnswer(f"POST {self._url}: {response.status_code} {answer[:300]!r}")
        return answer

    def operation(self, body: bytes) -> Operation:
        async def run() -> None:
            await self.post(body)

        return run

    async def aclose(self) -> None:
        await self._client.aclose()


class IntegratorPath:
    """The integrator's ``Complete`` as the agent service calls it: one channel for every call in flight."""

    def __init__(self, target: str, llm: dict[str, Any]) -> None:
        self._client = IntegratorClient(target, 60)
        self._llm = llm

    async def turn(self, stream: bool) -> runtime_pb2.ModelAnswer:
        request = complete_request(self._llm, stream)
        async for item in self._client.stream(self._client.runtime.Complete, request, timeout=60):
            if item.WhichOneof("kind") == "answer":
                return item.answer
        raise UnexpectedAnswer("the integrator ended a model turn without its answer")

    def operation(self, stream: bool) -> Operation:
        request = complete_request(self._llm, stream)
        runtime = self._client.runtime

        async def run() -> None:
            async for _ in self._client.stream(runtime.Complete, request, timeout=60):
                pass

        return run

    async def aclose(self) -> None:
        await self._client.aclose()


def start_mock() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    mock = subprocess.Popen([sys.executable, str(REPO / "bench" / "mock_llm.py"), str(port)], stdout=subprocess.DEVNULL)
    return mock, port


def start_litellm(workdir: Path, mock_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """LiteLLM's proxy with one model at the mock; quiet (errors only, as the integrator logs no line per call), no
    database, no cost-map download."""
    port = free_port()
    config = workdir / "litellm.yaml"
    model = {"model": f"openai/{MODEL}", "api_base": f"http://127.0.0.1:{mock_port}/v1", "api_key": INSTALL_KEY}
    settings = {
        "model_list": [{"model_name": MODEL, "litellm_params": model}],
        "litellm_settings": {"set_verbose": False},
        "general_settings": {"master_key": MASTER_KEY},
    }
    config.write_text(json.dumps(settings, indent=2))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "DATABASE_URL", "OPENAI"))}
    env.update(LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True")
    command = [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    with (workdir / "litellm.log").open("wb") as log:
        proxy = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proxy, port


def _wait_ready(url: str, process: subprocess.Popen[bytes], what: str, log: Path | None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2, trust_env=False) as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.get(url).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise RuntimeError(f"{what} did not become ready:\n{tail}")


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (worker processes, were LiteLLM to start any)."""
    found: list[int] = []
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found += [int(child), *_children(int(child))]
    except OSError:
        pass
    return found


@dataclass
class Running:
    """The processes of one run: the stack, the mock LLM and LiteLLM."""

    processes: Processes
    mock: subprocess.Popen[bytes]
    mock_port: int
    litellm: subprocess.Popen[bytes]
    litellm_port: int

    def meter(self) -> CpuMeter:
        extra = {"mock llm": self.mock.pid, "litellm": self.litellm.pid}
        extra |= {f"litellm child {pid}": pid for pid in _children(self.litellm.pid)}
        return CpuMeter(self.processes, extra)


class Clients:
    """The load generator's side of the three paths, for up to ``slots`` calls in flight on each."""

    def __init__(self, running: Running, llm: dict[str, Any], slots: int) -> None:
        mock_url = f"http://127.0.0.1:{running.mock_port}/v1/chat/completions"
        litellm_url = f"http://127.0.0.1:{running.litellm_port}/chat/completions"
        self.direct = [HttpSlot(mock_url, INSTALL_KEY) for _ in range(slots)]
        self.litellm = [HttpSlot(litellm_url, MASTER_KEY) for _ in range(slots)]
        self.integrator = IntegratorPath(f"127.0.0.1:{running.processes.ports['integrator']}", llm)
        self._slots = slots

    @classmethod
    async def open(cls, running: Running, slots: int) -> Clients:
        """Create the tenant's agent and bind the tenant's token, as the agent service holds it during a task."""
        token = running.processes.token(TENANT)
        context.bind(context.RequestContext(tenant_id=TENANT, user="bench", role="admin", token=token))
        mock_url = f"http://127.0.0.1:{running.mock_port}/v1/chat/completions"
        # OpenAI's wire format at the mock and no auth named, so the install's key goes with it (its hosts list
        # 127.0.0.1); the agent service turns this stored form into the request's LlmConfig.
        agent = {"name": "bench-llm", "llm": {"llm_id": MODEL, "provider": "openai", "endpoint": mock_url}}
        async with httpx.AsyncClient(base_url=running.processes.base_url, timeout=30, trust_env=False) as api:
            created = await api.post("/v1/agents", json=agent, headers={"Authorization": f"Bearer {token}"})
        if created.status_code != 201:
            raise UnexpectedAnswer(f"creating the agent: {created.status_code} {created.text[:300]}")
        return cls(running, created.json()["llm"], slots)

    async def check(self, mode: str) -> None:
        """One call of each path: each must answer one call of each tool offered."""
        stream, body = mode == "stream", chat_body(mode == "stream")
        _expect_two_calls("direct", _tool_names(await self.direct[0].post(body), stream))
        _expect_two_calls("litellm", _tool_names(await self.litellm[0].post(body), stream))
        answer = await self.integrator.turn(stream)
        _expect_two_calls("integrator", [call.name for call in answer.message.tool_calls])

    def operations(self, mode: str) -> dict[str, list[Operation]]:
        """Per path, one operation per slot."""
        body = chat_body(mode == "stream")
        return {
            "direct": [slot.operation(body) for slot in self.direct],
            "integrator": [self.integrator.operation(mode == "stream")] * self._slots,  # one channel, as the agent
            "litellm": [slot.operation(body) for slot in self.litellm],
        }

    async def aclose(self) -> None:
        await asyncio.gather(*(slot.aclose() for slot in (*self.direct, *self.litellm)), self.integrator.aclose())


async def measure(running: Running, scale: float) -> Phases:
    """Every (mode, level, path), the paths interleaved within each level."""
    clients = await Clients.open(running, max(level.in_flight for level in LEVELS))
    meter = running.meter()
    phases: Phases = {}
    try:
        for mode in MODES:
            await clients.check(mode)
            operations = clients.operations(mode)
            for level in LEVELS:
                for path, ops in operations.items():
                    print(f"  {mode}, {level.in_flight} in flight: {path}", file=sys.stderr, flush=True)
                    slots = ops[: level.in_flight]
                    await closed_loop(slots, max_ops=level.warmup * level.in_flight, max_seconds=10 * scale)
                    phases[(mode, level.in_flight, path)] = await closed_loop(
                        slots, max_ops=level.ops, max_seconds=level.seconds * scale, meter=meter
                    )
    finally:
        await clients.aclose()
    return phases


async def profile(running: Running, path: str, mode: str, in_flight: int, seconds: float) -> None:
    """Drive one path while py-spy samples its proxy; print where that proxy spends its CPU (raw stacks kept)."""
    py_spy = find_py_spy()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    pid = running.processes.pids["integrator"] if path == "integrator" else running.litellm.pid
    clients = await Clients.open(running, in_flight)
    try:
        await clients.check(mode)
        ops = clients.operations(mode)[path][:in_flight]
        await closed_loop(ops, max_ops=20 * in_flight, max_seconds=10)  # warm up before sampling
        raw = running.processes.workdir / f"{path}-{mode}.txt"
        sampler = start_sampler(py_spy, pid, seconds, 200, raw)
        phase = await closed_loop(ops, max_ops=10**9, max_seconds=seconds + 1, meter=running.meter())
        await asyncio.to_thread(sampler.wait, 30)
    finally:
        await clients.aclose()
    print(f"{path}, {mode}, {in_flight} in flight: {phase.throughput:,.0f} calls/s while sampled, ", end="")
    print(f"{proxy_cpu_ms(phase, path):.2f} ms of CPU per call\n\n{summarize(raw, 12)}\n\nraw collapsed stacks: {raw}")


def proxy_cpu_ms(phase: Phase, path: str) -> float:
    """CPU per call of the proxy in the path, in ms: the integrator process, or LiteLLM's (and any children)."""
    if path == "integrator":
        return phase.cpu_ms_per_op("integrator")
    if path == "litellm":
        return phase.cpu_ms_per_op(*(name for name in phase.cpu if name.startswith("litellm")))
    return 0.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs, or None when LiteLLM added nothing measurable to compare with."""
    return ours / theirs if theirs > 0 else None


def _verdict(ratios: dict[str, float | None]) -> str:
    missed = [f"{name} {value / TARGET:.2f}x" for name, value in ratios.items() if value is not None and value > TARGET]
    return "met" if not missed else "missed by " + ", ".join(missed)


def report(phases: Phases, litellm_version: str, steal: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run of {now} on {os.cpu_count()} vCPU ({cpu_model()}), Linux {platform.release()}, Python "
        f"{platform.python_version()}, LiteLLM {litellm_version}; everything on 127.0.0.1, the load generator "
        f"included, embedded state, log level INFO; CPU stolen by the hypervisor during the run: {steal:.1%}.",
        "",
        f'Ratios, integrator ÷ LiteLLM (target: at most {TARGET:.2f} for each; "missed by 2.00x" means twice '
        "the target):",
        "",
        "| answer | in flight | CPU per call | added p50 | added p99 | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for mode in MODES:
        for level in LEVELS:
            n = level.in_flight
            direct, ours, theirs = (phases[(mode, n, path)] for path in PATHS)
            ratios = {
                "CPU": _ratio(proxy_cpu_ms(ours, "integrator"), proxy_cpu_ms(theirs, "litellm")),
                "p50": _ratio(ours.p(50) - direct.p(50), theirs.p(50) - direct.p(50)),
                "p99": _ratio(ours.p(99) - direct.p(99), theirs.p(99) - direct.p(99)),
            }
            cells = " | ".join("n/a" if r is None else f"{r:.2f}" for r in ratios.values())
            lines.append(f"| {mode} | {n} | {cells} | {_verdict(ratios)} |")
    lines += [
        "",
        "Each path at each level; added = this path's percentile minus the direct call's at the same level; CPU per "
        "call in ms from /proc/<pid>/stat (proxy: the integrator process, or LiteLLM's):",
        "",
        "| answer | in flight | path | calls | calls/s | p50 (ms) | p99 (ms) | added p50 / p99 (ms) "
        "| proxy CPU | mock CPU | load generator CPU | cores busy |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        for level in LEVELS:
            n = level.in_flight
            direct = phases[(mode, n, "direct")]
            for path, label in PATHS.items():
                phase = phases[(mode, n, path)]
                added = "-"
                if path != "direct":
                    added = f"+{_ms(phase.p(50) - direct.p(50))} / +{_ms(phase.p(99) - direct.p(99))}"
                proxy = f"{proxy_cpu_ms(phase, path):.2f}" if path != "direct" else "-"
                busy = sum(phase.cpu.values()) / phase.elapsed
                lines.append(
                    f"| {mode} | {n} | {label} | {phase.count} | {phase.throughput:,.0f} | {_ms(phase.p(50))} "
                    f"| {_ms(phase.p(99))} | {added} | {proxy} | {phase.cpu_ms_per_op('mock llm'):.2f} "
                    f"| {phase.cpu_ms_per_op('load generator'):.2f} | {busy:.2f} |"
                )
    return "\n".join(lines).replace("+-", "-")


def write_doc(table: str) -> None:
    """Replace what lies between this benchmark's markers (appended with a heading when they are missing)."""
    block = f"{START}\n{table}\n{END}"
    text = DOC.read_text()
    if START not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n## The LLM path: integrator, direct, LiteLLM\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + block + tail)


def _litellm_version() -> str:
    python = LITELLM.parent / "python"
    script = "import importlib.metadata as m; print(m.version('litellm'))"
    answer = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=60, check=False)
    return answer.stdout.strip() or "unknown version"


def start(workdir: Path) -> Running:
    """The mock LLM, LiteLLM and the stack (the integrator may reach the mock, and sends it the install's key)."""
    mock, mock_port = start_mock()
    litellm, litellm_port = start_litellm(workdir, mock_port)  # it starts slowly: meanwhile, the stack
    try:
        keys = {"ALTAN_OPENAI_API_KEY": INSTALL_KEY, "ALTAN_OPENAI_API_HOSTS": "127.0.0.1"}
        processes = start_processes(egress_allow=[f"127.0.0.1:{mock_port}"], extra_env=keys)
    except BaseException:
        _stop(litellm, mock)
        raise
    running = Running(processes, mock, mock_port, litellm, litellm_port)
    try:
        _wait_ready(f"http://127.0.0.1:{litellm_port}/health/liveliness", litellm, "LiteLLM", workdir / "litellm.log")
    except BaseException:
        stop(running)
        raise
    return running


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop(running: Running) -> None:
    _stop(running.litellm, running.mock)
    running.processes.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the time bounds, for a smoke run")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(REPO)}")
    parser.add_argument(
        "--profile",
        metavar="PATH:MODE:N",
        help="instead of measuring, sample PATH's proxy (integrator or litellm) with py-spy while it serves MODE "
        "(stream or whole) answers at N in flight, e.g. integrator:stream:32",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="how long --profile samples")
    args = parser.parse_args()
    if not LITELLM.exists():
        print(f"{LITELLM.relative_to(REPO)} is missing: make bench-llm installs it", file=sys.stderr)
        return 2
    if args.profile:
        path, mode, in_flight = [*args.profile.split(":"), "", "", ""][:3]
        if path not in ("integrator", "litellm") or mode not in MODES or not in_flight.isdigit():
            parser.error("--profile takes integrator|litellm:stream|whole:N")
    version = _litellm_version()
    print("starting the mock LLM, LiteLLM and altan up ...", file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="altan-bench-llm-"))
    running = start(workdir)
    try:
        if args.profile:
            asyncio.run(profile(running, path, mode, int(in_flight), args.seconds))
            return 0
        steal_before, total_before = cpu_ticks()
        phases = asyncio.run(measure(running, 0.25 if args.quick else 1.0))
        steal_after, total_after = cpu_ticks()
    except Exception:
        print(running.processes.log_tail(), file=sys.stderr)
        raise
    finally:
        stop(running)
    shutil.rmtree(running.processes.workdir, ignore_errors=True)  # kept only when something failed, for its logs
    shutil.rmtree(workdir, ignore_errors=True)
    table = report(phases, version, (steal_after - steal_before) / max(1, total_after - total_before))
    print(table)
    if not args.no_write and not args.quick:
        write_doc(table)
        print(f"\nwritten to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
