"""The crate's norm helpers, against a float64 NumPy transcription of spec §3.1-3.2."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax


def _np_norm(arrays, skip):
    total = 0.0
    for a in arrays:
        a = np.asarray(a, np.float64).ravel()
        if skip:
            a = a[np.isfinite(a)]
        total += float(np.sum(a * a))
    return np.sqrt(total)


TREES = [
    {"a": np.array([3.0, 4.0]), "b": np.array([[1.0, -2.0], [0.5, 0.25]])},
    {"a": np.array([1e-20, 1e-20]), "b": np.zeros((2, 2))},
    {"a": np.array([np.nan, 4.0]), "b": np.array([[np.inf, 1.0], [2.0, 3.0]])},
]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("tree", TREES, ids=["plain", "tiny", "nonfinite"])
def test_l2_norm(tree, skip):
    got = float(
        rlx_optax.l2_norm(
            {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}, skip_nonfinite=skip
        )
    )
    want = _np_norm(tree.values(), skip)
    if np.isnan(want):
        assert np.isnan(got)
    else:
        assert got == pytest.approx(want, rel=1e-6, abs=1e-30)


def test_l2_norm_nonfinite_policy_is_visible_by_default():
    tree = {"a": jnp.array([jnp.inf, 1.0])}
    assert not np.isfinite(float(rlx_optax.l2_norm(tree)))
    assert float(rlx_optax.l2_norm(tree, skip_nonfinite=True)) == 1.0


def _np_scale(arrays, max_norm):
    # spec §3.2: sum of finite squares; clip when S > max_norm^2 and S > 0.
    s = _np_norm(arrays, True) ** 2
    if s > max_norm**2 and s > 0:
        return min(max_norm / np.sqrt(s), 1.0)
    return 1.0


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 10.0])
def test_global_grad_clip_scale_matches_crate_rule(max_norm):
    tree = TREES[0]
    got = float(
        rlx_optax.global_grad_clip_scale(
            [jnp.asarray(v, jnp.float32) for v in tree.values()], max_norm
        )
    )
    assert got == pytest.approx(_np_scale(tree.values(), max_norm), rel=1e-6)


def test_global_grad_clip_scale_nonfinite():
    grads = [jnp.array([jnp.nan, 3.0, 4.0])]
    assert np.isnan(float(rlx_optax.global_grad_clip_scale(grads, 1.0)))
    crate_like = float(rlx_optax.global_grad_clip_scale(grads, 1.0, skip_nonfinite=True))
    assert crate_like == pytest.approx(0.2)
    assert float(rlx_optax.global_grad_clip_scale([jnp.zeros(3)], 1.0)) == 1.0


def test_global_grad_clip_scale_rejects_bad_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        rlx_optax.global_grad_clip_scale([jnp.ones(2)], -1.0)


def test_logged_clip_matches_optax_and_records_norm():
    tx = rlx_optax.clip_by_global_norm_logged(1.0)
    g = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
    u, state = tx.update(g, tx.init(g))
    ref, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    np.testing.assert_allclose(u["w"], ref["w"], rtol=1e-6)
    assert float(state.norm) == pytest.approx(13.0)
    assert bool(state.clipped)
    _, state = tx.update({"w": jnp.array([0.3, 0.4]), "b": jnp.array([0.0])}, state)
    assert float(state.norm) == pytest.approx(0.5) and not bool(state.clipped)
