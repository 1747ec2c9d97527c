"""Sophia and the Hessian-diagonal estimators against float64 NumPy oracles and statistics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax

SHAPES = {"w": (6, 5), "b": (5,)}


def _np_sophia(p0, grads, hessians, *, lr, b1, b2, gamma, rho, eps, wd, bias_correction=False):
    """Float64 transcription of the crate's Sophia (spec §4.13), one estimate per step or None."""
    p = {k: np.asarray(v, np.float64) for k, v in p0.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    h = {k: np.zeros_like(v) for k, v in p.items()}
    traj = []
    for t, (g, est) in enumerate(zip(grads, hessians, strict=True), start=1):
        for k in p:
            if est is not None:
                h[k] = b2 * h[k] + (1 - b2) * np.asarray(est[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * np.asarray(g[k], np.float64)
            mh = m[k] / (1 - b1**t) if bias_correction else m[k]
            ratio = mh / np.maximum(max(gamma, eps) * h[k], eps)
            u = np.clip(ratio, -rho, rho)
            p[k] = p[k] - lr * (u + wd * p[k])
        traj.append({k: v.copy() for k, v in p.items()})
    return traj


def _random_tree(key, scale=1.0):
    keys = jax.random.split(key, len(SHAPES))
    return {
        n: scale * jax.random.normal(k, s, jnp.float32)
        for (n, s), k in zip(SHAPES.items(), keys, strict=True)
    }


def _sequence(n, seed=0):
    key = jax.random.key(seed)
    grads, hessians = [], []
    for i in range(n):
        kg, kh, key = jax.random.split(key, 3)
        grads.append(_random_tree(kg))
        # estimates arrive at some steps only, with some negative entries (Hutchinson can
        # produce them) and sizes that put the ratio on both sides of the clip bound
        hessians.append(_random_tree(kh, 3.0) if i % 3 != 1 else None)
    return grads, hessians


def _run(tx, params, grads, hessians):
    state = tx.init(params)
    update = jax.jit(tx.update)
    traj = []
    for g, h in zip(grads, hessians, strict=True):
        extra = {} if h is None else {"hessian_diag": h}
        u, state = update(g, state, params, **extra)
        params = optax.apply_updates(params, u)
        traj.append(params)
    return traj, state


def _assert_traj_close(traj, ref, p0):
    for k in p0:
        got = np.stack([np.asarray(t[k]) for t in traj])
        want = np.stack([r[k] for r in ref])
        disp = np.max(np.abs(want - np.asarray(p0[k])[None]))
        assert np.max(np.abs(got - want)) / disp < 1e-5, k


HP = dict(lr=0.05, b1=0.965, b2=0.99, gamma=0.01, rho=0.04, eps=1e-12, wd=0.1)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"rho": 1.0, "gamma": 0.5, "wd": 0.0}, {"bias_correction": True, "rho": 1.0}],
    ids=["crate", "paper_clip", "bias_correction"],
)
def test_matches_float64_oracle(overrides):
    hp = {**HP, **overrides}
    p0 = _random_tree(jax.random.key(42))
    grads, hessians = _sequence(9)
    tx = rlx_optax.sophia(
        hp["lr"],
        b1=hp["b1"],
        b2=hp["b2"],
        gamma=hp["gamma"],
        rho=hp["rho"],
        eps=hp["eps"],
        weight_decay=hp["wd"],
        bias_correction=hp.get("bias_correction", False),
    )
    traj, _ = _run(tx, p0, grads, hessians)
    _assert_traj_close(traj, _np_sophia(p0, grads, hessians, **hp), p0)


def test_no_estimate_gives_sign_momentum_step():
    # with h never set the denominator is eps: the step is lr * rho * sign(m)
    tx = rlx_optax.sophia(0.1, weight_decay=0.0)
    params = {"x": jnp.zeros(4)}
    g = {"x": jnp.array([1e-6, -2.0, 3.0, -1e-9])}
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u["x"], -0.1 * 0.04 * np.sign(g["x"]), rtol=1e-6)


def test_update_hessian_helper_equals_fold_then_step():
    p0 = _random_tree(jax.random.key(1))
    g, h = _random_tree(jax.random.key(2)), _random_tree(jax.random.key(3), 2.0)
    tx = rlx_optax.sophia(0.05)
    u_direct, s_direct = tx.update(g, tx.init(p0), p0, hessian_diag=h)
    state = rlx_optax.sophia_update_hessian(tx.init(p0), h, b2=0.99)
    one_minus_b2 = np.float32(1) - np.float32(0.99)  # the fold runs in float32
    np.testing.assert_allclose(state[0].h["w"], one_minus_b2 * np.asarray(h["w"]), rtol=1e-7)
    u_split, s_split = tx.update(g, state, p0)
    jax.tree.map(np.testing.assert_array_equal, (u_direct, s_direct), (u_split, s_split))
    # the helper finds the SophiaState inside wrapped states too, and keeps dtypes
    inj = optax.inject_hyperparams(rlx_optax.sophia)(learning_rate=0.05)
    s_inj = rlx_optax.sophia_update_hessian(inj.init(p0), h)
    np.testing.assert_array_equal(s_inj.inner_state[0].h["b"], state[0].h["b"])
    with pytest.raises(ValueError, match="b2"):
        rlx_optax.sophia_update_hessian(state, h, b2=1.5)


def test_win_rate_is_fraction_inside_clip_bound():
    p0 = _random_tree(jax.random.key(4))
    g, h = _random_tree(jax.random.key(5)), _random_tree(jax.random.key(6), 2e4)
    tx = rlx_optax.sophia(0.1, track_win_rate=True)
    _, state = tx.update(g, tx.init(p0), p0, hessian_diag=h)
    ratios = [
        (1 - 0.965)
        * np.asarray(g[k], np.float64)
        / np.maximum(0.01 * 0.01 * np.asarray(h[k]), 1e-12)
        for k in SHAPES
    ]
    want = np.mean(np.concatenate([np.abs(r).ravel() < 0.04 for r in ratios]))
    assert 0.0 < want < 1.0
    assert float(state[0].win_rate) == pytest.approx(want)
    assert np.isnan(float(rlx_optax.sophia(0.1).init(p0)[0].win_rate))  # not tracked


def test_rejects_bad_hyperparameters_and_structures():
    with pytest.raises(ValueError, match="rho"):
        rlx_optax.sophia(0.1, rho=0.0)
    with pytest.raises(ValueError, match="gamma"):
        rlx_optax.sophia(0.1, gamma=-1.0)
    with pytest.raises(ValueError, match="update_interval"):
        rlx_optax.sophia(0.1, update_interval=0)
    tx = rlx_optax.sophia(0.1)
    params = {"x": jnp.zeros(3)}
    with pytest.raises(ValueError, match="hessian_diag"):
        tx.update(params, tx.init(params), params, hessian_diag={"y": jnp.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        tx.update(params, tx.init(params), params, hessian_diag={"x": jnp.ones(4)})
    with_est = rlx_optax.sophia(0.1, hessian_estimator=rlx_optax.hutchinson_diag)
    with pytest.raises(ValueError, match="obj_fn"):
        with_est.update(params, with_est.init(params), params)


# --------------------------------------------------------------------------- estimators


def _dense_quadratic(n=12, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(n, n))
    a = (b + b.T) / 2 + np.diag(rng.uniform(1, 3, size=n))
    return a


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_on_a_quadratic(distribution):
    """Mean of N single-probe estimates within 5 standard errors of diag(A) in every entry.

    The standard error is analytic: Var = sum_{j != i} A_ij^2 (Rademacher), plus 2 A_ii^2
    (Gaussian). With a fixed key the test is deterministic; 5 sigma over 12 entries would fail
    by chance with probability about 7e-6 for a correct estimator, while a biased one (for
    example g*g, or a missing factor) misses by tens of sigma.
    """
    a = _dense_quadratic()
    a32 = jnp.asarray(a, jnp.float32)
    n_samples = 4000

    def loss(p):
        return 0.5 * p["x"] @ a32 @ p["x"] + jnp.sum(jnp.sin(p["y"]))

    params = {"x": jnp.asarray(np.linspace(-1, 1, 12), jnp.float32), "y": jnp.zeros(3)}
    keys = jax.random.split(jax.random.key(2024), n_samples)
    est = jax.jit(
        jax.vmap(lambda k: rlx_optax.hutchinson_diag(loss, params, k, distribution=distribution))
    )(keys)
    mean = np.asarray(est["x"], np.float64).mean(axis=0)
    off = np.sum(a**2, axis=1) - np.diag(a) ** 2
    var = off + (2 * np.diag(a) ** 2 if distribution == "gaussian" else 0.0)
    se = np.sqrt(var / n_samples)
    assert np.all(np.abs(mean - np.diag(a)) < 5 * se), (mean - np.diag(a)) / se
    # the sin(y) leaf at y = 0 has zero curvature: every sample is exactly 0
    np.testing.assert_array_equal(np.asarray(est["y"]), 0.0)


def test_hutchinson_averages_samples_and_is_exact_for_diagonal():
    d = jnp.array([0.5, 2.0, -1.0])
    loss = lambda p: 0.5 * jnp.sum(d * p**2)  # noqa: E731
    h = rlx_optax.hutchinson_diag(loss, jnp.ones(3), jax.random.key(0), num_samples=3)
    np.testing.assert_allclose(h, d, rtol=1e-6)
    a = jnp.asarray(_dense_quadratic(4), jnp.float32)
    quad = lambda p: 0.5 * p @ a @ p  # noqa: E731
    key = jax.random.key(7)
    many = rlx_optax.hutchinson_diag(quad, jnp.ones(4), key, num_samples=5)
    singles = [rlx_optax.hutchinson_diag(quad, jnp.ones(4), k) for k in jax.random.split(key, 5)]
    np.testing.assert_allclose(many, np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)


def test_gauss_newton_bartlett_expectation_is_the_softmax_hessian_diagonal():
    """For a linear softmax model, E[B g^2] over sampled labels = diag(Hessian of mean CE).

    The oracle is a float64 NumPy formula: H = (1/B) sum_b kron(diag(p_b) - p_b p_b^T,
    x_b x_b^T) for W of shape (features, classes); 5 standard errors per entry.
    """
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 3))
    w = 0.5 * rng.normal(size=(3, 4))
    logits = x @ w
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # diagonal entry (f, c): (1/B) sum_b x_bf^2 * p_bc (1 - p_bc)
    want = np.einsum("bf,bc->fc", x**2, p * (1 - p)) / x.shape[0]
    x32 = jnp.asarray(x, jnp.float32)
    n_samples = 4000
    keys = jax.random.split(jax.random.key(11), n_samples)
    est = jax.jit(
        jax.vmap(
            lambda k: rlx_optax.gauss_newton_bartlett_diag(
                lambda prm: x32 @ prm["w"], {"w": jnp.asarray(w, jnp.float32)}, k
            )["w"]
        )
    )(keys)
    est = np.asarray(est, np.float64)
    se = est.std(axis=0) / np.sqrt(n_samples)
    assert np.all(np.abs(est.mean(axis=0) - want) < 5 * se + 1e-7)


def test_estimator_inside_update_every_k_steps():
    # a diagonal quadratic: Rademacher Hutchinson is exact, so h follows a known EMA
    d = jnp.array([1.0, 2.0, 4.0])
    loss = lambda p: 0.5 * jnp.sum(d * p["x"] ** 2)  # noqa: E731
    tx = rlx_optax.sophia(
        0.05, hessian_estimator=rlx_optax.hutchinson_diag, update_interval=3, weight_decay=0.0
    )
    params = {"x": jnp.ones(3)}
    state = tx.init(params)
    step = jax.jit(functools.partial(tx.update, obj_fn=loss))
    h_expected = np.zeros(3)
    for t in range(7):
        if t % 3 == 0:  # steps 1, 4, 7
            h_expected = 0.99 * h_expected + 0.01 * np.asarray(d)
        u, state = step(jax.grad(loss)(params), state, params, key=jax.random.key(0))
        params = optax.apply_updates(params, u)
        np.testing.assert_allclose(state[0].h["x"], h_expected, rtol=1e-6)


# --------------------------------------------------------------------------- composition


def test_masked_and_partition_with_full_hessian_tree():
    p0 = _random_tree(jax.random.key(8))
    grads, hessians = _sequence(4, seed=9)
    hessians = [h if h is not None else _random_tree(jax.random.key(0)) for h in hessians]
    ref_tx = rlx_optax.sophia(0.05)
    ref_state = ref_tx.init({"w": p0["w"]})
    masked = optax.masked(rlx_optax.sophia(0.05), {"w": True, "b": False})
    masked_hint = optax.masked(
        rlx_optax.sophia(0.05), {"w": True, "b": False}, mask_compatible_extra_args=True
    )
    part = optax.partition(
        {"s": rlx_optax.sophia(0.05), "sgd": optax.sgd(0.1)}, {"w": "s", "b": "sgd"}
    )
    states = [t.init(p0) for t in (masked, masked_hint, part)]
    for g, h in zip(grads, hessians, strict=True):
        ref_u, ref_state = ref_tx.update(
            {"w": g["w"]}, ref_state, {"w": p0["w"]}, hessian_diag={"w": h["w"]}
        )
        for i, tx in enumerate((masked, masked_hint, part)):
            u, states[i] = jax.jit(tx.update)(g, states[i], p0, hessian_diag=h)
            np.testing.assert_allclose(u["w"], ref_u["w"], rtol=1e-6, atol=1e-8)
        np.testing.assert_array_equal(u["b"], -0.1 * g["b"])


def test_flax_nnx_training_step():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
    y = jnp.sin(x.sum(axis=1, keepdims=True))

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    model = Model(nnx.Rngs(0))
    tx = rlx_optax.sophia(0.05, rho=1.0, gamma=0.05, weight_decay=0.0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_of_params(p):
            return loss_fn(nnx.merge(graphdef, p, rest))

        hessian = rlx_optax.hutchinson_diag(loss_of_params, params, key)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads, hessian_diag=hessian)
        return loss

    first = None
    for i in range(150):
        loss = float(train_step(model, optimizer, jax.random.key(i)))
        first = loss if first is None else first
    assert loss < 0.2 * first
    # the state really received the estimates: h is non-zero for every parameter
    h_leaves = jax.tree.leaves(optimizer.opt_state[0].h)
    assert h_leaves and all(bool(jnp.any(leaf != 0)) for leaf in h_leaves)
