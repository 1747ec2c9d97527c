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

Run: ``python benchmarks/memory.py [--small]``; writes ``benchmarks/out/memory.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax

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
    args = ap.parse_args(argv)
    payload = run(0.001 if args.small else 1.0, args.only)
    path = harness.write_json("memory", payload)
    print(table(payload))
    print(f"({payload['n_params'] / 1e6:.1f}M params; wrote {path.name})")
    return payload


if __name__ == "__main__":
    main()
