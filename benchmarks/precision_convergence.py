"""Convergence at reduced state precision: AdamW with float32, bfloat16 and 8-bit moments.

The digits MLP and the character-level transformer of `benchmarks/convergence.py` (the same
sizes, data and seeds), AdamW at the registry's `train_lr` (3e-3) and weight decay 0.01, with
its moments stored as

- ``float32``: the default;
- ``bf16+sr``: ``mu_dtype = nu_dtype = bfloat16, stochastic_rounding=True``;
- ``bf16-nearest``: the same, rounded to nearest (what stochastic rounding replaces);
- ``q8``: ``mu_dtype = nu_dtype = "q8"`` (8-bit block-wise; leaves under 4096 elements stay
  float32: the digits MLP quantizes its (64, 128) layer, the transformer its matrices).

and, with bfloat16 *parameters* (gradients in bfloat16, moments float32, the loss evaluated
on the bfloat16 parameters), the parameter update applied

- ``bf16 params, nearest``: by `optax.apply_updates` (rounded to nearest);
- ``bf16 params, sr``: by `rlx_optax.apply_updates_stochastic` (rounded stochastically).

Reports the final validation loss (mean and standard deviation over the seeds) and its
difference from float32. Run: ``python benchmarks/precision_convergence.py [--small]``;
writes ``benchmarks/out/precision_convergence.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    from benchmarks import convergence, harness
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import convergence, harness

import rlx_optax
from rlx_optax._src import registry

VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {},
    "bf16+sr": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16, "stochastic_rounding": True},
    "bf16-nearest": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    "q8": {"mu_dtype": "q8", "nu_dtype": "q8"},
}


PARAM_VARIANTS = {
    "bf16 params, nearest": lambda p, u, t: optax.apply_updates(p, u),
    "bf16 params, sr": rlx_optax.apply_updates_stochastic,
}


def make_train_bf16(problem, steps: int, apply) -> Any:
    """A jitted ``(lr, params, batches, seed) -> final eval loss`` with bfloat16 parameters."""

    def train(lr, params, batches, seed):
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        tx = rlx_optax.adamw(lr, weight_decay=0.01, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
        state = tx.init(params)

        def step(carry, xs):
            params, state = carry
            t, batch = xs
            grads = jax.grad(problem.loss)(params, batch)
            updates, state = tx.update(grads, state, params)
            return (apply(params, updates, t), state), None

        (params, _), _ = jax.lax.scan(step, (params, state), (jnp.arange(steps), batches))
        return problem.eval_loss(params, seed)

    return jax.jit(train)


def run(small: bool = False, problems: list[str] | None = None) -> dict[str, Any]:
    size = convergence.SIZES["small" if small else "full"]
    row = registry.get("adamw")
    lr = convergence.base_lr(row, learned=True)
    out: dict[str, Any] = {
        "benchmark": "precision_convergence",
        "lr": lr,
        "seeds": size["seeds"],
        "problems": {},
    }
    for problem, steps, eval_every in convergence.build_problems(size)[:2]:
        if problems and problem.name not in problems:
            continue
        data = {s: (problem.init(s), problem.batches(s)) for s in range(size["seeds"])}
        res = {}
        for name, kw in VARIANTS.items():

            def make(learning_rate, kw=kw):
                return rlx_optax.adamw(learning_rate, weight_decay=0.01, **kw)

            train = convergence.make_train(problem, row, steps, eval_every, make)
            finals = []
            for s, (params, batches) in data.items():
                curve = np.asarray(train(jnp.float32(lr), params, batches, s), np.float64)
                finals.append(float(curve[-1]))
            res[name] = {
                "final": finals,
                "mean": float(np.mean(finals)),
                "std": float(np.std(finals)),
            }
        for name, apply in PARAM_VARIANTS.items():
            train = make_train_bf16(problem, steps, apply)
            finals = [
                float(train(jnp.float32(lr), params, batches, s))
                for s, (params, batches) in data.items()
            ]
            res[name] = {
                "final": finals,
                "mean": float(np.mean(finals)),
                "std": float(np.std(finals)),
            }
        for name in res:
            res[name]["minus_float32"] = res[name]["mean"] - res["float32"]["mean"]
        out["problems"][problem.name] = {"steps": steps, "results": res}
    return out


def table(payload: dict[str, Any]) -> str:
    lines = [
        f"| problem | state | final val loss (mean ± std, {payload['seeds']} seeds) "
        "| minus float32 |",
        "|---|---|---:|---:|",
    ]
    for pname, p in payload["problems"].items():
        for name, r in p["results"].items():
            lines.append(
                f"| {pname} ({p['steps']} steps) | {name} | {r['mean']:.4f} ± {r['std']:.4f} "
                f"| {r['minus_float32']:+.4f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--problems", nargs="*", help="charlm, digits (default: both)")
    args = ap.parse_args(argv)
    payload = run(args.small, args.problems)
    path = harness.write_json("precision_convergence", payload)
    print(table(payload))
    print(f"(AdamW lr {payload['lr']}; wrote {path.name})")
    return payload


if __name__ == "__main__":
    main()
