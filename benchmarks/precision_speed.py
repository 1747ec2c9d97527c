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
materialised array, never fused with the elementwise pass that consumes it, and it merges no
two outputs into one loop. So an 8-bit step makes several passes over each leaf where the
float32 step makes one per output: block maxima of the gradient and of the stored codes, the
parameter update, one encoding per moment, each decoding again. `xla_floor_adamw` times that
pass structure at its cheapest (linear codes, both block scales bounds, no bias correction),
and then with each of the two things the library adds (its codes; the second moment's exact
block maximum, one more reduction over the new moment) switched on: the second table.

Run: ``python benchmarks/precision_speed.py [--rounds N] [--only adamw lion ...] [--size
cpu|gpu]``; writes ``benchmarks/out/precision_speed.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

try:
    from benchmarks import harness, model
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import harness, model

import rlx_optax
from rlx_optax._src.transforms import _lowbit

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


class _FloorState(NamedTuple):
    count: jax.Array
    moments: Any  # per leaf: (m codes, m scale, v codes, v scale), or (m, v) in float32


def xla_floor_adamw(
    lr: float,
    *,
    library_codes: bool = False,
    exact_second_max: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """A lower bound, not an optimizer: the AdamW step with 8-bit moments at its cheapest in
    XLA, to measure what a CPU 8-bit step can reach at all.

    It keeps the passes any such step needs, given that XLA fuses no reduction with the pass
    that consumes it and no two outputs into one loop: a block maximum of the gradient, the
    largest stored code of each moment, the parameter update, one encoding per moment. It
    makes everything else as cheap as it can be: both block scales are bounds known before
    the new moments are (no pass over a new moment ahead of its encoding), and there is no
    bias correction. Leaves the library keeps in float32 (`_lowbit.quantizes`) stay float32.

    - `library_codes` False: both moments in linear 8-bit codes, a multiply and a round.
      Linear codes are known to diverge for second moments; that does not matter for a
      timing. True: the library's codes (`_lowbit._encode` / `_decode`).
    - `exact_second_max` True: the second moment scaled by its exact block maximum, as the
      library does, instead of a bound (one more reduction, over the new moment).
    """

    def decode(codes, signed):
        if library_codes:
            return _lowbit._decode(codes, signed)
        return codes.astype(jnp.float32) / (127 if signed else 255)

    def encode(y, signed):
        if library_codes:
            return _lowbit._encode(y, signed)
        return jnp.round(y * (127 if signed else 255)).astype(jnp.int8 if signed else jnp.uint8)

    def init(params):
        def leaf(p):
            if not _lowbit.quantizes(p):
                return (jnp.zeros_like(p), jnp.zeros_like(p))  # two buffers (donated)
            scales = _lowbit._blocks(p)[0].shape[:-1]
            return (
                jnp.zeros(p.shape, jnp.int8),
                jnp.zeros(scales, jnp.float32),
                jnp.zeros(p.shape, jnp.uint8),
                jnp.zeros(scales, jnp.float32),
            )

        return _FloorState(jnp.zeros([], jnp.int32), jax.tree.map(leaf, params))

    def update(grads, state, params):
        def leaf(g, st, p):
            if len(st) == 2:
                m, v = b1 * st[0] + (1 - b1) * g, b2 * st[1] + (1 - b2) * g * g
                return -lr * (m / (jnp.sqrt(v) + eps) + 1e-4 * p), (m, v)
            m_codes, ms, v_codes, vs = st
            (mc, last), (vc, _), (gb, _) = (_lowbit._blocks(x) for x in (m_codes, v_codes, g))
            gmax = jnp.max(jnp.abs(gb), axis=-1)
            top_m = jnp.maximum(jnp.max(mc, axis=-1), -jnp.min(mc, axis=-1))
            m = b1 * decode(mc, True) * ms[..., None] + (1 - b1) * gb
            v = b2 * decode(vc, False) * vs[..., None] + (1 - b2) * gb * gb
            ms2 = b1 * ms * decode(top_m, True) + (1 - b1) * gmax
            if exact_second_max:
                vs2 = jnp.max(v, axis=-1)
            else:
                vs2 = b2 * vs * decode(jnp.max(vc, axis=-1), False) + (1 - b2) * gmax**2
            u = _lowbit._unblocks(-lr * (m / (jnp.sqrt(v) + eps)), last) - lr * 1e-4 * p
            mc2 = encode(m * (1 / jnp.where(ms2 > 0, ms2, 1))[..., None], True)
            vc2 = encode(v * (1 / jnp.where(vs2 > 0, vs2, 1))[..., None], False)
            return u, (_lowbit._unblocks(mc2, last), ms2, _lowbit._unblocks(vc2, last), vs2)

        g_leaves, treedef = jax.tree.flatten(grads)
        moments = treedef.flatten_up_to(state.moments)
        leaves = zip(g_leaves, moments, treedef.flatten_up_to(params), strict=True)
        pairs = [leaf(*a) for a in leaves]
        updates = treedef.unflatten([u for u, _ in pairs])
        moments = treedef.unflatten([m for _, m in pairs])
        return updates, _FloorState(state.count + 1, moments)

    return optax.GradientTransformation(init, update)


#: The floor configurations timed beside AdamW: label -> `xla_floor_adamw` switches.
FLOORS = {
    "floor8": {},
    "floor8_exact_max": {"exact_second_max": True},
    "floor8_library_codes": {"library_codes": True},
    "floor8_library_codes_exact_max": {"library_codes": True, "exact_second_max": True},
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


def run(
    names: list[str] | None,
    rounds: int,
    iters: int,
    size: str = "cpu",
    codec_elements: int = 1 << 22,
) -> dict[str, Any]:
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
        if name == "adamw":
            configs |= {label: xla_floor_adamw(LR, **kw) for label, kw in FLOORS.items()}
        times = time_configs(configs, params, grads, rounds, iters)
        entry: dict[str, Any] = {
            "name": name,
            "float32_ms": statistics.median(times["float32"]) * 1e3,
        }
        for label in [c for c in configs if c != "float32"]:
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
        "codec": time_codec(codec_elements, rounds),
        "results": results,
    }


_FLOOR_ROWS = {
    "floor8": "linear codes, both scales bounds (the floor)",
    "floor8_exact_max": "linear codes, exact second-moment maximum",
    "floor8_library_codes": "the library's codes, both scales bounds",
    "floor8_library_codes_exact_max": "the library's codes, exact second-moment maximum",
    "q8": 'the library\'s AdamW, `mu_dtype="q8", nu_dtype="q8"`',
}


def table(payload: dict[str, Any]) -> str:
    lines = [
        f"Device {payload['device']}; {payload['n_params'] / 1e6:.2f}M parameters "
        f"(`--size {payload['size']}`); each configuration's step time over the float32 "
        f"step, median of {payload['rounds']} paired rounds. The second table: the 8-bit "
        "AdamW step's pass structure at its cheapest in XLA (`xla_floor_adamw`), then with "
        "the library's codes and its exact second-moment maximum.",
        "",
        "| algorithm | bf16+SR / float32 | q8 / float32 | q4 / float32 |",
        "|---|---:|---:|---:|",
    ]
    for r in payload["results"]:
        cells = [
            f"{r[k]:.2f}" if k in r else "-"
            for k in ("bf16_over_float32", "q8_over_float32", "q4_over_float32")
        ]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    adamw = next((r for r in payload["results"] if r["name"] == "adamw"), None)
    if adamw is not None and "floor8_over_float32" in adamw:
        lines += ["", "| AdamW step with 8-bit moments | / float32 |", "|---|---:|"]
        for key, label in _FLOOR_ROWS.items():
            lines.append(f"| {label} | {adamw[f'{key}_over_float32']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="families (default: all)")
    ap.add_argument("--size", choices=sorted(model.SIZES), default="cpu", help="model tree")
    args = ap.parse_args(argv)
    codec = 1 << 16 if args.size == "small" else 1 << 22  # elements timed in the codecs
    payload = run(args.only, args.rounds, args.iters, args.size, codec)
    path = harness.write_json("precision_speed", payload)
    print(table(payload))
    print({k: round(v, 2) for k, v in payload["codec"].items()}, "ns/element")
    print(f"({payload['n_params'] / 1e6:.2f}M params; wrote {path.name})")
    return payload


if __name__ == "__main__":
    main()
