"""How free-form JSON should cross the wire: ``google.protobuf.Struct``/``Value`` or JSON bytes.

``python bench/payload_encoding.py`` measures, for payloads shaped like the ones that cross a tool call (a built-in's
arguments, a parsed email, a third party's list of records), the CPU to encode on one side and decode on the other,
both ways, with the converters the services use (altan.api.convert and altan.wire), and prints the ratio. One run
takes a few seconds; nothing here is collected by pytest. docs/decisions.md ("Payload encoding") records a run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

from google.protobuf.struct_pb2 import Value

from altan.api.convert import python_to_value, value_to_python
from altan.wire import json_bytes

PAYLOADS: dict[str, Any] = {
    "json_extract arguments (40 B)": {"data": {"k": "v", "n": [1, 2, 3]}, "path": "k"},
    "parse_email output (0.3 KB)": {
        "subject": "Where is my order?",
        "from": "ada@example.com",
        "from_name": "Ada",
        "to": ["support@example.com"],
        "cc": [],
        "date": "2026-12-01T10:00:00+00:00",
        "message_id": "<1@example.com>",
        "headers": {"from": "Ada <ada@example.com>", "subject": "Where is my order?"},
        "text": "Hi! Where is my order?\n",
        "attachments": [],
    },
    "third-party list, 500 records (35 KB)": {
        "items": [{"id": i, "name": f"item {i}", "tags": ["a", "b"], "price": i * 1.5, "ok": True} for i in range(500)]
    },
}


def per_call_us(fn: Callable[[], object], budget_seconds: float = 0.5) -> float:
    """Mean microseconds per call over about ``budget_seconds``, after a warm-up."""
    for _ in range(10):
        fn()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < budget_seconds:
        for _ in range(20):
            fn()
        calls += 20
    return elapsed / calls * 1e6


def main() -> None:
    print("| payload | JSON bytes, encode + decode (µs) | Struct, encode + decode (µs) | Struct / JSON |")
    print("| --- | ---: | ---: | ---: |")
    for name, payload in PAYLOADS.items():
        wire_json = json_bytes(payload)
        wire_struct = python_to_value(payload).SerializeToString()
        assert value_to_python(Value.FromString(wire_struct)) == json.loads(wire_json) == payload
        as_json = per_call_us(lambda p=payload: json_bytes(p)) + per_call_us(lambda w=wire_json: json.loads(w))
        as_struct = per_call_us(lambda p=payload: python_to_value(p).SerializeToString()) + per_call_us(
            lambda w=wire_struct: value_to_python(Value.FromString(w))
        )
        print(f"| {name} | {as_json:.1f} | {as_struct:.1f} | {as_struct / as_json:.1f}x |")


if __name__ == "__main__":
    main()
