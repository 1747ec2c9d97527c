"""Timing primitives shared by every benchmark: one clock, one bandwidth and one GEMM probe.

Benchmarks report ratios measured in one run on one machine (see
docs/guides/benchmarks.md), never bare times: the floors below are measured in the same process.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Where every benchmark writes its JSON; RLX_OPTAX_BENCH_OUT redirects it (the smoke tests).
OUT_DIR = pathlib.Path(
    os.environ.get("RLX_OPTAX_BENCH_OUT") or pathlib.Path(__file__).resolve().parent / "out"
)


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_fn(
    fn: Callable[[], Any], *, warmup: int = 3, iters: int = 20, min_time: float = 0.5
) -> float:
    """Median wall time of `fn()` in seconds (after `warmup` calls), blocking on the result.

    Runs at least `iters` calls and at least `min_time` seconds.
    """
    for _ in range(warmup):
        block(fn())
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        block(fn())
        samples.append(time.perf_counter() - t0)
        if len(samples) > 10 * iters:
            break
    return statistics.median(samples)


def time_step(step: Callable, carry: Any, *, warmup: int = 3, iters: int = 20) -> float:
    """Median time of ``carry = step(*carry)`` for a jitted, donated step (carry is threaded)."""
    state = {"carry": carry}

    def once():
        state["carry"] = step(*state["carry"])
        return state["carry"]

    return time_fn(once, warmup=warmup, iters=iters)


def copy_bandwidth(n_bytes: int = 64 * 2**20) -> float:
    """Bytes per second of a jitted read+write pass (x -> x * 1.0001) over `n_bytes`."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    state = {"x": x}

    def once():
        state["x"] = f(state["x"])
        return state["x"]

    t = time_fn(once, warmup=3, iters=30)
    return 2 * n_bytes / t  # one read and one write per element


def gemm_rate(n: int = 1024, dtype: Any = jnp.float32) -> float:
    """FLOP/s of a jitted (n, n) @ (n, n) matmul at default precision."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    t = time_fn(lambda: f(a, b), warmup=3, iters=20)
    return 2 * n**3 / t


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def write_json(name: str, payload: dict[str, Any]) -> pathlib.Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float))
    return path
