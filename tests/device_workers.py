"""Launching the fake-device worker scripts of the sharding tests (a test helper).

JAX fixes its device count when it starts, so every test that needs several CPU devices runs
a worker script in a fresh Python process (``--xla_force_host_platform_device_count`` is set
by the worker itself). The worker prints one line ``<TAG> <json>``; `report` returns that
JSON, or fails the test with the end of the worker's stderr.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def report(
    command: Sequence[str], tag: str, timeout: float, extra_env: dict[str, str] | None = None
) -> dict:
    """The JSON a worker prints after `tag`, from ``python <command...>`` run in the
    repository with the CPU backend and one OpenBLAS thread (concurrent LAPACK calls from 8
    device threads into a threaded OpenBLAS can stall past XLA's collective timeout;
    docs/scaling.md)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env["OPENBLAS_NUM_THREADS"] = "1"
    env.pop("XLA_FLAGS", None)
    env.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag + " ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])
