"""The verifier remembers verified tokens, but never past their expiry and never a token it refused."""

from __future__ import annotations

import time

import jwt
import pytest

from altan import auth
from altan.auth import TokenVerifier
from altan.config import Settings
from altan.errors import Unauthenticated

SECRET = "cache-test-secret-cache-test-secret-cache-test-secret-cache-test!"


def _settings() -> Settings:
    return Settings(jwt_secret=SECRET, jwt_leeway_seconds=0)


def _token(exp: int, **extra: object) -> str:
    claims = {"tenant_id": "t", "sub": "u", "role": "admin", "aud": "altan", "iss": "altan-dev", "exp": exp, **extra}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_cached_token_expires_on_time() -> None:
    verifier = TokenVerifier(_settings())
    exp = int(time.time()) + 1
    token = _token(exp)
    assert verifier.verify(f"Bearer {token}").tenant_id == "t"
    assert verifier.verify(f"Bearer {token}").tenant_id == "t"  # from the cache
    time.sleep(max(0.0, exp - time.time()) + 0.05)  # let the token's own expiry pass (a clock, not a race)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(f"Bearer {token}")


def test_refused_tokens_are_not_remembered() -> None:
    verifier = TokenVerifier(_settings())
    bad = _token(int(time.time()) + 60, role="root")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            verifier.verify(f"Bearer {bad}")


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_CACHE_SIZE", 3)
    verifier = TokenVerifier(_settings())
    exp = int(time.time()) + 60
    tokens = [_token(exp, sub=f"user-{i}") for i in range(5)]
    for token in tokens:
        verifier.verify(f"Bearer {token}")
    assert len(verifier._verified) == 3
    assert list(verifier._verified) == tokens[2:]
