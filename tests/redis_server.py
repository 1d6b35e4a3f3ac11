"""A redis-server of a test's own, on a free port of 127.0.0.1, that can be stopped and started again."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from tests.e2e.stack import free_port


class RedisServer:
    """``redis-server`` (from PATH) without persistence: a restart comes back empty, on the same port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start, and return once the server accepts connections."""
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*command, "--dir", str(self.workdir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:  # redis-server says when it accepts connections
            if "Ready to accept connections" in line:
                return
        self.process.wait(10)
        raise RuntimeError(f"redis-server on port {self.port} exited before it was ready")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections open, nothing answers, as a hung or failing-over Redis."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop (SIGTERM), and return once the server is gone."""
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait(10)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self.process = None
