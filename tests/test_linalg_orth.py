"""Newton-Schulz, factored second moments and the Stiefel operations against float64 oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx_optax._src.linalg import (
    CUBIC_NS_COEFFS,
    DEFAULT_NS_COEFFS,
    factored_second_moment,
    gram_schmidt_rows,
    newton_schulz,
    reconstruct_second_moment,
    stiefel_tangent_projection,
)

SHAPES = [(24, 16), (16, 40), (64, 64), (1, 7), (7, 1), (3, 200)]


def _random(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def ns_oracle(x, coeff_rows, steps):
    """NS(x) = U p(Sigma / ||x||_F) V^T in float64, from the SVD (the iteration's closed form)."""
    x = np.asarray(x, np.float64)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    p = s / np.linalg.norm(x)
    rows = np.atleast_2d(np.asarray(coeff_rows, np.float64))
    for k in range(steps):
        a, b, c = rows[min(k, len(rows) - 1)]
        p = a * p + b * p**3 + c * p**5
    return (u * p) @ vt, p


def polar_oracle(x):
    u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return u @ vt


# --------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_matches_svd_closed_form(shape):
    x = _random(shape)
    got = np.asarray(newton_schulz(jnp.asarray(x, jnp.float32)), np.float64)
    want, _ = ns_oracle(x, DEFAULT_NS_COEFFS, 5)
    # float32 rounding amplified by the polynomial's slope; a wrong coefficient moves ~0.1
    np.testing.assert_allclose(got, want, atol=2e-5 * max(1, np.sqrt(min(shape))))


def test_newton_schulz_float64_is_tight():
    x = _random((24, 16), 1)
    with jax.enable_x64(True):
        got = np.asarray(newton_schulz(jnp.asarray(x, jnp.float64)))
    want, _ = ns_oracle(x, DEFAULT_NS_COEFFS, 5)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_quintic_singular_value_band():
    # singular values >= 3e-3 of the Frobenius norm land in [0.68, 1.21] after 5 steps
    x = _random((64, 32), 2)
    _, p = ns_oracle(x, DEFAULT_NS_COEFFS, 5)
    sigma = np.linalg.svd(x, compute_uv=False) / np.linalg.norm(x)
    assert sigma.min() >= 3e-3
    got = np.linalg.svd(np.asarray(newton_schulz(jnp.asarray(x, jnp.float32)), np.float64))[1]
    assert got.min() >= 0.68 and got.max() <= 1.21, (got.min(), got.max())
    np.testing.assert_allclose(np.sort(got), np.sort(p), atol=1e-4)
    # not orthogonal: the quintic deliberately stops short of the polar factor
    assert np.abs(got - 1).max() > 0.05


def test_cubic_schedule_converges_to_polar_factor():
    x = _random((20, 12), 3) + 3 * np.eye(20, 12)  # condition number about 3
    got = np.asarray(newton_schulz(jnp.asarray(x, jnp.float32), 40, CUBIC_NS_COEFFS))
    np.testing.assert_allclose(got, polar_oracle(x), atol=2e-6)


def test_transposition_symmetry():
    x = jnp.asarray(_random((24, 16), 4), jnp.float32)
    np.testing.assert_allclose(newton_schulz(x.T), newton_schulz(x).T, atol=1e-6)


def test_scale_invariance_and_zero_input():
    x = jnp.asarray(_random((8, 12), 5), jnp.float32)
    np.testing.assert_allclose(newton_schulz(1e-3 * x), newton_schulz(x), atol=2e-6)
    zero = newton_schulz(jnp.zeros((4, 6)))
    np.testing.assert_array_equal(zero, np.zeros((4, 6)))


def test_per_iteration_schedule_last_row_repeats():
    schedule = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037)]
    x = _random((16, 24), 6)
    got = np.asarray(newton_schulz(jnp.asarray(x, jnp.float32), 5, schedule))
    want, _ = ns_oracle(x, schedule, 5)
    np.testing.assert_allclose(got, want, atol=5e-5)
    # default step count of a schedule is its length
    got3 = np.asarray(newton_schulz(jnp.asarray(x, jnp.float32), coeffs=schedule))
    np.testing.assert_allclose(got3, ns_oracle(x, schedule, 3)[0], atol=5e-5)
    # a single repeated row is the plain iteration
    same = newton_schulz(jnp.asarray(x, jnp.float32), 5, [DEFAULT_NS_COEFFS])
    np.testing.assert_allclose(same, newton_schulz(jnp.asarray(x, jnp.float32)), atol=1e-6)


@pytest.mark.parametrize(
    "coeffs", [DEFAULT_NS_COEFFS, [(4.0848, -6.8946, 2.9270), CUBIC_NS_COEFFS]]
)
def test_traced_step_count_matches_static(coeffs):
    x = jnp.asarray(_random((12, 20), 7), jnp.float32)
    traced = jax.jit(lambda x, n: newton_schulz(x, n, coeffs))(x, 4)
    np.testing.assert_allclose(traced, newton_schulz(x, 4, coeffs), atol=1e-6)


def test_bfloat16_compute_is_close():
    x = _random((32, 48), 8)
    got = np.asarray(newton_schulz(jnp.asarray(x), ns_dtype=jnp.bfloat16), np.float64)
    want, _ = ns_oracle(x, DEFAULT_NS_COEFFS, 5)
    assert np.abs(got - want).max() < 0.05  # bf16 has 8 bits of mantissa
    assert newton_schulz(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_newton_schulz_rejects_bad_input():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="coeffs"):
        newton_schulz(jnp.ones((2, 3)), coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(jnp.ones((2, 3)), steps=-1)


# --------------------------------------------------------------------------- factored moments


def test_factored_moments_exact_on_rank_one():
    rng = np.random.default_rng(9)
    a, b = rng.uniform(0.1, 2.0, size=5), rng.uniform(0.1, 2.0, size=7)
    full = np.outer(a, b)
    row, col = factored_second_moment(jnp.asarray(full, jnp.float32))
    np.testing.assert_allclose(row, full.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(col, full.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(reconstruct_second_moment(row, col), full, rtol=1e-5)
    # the crate's normaliser (sum of row means) is R times smaller
    crate = reconstruct_second_moment(row, col, normalization="sum")
    np.testing.assert_allclose(crate, full / 5, rtol=1e-5)


def test_factored_moments_batched_and_general():
    x2 = np.random.default_rng(10).uniform(0.0, 1.0, size=(3, 4, 6))
    row, col = factored_second_moment(jnp.asarray(x2, jnp.float32))
    assert row.shape == (3, 4) and col.shape == (3, 6)
    r, c = x2.mean(-1), x2.mean(-2)
    want = r[:, :, None] * c[:, None, :] / r.mean(-1)[:, None, None]
    np.testing.assert_allclose(reconstruct_second_moment(row, col), want, rtol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        reconstruct_second_moment(row, col, normalization="max")


# --------------------------------------------------------------------------- Stiefel


def _qr_rows_oracle(y):
    q, r = np.linalg.qr(np.asarray(y, np.float64).T)
    return (q * np.sign(np.diag(r))).T


@pytest.mark.parametrize("shape", [(3, 6), (16, 40), (8, 8), (1, 5)])
def test_gram_schmidt_gives_orthonormal_rows(shape):
    y = _random(shape, 11)
    q = np.asarray(gram_schmidt_rows(jnp.asarray(y, jnp.float32)), np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(shape[0]), atol=2e-6)
    np.testing.assert_allclose(q, _qr_rows_oracle(y), atol=2e-5)


def test_gram_schmidt_zero_row_stays_zero():
    y = np.array([[1.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    q = np.asarray(gram_schmidt_rows(jnp.asarray(y, jnp.float32)))
    np.testing.assert_array_equal(q[1], 0.0)  # the norm floor, no NaN
    np.testing.assert_allclose(q[[0, 2]] @ q[[0, 2]].T, np.eye(2), atol=1e-6)


def test_tangent_projection():
    w = _qr_rows_oracle(_random((5, 9), 12))
    g = _random((5, 9), 13)
    a = w @ g.T
    want = g - 0.5 * (a + a.T) @ w
    got = np.asarray(stiefel_tangent_projection(jnp.asarray(w), jnp.asarray(g)), np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(w @ got.T + got @ w.T, 0.0, atol=1e-5)  # tangent
    again = stiefel_tangent_projection(jnp.asarray(w), jnp.asarray(got, jnp.float32))
    np.testing.assert_allclose(again, got, atol=1e-5)  # idempotent
    with pytest.raises(ValueError, match="shape"):
        stiefel_tangent_projection(jnp.ones((2, 3)), jnp.ones((3, 2)))


def test_newton_schulz_ns_dtype_is_the_name_and_compute_dtype_is_deprecated():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 4)), jnp.float32)
    new = newton_schulz(x, ns_dtype=jnp.bfloat16)
    with pytest.warns(DeprecationWarning, match="ns_dtype"):
        old = newton_schulz(x, compute_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="ns_dtype"):
        newton_schulz(x, ns_dtype=jnp.float32, compute_dtype=jnp.bfloat16)
