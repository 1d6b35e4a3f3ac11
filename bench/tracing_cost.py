"""What tracing costs the stack, side by side in one run: ``python bench/tracing_cost.py``.

Three stacks run at once on free ports, each with its own fake API:

- ``before``: the code before tracing existed (``--before``, default the main line just before the merge that
  brought ``libs/altan/telemetry.py``), exported with ``git archive`` into a temporary directory and run from there
  with this environment;
- ``off``: this code, tracing off (the default: trace ids are drawn and passed on, no span is built);
- ``on``: this code with every span sampled (``OTEL_TRACES_SAMPLER=always_on``) and exported over OTLP/HTTP to a
  local sink (``bench/otlp_sink.py``, a stand-in collector in a process of its own whose CPU is counted apart);
- with ``--also-on REV``, ``on@REV``: that revision's code with tracing on as ``on``, exported as ``before`` is (a
  change to tracing measured against the code it changes, in the same run).

With ``--profile``, each traced stack is then sampled by py-spy (``pip install py-spy``) under the same load: the
share of its processes' samples in tracing code (altan.telemetry, the OpenTelemetry API, SDK and exporter, the export
thread) is what tracing costs it, read inside each process at once, so the machine's drift does not enter it.

Each path is measured in rounds at many in flight, the stacks taking turns in a rotating order, so that the
drift of a shared machine spreads over all of them; stack CPU per operation is summed over the rounds. Prints a
markdown table and writes it into docs/benchmarks.md between its own markers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/tracing_cost.py` from anywhere

from bench.harness import REPO, CpuMeter, Phase, Processes, closed_loop, cpu_ticks, free_port, start_processes
from bench.run import BOUNDS, LABELS, SERVICES, _machine
from bench.scenarios import Worker, prepare

DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- bench:tracing:start -->", "<!-- bench:tracing:end -->"
SINK = "otlp sink"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def _untraced() -> str:
    """The main line just before altan.telemetry came into it: everything else it had, without tracing."""
    added = _git("log", "--first-parent", "--diff-filter=A", "--format=%H", "--", "libs/altan/telemetry.py")
    return _git("rev-parse", f"{added.splitlines()[-1]}^1")


def _export(rev: str) -> Path:
    """The tree of ``rev`` in a temporary directory (read from git's objects; no worktree is touched)."""
    commit = _git("rev-parse", rev)
    target = Path(tempfile.mkdtemp(prefix="altan-before-"))
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", commit], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
    archive.wait()
    (target / ".revision").write_text(commit)
    return target


# Frames of tracing code as py-spy names them (the path's last parts): altan.telemetry, the OpenTelemetry API and
# SDK (spans, context, attributes, sampling, ids), the batch processor's thread and the OTLP encoder and exporter.
_TRACING_FRAME = re.compile(
    r"\((altan/telemetry\.py|trace/__init__\.py|trace/span\.py|sdk/trace/|attributes/__init__\.py|context/__init__\.py"
    r"|context/contextvars_context\.py|trace/propagation/__init__\.py|sampling\.py|_shared_internal/__init__\.py"
    r"|trace_encoder/__init__\.py|proto/common/|proto/http/|trace_exporter/__init__\.py|export/__init__\.py"
    r"|sdk/util/__init__\.py|resources/__init__\.py|id_generator\.py):"
)
PROFILE_SECONDS = 10
TAIL = 1.5  # seconds: OTEL_BSP_SCHEDULE_DELAY below, and the export itself


async def _quiet(meter: CpuMeter, seconds: float) -> dict[str, float]:
    """CPU of the stack's processes over ``seconds`` with no request."""
    meter.start()
    await asyncio.sleep(seconds)
    return meter.stop()


def _tracing_share(raw: str) -> tuple[int, int]:
    """(samples in tracing code, all samples) of a py-spy ``--format raw`` profile (idle threads are not sampled)."""
    hit = total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        total += int(count)
        if _TRACING_FRAME.search(stack):
            hit += int(count)
    return hit, total


def _spy(py_spy: str, processes: Processes, seconds: float) -> tuple[Path, list[subprocess.Popen[bytes]]]:
    """py-spy recording each service of the stack for ``seconds`` (``--nonblocking``: the processes never pause)."""
    out = Path(tempfile.mkdtemp(prefix="altan-spy-"))
    record = [py_spy, "record", "-d", str(int(seconds)), "-r", "100", "-f", "raw", "--nonblocking"]
    spies = [
        subprocess.Popen(
            [*record, "-p", str(pid), "-o", str(out / f"{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in processes.pids.items()
        if name in SERVICES
    ]
    return out, spies


def _spied_share(out: Path, spies: list[subprocess.Popen[bytes]]) -> float:
    """The share of the services' samples in tracing code, once the recordings are written."""
    for spy in spies:
        spy.wait(30)
    counts = [_tracing_share(f.read_text()) for f in out.glob("*.txt")]
    shutil.rmtree(out, ignore_errors=True)
    if not counts or not sum(t for _, t in counts):
        raise RuntimeError("py-spy recorded nothing (ptrace not permitted?)")
    return sum(h for h, _ in counts) / sum(t for _, t in counts)


def _spans(port: int) -> int:
    return int(httpx.get(f"http://127.0.0.1:{port}/count", timeout=5, trust_env=False).text)


async def measure(
    stacks: dict[str, Processes],
    sink_pid: int,
    sink_port: int,
    paths: list[str],
    rounds: int,
    seconds: float,
    py_spy: str | None = None,
) -> tuple[dict[str, dict[str, list[Phase]]], dict[str, float], dict[str, float]]:
    targets = {name: await prepare(processes) for name, processes in stacks.items()}
    busy = max(BOUNDS[p].busy for p in paths)
    workers = {name: [Worker(target) for _ in range(busy)] for name, target in targets.items()}
    meters = {
        name: CpuMeter(processes, extra={SINK: sink_pid} if name.startswith("on") else None)
        for name, processes in stacks.items()
    }
    variants = list(stacks)
    phases: dict[str, dict[str, list[Phase]]] = {p: {v: [] for v in variants} for p in paths}
    spans_per_op: dict[str, float] = {}  # "<path>/<variant>" -> spans exported per operation
    shares: dict[str, float] = {}  # "<path>/<variant>" -> share of the services' samples in tracing code
    spans: dict[str, int] = {}
    try:
        for path in paths:
            b = BOUNDS[path]
            ops = {name: [w.operation(path) for w in workers[name][: b.busy]] for name in stacks}
            print(f"  {path}: warm-up, then {rounds} rounds of {b.busy} in flight", file=sys.stderr, flush=True)
            for name in variants:
                await closed_loop(ops[name], max_ops=b.warmup, max_seconds=10)
            await asyncio.sleep(1.5)  # the warm-up's spans exported
            for round_ in range(rounds):
                for name in variants[round_ % len(variants) :] + variants[: round_ % len(variants)]:
                    # Each traced stack's spans counted apart: the sink's count before and after its own phase.
                    counted = _spans(sink_port) if name.startswith("on") else 0
                    phase = await closed_loop(ops[name], max_ops=b.busy_ops, max_seconds=seconds, meter=meters[name])
                    # The phase's last spans are exported after it (OTEL_BSP_SCHEDULE_DELAY below): that CPU is the
                    # phase's too, less what the stack spends at rest (its pollers), measured right after as long.
                    tail = await _quiet(meters[name], TAIL)
                    rest = await _quiet(meters[name], TAIL)
                    phase.cpu = {n: phase.cpu.get(n, 0.0) + tail.get(n, 0.0) - rest.get(n, 0.0) for n in tail}
                    phases[path][name].append(phase)
                    if name.startswith("on"):
                        spans[name] = spans.get(name, 0) + _spans(sink_port) - counted
            for name in spans:
                spans_per_op[f"{path}/{name}"] = spans[name] / max(1, sum(p.count for p in phases[path][name]))
                spans[name] = 0
            if py_spy is not None:
                for name in (v for v in variants if v.startswith("on")):
                    print(f"  {path}: py-spy on {name}", file=sys.stderr, flush=True)
                    out, spies = _spy(py_spy, stacks[name], PROFILE_SECONDS)
                    await closed_loop(ops[name], max_ops=10**9, max_seconds=PROFILE_SECONDS + 1)
                    shares[f"{path}/{name}"] = _spied_share(out, spies)
    finally:
        await asyncio.gather(*(w.aclose() for group in workers.values() for w in group))
    return phases, spans_per_op, shares


def _per_op(phases: list[Phase], *names: str) -> float:
    return 1000 * sum(sum(p.cpu.get(n, 0.0) for n in names) for p in phases) / max(1, sum(p.count for p in phases))


def _change(runs: list[Phase], base: list[Phase]) -> str:
    """Pooled over the rounds, and in brackets the median of each round's ratio to the round of ``base`` next to it."""
    pooled = _per_op(runs, *SERVICES) / _per_op(base, *SERVICES)
    median = statistics.median(
        _per_op([p], *SERVICES) / _per_op([b], *SERVICES) for p, b in zip(runs, base, strict=True)
    )
    return f"{(pooled - 1) * 100:+.1f} % ({(median - 1) * 100:+.1f} %)"


def report(
    phases: dict[str, dict[str, list[Phase]]],
    spans_per_op: dict[str, float],
    shares: dict[str, float],
    revision: str,
    steal: float,
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Run of {now} on {_machine('embedded state')}; CPU stolen by the hypervisor during the run: {steal:.1%}. "
        f"`before` is {revision}.",
        "",
        "| path | stack | ops | throughput (/s) | p50 (ms) | stack CPU per op (ms) | per round (ms) "
        "| vs before: pooled (median of rounds) | vs off: pooled (median of rounds) "
        "| spans per op | sink CPU per op (ms) | tracing code (py-spy) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for path, by_variant in phases.items():
        for name in by_variant:
            runs = by_variant[name]
            count = sum(p.count for p in runs)
            elapsed = sum(p.elapsed for p in runs)
            latencies = sorted(x for p in runs for x in p.latencies)
            p50 = latencies[len(latencies) // 2] if latencies else 0.0
            cpu = _per_op(runs, *SERVICES)
            rounds = " / ".join(f"{_per_op([p], *SERVICES):.2f}" for p in runs)
            traced = name.startswith("on")
            vs_before = "-" if name == "before" else _change(runs, by_variant["before"])
            vs_off = _change(runs, by_variant["off"]) if traced else "-"
            spans = f"{spans_per_op[f'{path}/{name}']:.1f}" if traced else "-"
            sink = f"{_per_op(runs, SINK):.2f}" if traced else "-"
            share = shares.get(f"{path}/{name}")
            spied = f"{share:.1%}" if share is not None else "-"
            lines.append(
                f"| {LABELS[path]} | {name} | {count} | {count / elapsed:,.0f} | {p50 * 1000:.2f} | {cpu:.2f} "
                f"| {rounds} | {vs_before} | {vs_off} | {spans} | {sink} | {spied} |"
            )
    lines += [
        "",
        "CPU per operation by process (ms), summed over the rounds:",
        "",
        "| path | stack | " + " | ".join(SERVICES) + " | load generator |",
        "| --- | --- | " + " | ".join("---:" for _ in SERVICES) + " | ---: |",
    ]
    for path, by_variant in phases.items():
        for name in by_variant:
            per = [f"{_per_op(by_variant[name], service):.2f}" for service in (*SERVICES, "load generator")]
            lines.append(f"| {path} | {name} | " + " | ".join(per) + " |")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text()
    block = f"{START}\n{table}\n{END}"
    if START not in text:
        text = text.rstrip("\n") + f"\n\n## Tracing\n\n{block}\n"
    else:
        head, _, rest = text.partition(START)
        text = head + block + rest.partition(END)[2]
    DOC.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=["builtin", "custom", "task"], help="paths (bench/run.py's)")
    parser.add_argument("--before", help="the revision without tracing (default: main before tracing)")
    parser.add_argument("--also-on", metavar="REV", help="also run REV's code with tracing on, as on@REV")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each path on each stack")
    parser.add_argument("--seconds", type=float, default=4.0, help="at most this long per phase")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--profile", action="store_true", help="also sample each traced stack with py-spy")
    args = parser.parse_args()
    py_spy = None
    if args.profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(py_spy, os.X_OK):
            parser.error("--profile needs py-spy: pip install py-spy")
    before = _export(args.before or _untraced())
    also = _export(args.also_on) if args.also_on else None
    sink_port = free_port()
    sink = subprocess.Popen([sys.executable, str(REPO / "bench" / "otlp_sink.py"), str(sink_port)])
    tracing = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
    }
    stacks: dict[str, Processes] = {}
    print(f"starting {3 + bool(also)} stacks and the OTLP sink ...", file=sys.stderr, flush=True)
    try:
        stacks["before"] = start_processes(code=before)
        stacks["off"] = start_processes()
        stacks["on"] = start_processes(extra_env=tracing)
        if also is not None:
            stacks[f"on@{args.also_on}"] = start_processes(code=also, extra_env=tracing)
        deadline = time.monotonic() + 10
        while True:
            try:
                _spans(sink_port)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        steal_before, total_before = cpu_ticks()
        phases, spans_per_op, shares = asyncio.run(
            measure(stacks, sink.pid, sink_port, args.paths, args.rounds, args.seconds, py_spy)
        )
        steal_after, total_after = cpu_ticks()
    except Exception:
        for name, processes in stacks.items():
            print(f"--- {name}\n{processes.log_tail()}", file=sys.stderr)
        raise
    finally:
        for processes in stacks.values():
            processes.stop()
            shutil.rmtree(processes.workdir, ignore_errors=True)
        sink.terminate()
        sink.wait(10)
        revision = (before / ".revision").read_text()[:12]
        if also is not None:
            revision += f"; `on@{args.also_on}` is {(also / '.revision').read_text()[:12]}"
        for tree in (before, also):
            if tree is not None:
                shutil.rmtree(tree, ignore_errors=True)
    steal = (steal_after - steal_before) / max(1, total_after - total_before)
    table = report(phases, spans_per_op, shares, revision, steal)
    print(table)
    if not args.no_write:
        write_doc(table)
        print(f"\nwritten to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
