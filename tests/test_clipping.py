"""`clip_grad_norm` and `clip_by_global_norm_logged` against RUMUS's `clip_grad_norm_`.

The oracle is an independent float64 NumPy transcription of RUMUS's rule (spec §1.6):
norm = sqrt(sum of squares), c = max_norm / (norm + 1e-6), nothing changes when c >= 1,
otherwise every gradient is multiplied by c; the pre-clip norm is returned. optax's
`clip_by_global_norm` is the oracle for ``eps=0``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax

RUMUS_EPS = 1e-6
F32_EPS = float(np.finfo(np.float32).eps)


def rumus_clip(grads, max_norm, eps=RUMUS_EPS):
    """RUMUS `clip_grad_norm_` in float64 NumPy; returns (clipped leaves, total_norm)."""
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in leaves))
    c = max_norm / (norm + eps)
    if c >= 1.0:
        return leaves, norm
    return [g * c for g in leaves], norm


def random_tree(seed, scale):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(5, 3)) * scale, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)) * scale, jnp.float32),
        "s": jnp.asarray(rng.normal() * scale, jnp.float32),
    }


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1e-3, 0.3, 1.0, 50.0])
def test_matches_rumus_transcription(seed, scale):
    grads = random_tree(seed, scale)
    clipped, norm = rlx_optax.clip_grad_norm(grads, 1.0, eps=RUMUS_EPS)
    want, want_norm = rumus_clip(grads, 1.0)
    # float32 sums of 19 squares against float64: a few ulp.
    np.testing.assert_allclose(float(norm), want_norm, rtol=4 * F32_EPS)
    for got, ref in zip(jax.tree.leaves(clipped), want, strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=4 * F32_EPS, atol=0)


def test_at_exactly_max_rumus_clips_optax_does_not():
    grads = {"g": jnp.array([1.0], jnp.float32)}  # norm exactly 1.0
    rumus, norm = rlx_optax.clip_grad_norm(grads, 1.0, eps=RUMUS_EPS)
    assert float(norm) == 1.0
    # RUMUS, in float32: c = 1 / (1 + 1e-6), about 1 - 1e-6, and g * c.
    one = np.float32(1.0)
    c = one / (one + np.float32(RUMUS_EPS))
    assert float(rumus["g"][0]) == float(one * c)
    assert float(rumus["g"][0]) < 1.0
    plain, _ = rlx_optax.clip_grad_norm(grads, 1.0)
    assert float(plain["g"][0]) == 1.0
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert float(ref["g"][0]) == 1.0


def test_norm_two_ends_below_max_with_rumus_eps():
    grads = [jnp.array([2.0], jnp.float32)]
    clipped, norm = rlx_optax.clip_grad_norm(grads, 1.0, eps=RUMUS_EPS)
    assert float(norm) == 2.0  # the pre-clip norm is returned
    # The value measured in RUMUS: 2 * 1 / (2 + 1e-6) = 0.9999995.
    np.testing.assert_allclose(float(clipped[0][0]), 0.9999995, rtol=F32_EPS)
    assert float(clipped[0][0]) < 1.0
    plain, _ = rlx_optax.clip_grad_norm(grads, 1.0)
    assert float(plain[0][0]) == 1.0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 100.0])
def test_eps_zero_is_optax_rule(seed, max_norm):
    grads = random_tree(seed, 2.0)
    got, norm = rlx_optax.clip_grad_norm(grads, max_norm)
    ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    np.testing.assert_allclose(float(norm), float(optax.tree.norm(grads)), rtol=4 * F32_EPS)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        # optax divides then multiplies, we multiply by max/norm: two roundings apart.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=4 * F32_EPS)


@pytest.mark.parametrize("eps", [0.0, RUMUS_EPS])
def test_nan_norm_makes_every_leaf_nan(eps):
    grads = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([jnp.nan])}
    clipped, norm = rlx_optax.clip_grad_norm(grads, 1.0, eps=eps)
    assert np.isnan(float(norm))
    # RUMUS: c is NaN, "c >= 1" fails, every gradient is scaled by NaN. optax agrees.
    assert np.all(np.isnan(np.asarray(clipped["a"])))
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert np.all(np.isnan(np.asarray(ref["a"])))


@pytest.mark.parametrize("eps", [0.0, RUMUS_EPS])
def test_inf_norm_zeroes_finite_and_nans_infinite(eps):
    grads = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([jnp.inf])}
    clipped, norm = rlx_optax.clip_grad_norm(grads, 1.0, eps=eps)
    assert np.isposinf(float(norm))
    np.testing.assert_array_equal(np.asarray(clipped["a"]), [0.0, -0.0])
    assert np.isnan(float(clipped["b"][0]))
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    np.testing.assert_array_equal(np.asarray(ref["a"]), [0.0, -0.0])
    assert np.isnan(float(ref["b"][0]))


def test_zero_and_empty_gradients_unchanged():
    clipped, norm = rlx_optax.clip_grad_norm({"a": jnp.zeros(3)}, 1.0, eps=RUMUS_EPS)
    assert float(norm) == 0.0
    np.testing.assert_array_equal(np.asarray(clipped["a"]), np.zeros(3))
    clipped, norm = rlx_optax.clip_grad_norm({}, 1.0)  # RUMUS: no gradients -> 0.0
    assert clipped == {} and float(norm) == 0.0


def test_none_leaves_pass_through_and_dtype_kept():
    grads = {"a": jnp.array([3.0, 4.0], jnp.bfloat16), "frozen": None}
    clipped, norm = rlx_optax.clip_grad_norm(grads, 1.0)
    assert clipped["frozen"] is None
    assert clipped["a"].dtype == jnp.bfloat16
    assert float(norm) == 5.0


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan")])
def test_bad_max_norm_raises(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        rlx_optax.clip_grad_norm({"a": jnp.ones(2)}, max_norm)
    with pytest.raises(ValueError, match="max_norm"):
        rlx_optax.clip_by_global_norm_logged(max_norm)


def test_works_under_jit():
    grads = random_tree(0, 3.0)
    eager = rlx_optax.clip_grad_norm(grads, 1.0, eps=RUMUS_EPS)
    jitted = jax.jit(lambda g: rlx_optax.clip_grad_norm(g, 1.0, eps=RUMUS_EPS))(grads)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=F32_EPS)


@pytest.mark.parametrize("eps", [0.0, RUMUS_EPS])
def test_logged_transform_composes_with_clip_grad_norm(eps):
    """The transform in a chain = clip_grad_norm by hand, and it records the pre-clip norm."""
    params = random_tree(9, 1.0)
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=0.01, weight_decay=0.01)
    tx = optax.chain(rlx_optax.clip_by_global_norm_logged(1.0, eps=eps), inner)
    state, ref_state = tx.init(params), inner.init(params)
    step = jax.jit(tx.update)

    @jax.jit
    def by_hand(grads, ref_state, params):
        clipped, norm = rlx_optax.clip_grad_norm(grads, 1.0, eps=eps)
        return *inner.update(clipped, ref_state, params), norm

    for i, scale in enumerate([0.1, 5.0, 1e3]):
        grads = random_tree(100 + i, scale)
        updates, state = step(grads, state, params)
        ref_updates, ref_state, norm = by_hand(grads, ref_state, params)
        assert float(optax.tree.get(state, "norm")) == float(norm)
        assert bool(optax.tree.get(state, "clipped")) == (float(norm) > 1.0)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=4 * F32_EPS, atol=0)
        params = optax.apply_updates(params, updates)


def test_logged_transform_flags_nan_as_clipped():
    tx = rlx_optax.clip_by_global_norm_logged(1.0)
    _, state = tx.update({"a": jnp.array([jnp.nan, 1.0])}, tx.init(None))
    assert np.isnan(float(state.norm)) and bool(state.clipped)
