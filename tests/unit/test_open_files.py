"""A service raises its soft limit of open files to fit its outbound connections (altan.bootstrap.open_files_for)."""

from __future__ import annotations

import resource
import subprocess
import sys

_PROBE = """
import resource
from altan.bootstrap import open_files_for
print(open_files_for(1024), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _run_with_soft_limit(soft: int) -> tuple[int, int]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run(
        [sys.executable, "-c", _PROBE], preexec_fn=lower, capture_output=True, text=True, check=True, timeout=60
    )
    answered, now = out.stdout.split()
    return int(answered), int(now)


def test_a_low_soft_limit_is_raised_to_what_the_connections_need() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 1024 + 256 if hard == resource.RLIM_INFINITY else min(1024 + 256, hard)
    assert _run_with_soft_limit(512) == (expected, expected)


def test_a_soft_limit_high_enough_is_left_as_it_is() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    high = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    assert _run_with_soft_limit(high) == (high, high)
