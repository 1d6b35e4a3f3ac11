"""The token bucket's arithmetic, shared by the embedded backends (Redis runs the same in a Lua script)."""

from __future__ import annotations

__all__ = ["take"]


def take(state: tuple[float, float] | None, now: float, capacity: int, per_seconds: float) -> tuple[float, float]:
    """From a bucket's ``(tokens, at)`` (``None``: never used, so full), take one token if there is one.

    Returns the tokens left and the wait: 0 when one was taken, else the seconds until one is there.
    """
    rate = capacity / per_seconds
    tokens, at = state if state is not None else (float(capacity), now)
    tokens = min(float(capacity), tokens + max(0.0, now - at) * rate)
    if tokens >= 1:
        return tokens - 1, 0.0
    return tokens, (1 - tokens) / rate
