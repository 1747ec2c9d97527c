"""One computation per test session, shared by the pytest-xdist workers (a test helper).

A module-scoped fixture runs once per *process*: under ``pytest -n 2`` the tests of one module
are spread over both workers, and each would launch the module's subprocess (the 8-device
sharding worker, the benchmark smoke run, ...) again. `once_per_session` makes the first
worker that needs the value compute it while holding a lock and leave it in the session's
shared temporary directory; the other worker waits for the lock and reads it (its CPU goes to
the computation meanwhile). Without xdist it just computes. A computation that raises leaves
nothing behind, so the next worker tries again and reports its own failure.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

import pytest

try:
    import fcntl
except ImportError:  # no POSIX locks (Windows): every worker computes for itself
    fcntl = None


def once_per_session(
    tmp_path_factory: pytest.TempPathFactory, key: str, compute: Callable[[], Any]
) -> Any:
    """``compute()`` (a picklable value), computed by one worker of the session."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None or fcntl is None:
        return compute()
    shared = tmp_path_factory.getbasetemp().parent  # the session's, above every worker's own
    with open(shared / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = shared / f"{key}.pickle"
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = compute()
        path.write_bytes(pickle.dumps(value))
        return value
