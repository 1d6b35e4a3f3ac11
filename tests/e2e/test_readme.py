"""The README's quickstart, run as printed: its shell blocks in one bash, against a real stack on free ports.

Only what cannot be shared on a test machine is rewritten: the ports (the REST port of this stack instead of
8080, free ports instead of 9000 and 9100), the scratch directory of the fake API, and ``.venv/bin/`` made
absolute. The block that starts the stack (``make run``) is replaced by a stack started here with the same
egress exemption and a data directory that the shell's ``altan token`` shares with it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.stack import JWT_SECRET, free_port, start_stack

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)
_SHELL_TIMEOUT = 60
_SSE_FIELDS = frozenset({"event", "data", "id", "retry"})


def quickstart_blocks() -> list[str]:
    """The ```sh blocks of the README's "## Quickstart" section, in order."""
    text = README.read_text()
    start = text.index("\n## Quickstart\n")
    end = text.find("\n## ", start + 1)
    return _SH_BLOCK.findall(text[start : end if end != -1 else len(text)])


def _rewrite(script: str, *, http_port: int, api_port: int, llm_port: int, fake_api: Path) -> str:
    script = script.replace("127.0.0.1:8080", f"127.0.0.1:{http_port}")
    script = re.sub(r"\b9000\b", str(api_port), script)
    script = re.sub(r"\b9100\b", str(llm_port), script)
    script = script.replace("/tmp/fake-api", str(fake_api))
    return script.replace(".venv/bin/", f"{Path(sys.executable).parent}/")


def _split_output(out: str) -> tuple[list[Any], list[dict[str, str]]]:
    """The JSON documents curl printed (with no newline between them), and the Server-Sent Events among them."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    i = 0
    while i < len(out):
        if out[i] == "{":
            document, i = decoder.raw_decode(out, i)
            documents.append(document)
            continue
        end = out.find("\n", i)
        end = len(out) if end == -1 else end
        line, i = out[i:end].rstrip("\r"), end + 1
        if not line.strip():  # a blank line ends an event
            if current:
                events.append(current)
            current = {}
            continue
        name, _, value = line.partition(":")
        if name in _SSE_FIELDS:  # not a comment (":" first: the keep-alive ping) nor http.server's banner
            current[name] = value.removeprefix(" ")
    if current:
        events.append(current)
    return documents, events


def _split_at_terminal(events: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The first task's events (to its terminal event) and the rest."""
    end = next(i for i, e in enumerate(events) if e["event"] in ("task.succeeded", "task.failed", "task.cancelled"))
    return events[: end + 1], events[end + 1 :]


@pytest.mark.timeout(150)
def test_readme_quickstart_works_as_printed(tmp_path: Path) -> None:
    blocks = quickstart_blocks()
    assert any("make run" in b for b in blocks), "the quickstart no longer starts the stack with `make run`"
    assert "ALTAN_EGRESS_ALLOW=127.0.0.1:9000,127.0.0.1:9100" in next(b for b in blocks if "make run" in b)
    expected_invoke = re.search(r"^# (\{\"output\".*)$", README.read_text(), re.MULTILINE)
    assert expected_invoke, "the README no longer shows the invoke answer"

    api_port, llm_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    allow = f"127.0.0.1:{api_port},127.0.0.1:{llm_port}"
    stack = start_stack(data_dir=data_dir, egress_allow=allow, redis_url=None)
    try:
        script = "\n".join(b for b in blocks if "make run" not in b)
        fake_api = tmp_path / "fake-api"
        script = _rewrite(script, http_port=stack.http_port, api_port=api_port, llm_port=llm_port, fake_api=fake_api)
        # The README leaves the fake API running in the second terminal; here it must go when the shell does.
        script = "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALTAN_") and k != "REDIS_URL"}
        env.update(ALTAN_DATA_DIR=str(data_dir), ALTAN_JWT_SECRET=JWT_SECRET, NO_PROXY="127.0.0.1,localhost")
        env["PYTHONPATH"] = str(ROOT)  # `python -m tests.fakes.llm`, run from the repository root in the README
        work = tmp_path / "cwd"
        work.mkdir()
        shell = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so the background server can be killed with it
        )
        try:
            out, err = shell.communicate(timeout=_SHELL_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            out, err = shell.communicate()
            pytest.fail(f"the quickstart did not finish in {_SHELL_TIMEOUT}s\n{out}\n{err}\n{stack.logs()[-5000:]}")
        finally:
            try:
                os.killpg(shell.pid, signal.SIGKILL)  # whatever of the group is left, the http.server above all
            except ProcessLookupError:
                pass
        assert shell.returncode == 0, f"bash exited {shell.returncode}\nstdout:\n{out}\nstderr:\n{err}"
    finally:
        stopped = stack.stop()
    assert stopped == 0, f"altan up did not stop cleanly ({stopped}):\n{stack.logs()[-5000:]}"

    documents, events = _split_output(out)
    why = f"\nstdout:\n{out}\nstderr:\n{err}"
    assert expected_invoke.group(1) in out, "the invoke answer differs from the README's" + why
    assert {"output": {"customer": "Ada", "tier": "gold"}, "status": 200} in documents, why

    task = next(d for d in documents if "steps" in d)
    assert task["status"] == "succeeded", why
    steps = {s["id"]: s for s in task["steps"]}
    assert steps["s3"]["output"] == {"text": 'Dear Ada (gold), about "Where is my order?": we are on it.'}, why

    plan_events, chat_events = _split_at_terminal(events)
    assert plan_events[-1]["event"] == "task.succeeded", why
    assert [json.loads(e["data"])["type"] for e in events] == [e["event"] for e in events]

    # The natural-language task: the fake model called the agent's tool, then answered; the thread holds it all.
    assert chat_events[-1]["event"] == "task.succeeded", why
    kinds = [e["event"] for e in chat_events]
    assert kinds.count("llm.called") == 2 and "tool.finished" in kinds and "message.delta" in kinds, why
    assert "This is the fake model's answer." in err, why
    thread = next(d for d in documents if "messages" in d)
    assert [m["role"] for m in thread["messages"][:4]] == ["user", "assistant", "tool", "assistant"], why
    assert thread["messages"][0]["content"] == "Draft a greeting for Ada.", why

    audit = next(d for d in documents if "events" in d)["events"]
    assert sorted(e["tool_id"] for e in audit) == ["crm_lookup", "parse_email", "text_template"], why
    assert {(e["action"], e["task_id"], e["outcome"]) for e in audit} == {("tool.invoke", task["task_id"], "ok")}
    assert next(e for e in audit if e["tool_id"] == "crm_lookup")["credential"] == "crm"
