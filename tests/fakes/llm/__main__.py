"""``python -m tests.fakes.llm --port N [--provider anthropic]``: a fake LLM API that calls the first offered tool
(unless the last message is already a tool's result) and answers text otherwise, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tests.fakes.llm.anthropic import FakeAnthropic
from tests.fakes.llm.openai import FakeOpenAI
from tests.fakes.llm.responders import tool_then_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.llm", description="A fake LLM API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--provider", choices=("openai", "anthropic"), default="openai", help="wire format")
    args = parser.parse_args(argv)
    kind = FakeOpenAI if args.provider == "openai" else FakeAnthropic
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with kind(responder=tool_then_text, port=args.port) as fake:
        print(f"fake {fake.provider} API at {fake.url}", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
