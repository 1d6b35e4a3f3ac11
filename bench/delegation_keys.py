"""What ES256 delegations cost against the HS256 ones they replace (docs/decisions.md, "Authentication").

``python bench/delegation_keys.py`` measures in one run, side by side, the CPU (the fastest of a few rounds: the
machine may be shared) of what the agent does once per task run (sign a delegation) and what each verifier does the
first time it sees one (verify it; TokenVerifier then caches the token until it expires), with ES256 (a P-256 key,
altan.delegation) and with HS256 and a shared secret (the former ALTAN_INTERNAL_KEY), and prints the ratios. A few
seconds; not collected by pytest. docs/benchmarks.md records a run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

import jwt

from altan.auth import issue_delegation
from altan.delegation import generate_key_pair, load_public_keys, load_signing_key

CLAIMS = {"tenant": "acme", "sub": "alice", "role": "member", "task_id": "tsk_1", "ttl": 3600}
SECRET = "x" * 48


def per_call_us(fn: Callable[[], object], rounds: int = 7, round_seconds: float = 0.15) -> float:
    """The fastest of ``rounds`` rounds, in mean microseconds per call: the least disturbed by other load."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < round_seconds:
            for _ in range(10):
                fn()
            calls += 10
        best = min(best, elapsed / calls * 1e6)
    return best


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        private, public = generate_key_pair(Path(directory))
        key = load_signing_key(private)
        (public_key,) = load_public_keys(public).values()
    claims = jwt.decode(issue_delegation(key, **CLAIMS), options={"verify_signature": False})  # type: ignore[arg-type]
    es_token = jwt.encode(claims, key.key, algorithm="ES256", headers={"kid": key.kid})
    hs_token = jwt.encode(claims, SECRET, algorithm="HS256")
    checks = {"audience": "altan-internal", "issuer": "altan-internal"}
    rows = {
        "sign (the agent, once per task run)": (
            per_call_us(lambda: jwt.encode(claims, SECRET, algorithm="HS256")),
            per_call_us(lambda: jwt.encode(claims, key.key, algorithm="ES256", headers={"kid": key.kid})),
        ),
        # TokenVerifier caches a verified token until it expires: this is paid once per token and verifier.
        "verify (each verifier, first sight of a token)": (
            per_call_us(lambda: jwt.decode(hs_token, SECRET, algorithms=["HS256"], **checks)),
            per_call_us(lambda: jwt.decode(es_token, public_key, algorithms=["ES256"], **checks)),
        ),
    }
    print("| operation | HS256 (µs) | ES256 (µs) | ES256 / HS256 |")
    print("| --- | ---: | ---: | ---: |")
    for name, (hs, es) in rows.items():
        print(f"| {name} | {hs:.1f} | {es:.1f} | {es / hs:.1f}x |")


if __name__ == "__main__":
    main()
