"""Convergence at reduced state precision: AdamW, Lion, Muon, SOAP and Kron with float32,
bfloat16, 8-bit and 4-bit state.

The digits MLP and the character-level transformer of `benchmarks/convergence.py` (the same
sizes, data and seeds), each family at its registry `train_lr` (`convergence.base_lr(row,
learned=True)`: AdamW 3e-3, Lion 1e-3, Muon 3e-3, SOAP 1e-2, Kron 9e-2) and its factory's
defaults otherwise, with its moments (momentum) stored as

- ``float32``: the default;
- ``bf16+sr``: ``mu_dtype = bfloat16`` (and ``nu_dtype`` where the factory takes one),
  ``stochastic_rounding=True``;
- ``bf16-nearest`` (AdamW only): the same, rounded to nearest (what stochastic rounding
  replaces);
- ``q8``: ``mu_dtype = "q8"`` (and ``nu_dtype`` where taken): 8-bit block-wise; leaves under
  4096 elements stay float32 (the digits MLP quantizes its (64, 128) layer, the transformer
  its matrices). A factory that refuses a storage is recorded as not supported, with its
  message;
- ``q4``: the same with ``"q4"`` (4-bit block-wise codes, blocks of at most 128).

and, for AdamW, with bfloat16 *parameters* (gradients in bfloat16, moments float32, the loss
evaluated on the bfloat16 parameters), the parameter update applied

- ``bf16 params, nearest``: by `optax.apply_updates` (rounded to nearest);
- ``bf16 params, sr``: by `rlx_optax.apply_updates_stochastic` (rounded stochastically).

Reports the final validation loss (mean and sample standard deviation over the seeds), its
difference from float32 and the issue's verdict: a low-precision run is within the bound when
``|mean - mean_float32| <= max(2 * sqrt(se^2 + se_float32^2), 0.01 * mean_float32)`` with
``se = std / sqrt(seeds)``, and beside it the standard error of the per-seed difference
(``paired se``: the seeds share data and initialization, so a shift of a few paired standard
errors is real even inside the bound). Run: ``python benchmarks/precision_convergence.py [--small]
[--problems digits charlm] [--families adamw lion muon soap kron] [--variants float32 q4]
[--merge]``; writes ``benchmarks/out/precision_convergence.json`` after every family
(``--merge`` keeps the entries of an earlier run that this run does not redo, variant by
variant; ``--variants`` runs only the named variants, float32 always among them).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
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

# family -> (registry name, factory arguments besides the state precision)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {"weight_decay": 0.01}),
    "lion": ("lion", {}),
    "muon": ("muon", {}),
    "soap": ("soap", {}),
    "kron": ("kron_psgd", {}),
}


def variants(family: str) -> dict[str, dict[str, Any]]:
    """The state-precision arguments of each variant, as far as ``family``'s factory takes
    them (``nu_dtype`` only where it has a second moment argument)."""
    takes = inspect.signature(registry.get(FAMILIES[family][0]).factory).parameters

    def both(dtype, **extra):
        kw = {"mu_dtype": dtype, **extra}
        if "nu_dtype" in takes:
            kw["nu_dtype"] = dtype
        return kw

    out: dict[str, dict[str, Any]] = {
        "float32": {},
        "bf16+sr": both(jnp.bfloat16, stochastic_rounding=True),
    }
    if family == "adamw":
        out["bf16-nearest"] = both(jnp.bfloat16)
    out["q8"] = both("q8")
    out["q4"] = both("q4")
    return out


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


def summary(finals: list[float], seconds: float) -> dict[str, Any]:
    return {
        "final": finals,
        "mean": float(np.mean(finals)),
        "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
        "seconds": round(seconds, 1),
    }


def verdict(r: dict[str, Any], ref: dict[str, Any], seeds: int) -> None:
    """Add the difference from float32 (``ref``) and the issue's bound to ``r``."""
    se = math.hypot(r["std"], ref["std"]) / math.sqrt(seeds)
    bound = max(2 * se, 0.01 * abs(ref["mean"]))
    r["minus_float32"] = r["mean"] - ref["mean"]
    r["bound"] = bound
    r["within"] = bool(abs(r["minus_float32"]) <= bound)
    # The seeds share their data and initialization: the standard error of the per-seed
    # difference is the sharper (paired) measure of a shift, reported beside the verdict.
    diff = np.asarray(r["final"]) - np.asarray(ref["final"])
    r["paired_se"] = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0


def run_family(
    problem, steps, eval_every, data, family, seeds, log=print, only=None, previous=None
) -> dict[str, Any]:
    """The variants of `family` on `problem`; with `only`, just those (and float32), the
    others copied from `previous` (an earlier run's results of this family) where it has
    them."""
    row = registry.get(FAMILIES[family][0])
    base = FAMILIES[family][1]
    lr = convergence.base_lr(row, learned=True)
    res: dict[str, Any] = {}

    def skipped(name):
        if only is None or name == "float32" or name in only:
            return False
        if previous and name in previous:
            res[name] = previous[name]
        return True

    for name, kw in variants(family).items():
        if skipped(name):
            continue
        try:
            row.factory(lr, **base, **kw)
        except ValueError as e:  # the factory refuses this precision
            res[name] = {"supported": False, "reason": str(e)}
            log(f"  {problem.name} {family} {name}: not supported")
            continue

        def make(learning_rate, kw=kw):
            return row.factory(learning_rate, **base, **kw)

        t0 = time.perf_counter()
        train = convergence.make_train(problem, row, steps, eval_every, make)
        finals = []
        for s, (params, batches) in data.items():
            curve = np.asarray(train(jnp.float32(lr), params, batches, s), np.float64)
            finals.append(float(curve[-1]))
        res[name] = summary(finals, time.perf_counter() - t0)
        log(f"  {problem.name} {family} {name}: {res[name]['mean']:.4f} ({res[name]['seconds']} s)")
    if family == "adamw":
        for name, apply in PARAM_VARIANTS.items():
            if skipped(name):
                continue
            t0 = time.perf_counter()
            train = make_train_bf16(problem, steps, apply)
            finals = [
                float(train(jnp.float32(lr), params, batches, s))
                for s, (params, batches) in data.items()
            ]
            res[name] = summary(finals, time.perf_counter() - t0)
            log(f"  {problem.name} {family} {name}: {res[name]['mean']:.4f}")
    for name, r in res.items():
        if name != "float32" and r.get("supported", True):
            verdict(r, res["float32"], seeds)
    return {"lr": lr, "results": res}


def run(
    small: bool = False,
    problems: list[str] | None = None,
    families: list[str] | None = None,
    payload: dict[str, Any] | None = None,
    write: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    size = convergence.SIZES["small" if small else "full"]
    families = families or list(FAMILIES)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {list(FAMILIES)}")
    out: dict[str, Any] = payload or {}
    out.update(benchmark="precision_convergence", seeds=size["seeds"])
    out.setdefault("problems", {})
    for problem, steps, eval_every in convergence.build_problems(size)[:2]:
        if problems and problem.name not in problems:
            continue
        data = {s: (problem.init(s), problem.batches(s)) for s in range(size["seeds"])}
        entry = out["problems"].setdefault(problem.name, {})
        entry["steps"] = steps
        entry.setdefault("families", {})
        for family in families:
            previous = entry["families"].get(family, {}).get("results")
            entry["families"][family] = run_family(
                problem,
                steps,
                eval_every,
                data,
                family,
                size["seeds"],
                only=only,
                previous=previous,
            )
            if write:
                harness.write_json("precision_convergence", out)
    return out


def table(payload: dict[str, Any]) -> str:
    lines = [
        f"| problem | family (lr) | state | final val loss (mean ± std, {payload['seeds']} seeds) "
        "| minus float32 | bound | within | paired se |",
        "|---|---|---|---:|---:|---:|:---:|---:|",
    ]
    for pname, p in payload["problems"].items():
        for family, f in p.get("families", {}).items():
            for name, r in f["results"].items():
                head = f"| {pname} ({p['steps']} steps) | {family} ({f['lr']:g}) | {name} "
                if not r.get("supported", True):
                    lines.append(head + "| not supported | | | | |")
                    continue
                if name == "float32":
                    lines.append(head + f"| {r['mean']:.4f} ± {r['std']:.4f} | | | | |")
                    continue
                lines.append(
                    head + f"| {r['mean']:.4f} ± {r['std']:.4f} | {r['minus_float32']:+.4f} "
                    f"| {r['bound']:.4f} | {'yes' if r['within'] else 'NO'} "
                    f"| {r['paired_se']:.4f} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--problems", nargs="*", help="charlm, digits (default: both)")
    ap.add_argument(
        "--families", nargs="*", default=list(FAMILIES), help=f"default: {' '.join(FAMILIES)}"
    )
    ap.add_argument("--variants", nargs="*", help="run only these variants (and float32), e.g. q4")
    ap.add_argument(
        "--merge", action="store_true", help="keep the earlier JSON's entries not redone here"
    )
    args = ap.parse_args(argv)
    payload = None
    path = harness.OUT_DIR / "precision_convergence.json"
    if args.merge and path.exists():
        payload = json.loads(path.read_text())
        payload.pop("machine", None)
        if "families" not in next(iter(payload.get("problems", {}).values()), {"families": 1}):
            payload = None  # the AdamW-only format of earlier runs: start afresh
    payload = run(args.small, args.problems, args.families, payload, True, args.variants)
    path = harness.write_json("precision_convergence", payload)
    print(table(payload))
    print(f"(wrote {path.name})")
    return payload


if __name__ == "__main__":
    main()
