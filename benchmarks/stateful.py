"""The stateful (crate-style) API: dispatch overhead and `step_batch` against the pure step.

Measured in one process (docs/guides/benchmarks.md):

- ``dispatch``: one ``AdamW.step`` on a 1,000-element float32 tensor (NumPy in place, and JAX
  arrays), next to the jitted pure ``update + apply_updates`` call on the same tensor; the
  overhead is the difference.
- ``batch``: ``step_batch`` over a model of about 10M float32 parameters divided by the jitted,
  donated pure step over the same pytree (JAX arrays in and out, donated as by default; and
  NumPy arrays updated in place, which adds a host copy in and out), for every registered
  element-wise algorithm.
- ``crate_shapes``: per-iteration time on the shapes the crate was timed on (the crate's own
  numbers on the reference CPU are recorded beside ours). Algorithms not registered yet are
  skipped.

Run: ``python benchmarks/stateful.py [--small]``; writes ``benchmarks/out/stateful.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    from benchmarks import harness
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import harness

from rlx_optax._src import registry, stateful

LR = 1e-3
# The crate's per-iteration times on the reference CPU (seconds), from the issue.
CRATE_SHAPES = {
    "adamw": ({"embed": (8192, 512), **{f"w{i}": (512, 2048) for i in range(5)}}, 0.031),
    "muon": ({"a": (512, 512), "b": (512, 2048)}, 3.3),
    "kronpsgd": ({"a": (256, 256), "b": (256, 1024)}, 8.8),
}


def model_shapes(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
    """Transformer-like shapes: about 10.5M parameters at ``scale=1``."""
    d = max(8, int(512 * math.sqrt(scale)))
    shapes: dict[str, tuple[int, ...]] = {"embed": (16 * d, d), "final_norm": (d,)}
    for i in range(2):
        shapes |= {
            f"l{i}.attn_qkv": (d, 3 * d),
            f"l{i}.attn_out": (d, d),
            f"l{i}.mlp_in": (d, 4 * d),
            f"l{i}.mlp_in_bias": (4 * d,),
            f"l{i}.mlp_out": (4 * d, d),
            f"l{i}.norm": (d,),
        }
    return shapes


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}


def pure_step_fn(row: registry.Algorithm, params: dict, grads: dict):
    tx = row.from_crate(lr=LR)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        s = stateful.own_buffers(s, *jax.tree.leaves(g))  # MARS keeps g: never donate it
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    p = {n: jnp.array(v) for n, v in params.items()}
    g = {n: jnp.array(v) for n, v in grads.items()}
    carry = {"p": p, "s": tx.init(p)}

    def once():
        carry["p"], carry["s"] = step(carry["p"], carry["s"], g)
        return carry["p"]

    return once


def batch_fn(row: registry.Algorithm, shapes: dict, params: dict, grads: dict, numpy: bool):
    opt = stateful.get(row.name)(LR)
    if numpy:
        p = {n: v.copy() for n, v in params.items()}
        g = grads
    else:
        p = {n: jnp.array(v) for n, v in params.items()}
        g = {n: jnp.array(v) for n, v in grads.items()}

    def once():
        out = opt.step_batch([(n, shapes[n], p[n], g[n]) for n in shapes])
        opt.end_iteration()
        if not numpy:
            p.update(zip(shapes, out, strict=True))
        return out

    return once


def interleaved(fns: dict, rounds: int = 3) -> dict[str, float]:
    """Best-of-`rounds` median time of each function, the functions timed in turn (the machine
    may be shared: interleaving and the minimum keep the ratios fair)."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], harness.time_fn(fn, warmup=2, iters=5, min_time=0.2))
    return best


def loop_time(row: registry.Algorithm, shapes: dict, params: dict, grads: dict) -> float:
    opt = stateful.get(row.name)(LR)
    p = {n: v.copy() for n, v in params.items()}

    def once():
        for n, s in shapes.items():
            opt.step(n, s, p[n], grads[n])
        opt.end_iteration()
        return p[n]

    return harness.time_fn(once, warmup=1, iters=3, min_time=0.0)


def dispatch(n: int = 1000) -> dict[str, float]:
    row = registry.get("adamw")
    rng = np.random.default_rng(0)
    p_np = rng.standard_normal(n).astype(np.float32)
    g_np = rng.standard_normal(n).astype(np.float32)
    opt_np, opt_jax = stateful.get("adamw")(LR), stateful.get("adamw")(LR)
    holder = {"p": jnp.array(p_np)}
    g_jax = jnp.array(g_np)

    def jax_step():
        holder["p"] = opt_jax.step("w", (n,), holder["p"], g_jax)
        return holder["p"]

    tx = row.from_crate(lr=LR)
    pure = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
    )
    carry = {"p": jnp.array(p_np), "s": tx.init(jnp.array(p_np))}

    def pure_step():
        carry["p"], carry["s"] = pure(carry["p"], carry["s"], g_jax)
        return carry["p"]

    timings = interleaved(
        {
            "step_numpy_us": lambda: opt_np.step("w", (n,), p_np, g_np),
            "step_jax_us": jax_step,
            "pure_jit_call_us": pure_step,
        }
    )
    timings = {k: v * 1e6 for k, v in timings.items()}
    timings["overhead_numpy_us"] = timings["step_numpy_us"] - timings["pure_jit_call_us"]
    timings["overhead_jax_us"] = timings["step_jax_us"] - timings["pure_jit_call_us"]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a 100x smaller model (smoke run)")
    args = parser.parse_args()
    scale = 0.01 if args.small else 1.0
    registered = {row.crate_name for row in registry.ALGORITHMS}

    result: dict[str, Any] = {"dispatch": dispatch()}
    print("dispatch", {k: round(v, 1) for k, v in result["dispatch"].items()})

    shapes = model_shapes(scale)
    params, grads = random_tree(shapes, 0), random_tree(shapes, 1)
    result["model_params"] = sum(math.prod(s) for s in shapes.values())
    result["batch"] = {}
    for row in registry.ALGORITHMS:
        if row.matrix:
            continue
        t = interleaved(
            {
                "pure": pure_step_fn(row, params, grads),
                "jax": batch_fn(row, shapes, params, grads, numpy=False),
                "numpy": batch_fn(row, shapes, params, grads, numpy=True),
            }
        )
        pure, ours_jax, ours_np = t["pure"], t["jax"], t["numpy"]
        result["batch"][row.name] = {
            "pure_ms": pure * 1e3,
            "step_batch_jax_ms": ours_jax * 1e3,
            "step_batch_numpy_ms": ours_np * 1e3,
            "ratio_jax": ours_jax / pure,
            "ratio_numpy": ours_np / pure,
        }
        print(row.name, {k: round(v, 3) for k, v in result["batch"][row.name].items()})

    result["crate_shapes"] = {}
    for name, (crate_shapes, crate_s) in CRATE_SHAPES.items():
        if name not in registered:
            result["crate_shapes"][name] = {"skipped": "not registered yet"}
            print(name, "not registered yet")
            continue
        if args.small:
            crate_shapes = {n: tuple(max(1, d // 8) for d in s) for n, s in crate_shapes.items()}
        row = registry.get(name)
        p, g = random_tree(crate_shapes, 2), random_tree(crate_shapes, 3)
        t = interleaved(
            {
                "numpy": batch_fn(row, crate_shapes, p, g, numpy=True),
                "jax": batch_fn(row, crate_shapes, p, g, numpy=False),
            },
            rounds=2,
        )
        entry = {
            "shapes": crate_shapes,
            "params": sum(math.prod(s) for s in crate_shapes.values()),
            "crate_ms": crate_s * 1e3,
            "step_batch_numpy_ms": t["numpy"] * 1e3,
            "step_batch_jax_ms": t["jax"] * 1e3,
            "step_loop_numpy_ms": loop_time(row, crate_shapes, p, g) * 1e3,
        }
        entry["crate_over_ours_numpy"] = entry["crate_ms"] / entry["step_batch_numpy_ms"]
        result["crate_shapes"][name] = entry
        print(name, {k: v for k, v in entry.items() if k != "shapes"})

    print(harness.write_json("stateful", result))


if __name__ == "__main__":
    main()
