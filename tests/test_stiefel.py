"""Stiefel against a float64 NumPy transcription of the crate's rule and the crate's own tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax


def mgs_rows(y):
    """The crate's modified Gram-Schmidt on rows, float64."""
    q = np.array(y, np.float64)
    for i in range(q.shape[0]):
        for j in range(i):
            q[i] -= (q[i] @ q[j]) * q[j]
        q[i] /= max(np.linalg.norm(q[i]), 1e-12)
    return q


def stiefel64(params, seq, lr, mu=0.0):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for g in seq:
        for k in p:
            gk = np.asarray(g[k], np.float64)
            w = p[k]
            if w.ndim == 2 and w.shape[0] <= w.shape[1]:
                a = w @ gk.T
                gk = gk - 0.5 * (a + a.T) @ w
            v[k] = mu * v[k] + gk
            y = w - lr * (v[k] if mu else gk)
            p[k] = mgs_rows(y) if w.ndim == 2 and w.shape[0] <= w.shape[1] else y
    return p


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(24, 16)).astype(np.float32),
        "u": mgs_rows(rng.normal(size=(16, 40))).astype(np.float32),
        "b": rng.normal(size=(16,)).astype(np.float32),
        "k": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
    }


def run(tx, params, seq):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_matches_float64_transcription(mu):
    params = _tree()
    rng = np.random.default_rng(1)
    seq = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(8)
    ]
    got, state = run(rlx_optax.stiefel(0.05, momentum=mu), params, seq)
    want = stiefel64(params, seq, 0.05, mu)
    for k in params:
        den = np.max(np.abs(want[k] - params[k]))
        err = np.max(np.abs(np.asarray(got[k], np.float64) - want[k])) / den
        assert err < 1e-4, (k, err)
    u = np.asarray(got["u"], np.float64)
    np.testing.assert_allclose(u @ u.T, np.eye(16), atol=2e-6)
    assert (state[0].mu is None) == (mu == 0.0)


def _crate_problem(m=3, n=6):
    k = np.arange(n * n, dtype=np.float64).reshape(n, n)
    b = 0.5 * np.sin(0.37 * k + 1) + 0.2 * np.cos(0.11 * k)
    a = b.T @ b + n * np.eye(n)
    a = 0.5 * (a + a.T)
    kw = np.arange(m * n, dtype=np.float64).reshape(m, n)
    w0 = mgs_rows(np.cos(0.5 * kw + 0.3) + np.eye(m, n))
    return jnp.asarray(a, jnp.float32), jnp.asarray(w0, jnp.float32), a


def _train(tx, a, w0, steps):
    def body(carry, _):
        w, s = carry
        u, s = tx.update(-2.0 * w @ a, s, w)
        w = optax.apply_updates(w, u)
        return (w, s), -jnp.trace(w @ a @ w.T)

    (w, _), losses = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((w0, tx.init(w0)))
    return np.asarray(w, np.float64), np.asarray(losses, np.float64)


@pytest.mark.parametrize("lr,mu", [(0.05, 0.0), (0.02, 0.9)])
def test_crate_stays_on_manifold(lr, mu):
    a, w0, _ = _crate_problem()
    w, _ = _train(rlx_optax.stiefel(lr, momentum=mu), a, w0, 500)
    assert np.linalg.norm(w @ w.T - np.eye(3)) < 1e-6


def test_crate_reaches_top_eigenspace_monotonically():
    a, w0, a64 = _crate_problem()
    _, losses = _train(rlx_optax.stiefel(0.05), a, w0, 3000)
    assert np.all(np.diff(losses) <= 1e-4 * max(1.0, abs(losses[0])))
    target = -np.sort(np.linalg.eigvalsh(a64))[-3:].sum()
    assert abs(losses[-1] - target) < 1e-4 * abs(target)


def test_crate_determinism_and_vector_fallback():
    a, w0, _ = _crate_problem()
    w1, _ = _train(rlx_optax.stiefel(0.05, momentum=0.5), a, w0, 100)
    w2, _ = _train(rlx_optax.stiefel(0.05, momentum=0.5), a, w0, 100)
    np.testing.assert_array_equal(w1, w2)
    target = jnp.array([1.0, -2.0, 3.0, 0.5])
    tx = rlx_optax.stiefel(0.5)
    x, s = jnp.zeros(4), tx.init(jnp.zeros(4))
    for _ in range(200):
        u, s = tx.update(x - target, s, x)
        x = optax.apply_updates(x, u)
    assert float(jnp.linalg.norm(x - target)) < 1e-4


def test_tall_matrices_take_the_sgd_fallback():
    # rows > cols is not a Stiefel point in the crate's convention (never transposed)
    params = {"w": _tree()["w"]}
    rng = np.random.default_rng(2)
    seq = [{"w": rng.normal(size=(24, 16)).astype(np.float32)} for _ in range(3)]
    got, _ = run(rlx_optax.stiefel(0.05, momentum=0.9), params, seq)
    want, _ = run(rlx_optax.sgd(0.05, momentum=0.9), params, seq)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6, atol=1e-7)


def test_needs_params():
    tx = rlx_optax.stiefel(0.1)
    w = jnp.eye(2, 3)
    with pytest.raises(ValueError, match="params"):
        tx.update(w, tx.init(w))


def _building_blocks(learning_rate, momentum, mu_dtype):
    return optax.chain(
        rlx_optax.scale_by_stiefel(momentum, mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
        rlx_optax.retract_stiefel(),
    )


@pytest.mark.parametrize(
    "dtype,momentum,mu_dtype,schedule",
    [
        (jnp.float32, 0.0, None, False),
        (jnp.float32, 0.9, None, True),
        (jnp.bfloat16, 0.9, jnp.bfloat16, False),
        (jnp.bfloat16, 0.0, None, True),
    ],
)
def test_alias_is_its_building_blocks_bit_for_bit(dtype, momentum, mu_dtype, schedule):
    # the alias runs the chain's per-leaf operations as one step (one owner trip on a mesh)
    lr = optax.linear_schedule(0.1, 0.01, 3) if schedule else 0.05
    rng = np.random.default_rng(3)
    params = {
        "u": jnp.asarray(mgs_rows(rng.normal(size=(6, 10))), dtype),
        "w": jnp.asarray(rng.normal(size=(10, 6)), dtype),
        "b": jnp.asarray(rng.normal(size=(5,)), dtype),
        "frozen": None,
    }
    seq = [
        {k: None if x is None else jnp.asarray(rng.normal(size=x.shape), dtype)
         for k, x in params.items()}
        for _ in range(4)
    ]  # fmt: skip
    runs = []
    for tx in [
        rlx_optax.stiefel(lr, momentum, mu_dtype=mu_dtype),
        _building_blocks(lr, momentum, mu_dtype),
    ]:
        p, state, step, out = params, tx.init(params), jax.jit(tx.update), []
        for g in seq:
            u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
            out.append((u, state))
        runs.append(out)
    got, want = runs
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def test_injected_momentum_matches_the_number():
    params = {"u": jnp.asarray(mgs_rows(np.eye(3, 5) + 0.1), jnp.float32), "b": jnp.ones(3)}
    grads = {"u": jnp.full((3, 5), 0.3), "b": jnp.full(3, -0.2)}
    runs = []
    for tx in [
        optax.inject_hyperparams(rlx_optax.stiefel)(learning_rate=0.1, momentum=0.9),
        rlx_optax.stiefel(0.1, momentum=0.9),
    ]:
        p, state, step = params, tx.init(params), jax.jit(tx.update)
        for _ in range(3):
            u, state = step(grads, state, p)
            p = optax.apply_updates(p, u)
        runs.append(p)
    for k in params:
        np.testing.assert_allclose(runs[0][k], runs[1][k], rtol=1e-6, atol=1e-7)


def test_owner_state_placement_is_the_parameter_one_on_one_device():
    # on a mesh the momentum stays on its owner devices (tests/sharding_worker.py)
    with pytest.raises(ValueError, match="state_placement"):
        rlx_optax.stiefel(0.1, state_placement="device")
    params = {"u": jnp.asarray(mgs_rows(np.eye(3, 5) + 0.1), jnp.float32), "b": jnp.ones(3)}
    grads = {"u": jnp.full((3, 5), 0.3), "b": jnp.full(3, -0.2)}
    runs = []
    for placement in ["owner", "parameter"]:
        tx = rlx_optax.stiefel(0.1, momentum=0.9, state_placement=placement)
        state = tx.init(params)
        assert isinstance(state[0], rlx_optax.StiefelState)
        u, state = jax.jit(tx.update)(grads, state, params)
        runs.append((u, state))
    for a, b in zip(*(jax.tree.leaves(r) for r in runs), strict=True):
        np.testing.assert_array_equal(a, b)
