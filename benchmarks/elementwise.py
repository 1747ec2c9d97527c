"""Element-wise families: step time of a jitted, donated ``update + apply_updates``.

Every registry row without a matrix path is timed on a model of about 10M float32 parameters
(a few matrices and vectors), and reported as two ratios measured in the same process
(docs/guides/benchmarks.md):

- ``ours/floor``: step time over the memory-traffic floor, the bytes a single fused pass must
  read and write (params read+write, gradient read, every parameter-sized state buffer
  read+write) divided by the copy bandwidth measured in this run;
- ``ours/optax``: step time over optax's implementation of the same rule, where optax has one
  (the peer is configured to the same hyperparameters and checked to give the same update).

Run: ``python benchmarks/elementwise.py [--small]``; writes ``benchmarks/out/elementwise.json``.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

try:
    from benchmarks import harness
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import harness

from rlx_optax._src import registry

LR = 1e-3

# optax's implementation of the same rule, by registry name: (our kwargs, optax factory).
# Hyperparameters are set so both compute the same update (checked by `check_same_update`).
OPTAX_PEERS: dict[str, tuple[dict[str, Any], Callable[[], optax.GradientTransformation]]] = {
    "sgd": ({"momentum": 0.9}, lambda: optax.sgd(LR, momentum=0.9)),
    "adam": ({}, lambda: optax.adam(LR)),
    "adamw": ({"weight_decay": 0.01}, lambda: optax.adamw(LR, weight_decay=0.01)),
    "nadamw": ({"weight_decay": 0.01}, lambda: optax.nadamw(LR, weight_decay=0.01)),
    "radam": ({"threshold": 5.0}, lambda: optax.radam(LR, threshold=5.0)),
    "lamb": ({"weight_decay": 0.01}, lambda: optax.lamb(LR, weight_decay=0.01)),
    "lion": ({"weight_decay": 0.01}, lambda: optax.lion(LR, weight_decay=0.01)),
}


def model_params(scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """A transformer-like pytree: embedding, two blocks of matrices, biases and norm scales.

    ``scale=1`` gives about 10.5M float32 parameters; smaller scales shrink every width.
    """
    d = max(8, int(512 * math.sqrt(scale)))
    vocab, hidden = 16 * d, 4 * d
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, d), "final_scale": (d,)}
    for i in range(2):
        shapes |= {
            f"block{i}/qkv": (d, 3 * d),
            f"block{i}/out": (d, d),
            f"block{i}/mlp_in": (d, hidden),
            f"block{i}/mlp_in_bias": (hidden,),
            f"block{i}/mlp_out": (hidden, d),
            f"block{i}/mlp_out_bias": (d,),
            f"block{i}/scale": (d,),
        }
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: 0.02 * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }


def n_params(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def n_bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def state_buffer_bytes(state: Any, params: Any) -> int:
    """Bytes of the optimizer state held in buffers of at least the smallest parameter leaf.

    Scalars (step counters, scheduled rates) are not traffic; parameter-sized moments are.
    """
    smallest = min(x.size for x in jax.tree.leaves(params))
    return sum(
        x.size * x.dtype.itemsize
        for x in jax.tree.leaves(state)
        if hasattr(x, "size") and x.size >= smallest
    )


def floor_bytes(params: Any, state: Any) -> int:
    """Bytes one fused pass must move: params read+write, grad read, state read+write."""
    return 3 * n_bytes(params) + 2 * state_buffer_bytes(state, params)


def make_step(tx: optax.GradientTransformation) -> Callable:
    """A jitted ``(params, state, grads, extra) -> (params, state)`` donating params and state.

    `extra` is a dict of additional `update` arguments (for example a Hessian estimate).
    """

    def step(params, state, grads, extra):
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def time_step_with(
    step: Callable, params: Any, state: Any, grads: Any, extra: dict | None = None, **kw: Any
) -> float:
    """Median seconds of one donated step; `grads` and `extra` are passed again every call."""
    carry = (params, state)
    extra = extra or {}

    def threaded(p, s):
        return step(p, s, grads, extra)

    return harness.time_step(threaded, carry, **kw)


def fresh(tree: Any) -> Any:
    """An independent copy (donation invalidates the buffers a step receives)."""
    return jax.tree.map(jnp.copy, tree)


def grads_like(params: Any, seed: int = 1) -> Any:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def check_same_update(ours, peer, params, grads, steps: int = 6) -> float:
    """Largest relative difference of the two updates over a few steps (a configuration check)."""
    s_ours, s_peer = ours.init(params), peer.init(params)
    worst = 0.0
    for _ in range(steps):
        u_ours, s_ours = ours.update(grads, s_ours, params)
        u_peer, s_peer = peer.update(grads, s_peer, params)
        for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_peer), strict=True):
            scale = float(jnp.max(jnp.abs(b))) or 1.0
            worst = max(worst, float(jnp.max(jnp.abs(a - b))) / scale)
    return worst


_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1}
_INSTR = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\((.*?)\)")
_ARRAY = re.compile(r"^(\w+)\[([\d,]*)\]")
# Instructions that move no data of their own (views, control flow, tuples).
_FREE = {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "conditional",
    "call",
    "while",
    "optimization-barrier",
    "opt-barrier",
}


def _array_bytes(shape: str) -> int:
    m = _ARRAY.match(shape)
    if not m or m.group(1) not in _DTYPE_BYTES:
        return 0
    dims = [int(d) for d in m.group(2).split(",") if d]
    return _DTYPE_BYTES[m.group(1)] * math.prod(dims)


def compiled_traffic(hlo_text: str, min_bytes: int = 0) -> dict[str, int]:
    """Bytes the compiled entry computation reads and writes, instruction by instruction.

    Each top-level fusion, copy or custom call counts its array operands once and its array
    result once; arrays under `min_bytes` (scalars, small vectors) are ignored. ``passes``
    counts the instructions that touch an array of at least `min_bytes`, ``copies`` the
    `copy` instructions among them (buffers duplicated to protect a donated input).
    """
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    shapes: dict[str, int] = {}
    moved = passes = copies = 0
    for line in entry.splitlines()[1:]:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        shapes[name] = _array_bytes(shape)
        if op in _FREE:
            continue
        sizes = [shapes.get(o.split()[-1], 0) for o in operands.split(", ") if o]
        sizes = [b for b in [*sizes, shapes[name]] if b >= max(min_bytes, 1)]
        if sizes:
            moved += sum(sizes)
            passes += 1
            copies += op == "copy"
    return {"bytes": moved, "passes": passes, "copies": copies}


# An instruction of the entry computation: its name, result shape (a tuple shape in
# parentheses) and opcode.
_ENTRY_INSTR = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\([^)]*\)|\S+?)(?:\{[^}]*\})? ([\w\-]+)\(")
# Instructions of the entry computation that launch nothing (views, tuples, inputs).
_NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def entry_kernels(hlo_text: str) -> list[tuple[str, str, str]]:
    """``(name, opcode, result shape)`` of every top-level instruction of the compiled entry
    computation that runs as a kernel or a runtime operation: fusions, copies, library calls,
    concatenates, conditionals (everything but parameters, constants, tuples and bitcasts).

    This counts more than `benchmarks.model.kernels_per_leaf`, which lists fusions, copies,
    reductions and library calls only (an unfused concatenate or a conditional is missing
    there).
    """
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    out = []
    for line in entry.splitlines()[1:]:
        m = _ENTRY_INSTR.match(line)
        if m and m.group(3) not in _NO_KERNEL:
            out.append((m.group(1), m.group(3), m.group(2)))
    return out


def step_hlo(tx: optax.GradientTransformation, params: Any, grads: Any, extra=None) -> str:
    """The compiled HLO text of the donated ``update + apply_updates`` step (`make_step`)."""
    step = make_step(tx)
    return step.lower(params, tx.init(params), grads, extra or {}).compile().as_text()


def kernel_census(tx, params: Any, grads: Any, extra=None) -> dict[str, Any]:
    """Kernels of the compiled donated step: the list, the count by opcode and per leaf."""
    kernels = entry_kernels(step_hlo(tx, params, grads, extra))
    n_leaves = len(jax.tree.leaves(params))
    by_op: dict[str, int] = {}
    for _, op, _ in kernels:
        by_op[op] = by_op.get(op, 0) + 1
    return {"kernels": kernels, "by_op": by_op, "per_leaf": len(kernels) / n_leaves}


def kernels_table(names: list[str] | None = None, size: str = "cpu", leaf=None) -> str:
    """Kernels per leaf of every element-wise rule and its optax peer on the model benchmark's
    transformer-shaped tree (`benchmarks.model`, sizes by `size`), as a Markdown table.

    With `leaf` (a shape) the kernels of each step on a tree of that one leaf are listed too.
    """
    from benchmarks import model  # imports this module

    d, layers = model.SIZES[size]
    shapes = model.model_shapes(d, layers)
    params = model.random_tree(shapes, 0, 0.02)
    grads = model.random_tree(shapes, 1, 1.0)
    one = {"w": jnp.full(tuple(leaf), 0.5, jnp.float32)} if leaf else None
    lines = [
        f"Model tree: d={d}, {layers} layers, {len(shapes)} leaves. `all`: every top-level "
        "instruction that runs (`entry_kernels`); `model.py`: the model benchmark's count.",
        "",
        "| algorithm | ours: all | ours: model.py | optax: all | optax: model.py |",
        "|---|---:|---:|---:|---:|",
    ]
    listings = []
    for row in elementwise_rows():
        if names is not None and row.name not in names:
            continue
        kwargs, peer = OPTAX_PEERS.get(row.name, ({}, None))
        pairs = [("ours", row.factory(LR, **kwargs), row.update_extra)]
        if peer is not None:
            pairs.append((f"optax.{row.name}", peer(), None))
        cells = []
        for label, tx, make_extra in pairs:
            extra = make_extra(params, grads) if make_extra else {}
            census = kernel_census(tx, params, grads, extra)
            metric = model.kernels_per_leaf(tx, params, grads, extra)
            cells += [f"{census['per_leaf']:.2f}", f"{metric:.2f}"]
            if one is not None:
                extra1 = make_extra(one, one) if make_extra else {}
                ks = entry_kernels(step_hlo(tx, one, one, extra1))
                listings.append(f"{row.name} ({label}), one leaf {tuple(leaf)}: {len(ks)}")
                listings += [f"    {op:<12} {shape:<28} {name}" for name, op, shape in ks]
        cells += ["-", "-"] * (2 - len(pairs))
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + listings if listings else []))


def elementwise_rows() -> list[registry.Algorithm]:
    return [row for row in registry.ALGORITHMS if not row.matrix]


def run(scale: float = 1.0, rounds: int = 3, iters: int = 20, names: list[str] | None = None):
    """Time every element-wise registry row (and its optax peer); return a JSON-able dict."""
    params = model_params(scale)
    grads = grads_like(params)
    n = n_params(params)
    rows = [r for r in elementwise_rows() if names is None or r.name in names]

    def build(row):
        kwargs, peer = OPTAX_PEERS.get(row.name, ({}, None))
        ours = row.factory(LR, **kwargs)
        extra = row.update_extra(params, grads) if row.update_extra else {}
        return ours, extra, (peer() if peer else None), kwargs

    built = {row.name: build(row) for row in rows}
    steps = {}
    for name, (ours, extra, peer, _) in built.items():
        steps[(name, "ours")] = (make_step(ours), ours, extra)
        if peer is not None:
            steps[(name, "optax")] = (make_step(peer), peer, {})
    smallest = min(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    traffic = {
        key: compiled_traffic(
            step.lower(params, tx.init(params), grads, extra).compile().as_text(), smallest
        )
        for key, (step, tx, extra) in steps.items()
    }

    # Interleave: every round measures the copy bandwidth and every step once; the best
    # (smallest) median over rounds is kept, which discounts rounds disturbed by other load.
    best: dict[Any, float] = {}
    bandwidth = 0.0
    for _ in range(rounds):
        # A buffer as large as an Adam step's working set (params, grads, two moments).
        bandwidth = max(bandwidth, harness.copy_bandwidth(max(4 * 2**20, 4 * n_bytes(params))))
        for key, (step, tx, extra) in steps.items():
            state = fresh(tx.init(params))
            t = time_step_with(step, fresh(params), state, grads, extra, iters=iters)
            best[key] = min(best.get(key, math.inf), t)

    results = []
    for name, (ours, _extra, peer, kwargs) in built.items():
        state = ours.init(params)
        fb = floor_bytes(params, state)
        floor_s = fb / bandwidth
        entry = {
            "name": name,
            "kwargs": kwargs,
            "step_ms": 1e3 * best[(name, "ours")],
            "floor_ms": 1e3 * floor_s,
            "floor_bytes": fb,
            "ours_over_floor": best[(name, "ours")] / floor_s,
            "compiled_traffic_over_floor": traffic[(name, "ours")]["bytes"] / fb,
            "compiled_copies": traffic[(name, "ours")]["copies"],
        }
        if peer is not None:
            entry |= {
                "optax_ms": 1e3 * best[(name, "optax")],
                "optax_over_floor": best[(name, "optax")] / floor_s,
                "ours_over_optax": best[(name, "ours")] / best[(name, "optax")],
                "optax_compiled_traffic_over_floor": traffic[(name, "optax")]["bytes"] / fb,
                "optax_compiled_copies": traffic[(name, "optax")]["copies"],
                "max_rel_diff_vs_optax": check_same_update(ours, peer, params, grads),
            }
        results.append(entry)
    return {
        "benchmark": "elementwise",
        "n_params": n,
        "param_bytes": n_bytes(params),
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "rounds": rounds,
        "results": results,
    }


def table(payload: dict[str, Any]) -> str:
    """A Markdown table of the ratios."""
    lines = [
        "| algorithm | ours/optax | ours/floor | optax/floor | traffic ours | traffic optax |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(x):
        return "-" if x is None else f"{x:.2f}"

    for r in payload["results"]:
        lines.append(
            f"| {r['name']} | {fmt(r.get('ours_over_optax'))} | {fmt(r['ours_over_floor'])} | "
            f"{fmt(r.get('optax_over_floor'))} | {fmt(r['compiled_traffic_over_floor'])} | "
            f"{fmt(r.get('optax_compiled_traffic_over_floor'))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="registry names to time (default: all)")
    ap.add_argument(
        "--kernels",
        action="store_true",
        help="print the kernels per leaf of each step on the model tree instead of timing",
    )
    ap.add_argument(
        "--leaf", type=int, nargs="*", help="with --kernels: list the kernels of a one-leaf tree"
    )
    args = ap.parse_args(argv)
    if args.kernels:
        print(kernels_table(args.only, "small" if args.small else "cpu", args.leaf))
        return {}
    payload = (
        run(scale=0.001, rounds=1, iters=3, names=args.only)
        if args.small
        else run(rounds=args.rounds, names=args.only)
    )
    path = harness.write_json("elementwise", payload)
    print(table(payload))
    print(f"({payload['n_params'] / 1e6:.1f}M params; wrote {path.name})")
    return payload


if __name__ == "__main__":
    main()
