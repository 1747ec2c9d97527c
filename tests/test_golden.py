"""Parity with trajectories recorded from the crate (`shared/golden/rlx_optim`)."""

from __future__ import annotations

import pytest

from rlx_optax._src import registry
from tests import golden

_KNOWN = {a.crate_name for a in registry.ALGORITHMS}
CASES = [c for c in golden.manifest() if c["optimizer"] in _KNOWN]


def test_every_golden_optimizer_is_registered_or_pending():
    # The manifest lists 15 optimizers; a case for an unregistered one is skipped, never hidden.
    assert {c["optimizer"] for c in golden.manifest()} >= _KNOWN


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_pure_transform_matches_crate(case):
    row = registry.get(case["optimizer"])
    data = golden.load(case)
    err = golden.relative_error(golden.replay_pure(case, data), data["traj"], data["init"])
    assert max(err.values()) < row.golden_tol, err
