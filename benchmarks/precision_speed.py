"""Step time of low-precision optimizer state relative to float32 (issue 21).

A jitted, donated ``update + apply_updates`` of AdamW (and a few other families) on the
transformer tree of `benchmarks/model.py` (``--size cpu``, the default: d=256, 4 layers,
3.15M float32 parameters; ``--size gpu``: d=1024, 24 layers, 302M, for an accelerator), with
the moments stored in float32, bfloat16 with stochastic rounding, 8-bit block-wise
(``"q8"``) and 4-bit block-wise (``"q4"``). The configurations are timed in one process,
interleaved round by round (paired), and each round's time is divided by the float32 time of
the same round; the table gives the median ratio over the rounds. Also times
`quantize_blockwise` and `dequantize_blockwise` alone, per element, for both code widths.

What bounds the 8-bit step on a CPU: XLA runs a block maximum as a reduction over a
materialised array, never fused with the elementwise pass that produces it, and it does not
merge the parameter update and the encoding into one pass (no multi-output fusion). So a
first moment is decoded twice (once for the update, once to encode the new moment, whose
block scale comes from two small reductions over the gradient and the stored codes), and a
second moment, whose scale is its exact block maximum, is also materialised in float32 for
its reduction. The float32 step is one pass over memory; the 8-bit one is three to five,
each with integer work per element.

Run: ``python benchmarks/precision_speed.py [--rounds N] [--only adamw lion ...] [--size
cpu|gpu]``; writes ``benchmarks/out/precision_speed.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

try:
    from benchmarks import harness, model
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import harness, model

import rlx_optax

LR = 1e-3
_BF16 = {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16, "stochastic_rounding": True}
_Q8 = {"mu_dtype": "q8", "nu_dtype": "q8"}
_BF16_MU = {"mu_dtype": jnp.bfloat16, "stochastic_rounding": True}
_Q8_MU = {"mu_dtype": "q8"}
_Q4 = {"mu_dtype": "q4", "nu_dtype": "q4"}
_Q4_MU = {"mu_dtype": "q4"}
# family -> (base arguments, {label: storage arguments})
FAMILIES: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "adamw": ({}, {"bf16": _BF16, "q8": _Q8, "q4": _Q4}),
    "lion": ({}, {"bf16": _BF16_MU, "q8": _Q8_MU, "q4": _Q4_MU}),
    "sgd": (
        {"momentum": 0.9},
        {
            "bf16": {"accumulator_dtype": jnp.bfloat16, "stochastic_rounding": True},
            "q8": {"accumulator_dtype": "q8"},
            "q4": {"accumulator_dtype": "q4"},
        },
    ),
    "muon": ({}, {"bf16": _BF16_MU, "q8": _Q8_MU, "q4": _Q4_MU}),
}


def make_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def time_configs(
    configs: dict[str, optax.GradientTransformation], params, grads, rounds: int, iters: int
) -> dict[str, list[float]]:
    """Seconds per step of each configuration, `rounds` paired rounds of `iters` steps."""
    carries, steps = {}, {}
    for label, tx in configs.items():
        p = jax.tree.map(jnp.copy, params)
        steps[label] = make_step(tx)
        carries[label] = steps[label](p, tx.init(p), grads)  # compile and warm up
        jax.block_until_ready(carries[label])
    times: dict[str, list[float]] = {label: [] for label in configs}
    for _ in range(rounds):
        for label in configs:
            p, s = carries[label]
            t0 = time.perf_counter()
            for _ in range(iters):
                p, s = steps[label](p, s, grads)
            jax.block_until_ready((p, s))
            times[label].append((time.perf_counter() - t0) / iters)
            carries[label] = (p, s)
    return times


def time_codec(n: int, rounds: int) -> dict[str, float]:
    """Nanoseconds per element of quantize and dequantize (signed and unsigned, 8- and 4-bit
    codes; the 4-bit keys end in ``_q4_ns``), median."""
    x = jax.random.normal(jax.random.key(0), (n // 1024, 1024))
    out = {}
    for bits, suffix in ((8, ""), (4, "_q4")):
        for signed in (True, False):
            v = x if signed else x * x
            q = jax.jit(lambda a, s=signed, b=bits: rlx_optax.quantize_blockwise(a, s, bits=b))
            d = jax.jit(rlx_optax.dequantize_blockwise)
            qv = jax.block_until_ready(q(v))
            jax.block_until_ready(d(qv))
            for label, fn, arg in (("quantize", q, v), ("dequantize", d, qv)):
                ts = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(arg))
                    ts.append(time.perf_counter() - t0)
                kind = "signed" if signed else "unsigned"
                out[f"{label}_{kind}{suffix}_ns"] = statistics.median(ts) / n * 1e9
    return out


def run(names: list[str] | None, rounds: int, iters: int, size: str = "cpu") -> dict[str, Any]:
    d, layers = model.SIZES[size]
    params = model.random_tree(model.model_shapes(d, layers), 0, 0.02)
    grads = model.random_tree(model.model_shapes(d, layers), 1, 1e-2)
    results = []
    for name, (base, options) in FAMILIES.items():
        if names and name not in names:
            continue
        factory = getattr(rlx_optax, name)
        configs = {"float32": factory(LR, **base)}
        configs |= {label: factory(LR, **base, **extra) for label, extra in options.items()}
        times = time_configs(configs, params, grads, rounds, iters)
        entry: dict[str, Any] = {
            "name": name,
            "float32_ms": statistics.median(times["float32"]) * 1e3,
        }
        for label in options:
            ratios = [t / f for t, f in zip(times[label], times["float32"], strict=True)]
            entry[f"{label}_over_float32"] = statistics.median(ratios)
        results.append(entry)
    return {
        "benchmark": "precision_speed",
        "device": jax.devices()[0].device_kind,
        "size": size,
        "n_params": sum(x.size for x in jax.tree.leaves(params)),
        "rounds": rounds,
        "iters": iters,
        "codec": time_codec(1 << 22, rounds),
        "results": results,
    }


def table(payload: dict[str, Any]) -> str:
    lines = [
        "| algorithm | bf16+SR / float32 | q8 / float32 | q4 / float32 |",
        "|---|---:|---:|---:|",
    ]
    for r in payload["results"]:
        cells = [
            f"{r[k]:.2f}" if k in r else "-"
            for k in ("bf16_over_float32", "q8_over_float32", "q4_over_float32")
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="families (default: all)")
    ap.add_argument("--size", choices=sorted(model.SIZES), default="cpu", help="model tree")
    args = ap.parse_args(argv)
    payload = run(args.only, args.rounds, args.iters, args.size)
    path = harness.write_json("precision_speed", payload)
    print(table(payload))
    print({k: round(v, 2) for k, v in payload["codec"].items()}, "ns/element")
    print(f"({payload['n_params'] / 1e6:.2f}M params; wrote {path.name})")
    return payload


if __name__ == "__main__":
    main()
