"""Kron-PSGD: a float64 NumPy transcription of the crate's rule, invariants of the factors,
the reference switches, and SOAP/Kron against AdamW on an ill-conditioned quadratic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax

REFERENCE = {
    "momentum_before": True,
    "probe": "random",
    "key": jax.random.key(0),
    "factor_update": "reference",
    "clip_mode": "rms",
    "clip": 1.1,
    "precondition_nd": True,
}


def _crate_kron_numpy(params, grads, lr, plr, mu, wd, eps, clip):
    """Float64 transcription of the crate's `KronPsgd::step` for one matrix (spec 4.11)."""
    p = params.astype(np.float64)
    m_, n_ = p.shape
    ql, qr, v = np.eye(m_), np.eye(n_), np.zeros_like(p)
    out = []
    for g in grads:
        g = g.astype(np.float64)
        a = ql @ g @ qr.T
        b = np.linalg.solve(ql.T, g) @ np.linalg.inv(qr)
        new = []
        for q, mat in ((ql, a @ a.T - b @ b.T), (qr, a.T @ a - b.T @ b)):
            s = plr / (np.linalg.norm(mat) + eps)
            new.append(q - s * q @ np.triu(mat))
        ql, qr = new
        pg = ql.T @ ql @ g @ qr @ qr.T
        mx = np.abs(pg).max()
        if mx > clip:
            pg = pg * clip / mx
        v = mu * v + pg + wd * p
        p = p - lr * v
        out.append(p)
    return out


def test_matches_float64_transcription_of_the_crate():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(6, 4)).astype(np.float32)
    grads = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(8)]
    ref = _crate_kron_numpy(w0, grads, 0.05, 0.2, 0.5, 0.01, 1e-8, 1.0)
    tx = rlx_optax.kron_psgd(0.05, precond_lr=0.2, momentum=0.5, weight_decay=0.01)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    for g, expected in zip(grads, ref, strict=True):
        u, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, u)
        np.testing.assert_allclose(params["w"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["crate", "reference"])
def test_factors_stay_triangular_and_finite(mode):
    kwargs = {} if mode == "crate" else REFERENCE
    tx = rlx_optax.scale_by_kron_psgd(
        **{k: v for k, v in kwargs.items() if k not in ("momentum_before",)}
    )
    params = {"w": jnp.zeros((7, 5)), "t": jnp.zeros((3, 4, 2))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    keys = jax.random.split(jax.random.key(1), 8)
    for k in keys:
        g = jax.tree.map(lambda p, k=k: 3.0 * jax.random.normal(k, p.shape), params)
        _, state = update(g, state)
    for leaf in jax.tree.leaves(state.factors):
        q = np.asarray(leaf)
        assert np.all(np.isfinite(q))
        if q.ndim == 2:
            assert np.all(np.tril(q, -1) == 0.0)
            assert np.all(np.diag(q) > 0)
            if mode == "crate":
                # The crate's gradient probe from Q = I gives A = B = G, so M = 0 and the
                # factors never leave the identity (its Kron is clipped SGD-momentum).
                np.testing.assert_array_equal(q, np.eye(q.shape[0]))
            else:
                assert not np.allclose(q, np.eye(q.shape[0]))  # they did move


@pytest.mark.parametrize("mode", ["crate", "reference"])
def test_zero_gradients_never_nan(mode):
    kwargs = {} if mode == "crate" else REFERENCE
    tx = rlx_optax.kron_psgd(1e-2, weight_decay=0.1, **kwargs)
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3), "k": jnp.ones((2, 3, 2))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        u, state = update(zeros, state, params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((u, state)))
    if mode == "crate":  # M = 0: factors unchanged, only the decay moves the parameters
        left, right = (tree["w"] for tree in state[0].factors)
        np.testing.assert_array_equal(left, np.eye(4))
        np.testing.assert_array_equal(right, np.eye(3))


def test_reference_layout_rms_clip_and_probability():
    params = {"w": jnp.zeros((6, 40)), "b": jnp.zeros(5), "k": jnp.zeros((2, 3, 4))}
    tx = rlx_optax.scale_by_kron_psgd(
        probe="random",
        key=jax.random.key(0),
        factor_update="reference",
        clip_mode="rms",
        clip=1.1,
        precondition_nd=True,
        max_size_triangular=32,
        update_probability=0.5,
    )
    state = tx.init(params)
    # one tree per axis (None where a leaf has fewer axes)
    shapes = jax.tree.map(lambda q: q.shape, state.factors)
    assert shapes == (
        {"w": (6, 6), "b": (5,), "k": (2, 2)},
        {"w": (40,), "b": None, "k": (3, 3)},
        {"w": None, "b": None, "k": (4, 4)},
    )
    g = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    update = jax.jit(tx.update)
    u, s1 = update(g, state)
    for x in jax.tree.leaves(u):
        assert float(jnp.sqrt(jnp.mean(x * x))) <= 1.1 * (1 + 1e-5)
    # probability 1/2: the factors move on every second call only
    np.testing.assert_array_equal(s1.factors[0]["w"], state.factors[0]["w"])
    _, s2 = update(g, s1)
    assert not np.allclose(s2.factors[0]["w"], s1.factors[0]["w"])
    assert not np.array_equal(np.asarray(jax.random.key_data(s2.key)), jax.random.key_data(s1.key))


def test_state_dtypes_float32_with_bf16_params():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
    tx = rlx_optax.kron_psgd(1e-2)
    state = tx.init(params)
    assert {q.dtype for q in jax.tree.leaves(state[0].factors)} == {jnp.dtype("float32")}


def test_invalid_options():
    with pytest.raises(ValueError, match="key"):
        rlx_optax.kron_psgd(1e-2, probe="random")
    with pytest.raises(ValueError, match="clip_mode"):
        rlx_optax.kron_psgd(1e-2, clip_mode="spectral")
    with pytest.raises(ValueError, match="precond_lr"):
        rlx_optax.kron_psgd(1e-2, precond_lr=-1.0)
    with pytest.raises(ValueError, match="precondition_nd"):
        rlx_optax.kron_psgd(1e-2, precondition_nd=True)


# ----------------------------------------------------------------- ill-conditioned quadratic


def ill_conditioned_quadratic(n=8, seed=0, cond=100.0):
    """0.5 tr((W - W*)^T A (W - W*) B): rotated Hessian A (x) B, condition number cond**2."""
    rng = np.random.default_rng(seed)

    def spd():
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        return jnp.asarray((q * np.geomspace(1.0, 1.0 / cond, n)) @ q.T, jnp.float32)

    a, b = spd(), spd()
    target = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)

    def loss(p):
        e = p["w"] - target
        return 0.5 * jnp.sum(e * (a @ e @ b))

    return loss, {"w": jnp.zeros((n, n), jnp.float32)}


def steps_to_target(make_tx, lrs, loss, init, *, frac=1e-6, max_steps=1000):
    """Fewest steps (over the learning-rate grid) to reach `frac` of the initial loss."""
    start = float(loss(init))
    best = max_steps + 1
    for lr in lrs:
        tx = make_tx(lr)

        def body(carry, _, tx=tx):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), loss(p)

        run = jax.jit(lambda c, body=body: jax.lax.scan(body, c, None, length=max_steps))
        _, losses = run((init, tx.init(init)))
        hit = np.nonzero(np.asarray(losses) < frac * start)[0]
        if hit.size:
            best = min(best, int(hit[0]) + 1)
    return best


def test_ill_conditioned_quadratic_soap_and_kron_beat_adamw():
    loss, init = ill_conditioned_quadratic()
    lrs = (0.03, 0.1, 0.3, 1.0, 3.0)
    adamw = steps_to_target(lambda lr: optax.adamw(lr, weight_decay=0.0), lrs, loss, init)
    soap = steps_to_target(lambda lr: rlx_optax.soap(lr, weight_decay=0.0), lrs, loss, init)
    kron = steps_to_target(rlx_optax.kron_psgd, lrs, loss, init)
    print(f"steps to 1e-6 of the initial loss: adamw {adamw}, soap {soap}, kron {kron}")
    assert adamw <= 1000  # the baseline converges: the comparison means something
    assert soap < adamw
    assert kron < adamw


@pytest.mark.parametrize("mode", ["crate", "reference"])
def test_huge_gradients_give_finite_factors_and_updates(mode):
    """1e30 gradients: A A^T overflows float32; the factor step is computed scale-free.

    The step is homogeneous of degree 0 in the gradient for the gradient probe, so a scaled
    gradient must give the same factors as an ordinary one (to rounding).
    """
    kwargs = {} if mode == "crate" else {"factor_update": "reference", "precondition_nd": True}
    tx = rlx_optax.scale_by_kron_psgd(**kwargs)
    g = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)), jnp.float32)
    p = {"w": jnp.zeros((5, 4), jnp.float32)}
    ordinary, huge = tx.init(p), tx.init(p)
    for _ in range(3):
        u_ord, ordinary = tx.update({"w": g}, ordinary)
        u_huge, huge = tx.update({"w": g * jnp.float32(2.0**100)}, huge)  # about 1.3e30
        assert bool(jnp.all(jnp.isfinite(u_huge["w"])))
        for t_ord, t_huge in zip(ordinary.factors, huge.factors, strict=True):
            f_ord, f_huge = t_ord["w"], t_huge["w"]
            assert bool(jnp.all(jnp.isfinite(f_huge)))
            np.testing.assert_allclose(f_huge, f_ord, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (5, 5), (4, 9), (9, 4)])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_crate_gradient_probe_leaves_the_factors_exactly_the_identity(shape, jit):
    """With the gradient as its own probe the crate computes A and B bit for bit equal from
    Q = I, so M = AA^T - BB^T is exactly 0 and the factors never move. Ours must agree on
    every shape and compilation: the update is then the crate's clipped gradient."""
    tx = rlx_optax.scale_by_kron_psgd()
    rng = np.random.default_rng(sum(shape))
    params = {"w": jnp.zeros(shape, jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for _ in range(4):
        g = rng.normal(size=shape).astype(np.float32) * 3.0
        updates, state = update({"w": jnp.asarray(g)}, state)
        for q, d in zip((tree["w"] for tree in state.factors), shape, strict=True):
            identity = np.eye(d) if d > 1 else np.ones(1)  # a length-1 axis: a diagonal factor
            assert np.array_equal(np.asarray(q), identity.astype(np.float32))
        # float64 oracle: P = I, so the update is g clipped to max-abs 1
        want = g.astype(np.float64) * min(1.0, 1.0 / np.max(np.abs(g.astype(np.float64))))
        np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=2e-7, atol=0)


@pytest.mark.parametrize(("n", "block"), [(5, 512), (7, 2), (33, 4), (513, 512), (700, 256)])
def test_blocked_upper_triangular_product_is_the_dense_product(n, block):
    """The factor step's blocked product against float64 NumPy (`np.triu(a) @ np.triu(b)`):
    float32 rounding, exact zeros below the diagonal, lower inputs ignored."""
    from rlx_optax._src.linalg import triangular

    rng = np.random.default_rng(n)
    a, b = (rng.normal(size=(n, n)).astype(np.float32) for _ in range(2))
    got = np.asarray(
        jax.jit(lambda a, b: triangular.upper_triangular_product(a, b, block=block))(a, b)
    )
    want = np.triu(a).astype(np.float64) @ np.triu(b).astype(np.float64)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert np.all(np.tril(got, -1) == 0)


@pytest.mark.parametrize(("m", "n"), [(600, 520), (5, 700)])
@pytest.mark.parametrize("transpose", [False, True])
def test_apply_along_axes_upper_triangular_is_the_dense_product(m, n, transpose):
    """Kron's blocked triangular products against float64 NumPy: ``A x B^T`` (or ``A^T x B``)
    for upper-triangular A, B (their lower triangles ignored)."""
    from rlx_optax._src import linalg

    rng = np.random.default_rng(m + n)
    x = rng.normal(size=(m, n)).astype(np.float32)
    a = rng.normal(size=(m, m)).astype(np.float32)
    b = rng.normal(size=(n, n)).astype(np.float32)
    got = np.asarray(linalg.apply_along_axes(x, [a, b], transpose=transpose, upper_triangular=True))
    ta, tb = np.triu(a).astype(np.float64), np.triu(b).astype(np.float64)
    want = ta.T @ x @ tb if transpose else ta @ x @ tb.T
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
