"""Every registered algorithm on one transformer-shaped model, against its peer and its floor.

The tree is what users train: ``layers`` blocks of ``qkv (d, 3d)``, ``o (d, d)``,
``up (d, 4d)``, ``down (4d, d)`` and two ``(d,)`` norm scales (many leaves, four matrix
shapes). Sizes follow the backend: d=256, 4 layers (3.1M float32 parameters, 24 leaves) on a
CPU; d=1024, 24 layers (302M, 144 leaves) on a GPU or TPU. Each row times a jitted scan of
`STEPS` steps (``update + apply_updates``, params and state donated, two gradients taken
in turn so that nothing is hoisted out of the loop; SOAP's refresh every 10 steps is
amortised) and reports ratios measured in this process (DESIGN.md, Performance
method):

- ``ours/peer``: over optax's version of the same rule (sgd, adam, adamw, nadamw, radam,
  lamb, lion, adafactor, contrib.muon) or psgd-jax's ``kron`` (``pip install .[bench]``),
  configured to the same hyperparameters;
- ``ours/floor``: over the floor: for element-wise rules the memory-traffic floor (params
  read+write, gradient read, parameter-sized state read+write, at the copy bandwidth measured
  here); for matrix families the larger of that and counted FLOPs / GEMM rate measured here
  at the precision the row uses;
- ``batched/per-leaf``: Muon, SOAP and Kron with same-shaped matrices batched into one
  computation per shape (as shipped on accelerators; forced on a CPU, where the library runs
  leaf by leaf) over the same transform run leaf by leaf (`per_leaf`);
- ``kernels/leaf``: top-level kernels (fusions, copies, library calls) of the compiled single
  step, per parameter leaf, for the element-wise rules (ours and optax's).

On an accelerator it writes ``model_<platform>.json`` (the device named), so the CPU section
of RESULTS.md and the GPU one coexist.

Run: ``python -m benchmarks.model [--small] [--size cpu|gpu] [--only NAMES]``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

# LAPACK calls (Kron's triangular solves, SOAP's eigh) run single-threaded: on a busy or
# shared CPU OpenBLAS's spinning threads made a (128, 128) triangular solve 1000x slower
# (30 ms instead of 30 us), which would time the machine's load, not the algorithm.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

try:
    from benchmarks import elementwise, harness, kron_soap
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import elementwise, harness, kron_soap

import rlx_optax
from rlx_optax._src import registry
from rlx_optax._src.transforms import _batching

LR = 1e-3
STEPS = 10  # steps per timed scan (SOAP's precond_freq: one refresh per scan)
SIZES = {"cpu": (256, 4), "gpu": (1024, 24), "small": (32, 2)}
HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- the model


def model_shapes(d: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        shapes |= {
            f"layer{i:02d}/qkv": (d, 3 * d),
            f"layer{i:02d}/o": (d, d),
            f"layer{i:02d}/up": (d, 4 * d),
            f"layer{i:02d}/down": (4 * d, d),
            f"layer{i:02d}/norm1": (d,),
            f"layer{i:02d}/norm2": (d,),
        }
    return shapes


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float) -> dict[str, Any]:
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: scale * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }


def matrices(params: dict[str, Any]) -> list[tuple[int, int]]:
    return [tuple(p.shape) for p in jax.tree.leaves(params) if p.ndim == 2]


# --------------------------------------------------------------------------- floors


def gemm_rate(n: int, dtype: Any = jnp.float32, precision: Any = None) -> float:
    """FLOP/s of a jitted (n, n) @ (n, n) product at `precision` (default: the backend's)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=precision))
    return 2 * n**3 / harness.time_fn(lambda: f(a, b), warmup=2, iters=10, min_time=0.2)


def muon_flops(shapes: list[tuple[int, int]], steps: int = 5) -> float:
    return sum(steps * (4.0 * min(s) ** 2 * max(s) + 2.0 * min(s) ** 3) for s in shapes)


def stiefel_flops(shapes: list[tuple[int, int]]) -> float:
    """Wide matrices (rows <= cols): W G^T, sym(.) W, and Gram-Schmidt (about 2 r^2 c)."""
    return sum(6.0 * r * r * c for r, c in shapes if r <= c)


# --------------------------------------------------------------------------- transforms


def per_leaf(make: Callable[[], optax.GradientTransformation], params: Any) -> Any:
    """`make()` applied to every leaf on its own (one transform per leaf, no batching)."""
    names = list(params)
    return optax.partition({n: make() for n in names}, {n: n for n in names})


def psgd_kron_pair():
    """(ours in psgd-jax's configuration, psgd-jax kron) or None when psgd-jax is missing."""
    peer = kron_soap.load_psgd_jax()
    if peer is None:
        return None
    # the reference preset; factors updated every step, as psgd-jax is configured below
    ours = rlx_optax.kron_psgd(
        LR, behaviour="reference", key=jax.random.key(0), update_probability=1.0
    )
    theirs = peer(LR, b1=0.9, preconditioner_update_probability=1.0)
    return ours, theirs


def cases(params: Any, names: list[str] | None) -> list[dict[str, Any]]:
    """One dict per timed configuration: name, variant, tx, peer, floor kind, extra."""
    grads_probe = params
    out = []
    for row in registry.ALGORITHMS:
        if names is not None and row.name not in names:
            continue
        extra = row.update_extra(params, grads_probe) if row.update_extra else {}
        base = {"name": row.name, "extra": extra, "floor": "memory"}
        if not row.matrix:
            kwargs, peer = elementwise.OPTAX_PEERS.get(row.name, ({}, None))
            if row.name == "adafactor":
                rule = {"factored": "last_two", "factored_normalization": "mean"}
                out.append({**base, "variant": "crate default", "tx": row.factory(), "peer": None})
                out.append(
                    {
                        **base,
                        "variant": "fixed lr, paper clipping",
                        "tx": row.factory(LR, clipping_rule="paper", **rule),
                        "peer": optax.adafactor(
                            LR, min_dim_size_to_factor=1, multiply_by_parameter_scale=False
                        ),
                        "peer_name": "optax.adafactor",
                    }
                )
                continue
            out.append(
                {
                    **base,
                    "variant": ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "default",
                    "tx": row.factory(LR, **kwargs),
                    "peer": peer() if peer else None,
                    "peer_name": f"optax.{row.name}" if peer else None,
                    "kernels": True,
                }
            )
            continue
        mat = {**base, "floor": "matmul"}
        if row.name == "muon":
            # default: crate-exact float32 products (HIGHEST); "default" precision is the
            # backend's (TF32 on NVIDIA GPUs, what optax.contrib.muon uses); bfloat16 is the
            # reference's cast
            flops = muon_flops(matrices(params))
            for variant, kw, rate in (
                ("default (float32, HIGHEST)", {}, "highest"),
                ("precision=DEFAULT", {"precision": "default"}, "default"),
                ("ns_dtype=bfloat16", {"ns_dtype": jnp.bfloat16}, "bfloat16"),
            ):
                out.append(
                    {
                        **mat,
                        "variant": variant,
                        "tx": rlx_optax.muon(LR, **kw),
                        "per_leaf": (lambda kw=kw: rlx_optax.muon(LR, **kw)) if not kw else None,
                        "peer": optax.contrib.muon(LR),
                        "peer_name": "optax.contrib.muon",
                        "flops": flops,
                        "rate": rate,
                    }
                )
        elif row.name == "soap":
            flops = sum(kron_soap.soap_flops(*s) for s in matrices(params))
            for variant, kw in (("default (eigh refresh)", {}), ("refresh=qr", {"refresh": "qr"})):
                out.append(
                    {
                        **mat,
                        "variant": variant,
                        "tx": rlx_optax.soap(LR, **kw),
                        "per_leaf": (lambda kw=kw: rlx_optax.soap(LR, **kw)),
                        "peer": None,
                        "flops": flops,
                    }
                )
        elif row.name == "kron_psgd":
            flops = sum(kron_soap.kron_flops(*s) for s in matrices(params))
            out.append(
                {
                    **mat,
                    "variant": "crate default",
                    "tx": rlx_optax.kron_psgd(LR),
                    "per_leaf": lambda: rlx_optax.kron_psgd(LR),
                    "peer": None,
                    "flops": flops,
                }
            )
            pair = psgd_kron_pair()
            if pair is not None:
                out.append(
                    {
                        **mat,
                        "variant": "psgd-jax configuration",
                        "tx": pair[0],
                        "peer": pair[1],
                        "peer_name": "psgd_jax.kron",
                        "flops": flops,
                        "rate": "default",  # reference mode: psgd-jax's HIGH/DEFAULT products
                    }
                )
        elif row.name == "stiefel":
            out.append(
                {
                    **mat,
                    "variant": "default",
                    "tx": rlx_optax.stiefel(LR),
                    "peer": None,
                    "flops": stiefel_flops(matrices(params)),
                }
            )
        else:
            out.append({**base, "variant": "default", "tx": row.factory(LR), "peer": None})
    return out


# --------------------------------------------------------------------------- timing


def make_block(tx: optax.GradientTransformation, extra: dict, steps: int) -> Callable:
    """A jitted scan of `steps` donated ``update + apply_updates``.

    `grads` holds two gradients per leaf (a leading axis of 2), taken in turn: with one fixed
    gradient XLA hoists whatever depends on the gradient alone out of the loop (Adafactor's
    row and column means of g^2, for one), and the step would not be timed whole.
    """

    def block(params, state, grads):
        def body(carry, i):
            p, s = carry
            g = jax.tree.map(lambda x: x[i % 2], grads)
            u, s = tx.update(g, s, p, **extra)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), jnp.arange(steps))[0]

    return jax.jit(block, donate_argnums=(0, 1))


class Timed:
    """A compiled block and its carry; `once()` runs it and returns seconds per step."""

    def __init__(self, tx, params, grads, extra, steps):
        self.steps = steps
        self.block = make_block(tx, extra, steps)
        t0 = time.perf_counter()
        self.carry = harness.block((elementwise.fresh(params), tx.init(params)))
        self.carry = harness.block(self.block(*self.carry, grads))  # compiles
        self.compile_s = time.perf_counter() - t0
        self.grads = grads

    def once(self, iters: int) -> float:
        def run():
            self.carry = self.block(*self.carry, self.grads)
            return self.carry

        return harness.time_fn(run, warmup=1, iters=iters, min_time=0.2) / self.steps


def batched(c: dict, params: Any, grads: Any, steps: int) -> Timed:
    """Row `c`'s transform with same-shaped leaves batched whatever the backend (on a CPU the
    library runs them leaf by leaf; compiled inside the switch, which acts while tracing)."""
    with _batching.force_batching(True):
        return Timed(c["tx"], params, grads, c["extra"], steps)


_KERNEL = re.compile(
    r"^\s*(?:ROOT )?%[\w.\-]+ = \S+ (fusion|copy|custom-call|dot|convolution|"
    r"reduce|scatter|gather|sort|all-reduce|dynamic-update-slice)\("
)


def kernels_per_leaf(tx, params, grads, extra) -> float:
    """Top-level kernels of the compiled single step (entry computation) per parameter leaf."""
    step = elementwise.make_step(tx)
    text = step.lower(params, tx.init(params), grads, extra).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    count = sum(1 for line in entry.splitlines() if _KERNEL.match(line))
    return count / len(jax.tree.leaves(params))


def run(size: str, names: list[str] | None, rounds: int, iters: int) -> dict[str, Any]:
    d, layers = SIZES[size]
    params = random_tree(model_shapes(d, layers), 0, 0.02)
    grads = random_tree(model_shapes(d, layers), 1, 1.0)
    # two gradients taken in turn by the timed scans (see `make_block`)
    pair = jax.tree.map(
        lambda a, b: jnp.stack([a, b]), grads, random_tree(model_shapes(d, layers), 2, 1.0)
    )
    n = elementwise.n_params(params)
    steps = 2 if size == "small" else STEPS
    gemm_n = min(4096, max(256, 4 * d))
    gemm = {"default": gemm_rate(gemm_n), "highest": gemm_rate(gemm_n, precision=HIGHEST)}
    gemm["bfloat16"] = gemm_rate(gemm_n, jnp.bfloat16)
    bandwidth = harness.copy_bandwidth(max(4 * 2**20, 4 * elementwise.n_bytes(params)))

    rows = cases(params, names)
    jobs: list[tuple[Any, Callable[[], Timed]]] = []
    for i, c in enumerate(rows):
        jobs.append(((i, "ours"), lambda c=c: Timed(c["tx"], params, pair, c["extra"], steps)))
        if c.get("peer") is not None:
            jobs.append(((i, "peer"), lambda c=c: Timed(c["peer"], params, pair, {}, steps)))
        if c.get("per_leaf") is not None:
            jobs.append(
                (
                    (i, "per_leaf"),
                    lambda c=c: Timed(
                        per_leaf(c["per_leaf"], params), params, pair, c["extra"], steps
                    ),
                )
            )
            if not _batching.batching_enabled():  # CPU: as shipped is leaf by leaf; force it
                jobs.append(((i, "batched"), lambda c=c: batched(c, params, pair, steps)))
    # the per-leaf overhead of the element-wise rules: adamw on one flat leaf of the same size
    if names is None or "adamw" in names:
        flat = {"all": jnp.zeros((n,), jnp.float32)}
        flat_grads = {
            "all": jnp.concatenate([g.reshape(2, -1) for g in jax.tree.leaves(pair)], axis=1)
        }
        adamw = optax.adamw(LR, weight_decay=0.01)
        jobs.append(("flat", lambda: Timed(adamw, flat, flat_grads, {}, steps)))
        jobs.append(("tree", lambda: Timed(adamw, params, pair, {}, steps)))

    # With several rounds every configuration stays compiled and resident and the rounds are
    # interleaved (the best median is kept, which discounts rounds disturbed by other load);
    # with one round (large models) each is timed and freed in turn.
    best: dict[Any, float] = {}
    compile_s: dict[Any, float] = {}
    resident: dict[Any, Timed] = {}
    for key, build in jobs:
        print(f"compiling {key} ...", flush=True)
        t = build()
        compile_s[key] = t.compile_s
        if rounds > 1:
            resident[key] = t
        else:
            best[key] = t.once(iters)
        del t
    for _ in range(rounds if rounds > 1 else 0):
        nb = max(4 * 2**20, 4 * elementwise.n_bytes(params))
        bandwidth = max(bandwidth, harness.copy_bandwidth(nb))
        for key, t in resident.items():
            best[key] = min(best.get(key, math.inf), t.once(iters))
    resident.clear()

    results = []
    for i, c in enumerate(rows):
        state = c["tx"].init(params)
        mem_floor = elementwise.floor_bytes(params, state) / bandwidth
        floor = mem_floor
        rate_key = c.get("rate", "highest" if c["floor"] == "matmul" else "default")
        if c["floor"] == "matmul":
            floor = max(mem_floor, c["flops"] / gemm[rate_key])
        ours = best[(i, "ours")]
        entry = {
            "name": c["name"],
            "variant": c["variant"],
            "step_ms": 1e3 * ours,
            "floor_ms": 1e3 * floor,
            "floor_kind": "memory" if floor == mem_floor else f"matmul ({rate_key})",
            "ours/floor": ours / floor,
            "compile_s": compile_s[(i, "ours")],
        }
        if (i, "peer") in best:
            entry |= {
                "peer": c["peer_name"],
                "peer_ms": 1e3 * best[(i, "peer")],
                "ours/peer": ours / best[(i, "peer")],
                "peer/floor": best[(i, "peer")] / floor,
            }
        if (i, "per_leaf") in best:
            batched_s = best.get((i, "batched"), ours)
            entry |= {
                "per_leaf_ms": 1e3 * best[(i, "per_leaf")],
                "batched_ms": 1e3 * batched_s,
                "batched/per-leaf": batched_s / best[(i, "per_leaf")],
            }
        if c.get("kernels"):
            entry["kernels/leaf"] = kernels_per_leaf(c["tx"], params, grads, c["extra"])
            if c.get("peer") is not None:
                entry["peer_kernels/leaf"] = kernels_per_leaf(c["peer"], params, grads, {})
        results.append(entry)
        print(
            f"{c['name']:>10} {c['variant']:<28} ours/floor {entry['ours/floor']:6.2f}"
            + (f"  ours/peer {entry['ours/peer']:5.2f}" if "ours/peer" in entry else "")
            + (
                f"  batched/per-leaf {entry['batched/per-leaf']:5.2f}"
                if "batched/per-leaf" in entry
                else ""
            ),
            flush=True,
        )
    payload = {
        "benchmark": "model",
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "size": size,
        "d": d,
        "layers": layers,
        "n_params": n,
        "n_leaves": len(jax.tree.leaves(params)),
        "steps_per_scan": steps,
        "rounds": rounds,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "gemm_GFLOPs": {k: v / 1e9 for k, v in gemm.items()},
        "results": results,
    }
    if "flat" in best:
        payload["adamw_one_flat_leaf/tree"] = best["flat"] / best["tree"]
    return payload


def table(payload: dict[str, Any]) -> str:
    lines = [
        "| algorithm | configuration | ours/floor | floor | peer | ours/peer | peer/floor "
        "| batched/per-leaf | kernels/leaf (ours, peer) |",
        "|---|---|---:|---|---|---:|---:|---:|---|",
    ]

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    for r in payload["results"]:
        kern = "-"
        if "kernels/leaf" in r:
            kern = f"{r['kernels/leaf']:.2f}, {fmt(r.get('peer_kernels/leaf'))}"
        lines.append(
            f"| {r['name']} | {r['variant']} | {fmt(r['ours/floor'])} | {r['floor_kind']} | "
            f"{r.get('peer', '-')} | {fmt(r.get('ours/peer'))} | {fmt(r.get('peer/floor'))} | "
            f"{fmt(r.get('batched/per-leaf'))} | {kern} |"
        )
    return "\n".join(lines)


def render(payload: dict[str, Any]) -> str:
    """The RESULTS.md section of one payload (the device named)."""
    ratio = payload.get("adamw_one_flat_leaf/tree")
    flat = (
        f" optax.adamw on the same parameters as one flat leaf runs at {ratio:.2f}x the "
        "time of the tree (the rest is per-leaf overhead)."
        if ratio
        else ""
    )
    return (
        f"Device: {payload['device']} ({payload['platform']}). Model: d={payload['d']}, "
        f"{payload['layers']} layers, {payload['n_params'] / 1e6:.1f}M float32 parameters in "
        f"{payload['n_leaves']} leaves; a jitted scan of {payload['steps_per_scan']} donated "
        f"steps (two gradients in turn), best of {payload['rounds']} interleaved rounds. "
        f"Copy bandwidth {payload['copy_bandwidth_GBps']:.1f} GB/s; GEMM "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in payload["gemm_GFLOPs"].items())
        + ". `floor`: memory floor, or counted FLOPs / GEMM rate at the row's precision when "
        "larger. `batched/per-leaf`: same-shaped matrices batched (as shipped on accelerators, "
        "forced on a CPU) over the same transform applied leaf by leaf. `kernels/leaf`: "
        "top-level kernels of the compiled single step per leaf." + flat + "\n\n" + table(payload)
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--size", choices=list(SIZES), help="default: by backend")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="registry names (default: all)")
    args = ap.parse_args(argv)
    size = "small" if args.small else args.size
    if size is None:
        size = "cpu" if jax.default_backend() == "cpu" else "gpu"
    iters = 2 if size == "small" else 3
    rounds = 1 if size == "small" else args.rounds
    t0 = time.perf_counter()
    payload = run(size, args.only, rounds, iters)
    payload["wall_s"] = time.perf_counter() - t0
    name = "model" if payload["platform"] == "cpu" else f"model_{payload['platform']}"
    path = harness.write_json(name, payload)
    print(render(payload))
    print(f"wrote {path.name} in {payload['wall_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
