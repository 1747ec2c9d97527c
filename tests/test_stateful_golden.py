"""The crate's golden trajectories driven through the stateful API, as they were recorded.

Per iteration: ``step(name, shape, param, grad)`` for every tensor in manifest order on a
writable NumPy float32 array, then ``end_iteration()``; Sophia first gets
``update_hessian(name, h)`` once per tensor (``shared/golden/rlx_optim/README.md``).
"""

from __future__ import annotations

import numpy as np
import pytest

from rlx_optax._src import registry, stateful
from tests import golden

pytestmark = pytest.mark.skipif(golden.GOLDEN_DIR is None, reason=golden.MISSING)

_KNOWN = {a.crate_name for a in registry.ALGORITHMS}
CASES = [c for c in golden.manifest() if c["optimizer"] in _KNOWN]


def replay_stateful(case: dict, data: dict) -> dict[str, np.ndarray]:
    hparams = dict(case["hparams"])
    hessian_init = hparams.pop("hessian_init", 1.0)
    opt = stateful.get(case["optimizer"])(**hparams)
    params = {n: v.copy() for n, v in data["init"].items()}
    if case["optimizer"] == "sophia":
        for t in case["tensors"]:
            opt.update_hessian(t["name"], np.full(t["shape"], hessian_init, np.float32))
    traj = {n: [] for n in params}
    for k in range(case["steps"]):
        for t in case["tensors"]:
            name = t["name"]
            assert opt.step(name, t["shape"], params[name], data["grads"][name][k]) is params[name]
        opt.end_iteration()
        for name in params:
            traj[name].append(params[name].copy())
    return {n: np.stack(v) for n, v in traj.items()}


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_stateful_api_matches_crate(case):
    row = registry.get(case["optimizer"])
    data = golden.load(case)
    err = golden.relative_error(replay_stateful(case, data), data["traj"], data["init"])
    checked, _ = golden.split_errors(case, err)  # SOAP rank-2 leaves: see tests/golden.py
    assert checked and max(checked.values()) < row.golden_tol, err


def main() -> None:
    """`python -m tests.test_stateful_golden` prints the worst error of every case."""
    for case in golden.manifest():
        if case["optimizer"] not in _KNOWN:
            print(f"{case['case']:20s} (not registered yet)")
            continue
        data = golden.load(case)
        err = golden.relative_error(replay_stateful(case, data), data["traj"], data["init"])
        checked, excluded = golden.split_errors(case, err)
        note = f"  (excluded: {excluded})" if excluded else ""
        print(f"{case['case']:20s} worst {max(checked.values()):.2e}{note}")


if __name__ == "__main__":
    main()
