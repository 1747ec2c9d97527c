"""Load the crate's golden trajectories and replay them through the pure transforms.

`python -m tests.golden` prints the worst error of every case.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import optax

from rlx_optax._src import registry

MISSING = (
    "golden trajectories not found: expected shared/golden/rlx_optim inside or beside the "
    "repository, or a folder named by RLX_OPTAX_GOLDEN_DIR"
)


def _find_golden_dir() -> pathlib.Path | None:
    repo = pathlib.Path(__file__).resolve().parents[1]
    candidates = (
        [pathlib.Path(os.environ["RLX_OPTAX_GOLDEN_DIR"])]
        if "RLX_OPTAX_GOLDEN_DIR" in os.environ
        else []
    )
    candidates += [
        repo / "shared" / "golden" / "rlx_optim",
        repo.parent / "shared" / "golden" / "rlx_optim",
    ]
    return next((c for c in candidates if (c / "manifest.json").is_file()), None)


GOLDEN_DIR = _find_golden_dir()


def manifest() -> list[dict]:
    """The cases, or [] when the folder is missing (the tests then skip with `MISSING`)."""
    if GOLDEN_DIR is None:
        return []
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


# The crate's SOAP takes its first step in the eigenbasis of the first gradient G, where G is
# diagonal up to float32 rounding (about 1e-7 |G|). With eps = 1e-8, Adam maps that rounding
# noise to +-1, so the crate's step-1 update of a rank-2 leaf is mostly rounding noise (RMS 0.95
# where the exact update has RMS 0.2): it depends on the crate's Jacobi sweeps and f32
# summation order, and no independent implementation reproduces it (a float32 transcription
# of the crate's Jacobi was also off by 1.1 at step 1). Rank-2 SOAP is compared with the crate
# on the noise-free block spanned by G's singular vectors instead (tests/test_soap.py), and the
# full comparison is kept as a strict xfail so that a change in this finding is noticed.
UNREPRODUCIBLE = (
    "crate SOAP step 1 on rank-2 leaves is float32 rounding noise (see tests/golden.py)"
)


def unreproducible(case: dict, name: str) -> bool:
    shape = next(t["shape"] for t in case["tensors"] if t["name"] == name)
    return case["optimizer"] == "soap" and len(shape) == 2


def split_errors(case: dict, err: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(errors of the tensors that must match, errors of the unreproducible ones)."""
    bad = {k: v for k, v in err.items() if unreproducible(case, k)}
    return {k: v for k, v in err.items() if k not in bad}, bad


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
