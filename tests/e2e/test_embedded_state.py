"""Embedded state lasts (REDIS_URL unset): ``altan up`` stopped and started again on its data directory keeps agents,
tools, credentials (whose secrets still work), tasks, threads, audit and MCP servers; another data directory is
another install; a data directory that cannot hold the state stops ``altan up`` with one line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import McpServers
from tests.e2e.fake_llms import Llms
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import JWT_SECRET, Stack, start_stack
from tests.e2e.test_agent_loop import _openai_messages
from tests.e2e.test_tasks import _events, _finished
from tests.fakes.llm import Reply


def _ok(answer: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_everything_stored_is_there_after_altan_up_stops_and_starts_again(
    tmp_path: Path, tenant: str, third_party: FakeThirdParty, llms: Llms, mcp_servers: McpServers
) -> None:
    data_dir = tmp_path / "data"
    allow = f"127.0.0.1:{third_party.port},127.0.0.1:{llms.openai.port},127.0.0.1:{mcp_servers.port}"
    secret, llm_key = f"sk-kept-{tenant}-5e4d3c2b1a", f"sk-llm-{tenant}-0f1e2d3c4b"
    model = llms.model(Reply(text="Nice to meet you, Ada."), Reply(text="Your name is Ada."))
    tool = {
        "tool_id": "secure",
        "name": "Secure",
        "endpoint": f"{third_party.base_url}/secure",
        "method": "POST",
        "auth": "api_key",
        "credential": "vault",
    }
    plan = {"plan": [{"id": "s1", "tool": "secure", "arguments": {}}]}

    first = start_stack(data_dir=data_dir, egress_allow=allow, redis_url=None)
    try:
        with first.client(tenant) as api:
            _ok(api.put("/v1/credentials/vault", json={"type": "api_key", "value": secret}), 201)
            _ok(api.put("/v1/credentials/llm", json={"type": "api_key", "value": llm_key}), 201)
            _ok(api.post("/v1/tools", json=tool), 201)
            server = _ok(api.put("/v1/mcp-servers/ref", json={"url": f"http://127.0.0.1:{mcp_servers.port}/mcp"}), 201)
            llm = llms.config(model, auth={"type": "api_key", "credential": "llm"})
            agent = _ok(api.post("/v1/agents", json={"name": "kept", "llm": llm, "tools": ["secure", "ref__add"]}), 201)
            planned = _ok(
                api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": plan, "idempotency_key": "k1"}), 202
            )
            chat = _ok(api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": "My name is Ada."}), 202)
            before = {
                "agent": _ok(api.get(f"/v1/agents/{agent['id']}")),
                "tools": _ok(api.get("/v1/tools")),
                "credentials": _ok(api.get("/v1/credentials")),
                "mcp": _ok(api.get("/v1/mcp-servers")),
                "planned": _finished(api, planned["task_id"]),
                "chat": _finished(api, chat["task_id"]),
                "thread": None,
                "audit": None,
            }
            assert before["planned"]["status"] == "succeeded", (before["planned"]["error"], before["planned"]["steps"])
            assert before["chat"]["status"] == "succeeded", before["chat"]
            before["thread"] = _ok(api.get(f"/v1/threads/{chat['thread_id']}"))
            before["audit"] = _ok(api.get("/v1/audit"))
            assert before["audit"]["events"], "the calls were audited"
    finally:
        assert first.stop() == 0, first.logs()[-3000:]

    calls_before = len(third_party.requests_to("/secure"))
    second = start_stack(data_dir=data_dir, egress_allow=allow, redis_url=None)
    other = start_stack(data_dir=tmp_path / "other", egress_allow=allow, redis_url=None)
    try:
        with second.client(tenant) as api:
            assert _ok(api.get(f"/v1/agents/{agent['id']}")) == before["agent"]
            assert _ok(api.get("/v1/tools")) == before["tools"]
            assert _ok(api.get("/v1/credentials")) == before["credentials"]
            assert [c["status"] for c in before["credentials"]["credentials"]] == ["connected", "connected"]
            assert _ok(api.get("/v1/mcp-servers")) == before["mcp"]
            assert _ok(api.get("/v1/mcp-servers/ref"))["tools"] == server["tools"]
            # Finished tasks stay readable, events and all; the idempotency key still names its task.
            assert _ok(api.get(f"/v1/tasks/{planned['task_id']}")) == before["planned"]
            assert _ok(api.get(f"/v1/tasks/{chat['task_id']}")) == before["chat"]
            assert _events(api, planned["task_id"])[-1]["type"] == "task.succeeded"
            again = api.post(f"/v1/agents/{agent['id']}/tasks", json={"input": plan, "idempotency_key": "k1"})
            assert _ok(again, 202)["task_id"] == planned["task_id"]
            assert _ok(api.get(f"/v1/threads/{chat['thread_id']}")) == before["thread"]
            audit = _ok(api.get("/v1/audit"))["events"]
            assert audit[: len(before["audit"]["events"])] == before["audit"]["events"]

            # The secrets still decrypt (the master key lasted): the tool's credential reaches the third party, the
            # LLM's key the model, and the thread goes on where it was.
            _ok(api.post("/v1/tools/secure/invoke", json={"arguments": {}}))
            assert third_party.requests_to("/secure")[calls_before:][-1].headers["Authorization"] == f"Bearer {secret}"
            turn = _ok(
                api.post(
                    f"/v1/agents/{agent['id']}/tasks", json={"input": "Who am I?", "thread_id": chat["thread_id"]}
                ),
                202,
            )
            assert _finished(api, turn["task_id"])["result"] == {"answer": "Your name is Ada."}
            assert llms.requests(model)[-1].headers["authorization"] == f"Bearer {llm_key}"
            contents = [m.get("content") for m in _openai_messages(llms, model, -1)]
            assert "My name is Ada." in contents and "Nice to meet you, Ada." in contents

        # Another data directory is another install: nothing of the first.
        with other.client(tenant) as api:
            assert api.get(f"/v1/agents/{agent['id']}").status_code == 404
            assert _ok(api.get("/v1/credentials"))["credentials"] == []
            assert api.get(f"/v1/tasks/{planned['task_id']}").status_code == 404
    finally:
        assert other.stop() == 0, other.logs()[-3000:]
        assert second.stop() == 0, second.logs()[-3000:]

    # The state and the key that encrypts its secrets are the owner's only; no secret is written in the clear.
    for name in ("master.key", "state.db"):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
    stored = b"".join(p.read_bytes() for p in data_dir.iterdir() if p.name.startswith("state.db"))
    assert b"Nice to meet you" in stored  # the check below looks at the right bytes
    assert secret.encode() not in stored and llm_key.encode() not in stored
    key = (data_dir / "master.key").read_text().strip()
    for logs in (first.logs(), second.logs()):
        assert secret not in logs and llm_key not in logs and key not in logs
        assert "Traceback" not in logs


def test_up_refuses_a_state_file_it_cannot_use_in_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "state.db").write_bytes(b"not a database, " * 512)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALTAN_") and k != "REDIS_URL"}
    env |= {"ALTAN_JWT_SECRET": JWT_SECRET, "ALTAN_DATA_DIR": str(data_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "altan.cli", "up"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"altan: invalid configuration: ALTAN_DATA_DIR: cannot use {data_dir / 'state.db'}: file is not a database"
    ]
    assert result.stdout == ""


def test_the_memory_opt_in_keeps_nothing_on_disk(tmp_path: Path, tenant: str) -> None:
    stack: Stack = start_stack(
        data_dir=tmp_path / "data", egress_allow="", redis_url=None, extra_env={"ALTAN_STATE": "memory"}
    )
    try:
        with stack.client(tenant) as api:
            _ok(api.post("/v1/agents", json={"name": "fleeting"}), 201)
    finally:
        assert stack.stop() == 0, stack.logs()[-3000:]
    assert not (tmp_path / "data" / "state.db").exists()
