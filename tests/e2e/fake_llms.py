"""The fake LLM APIs of the end-to-end suite, one per wire format, scripted per model.

The stack is shared by the whole session, so the fakes are too; each test names its own model (:meth:`Llms.model`)
and scripts the answers of that model only. A model without a script left calls its first offered tool, then
answers text (tests.fakes.llm.tool_then_text).
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from typing import Any, Self

from tests.fakes.llm import Answer, FakeAnthropic, FakeLlm, FakeOpenAI, Received, tool_then_text

INSTALL_KEY = "sk-install-e2e-0123456789abcdefghij"


class Llms:
    def __init__(self) -> None:
        self._scripts: dict[str, deque[Answer]] = {}
        self._lock = threading.Lock()
        self.openai = FakeOpenAI(responder=self._answer)
        self.anthropic = FakeAnthropic(responder=self._answer)

    def model(self, *answers: Answer) -> str:
        """A fresh model name whose requests get these answers, in order."""
        name = f"model-{uuid.uuid4().hex[:10]}"
        self.script(name, *answers)
        return name

    def script(self, model: str, *answers: Answer) -> None:
        with self._lock:
            self._scripts.setdefault(model, deque()).extend(answers)

    def requests(self, model: str) -> list[Received]:
        """What the fakes received for this model, in order."""
        return [r for fake in (self.openai, self.anthropic) for r in fake.requests if _model(r) == model]

    def config(self, model: str, provider: str = "openai", **fields: Any) -> dict[str, Any]:
        """An agent's ``llm`` for this model on one of the fakes."""
        fake: FakeLlm = self.openai if provider == "openai" else self.anthropic
        return {"llm_id": model, "provider": provider, "endpoint": fake.url, **fields}

    def _answer(self, received: Received) -> Answer:
        with self._lock:
            queue = self._scripts.get(_model(received))
            if queue:
                return queue.popleft()
        return tool_then_text(received)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.openai.close()
        self.anthropic.close()


def _model(received: Received) -> str:
    return str(received.body.get("model", "")) if isinstance(received.body, dict) else ""
