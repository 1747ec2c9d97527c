"""Eigenbasis, QR refresh, axis products and triangular factors against float64 NumPy oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx_optax._src import linalg


def _spd(n, seed, spread=3.0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.exp(np.linspace(spread, -spread, n))
    return (q * lam) @ q.T, lam


def _upper(n, seed):
    rng = np.random.default_rng(seed)
    q = np.triu(rng.normal(size=(n, n)) * 0.3) + np.eye(n) * 2.0
    return q


@pytest.mark.parametrize("n", [1, 5, 16])
def test_eigenbasis_diagonalises_sorted(n):
    s, lam = _spd(n, n)
    q = np.asarray(linalg.symmetric_eigenbasis(jnp.asarray(s, jnp.float32)), np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-5)
    d = q.T @ s @ q
    scale = lam.max()
    np.testing.assert_allclose(d, np.diag(np.diag(d)), atol=1e-5 * scale)
    np.testing.assert_allclose(np.diag(d), np.sort(np.linalg.eigvalsh(s))[::-1], atol=1e-5 * scale)


def test_eigenbasis_of_zero_is_orthonormal():
    q = np.asarray(linalg.symmetric_eigenbasis(jnp.zeros((6, 6))))
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-6)


def test_qr_refresh_is_one_sorted_power_step():
    n = 8
    s, _ = _spd(n, 1, spread=1.0)
    rng = np.random.default_rng(2)
    q0, _ = np.linalg.qr(rng.normal(size=(n, n)))
    q_new, order = linalg.qr_refresh(jnp.asarray(s, jnp.float32), jnp.asarray(q0, jnp.float32))
    expected_order = np.argsort(-np.diag(q0.T @ s @ q0))
    np.testing.assert_array_equal(np.asarray(order), expected_order)
    ref, _ = np.linalg.qr(s @ q0[:, expected_order])
    # QR is unique up to column signs
    overlap = np.abs(np.sum(np.asarray(q_new, np.float64) * ref, axis=0))
    np.testing.assert_allclose(overlap, np.ones(n), atol=1e-5)


def test_qr_refresh_converges_to_eigenbasis():
    n = 6
    s, lam = _spd(n, 3, spread=1.5)
    q = jnp.eye(n)
    refresh = jax.jit(linalg.qr_refresh)  # one compile, not 60 eager dispatches of each op
    for _ in range(60):
        q, _ = refresh(jnp.asarray(s, jnp.float32), q)
    d = np.asarray(q, np.float64).T @ s @ np.asarray(q, np.float64)
    np.testing.assert_allclose(np.diag(d), lam, rtol=1e-4)
    np.testing.assert_allclose(d - np.diag(np.diag(d)), 0.0, atol=1e-4 * lam.max())


def test_qr_refresh_of_zero_is_finite():
    q, order = linalg.qr_refresh(jnp.zeros((5, 5)), jnp.eye(5))
    assert np.all(np.isfinite(np.asarray(q)))
    assert sorted(np.asarray(order).tolist()) == list(range(5))


def test_apply_along_axes_matches_einsum():
    rng = np.random.default_rng(4)
    x2 = rng.normal(size=(4, 5))
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(5, 5))
    f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731
    out = linalg.apply_along_axes(*f32(x2), f32(a, b))
    np.testing.assert_allclose(out, a @ x2 @ b.T, rtol=1e-5, atol=1e-5)
    out = linalg.apply_along_axes(*f32(x2), f32(a, b), transpose=True)
    np.testing.assert_allclose(out, a.T @ x2 @ b, rtol=1e-5, atol=1e-5)
    x3 = rng.normal(size=(3, 4, 5))
    c, d = rng.normal(size=(3, 3)), rng.normal(size=(4,))
    out = linalg.apply_along_axes(jnp.asarray(x3, jnp.float32), [*f32(c, d), None])
    np.testing.assert_allclose(
        out, np.einsum("ai,ijk->ajk", c, x3) * d[None, :, None], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="one matrix per axis"):
        linalg.apply_along_axes(jnp.ones((2, 2)), [None])


@pytest.mark.parametrize("shape", [(4, 6), (3, 4, 5)])
def test_axis_gram(shape):
    x = np.random.default_rng(5).normal(size=shape)
    for axis in range(len(shape)):
        ref = np.moveaxis(x, axis, 0).reshape(shape[axis], -1)
        got = linalg.axis_gram(jnp.asarray(x, jnp.float32), axis)
        np.testing.assert_allclose(got, ref @ ref.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("transpose", [True, False])
def test_solve_upper_triangular(left, transpose):
    n, k = 7, 3
    q = _upper(n, 6)
    garbage = q + np.tril(np.full((n, n), 100.0), -1)  # below the diagonal: never read
    b = np.random.default_rng(7).normal(size=(n, k) if left else (k, n))
    x = np.asarray(
        linalg.solve_upper_triangular(
            jnp.asarray(garbage, jnp.float32),
            jnp.asarray(b, jnp.float32),
            left=left,
            transpose=transpose,
        ),
        np.float64,
    )
    op = q.T if transpose else q
    ref = np.linalg.solve(op, b) if left else np.linalg.solve(op.T, b.T).T
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_lie_group_step_keeps_triangular(side):
    n = 6
    q = _upper(n, 8)
    m = np.random.default_rng(9).normal(size=(n, n))
    got = np.asarray(
        linalg.lie_group_factor_step(
            jnp.asarray(q, jnp.float32), jnp.asarray(m, jnp.float32), 0.1, side=side
        ),
        np.float64,
    )
    ref = q - 0.1 * (q @ np.triu(m) if side == "right" else np.triu(m) @ q)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert np.all(np.tril(got, -1) == 0.0)


def test_lie_group_step_diagonal_and_bad_side():
    q = jnp.asarray([1.0, 2.0, 0.5])
    m = jnp.asarray([0.5, -1.0, 2.0])
    np.testing.assert_allclose(linalg.lie_group_factor_step(q, m, 0.1), [0.95, 2.2, 0.4])
    with pytest.raises(ValueError, match="side"):
        linalg.lie_group_factor_step(jnp.eye(2), jnp.eye(2), 0.1, side="up")


@pytest.mark.parametrize("seed", range(5))
def test_spectral_norm_lower_bound(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(9, 6)) * rng.uniform(0.1, 10.0, size=(1, 6))
    true = np.linalg.norm(a, 2)
    got = float(linalg.spectral_norm_lower_bound(jnp.asarray(a, jnp.float32)))
    assert got <= true * (1 + 1e-5)
    assert got >= true / np.sqrt(2)
    spd, lam = _spd(8, seed)
    got = float(linalg.spectral_norm_lower_bound(jnp.asarray(spd, jnp.float32)))
    assert lam.max() / np.sqrt(2) <= got <= lam.max() * (1 + 1e-5)


def test_spectral_norm_lower_bound_zero():
    assert float(linalg.spectral_norm_lower_bound(jnp.zeros((3, 4)))) == 0.0


def test_power_of_two_scale_is_exact_and_bounded():
    x = jnp.asarray([[3.0, -0.25], [1e30, 7.0]], jnp.float32)
    k = float(linalg.power_of_two_scale(x))
    assert k == 2.0**100 and 1e30 / k < 2.0  # a power of two just above max|x|
    np.testing.assert_array_equal(np.asarray(x / k) * k, np.asarray(x))  # exact round trip
    small = jnp.asarray([0.3, -0.7], jnp.float32)
    assert float(linalg.power_of_two_scale(small)) == 1.0
    assert float(linalg.power_of_two_scale(small * 1e-20)) < 1e-19  # scales up by default
    assert float(linalg.power_of_two_scale(small * 1e-20, at_least_one=True)) == 1.0
    assert float(linalg.power_of_two_scale(jnp.zeros(3))) == 1.0
    assert float(linalg.power_of_two_scale(jnp.asarray([3e38, -3e38]))) == 2.0**126


@pytest.mark.parametrize("scale", [1e30, 3e38])
def test_eigenbasis_and_qr_refresh_of_huge_statistics(scale):
    """Statistics near the top of the float32 range (a held SOAP statistic): finite, same basis.

    Before scaling, `s + s.T` and eigh's norms overflowed to inf and the basis was NaN.
    """
    s, _ = _spd(6, 3)
    s = s / np.max(np.abs(s))  # max-abs 1: `s * scale` is finite
    small = jnp.asarray(s, jnp.float32)
    big = small * jnp.float32(scale)
    q_small, q_big = linalg.symmetric_eigenbasis(small), linalg.symmetric_eigenbasis(big)
    assert bool(jnp.all(jnp.isfinite(q_big)))
    # same eigenvectors up to sign (the eigenvalues are distinct)
    np.testing.assert_allclose(np.abs(np.asarray(q_big.T @ q_small)), np.eye(6), atol=1e-4)
    q0 = jnp.asarray(np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))[0], jnp.float32)
    new_small, order_small = linalg.qr_refresh(small, q0)
    new_big, order_big = linalg.qr_refresh(big, q0)
    assert bool(jnp.all(jnp.isfinite(new_big)))
    np.testing.assert_array_equal(order_big, order_small)
    np.testing.assert_allclose(new_big, new_small, atol=1e-5)


# --------------------------------------------------------------------------- canonical bases


def _canonical_np(q: np.ndarray) -> np.ndarray:
    """The documented sign rule in float64 NumPy: the first entry within 0.1% of a column's
    largest magnitude is positive."""
    q = q.copy()
    for j in range(q.shape[1]):
        mag = np.abs(q[:, j])
        lead = int(np.argmax(mag >= (1 - 1e-3) * mag.max()))
        if q[lead, j] < 0:
            q[:, j] = -q[:, j]
    return q


@pytest.mark.parametrize("seed", range(3))
def test_eigenbasis_signs_are_canonical(seed):
    """Against LAPACK's float64 eigh with the sign rule applied: equal to float32 rounding
    (whatever signs XLA's solver returned)."""
    a = np.random.default_rng(seed).normal(size=(9, 9))
    s = a @ a.T
    want = _canonical_np(np.linalg.eigh(s)[1][:, ::-1])
    got = np.asarray(linalg.symmetric_eigenbasis(jnp.asarray(s, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, atol=2e-4)
    flipped = np.asarray(linalg.canonical_column_signs(-jnp.asarray(got)))
    np.testing.assert_array_equal(flipped, got)


def test_null_space_of_a_coordinate_statistic_is_the_standard_basis():
    """diag(3, 0, 2, 0, 0): the range by eigenvalue (e0, e2), the null space in order
    (e1, e3, e4); any orthonormal basis of span(e1, e3, e4) is a valid eigh answer."""
    s = jnp.diag(jnp.array([3.0, 0.0, 2.0, 0.0, 0.0]))
    got = np.asarray(linalg.symmetric_eigenbasis(s))
    want = np.eye(5)[:, [0, 2, 1, 3, 4]]
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(linalg.symmetric_eigenbasis(jnp.zeros((4, 4)))), np.eye(4), atol=0
    )


@pytest.mark.parametrize("shape", [(12, 3), (10, 1), (16, 8)])
def test_rank_deficient_eigenbasis_is_a_function_of_the_statistic(shape):
    """A statistic G G^T of rank < n: its null-space basis is arbitrary for eigh. Ours must not
    depend on how the statistic was rounded or compiled: a relative change of 1e-7 (another
    summation order), jit, eager and vmap all give the same basis to rounding."""
    g = np.random.default_rng(sum(shape)).normal(size=shape)
    s = (g @ g.T).astype(np.float32)
    noise = np.random.default_rng(1).normal(size=s.shape)
    s2 = (s * (1 + 1e-7 * (noise + noise.T) / 2)).astype(np.float32)
    base = np.asarray(linalg.symmetric_eigenbasis(jnp.asarray(s)))
    runs = {
        "perturbed": linalg.symmetric_eigenbasis(jnp.asarray(s2)),
        "jit": jax.jit(linalg.symmetric_eigenbasis)(jnp.asarray(s)),
        "vmap": jax.vmap(linalg.symmetric_eigenbasis)(jnp.stack([jnp.asarray(s)] * 2))[1],
    }
    for label, q in runs.items():
        np.testing.assert_allclose(np.asarray(q), base, atol=5e-4, err_msg=label)
    # still an eigenbasis, orthonormal, range first
    np.testing.assert_allclose(base.T @ base, np.eye(s.shape[0]), atol=1e-5)
    d = base.T @ s.astype(np.float64) @ base
    np.testing.assert_allclose(d - np.diag(np.diag(d)), 0, atol=1e-4 * np.abs(d).max())
    rank = shape[1]
    assert np.all(np.diag(d)[:rank] > 1e-3 * np.abs(d).max())
    # the completion is the float64 oracle's: eigenvectors of P D P on the complement
    w, v = np.linalg.eigh(s.astype(np.float64))
    r = v[:, ::-1][:, :rank]
    p = np.eye(s.shape[0]) - r @ r.T
    dd = np.arange(s.shape[0], 0, -1.0)
    _, vn = np.linalg.eigh(p @ np.diag(dd) @ p)
    null = _canonical_np(vn[:, ::-1][:, : s.shape[0] - rank])
    np.testing.assert_allclose(base[:, rank:], null, atol=5e-4)


def test_qr_refresh_signs_and_rank_deficient_fallback():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(7, 7))
    s = jnp.asarray(a @ a.T, jnp.float32)
    q0 = jnp.asarray(np.linalg.qr(rng.normal(size=(7, 7)))[0], jnp.float32)
    q, order = linalg.qr_refresh(s, q0)
    sq = np.asarray(s, np.float64) @ np.asarray(q0, np.float64)[:, np.asarray(order)]
    qw, rw = np.linalg.qr(sq)
    qw = qw * np.where(np.diag(rw) < 0, -1, 1)[None, :]  # R with a positive diagonal
    np.testing.assert_allclose(np.asarray(q), qw, atol=2e-4)
    # rank deficient: the power step cannot determine the trailing columns; the canonical
    # eigenbasis is used instead
    g = rng.normal(size=(7, 2))
    s_low = jnp.asarray(g @ g.T, jnp.float32)
    q_low, _ = linalg.qr_refresh(s_low, q0)
    np.testing.assert_allclose(
        np.asarray(q_low), np.asarray(linalg.symmetric_eigenbasis(s_low)), atol=1e-6
    )
