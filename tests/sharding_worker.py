"""Run every registered algorithm sharded over 8 fake CPU devices; print one JSON report.

`tests/test_sharding.py` runs this file in a subprocess (the device count is fixed when JAX
starts, so it cannot be changed inside the pytest process). Usage::

    python tests/sharding_worker.py --mesh auto|explicit [--only adamw,lion]
        [--variant-layouts ci|all]

For each algorithm and mesh kind it builds one parameter tree whose leaves carry every layout
of `LAYOUTS` (matrices sharded on rows, on columns and on both, replicated matrices, vectors
replicated and sharded, a scalar, a 3-D leaf), and checks:

* `init` outside `jax.jit` and inside it give state leaves sharded like their parameter
  (inside `jax.jit` on an Auto mesh XLA chooses, so that case is recorded, not required);
* `STEPS` jitted steps (`update` + `apply_updates`, no in/out shardings given) keep every
  parameter and every state leaf of the parameter's shape sharded like the parameter, and
  scalar state replicated. The exception: on an Auto mesh the families with owner compute
  (`OWNER_FAMILIES`: whole matrices exchanged with owner devices, `transforms/_owner.py`) give
  their results the exchange's layout where the compiler's propagation prefers it, so their
  step is pinned to the parameters' shardings and `rlx_optax.state_shardings`, as
  docs/scaling.md asks of such steps; the state is then checked against those;
* parameters and state agree with the same steps run on a single device, within the row's
  `golden_tol` relative to the displacement (parameters) or to the magnitude (state): the
  sharded program sums partial reductions (norms, matmuls) in another order, so bit equality
  is not expected for the matrix families.

When the combined tree fails with an exception, each layout is run alone to say which fail.
With the Explicit mesh, `VARIANTS` (options of the matrix families whose code paths the
contract options skip) are run the same way, on `VARIANT_LAYOUTS` (every layout with
``--variant-layouts all``), and reported under ``variants``.
The last line of stdout is ``SHARDING_REPORT <json>``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rlx_optax  # noqa: E402
from rlx_optax._src import registry  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

STEPS = 3
MESH_SHAPE = (4, 2)
AXES = ("data", "model")
ALL = ("data", "model")  # both mesh axes on one dimension: 8-way

# name -> (shape, partition spec). Every dimension divides its mesh axes.
LAYOUTS: dict[str, tuple[tuple[int, ...], P]] = {
    "w_rows": ((16, 16), P(ALL, None)),
    "w_cols": ((16, 16), P(None, ALL)),
    "w_both": ((16, 16), P("data", "model")),
    "w_tall": ((32, 16), P("data", None)),
    "w_wide": ((16, 32), P(None, ALL)),
    "w_replicated": ((8, 12), P()),
    "b_replicated": ((16,), P()),
    "b_sharded": ((32,), P(ALL)),
    "scalar": ((), P()),
    "t_sharded": ((8, 3, 4), P("data", None, None)),
}


def make_mesh(kind: str) -> jax.sharding.Mesh:
    axis_type = AxisType.Explicit if kind == "explicit" else AxisType.Auto
    return jax.make_mesh(MESH_SHAPE, AXES, axis_types=(axis_type,) * len(AXES))


def host_values(names: list[str], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=LAYOUTS[n][0]).astype(np.float32) + np.float32(0.5) for n in names}


def make_tx(row: registry.Algorithm) -> optax.GradientTransformationExtraArgs:
    return row.factory(row.contract_lr, **row.contract_kwargs)


#: Families whose whole-matrix work runs on owner devices on an Auto mesh (`_owner`).
OWNER_FAMILIES = {"muon", "soap", "kron_psgd", "stiefel"}


def make_step(row, tx, out_shardings=None):
    def step(params, state, grads):
        extra = row.update_extra(params, grads) if row.update_extra else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return jax.jit(step) if out_shardings is None else jax.jit(step, out_shardings=out_shardings)


#: State fields of the matrix families that hold per-axis preconditioner matrices.
PRECONDITIONER_FIELDS = {"stats", "bases", "factors"}


def leaf_name(path) -> str | None:
    """The parameter a state leaf mirrors: its path ends with a `DictKey` naming a layout.

    Moments (`mu['w_rows']`) end with the parameter's key. Preconditioner matrices, one tree
    per axis (`stats[0]['w_rows']`, `factors[1]['w_rows']`), are free to take another layout
    (a square parameter's factor has its shape, not its role).
    """
    fields = {k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)}
    if fields & PRECONDITIONER_FIELDS:
        return None
    if path and isinstance(path[-1], jax.tree_util.DictKey) and path[-1].key in LAYOUTS:
        return path[-1].key
    return None


def check_shardings(mesh, where: str, params, state, problems: list[str]) -> int:
    """Append mismatches to `problems`; return how many state leaves were checked."""
    checked = 0
    for name, p in params.items():
        want = NamedSharding(mesh, LAYOUTS[name][1])
        if not p.sharding.is_equivalent_to(want, p.ndim):
            problems.append(f"{where}: param {name} has {p.sharding.spec}, want {want.spec}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if not isinstance(leaf, jax.Array) or not jnp.issubdtype(leaf.dtype, jnp.number):
            continue
        name = leaf_name(path)
        label = jax.tree_util.keystr(path)
        if name is not None and leaf.shape == params[name].shape and leaf.ndim > 0:
            checked += 1
            if not leaf.sharding.is_equivalent_to(params[name].sharding, leaf.ndim):
                problems.append(
                    f"{where}: state {label} has {leaf.sharding.spec}, "
                    f"param {name} has {params[name].sharding.spec}"
                )
        elif leaf.ndim == 0 and not leaf.sharding.is_fully_replicated:
            problems.append(f"{where}: scalar state {label} is not replicated")
    return checked


def relative_error(got, want, scale) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.size == 0:
        return 0.0
    if not np.array_equal(np.isfinite(got), np.isfinite(want)):
        return float("inf")
    finite = np.isfinite(want)
    return float(np.max(np.abs(got - want)[finite], initial=0.0) / max(scale, 1e-30))


def leaf_errors(row, p0, ref_params, ref_state, params, state) -> dict[str, float]:
    """Relative error of every parameter (of the displacement) and float state leaf."""
    errors = {}
    for name in ref_params:
        disp = float(np.max(np.abs(np.asarray(ref_params[name]) - p0[name]), initial=0.0))
        errors[f"param {name}"] = relative_error(params[name], ref_params[name], disp)
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(ref_state), jax.tree.leaves(state), strict=True
    ):
        if not hasattr(want, "dtype") or not jnp.issubdtype(want.dtype, jnp.number):
            continue
        label = f"state {jax.tree_util.keystr(path)}"
        if jnp.issubdtype(want.dtype, jnp.integer):
            same = np.array_equal(np.asarray(got), np.asarray(want))
            errors[label] = 0.0 if same else float("inf")
            continue
        scale = float(np.max(np.abs(np.asarray(want, np.float64)), initial=0.0))
        errors[label] = relative_error(got, want, scale)
    return errors


def compare(row, p0, reference, params, state, problems: list[str]) -> float:
    ref_params, ref_state = reference
    if len(jax.tree.leaves(ref_state)) != len(jax.tree.leaves(state)):
        problems.append("the state has another structure than on a single device")
        return float("inf")
    worst = 0.0
    for label, err in leaf_errors(row, p0, ref_params, ref_state, params, state).items():
        worst = max(worst, err)
        if err > row.golden_tol:
            problems.append(f"{label}: error {err:.3g} > {row.golden_tol:g}")
    return worst


def run_single(row, names: list[str]):
    """The reference: the same steps on one device, no mesh."""
    tx = make_tx(row)
    step = make_step(row, tx)
    params = {n: jnp.asarray(v) for n, v in host_values(names, 0).items()}
    state = tx.init(params)
    for i in range(STEPS):
        grads = {n: jnp.asarray(v) for n, v in host_values(names, 100 + i).items()}
        params, state = step(params, state, grads)
    return jax.device_get(params), jax.device_get(state)


def run_sharded(row, names: list[str], mesh, reference=None) -> dict:
    problems: list[str] = []
    p0 = host_values(names, 0)
    reference = reference or run_single(row, names)
    tx = make_tx(row)
    step = make_step(row, tx)

    def place(values):
        return {n: jax.device_put(v, NamedSharding(mesh, LAYOUTS[n][1])) for n, v in values.items()}

    pinned = None
    with jax.set_mesh(mesh):
        params = place(p0)
        if row.name in OWNER_FAMILIES and mesh_kind(mesh) == "auto":
            param_shardings = jax.tree.map(lambda p: p.sharding, params)
            pinned = (param_shardings, rlx_optax.state_shardings(tx, params))
            step = make_step(row, tx, out_shardings=pinned)
        eager = tx.init(params)
        checked = check_shardings(mesh, "init (eager)", params, eager, problems)
        if mesh_kind(mesh) == "explicit":
            # sharding is part of the type: a jitted init must keep it too (on an Auto mesh
            # XLA chooses and replicates constants; docs/scaling.md says how to place them)
            check_shardings(mesh, "init (jit)", params, jax.jit(tx.init)(params), problems)
        # Start from the eager state: on an Auto mesh the jitted init is replicated, and
        # stepping from it would compile the step twice (the state comes back sharded). A
        # pinned step starts from the eager state placed as it pins it, for the same reason
        # (Kron's eager factors are replicated, its pinned ones split).
        state = eager if pinned is None else jax.device_put(eager, pinned[1])
        for i in range(STEPS):
            params, state = step(params, state, place(host_values(names, 100 + i)))
            checked_after = check_shardings(mesh, f"step {i + 1}", params, state, problems)
        worst = compare(row, p0, reference, params, state, problems)
    return {
        "ok": not problems,
        "problems": problems,
        "state_leaves_checked": checked_after,
        "state_leaves_checked_init": checked,
        "worst_relative_error": worst,
        "tolerance": row.golden_tol,
        "layouts": names,
    }


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def run_algorithm(row, mesh, names: list[str] | None = None) -> dict:
    names = list(LAYOUTS) if names is None else names
    try:
        return run_sharded(row, names, mesh, reference=REFERENCES.get(row.name))
    except Exception as exc:  # one layout at a time, to say which ones fail
        failed = {}
        for name in names:
            try:
                result = run_sharded(row, [name], mesh)
                if not result["ok"]:
                    failed[name] = "; ".join(result["problems"])
            except Exception as inner:
                failed[name] = error_text(inner)
        return {
            "ok": False,
            "problems": [f"combined tree raised {error_text(exc)}"]
            + [f"layout {n}: {msg}" for n, msg in failed.items()],
            "failed_layouts": sorted(failed),
            "traceback": traceback.format_exc(limit=6)[-3000:],
        }


def optax_muon_comparison(mesh) -> dict:
    """optax.contrib.muon on a matrix whose contracting dimension is sharded, and ours."""
    shape, spec = LAYOUTS["w_both"]
    value = host_values(["w_both"], 0)["w_both"]
    out: dict = {"layout": str(spec), "mesh": mesh_kind(mesh)}
    with jax.set_mesh(mesh):
        params = {"w_both": jax.device_put(value, NamedSharding(mesh, spec))}
        candidates = {"optax.contrib.muon": optax.contrib.muon(0.02)}
        if "muon" in registry.names():
            candidates["rlx_optax.muon"] = make_tx(registry.get("muon"))
        for label, tx in candidates.items():
            try:
                updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
                out[label] = {
                    "raised": None,
                    "finite": bool(jnp.all(jnp.isfinite(updates["w_both"]))),
                    "sharding": str(updates["w_both"].sharding.spec),
                }
            except Exception as exc:
                out[label] = {"raised": type(exc).__name__, "message": error_text(exc)}
    return out


def stiefel_owner_state(mesh) -> dict:
    """Stiefel with its momentum kept on the owner devices (``state_placement="owner"``) on an
    Auto mesh: after `STEPS` pinned steps the parameters agree with the same steps on one
    device, and the owned matrices' momentum lies in buffers split row by row over the mesh."""
    row = registry.get("stiefel")
    names = ["w_rows", "w_both", "w_wide", "b_sharded"]
    p0 = host_values(names, 0)
    tx = rlx_optax.stiefel(row.contract_lr, momentum=0.9, state_placement="owner")
    single = make_step(row, tx)
    want = {n: jnp.asarray(v) for n, v in p0.items()}
    want_state = tx.init(want)
    for i in range(STEPS):
        grads = {n: jnp.asarray(v) for n, v in host_values(names, 100 + i).items()}
        want, want_state = single(want, want_state, grads)

    def place(values):
        return {n: jax.device_put(v, NamedSharding(mesh, LAYOUTS[n][1])) for n, v in values.items()}

    with jax.set_mesh(mesh):
        params = place(p0)
        pinned = (jax.tree.map(lambda p: p.sharding, params), rlx_optax.state_shardings(tx, params))
        state = jax.jit(tx.init, out_shardings=pinned[1])(params)
        step = make_step(row, tx, out_shardings=pinned)
        for i in range(STEPS):
            params, state = step(params, state, place(host_values(names, 100 + i)))
    placed = state[0]
    errors = {}
    for n in names:
        disp = float(np.max(np.abs(np.asarray(want[n]) - p0[n]), initial=0.0))
        errors[n] = relative_error(params[n], want[n], disp)
    return {
        "placed": type(placed).__name__,
        "owned_leaves": len(placed.owned.directory.entries),
        "buffers": [str(b.sharding.spec) for b in placed.owned.buffers],
        "errors": errors,
        "tolerance": row.golden_tol,
    }


def mesh_kind(mesh) -> str:
    return "explicit" if AxisType.Explicit in mesh.axis_types else "auto"


REFERENCES: dict[str, tuple] = {}

# Options of the matrix families that take code paths the registry's contract options do not
# (SOAP's contract rotates no axis of these layouts: max_precond_dim=6), run on an Explicit
# mesh, where every product over a sharded axis must name its output sharding.
#
# Every configuration is well-posed, so the sharded run must agree with one device to rounding
# on every machine: SOAP's eigenbases are canonical (signs, null-space completion), and the
# crate-order variant takes eps = 0.1. With the crate's eps = 1e-8 its first step is chaotic
# (the rotated first gradient is diagonal up to float32 rounding, which Adam maps to +-1;
# docs/numerics.md), so no two programs that round differently agree there.
VARIANTS: dict[str, dict[str, dict]] = {
    "soap": {
        "rotated": {"max_precond_dim": None, "eps": 0.1},
        "reference": {
            "skip_first_step": True,
            "reproject_moments": True,
            "refresh": "qr",
            "max_precond_dim": 16,
            "precondition_nd": True,
        },
    },
    "kron_psgd": {
        "reference_diagonal": {
            "factor_update": "reference",
            "precondition_nd": True,
            "max_size_triangular": 8,
            "clip_mode": "rms",
        },
    },
}


#: The layouts the variants run on in CI: rows, columns, both, a tall matrix whose long side
#: the reference variant leaves unrotated, a sharded vector and the 3-D leaf (``--variant-layouts
#: all`` adds the wide and replicated matrices, the replicated vector and the scalar: slow).
VARIANT_LAYOUTS = ["w_rows", "w_cols", "w_both", "w_tall", "b_sharded", "t_sharded"]


def run_variants(names: list[str], layouts: list[str]) -> dict:
    """Every `VARIANTS` entry of the algorithms in `names` on an Explicit mesh, on `layouts`."""
    mesh = make_mesh("explicit")
    out: dict = {}
    for name in names:
        for label, kwargs in VARIANTS.get(name, {}).items():
            row = dataclasses.replace(
                registry.get(name), contract_kwargs={**registry.get(name).contract_kwargs, **kwargs}
            )
            REFERENCES.pop(row.name, None)
            start = time.perf_counter()
            result = run_algorithm(row, mesh, layouts)
            result["seconds"] = round(time.perf_counter() - start, 2)
            out[f"{name}:{label}"] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mesh", default="auto,explicit", help="comma-separated mesh kinds")
    parser.add_argument("--only", default="", help="comma-separated algorithm names")
    parser.add_argument("--variant-layouts", default="ci", choices=["ci", "all"])
    args = parser.parse_args()
    if jax.device_count() != 8:
        raise SystemExit(f"expected 8 devices, got {jax.device_count()}")
    kinds = [k for k in args.mesh.split(",") if k]
    only = [n for n in args.only.split(",") if n]
    rows = [r for r in registry.ALGORITHMS if not only or r.name in only]
    report: dict = {"devices": jax.device_count(), "steps": STEPS, "layouts": {}}
    report["layouts"] = {n: [list(shape), str(spec)] for n, (shape, spec) in LAYOUTS.items()}
    for row in rows:
        try:
            REFERENCES[row.name] = run_single(row, list(LAYOUTS))
        except Exception:  # the single-device run failing is reported by run_algorithm
            pass
    for kind in kinds:
        mesh = make_mesh(kind)
        report[kind] = {}
        for row in rows:
            start = time.perf_counter()
            report[kind][row.name] = run_algorithm(row, mesh)
            report[kind][row.name]["seconds"] = round(time.perf_counter() - start, 2)
        if kind == "auto" and any(row.name == "stiefel" for row in rows):
            report["stiefel_owner_state"] = stiefel_owner_state(mesh)
        if kind == "explicit":
            report["muon_comparison"] = optax_muon_comparison(mesh)
            layouts = VARIANT_LAYOUTS if args.variant_layouts == "ci" else list(LAYOUTS)
            report["variants"] = run_variants([row.name for row in rows], layouts)
    sys.stdout.flush()
    print("SHARDING_REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
