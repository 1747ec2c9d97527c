"""Memory: optimizer-state bytes per parameter, and the peak memory of a donated step.

Every registry row (and optax's version of the same rule, where `elementwise.OPTAX_PEERS` has
one) on the model of `elementwise.model_params` (about 10.5M float32 parameters: an
(8192, 512) embedding, two transformer blocks, vectors). Nothing is allocated: the state is
sized with `jax.eval_shape`, and the step's memory comes from XLA's compile-time analysis of
the jitted ``update + apply_updates`` that donates params and state:

- ``state_bytes_per_param``: bytes of optimizer state over the number of parameters
  (4 = one float32 buffer per parameter);
- ``peak_over_params``: (arguments + outputs - donated aliases + temporaries) over the
  parameter bytes, the resident memory of one step in units of the model (params, grads and
  state included: Adam is at least 4);
- ``temp_over_params``: the temporaries alone. A lax.cond branch's buffer counts whether or
  not it runs (LAMB's masked-norm fallback, taken only for non-finite gradients).

``--precision`` instead tabulates the state bytes per parameter of every family with its
moments in float32 (the default), bfloat16 (stochastic rounding), 8-bit block-wise (``"q8"``)
and 4-bit block-wise (``"q4"``) storage, where the family offers it, on the transformer tree of
`benchmarks/model.py` (d=256, 4 layers: 3.1M parameters); the bytes are counted from the state
pytree itself (every array leaf, the per-block scales of quantized moments included), each
element at its dtype's bit width: a 4-bit code counts half a byte (JAX's ``nbytes`` and
``itemsize`` say one byte, but XLA stores int4 two per byte). AdamW's q4 state is also sized
by XLA's compiled memory analysis of its jitted ``init`` (``adamw_q4_compiled``), as a check
of that count. Writes ``benchmarks/out/memory_precision.json``.

Run: ``python benchmarks/memory.py [--small] [--precision]``; writes
``benchmarks/out/memory.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp

try:
    from benchmarks import elementwise, harness
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import elementwise, harness

from rlx_optax._src import registry

LR = 1e-3


def abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def measure(tx, params: Any, grads: Any, extra: dict[str, Any]) -> dict[str, float]:
    n = elementwise.n_params(params)
    param_bytes = elementwise.n_bytes(params)
    state = jax.eval_shape(tx.init, params)
    state_bytes = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "size")
    )
    step = elementwise.make_step(tx)
    mem = step.lower(params, state, grads, extra).compile().memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return {
        "state_bytes": state_bytes,
        "state_bytes_per_param": state_bytes / n,
        "peak_bytes": peak,
        "peak_over_params": peak / param_bytes,
        "temp_over_params": mem.temp_size_in_bytes / param_bytes,
    }


# The storage arguments per family: bf16 (with stochastic rounding where the family has it),
# 8-bit and 4-bit; None where the family has no such option. "mu only": the family stores
# only its first moment in the chosen dtype (its other state is float32 or matrix statistics).
_BF16 = jnp.bfloat16
_TWO_MOMENTS = {
    "bf16": {"mu_dtype": _BF16, "nu_dtype": _BF16, "stochastic_rounding": True},
    "q8": {"mu_dtype": "q8", "nu_dtype": "q8"},
    "q4": {"mu_dtype": "q4", "nu_dtype": "q4"},
}
PRECISIONS: dict[str, dict[str, dict[str, Any] | None]] = {
    **{name: _TWO_MOMENTS for name in ("adam", "adamw", "nadamw", "radam", "qhadamw", "lamb")},
    "sgd": {
        "bf16": {"accumulator_dtype": _BF16, "stochastic_rounding": True},
        "q8": {"accumulator_dtype": "q8"},
        "q4": {"accumulator_dtype": "q4"},
    },
    "lion": {
        "bf16": {"mu_dtype": _BF16, "stochastic_rounding": True},
        "q8": {"mu_dtype": "q8"},
        "q4": {"mu_dtype": "q4"},
    },
    "sophia": {
        "bf16": {"mu_dtype": _BF16, "stochastic_rounding": True},
        "q8": {"mu_dtype": "q8"},
        "q4": {"mu_dtype": "q4"},
    },
    **{
        name: {
            "bf16": {"mu_dtype": _BF16, "stochastic_rounding": True},
            "q8": {"mu_dtype": "q8"},
            "q4": {"mu_dtype": "q4"},
        }
        for name in ("muon", "kron_psgd")
    },
    # MARS: mu_dtype rounded to nearest, no q8 yet
    "mars": {
        "bf16": {**_TWO_MOMENTS["bf16"], "prev_grad_dtype": _BF16},
        "q8": {**_TWO_MOMENTS["q8"], "prev_grad_dtype": "q8"},
        "q4": {**_TWO_MOMENTS["q4"], "prev_grad_dtype": "q4"},
    },
    "soap": _TWO_MOMENTS,
    **{name: {"bf16": None, "q8": None, "q4": None} for name in ("adafactor", "stiefel")},
}
# Rows with a configuration of their own: Adafactor keeps a momentum only when asked.
EXTRA_ROWS = {
    "adafactor (momentum 0.9)": (
        "adafactor",
        {"momentum": 0.9},
        {
            "bf16": {"mu_dtype": _BF16, "stochastic_rounding": True},
            "q8": {"mu_dtype": "q8"},
            "q4": {"mu_dtype": "q4"},
        },
    )
}
PARTIAL = {
    "adafactor": "no first moment unless momentum is set (next row)",
    "adafactor (momentum 0.9)": "the momentum; the factored second moment float32",
    "sophia": "mu only (h float32)",
    "muon": "momentum",
    "mars": "mu, nu and the previous gradient",
    "kron_psgd": "momentum; the factors float32",
    "soap": "mu and nu; statistics and bases float32",
}


def element_bytes(dtype: Any) -> float:
    """Bytes per element at the dtype's bit width: 0.5 for int4 (XLA packs two per byte;
    ``dtype.itemsize`` says 1)."""
    dt = jnp.dtype(dtype)
    if jnp.issubdtype(dt, jnp.integer):
        return jnp.iinfo(dt).bits / 8
    if jnp.issubdtype(dt, jnp.floating):
        return jnp.finfo(dt).bits / 8
    return float(dt.itemsize)


def state_bytes(tx, params: Any) -> float:
    """Bytes of every array leaf of `tx.init(params)` (shapes only, nothing allocated), each
    element at its dtype's bit width (`element_bytes`)."""
    state = jax.eval_shape(tx.init, params)
    return sum(
        x.size * element_bytes(x.dtype) for x in jax.tree.leaves(state) if hasattr(x, "size")
    )


def compiled_state_bytes(tx, params: Any) -> int:
    """The output bytes of the compiled ``jit(tx.init)`` by XLA's memory analysis."""
    return jax.jit(tx.init).lower(params).compile().memory_analysis().output_size_in_bytes


def run_precision(d: int = 256, layers: int = 4, peaks: bool = False) -> dict[str, Any]:
    """State bytes per parameter of every family and storage (`PRECISIONS`); with `peaks`,
    also the peak memory of its donated jitted step over the parameter bytes (``<label>_peak``,
    XLA's compiled memory analysis: one compilation per family and storage)."""
    try:
        from benchmarks import model
    except ImportError:  # run as a script
        import model  # type: ignore[no-redef]

    shapes = model.model_shapes(d, layers)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    n = elementwise.n_params(params)
    results = []
    configs = [
        (
            row.name,
            row,
            elementwise.OPTAX_PEERS.get(row.name, ({}, None))[0],
            PRECISIONS[row.name],
        )  # sgd: momentum 0.9, as the optax peer
        for row in registry.ALGORITHMS
    ]
    configs += [
        (label, registry.get(name), base, options)
        for label, (name, base, options) in EXTRA_ROWS.items()
    ]
    for name, row, base, options in configs:
        entry: dict[str, Any] = {"name": name}
        update_extra = {}
        if peaks and row.update_extra:  # the extra `update` arguments only need their shapes
            update_extra = jax.eval_shape(row.update_extra, params, params)
        for label, extra in (("float32", {}), *options.items()):
            if extra is None:
                entry[label] = None
                continue
            tx = row.factory(LR, **base, **extra)
            entry[label] = state_bytes(tx, params) / n
            if peaks:
                entry[f"{label}_peak"] = measure(tx, params, params, update_extra)[
                    "peak_over_params"
                ]
        entry["note"] = PARTIAL.get(name, "")
        results.append(entry)
    adamw = registry.get("adamw").factory(LR, **_TWO_MOMENTS["q4"])
    return {
        "benchmark": "memory_precision",
        "adamw_q4_compiled": compiled_state_bytes(adamw, params) / n,
        "n_params": n,
        "d": d,
        "layers": layers,
        "results": results,
    }


_STORAGES = ("float32", "bf16", "q8", "q4")


def _storage_rows(payload: dict[str, Any], cell, missing: str, note: bool) -> list[str]:
    """One table row per family: `cell(row, storage)` for each storage it offers."""
    out = []
    for r in payload["results"]:
        cells = [missing if r.get(k) is None else cell(r, k) for k in _STORAGES]
        out.append(
            f"| {r['name']} | " + " | ".join(cells) + (f" | {r['note']} |" if note else " |")
        )
    return out


def precision_table(payload: dict[str, Any]) -> str:
    lines = [
        f"State bytes per parameter on the transformer tree of `benchmarks/model.py` (d="
        f"{payload['d']}, {payload['layers']} layers, {payload['n_params'] / 1e6:.2f}M "
        "parameters), every array leaf of the state counted at its dtype's bit width (AdamW "
        f"with 4-bit moments by XLA's compiled `init`: {payload['adamw_q4_compiled']:.3f}):",
        "",
        "| algorithm | float32 | bf16 | 8-bit (q8) | 4-bit (q4) | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    lines += _storage_rows(payload, lambda r, k: f"{r[k]:.3f}", "not supported", note=True)
    if all("float32_peak" in r for r in payload["results"]):
        lines += [
            "",
            "Peak memory of a donated jitted step (params, gradients, state, outputs and "
            "temporaries, by XLA's compiled memory analysis) over the parameters' bytes:",
            "",
            "| algorithm | float32 | bf16 | 8-bit (q8) | 4-bit (q4) |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += _storage_rows(payload, lambda r, k: f"{r[f'{k}_peak']:.2f}", "-", note=False)
    return "\n".join(lines)


def run(scale: float = 1.0, names: list[str] | None = None) -> dict[str, Any]:
    concrete = elementwise.model_params(scale)
    params, grads = abstract(concrete), abstract(elementwise.grads_like(concrete))
    results = []
    for row in registry.ALGORITHMS:
        if names is not None and row.name not in names:
            continue
        kwargs, peer = elementwise.OPTAX_PEERS.get(row.name, ({}, None))
        extra = {}
        if row.update_extra:  # the extra arguments only need their shapes
            extra = abstract(row.update_extra(concrete, concrete))
        entry = {
            "name": row.name,
            "matrix": row.matrix,
            **measure(row.factory(LR, **kwargs), params, grads, extra),
        }
        if peer is not None:
            entry["optax"] = measure(peer(), params, grads, {})
        results.append(entry)
    return {
        "benchmark": "memory",
        "n_params": elementwise.n_params(concrete),
        "shapes": {k: list(v.shape) for k, v in concrete.items()},
        "results": results,
    }


def table(payload: dict[str, Any]) -> str:
    lines = [
        "| algorithm | state bytes/param | peak / params | temporaries / params "
        "| optax state bytes/param | optax peak / params |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in payload["results"]:
        o = r.get("optax")
        lines.append(
            f"| {r['name']} | {r['state_bytes_per_param']:.2f} | {r['peak_over_params']:.2f} | "
            f"{r['temp_over_params']:.2f} | "
            + (
                f"{o['state_bytes_per_param']:.2f} | {o['peak_over_params']:.2f} |"
                if o
                else "- | - |"
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    ap.add_argument("--only", nargs="*", help="registry names (default: all)")
    ap.add_argument(
        "--precision", action="store_true", help="state bytes per parameter by state dtype"
    )
    args = ap.parse_args(argv)
    if args.precision:
        payload = run_precision(*((32, 2) if args.small else (256, 4)), peaks=True)
        path = harness.write_json("memory_precision", payload)
        print(precision_table(payload))
        print(f"({payload['n_params'] / 1e6:.2f}M params; wrote {path.name})")
        return payload
    payload = run(0.001 if args.small else 1.0, args.only)
    path = harness.write_json("memory", payload)
    print(table(payload))
    print(f"({payload['n_params'] / 1e6:.1f}M params; wrote {path.name})")
    return payload


if __name__ == "__main__":
    main()
