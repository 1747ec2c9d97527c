"""Load the crate's golden trajectories and replay them through the pure transforms.

`python -m tests.golden` prints the worst error of every case.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import optax

from rlx_optax._src import registry

GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "rlx_optim"
if not GOLDEN_DIR.exists():  # the repository checked out beside `shared/`
    GOLDEN_DIR = (
        pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "golden" / "rlx_optim"
    )


def manifest() -> list[dict]:
    return json.loads((GOLDEN_DIR / "manifest.json").read_text())


def load(case: dict) -> dict[str, dict[str, np.ndarray]]:
    data = np.load(GOLDEN_DIR / f"{case['case']}.npz")
    names = [t["name"] for t in case["tensors"]]
    return {
        "init": {n: data[f"init/{n}"] for n in names},
        "grads": {n: data[f"grads/{n}"] for n in names},
        "traj": {n: data[f"traj/{n}"] for n in names},
    }


def relative_error(traj: dict, ref: dict, init: dict) -> dict[str, float]:
    """`max|p - p_ref| / max|p_ref - p_init|` per tensor, over the whole trajectory."""
    out = {}
    for name in ref:
        num = np.max(np.abs(traj[name] - ref[name]))
        den = np.max(np.abs(ref[name] - init[name][None]))
        out[name] = float(num / den) if den > 0 else float(num)
    return out


def replay_pure(case: dict, data: dict) -> dict[str, np.ndarray]:
    """Run the case through `registry.get(case["optimizer"]).from_crate(**hparams)`."""
    row = registry.get(case["optimizer"])
    hparams = dict(case["hparams"])
    hessian_init = hparams.pop("hessian_init", 1.0)
    tx = row.from_crate(**hparams)
    params = {n: jax.numpy.asarray(v) for n, v in data["init"].items()}
    state = tx.init(params)
    step = jax.jit(tx.update)
    traj = {n: [] for n in params}
    for k in range(case["steps"]):
        grads = {n: jax.numpy.asarray(g[k]) for n, g in data["grads"].items()}
        extra = {}
        if row.crate_name == "sophia" and k == 0:
            extra["hessian_diag"] = jax.tree.map(
                lambda p: np.full(p.shape, hessian_init, np.float32), params
            )
        updates, state = step(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        for n in params:
            traj[n].append(np.asarray(params[n]))
    return {n: np.stack(v) for n, v in traj.items()}


def main() -> None:
    known = set(registry.names()) | {a.crate_name for a in registry.ALGORITHMS}
    for case in manifest():
        if case["optimizer"] not in known:
            print(f"{case['case']:20s} (not registered yet)")
            continue
        data = load(case)
        err = relative_error(replay_pure(case, data), data["traj"], data["init"])
        worst = max(err.values())
        print(
            f"{case['case']:20s} worst {worst:.2e}  "
            + "  ".join(f"{k}={v:.1e}" for k, v in err.items())
        )


if __name__ == "__main__":
    main()
