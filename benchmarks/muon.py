"""Muon and Adafactor: step time of a jitted, donated ``update + apply_updates``, as ratios.

Measured in one process (docs/guides/benchmarks.md):

- Muon on one (1024, 1024) and one (1024, 4096) matrix: ``ours/floor``, step time over the
  matmul floor (the Newton-Schulz FLOPs, ``steps * (4 r^2 k + 2 r^3)`` for r <= k, divided by
  the GEMM rate measured in this run), and ``ours/optax``, over ``optax.contrib.muon`` (same
  5 float32 quintic steps; its momentum rule differs, which costs nothing here);
  Newton-Schulz alone is timed too.
- Adafactor on about 10M parameters (matrices, a conv kernel and vectors): ``ours/floor``,
  over the memory-traffic floor (params read+write, gradient read, state read+write, at the
  copy bandwidth of this run), and ``ours/optax``, over ``optax.adafactor`` configured to
  the same rule (fixed rate, factored from dimension 1, no parameter scale); the crate's
  default (relative step) is timed as well.

Run: ``python benchmarks/muon.py [--quick]``; writes ``benchmarks/out/muon.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

try:
    from benchmarks import harness
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import harness

import rlx_optax

MUON_SHAPES = ((1024, 1024), (1024, 4096))
NS_STEPS = 5


def ns_flops(shape: tuple[int, int], steps: int = NS_STEPS) -> float:
    r, k = sorted(shape)
    return steps * (4.0 * r * r * k + 2.0 * r**3)


def time_update(tx: optax.GradientTransformation, params: Any, grads: Any, iters: int) -> float:
    """Median time of the jitted step with params and state donated (grads are inputs)."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    f = jax.jit(step, donate_argnums=(0, 1))
    box = {"carry": (jax.tree.map(jnp.copy, params), tx.init(params))}

    def once():
        box["carry"] = f(*box["carry"], grads)
        return box["carry"]

    return harness.time_fn(once, warmup=1, iters=iters, min_time=0.3)


def _random_tree(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: 0.1 * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }


def bench_muon(gemm: float, iters: int) -> list[dict[str, Any]]:
    rows = []
    for shape in MUON_SHAPES:
        params = _random_tree({"w": shape}, 0)
        grads = _random_tree({"w": shape}, 1)
        floor = ns_flops(shape) / gemm
        ours = time_update(rlx_optax.muon(0.02), params, grads, iters)
        peer = time_update(optax.contrib.muon(0.02), params, grads, iters)
        ns = jax.jit(rlx_optax.newton_schulz)
        t_ns = harness.time_fn(
            lambda g=grads["w"], ns=ns: ns(g), warmup=1, iters=iters, min_time=0.3
        )
        print(f"muon {shape}: ours {ours:.3f}s optax {peer:.3f}s NS {t_ns:.3f}s floor {floor:.3f}s")
        rows.append(
            {
                "shape": list(shape),
                "flops": ns_flops(shape),
                "floor_s": floor,
                "ours_s": ours,
                "optax_s": peer,
                "newton_schulz_s": t_ns,
                "ours/floor": ours / floor,
                "optax/floor": peer / floor,
                "ours/optax": ours / peer,
                "newton_schulz/floor": t_ns / floor,
            }
        )
    return rows


ADAFACTOR_SHAPES = {
    "embed": (8192, 512),
    "w1": (512, 2048),
    "w2": (2048, 512),
    "w3": (512, 2048),
    "w4": (2048, 512),
    "conv": (3, 3, 256, 256),
    "bias": (2048,),
    "scale": (512,),
}


def adafactor_floor_bytes(params: dict[str, jax.Array], state: Any) -> int:
    """Params read and written, gradient read, every state buffer read and written."""
    n = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    s = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return 3 * n + 2 * s


def bench_adafactor(bandwidth: float, iters: int) -> list[dict[str, Any]]:
    params = _random_tree(ADAFACTOR_SHAPES, 2)
    grads = _random_tree(ADAFACTOR_SHAPES, 3)
    same_rule = {"factored": "last_two", "factored_normalization": "mean", "clipping_rule": "paper"}
    configs = [
        (
            "fixed lr, reference rule",
            rlx_optax.adafactor(1e-3, **same_rule),
            optax.adafactor(1e-3, min_dim_size_to_factor=1, multiply_by_parameter_scale=False),
        ),
        ("crate default (relative step)", rlx_optax.adafactor(), None),
    ]
    # the peer and ours agree on this configuration (tests/test_adafactor.py checks it)
    rows = []
    for name, ours_tx, peer_tx in configs:
        state = ours_tx.init(params)
        floor = adafactor_floor_bytes(params, state) / bandwidth
        ours = time_update(ours_tx, params, grads, iters)
        row = {
            "config": name,
            "n_params": int(sum(p.size for p in jax.tree.leaves(params))),
            "floor_s": floor,
            "ours_s": ours,
            "ours/floor": ours / floor,
        }
        if peer_tx is not None:
            peer = time_update(peer_tx, params, grads, iters)
            row.update({"optax_s": peer, "ours/optax": ours / peer, "optax/floor": peer / floor})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing iterations")
    args = parser.parse_args()
    iters = 3 if args.quick else 7

    gemm = harness.gemm_rate(1024)
    bandwidth = harness.copy_bandwidth()
    muon_rows = bench_muon(gemm, iters)
    ada_rows = bench_adafactor(bandwidth, iters)

    print(f"GEMM rate {gemm / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    head = ("muon shape", "ours/floor", "optax/floor", "ours/optax", "NS/floor")
    print(f"{head[0]:>14} {head[1]:>11} {head[2]:>12} {head[3]:>11} {head[4]:>9}")
    for r in muon_rows:
        print(
            f"{str(tuple(r['shape'])):>14} {r['ours/floor']:11.2f} {r['optax/floor']:12.2f}"
            f" {r['ours/optax']:11.2f} {r['newton_schulz/floor']:9.2f}"
        )
    print(f"{'adafactor':>30} {'ours/floor':>11} {'ours/optax':>11}")
    for r in ada_rows:
        ratio = f"{r['ours/optax']:11.2f}" if "ours/optax" in r else f"{'-':>11}"
        print(f"{r['config']:>30} {r['ours/floor']:11.2f} {ratio}")
    path = harness.write_json(
        "muon",
        {
            "gemm_flops_per_s": gemm,
            "copy_bytes_per_s": bandwidth,
            "muon": muon_rows,
            "adafactor": ada_rows,
            "note": "ratios measured in one run; timings on a shared machine are noisy",
        },
    )
    print(f"wrote {path.name}")


if __name__ == "__main__":
    main()
