"""Adafactor against a float64 NumPy transcription (crate rule and reference options), the
crate's own quadratic tests, and optax.adafactor configured to the same rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from tests import problems


def _tree(seed=0):
    return problems.mixed_params(seed, conv=(3, 5, 4, 8))


def _grads(params, n, seed=1):
    return problems.random_grads(params, n, seed, scale=0.1)


def adafactor64(params, seq, lr=None, wd=0.0, *, d=1.0, factored="rank2", min_dim=1,
                norm="sum", clip="crate", momentum=None, param_scale=None, eps=1e-30):  # fmt: skip
    """Shazeer & Stern's Algorithm 4 and the crate's variant, float64, one leaf at a time."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    state = {}
    if param_scale is None:
        param_scale = lr is None
    for t, g in enumerate(seq, start=1):
        beta2 = 1 - t**-0.8
        for k in p:
            gk = np.asarray(g[k], np.float64)
            g2 = gk * gk + eps
            shape = gk.shape
            fac = (
                factored != "none"
                and len(shape) >= 2
                and (factored == "last_two" or len(shape) == 2)
                and min(shape[-2:]) >= min_dim
            )
            if fac:
                r, c = state.get(k, (0.0, 0.0))
                r = beta2 * r + (1 - beta2) * g2.mean(-1)
                c = beta2 * c + (1 - beta2) * g2.mean(-2)
                state[k] = (r, c)
                den = r.sum(-1) if norm == "sum" else r.mean(-1)
                v = r[..., :, None] * c[..., None, :] / np.maximum(den, eps)[..., None, None]
            else:
                v = beta2 * state.get(k, 0.0) + (1 - beta2) * g2
                state[k] = v
            u = gk / np.maximum(np.sqrt(v), np.sqrt(eps))
            rms = np.sqrt(np.mean(u * u))
            u = u / max(1.0, rms * d if clip == "crate" else rms / d)
            if momentum is not None:
                m = momentum * state.get(k + "/m", 0.0) + (1 - momentum) * u
                state[k + "/m"] = u = m
            alpha = min(1e-2, 1 / np.sqrt(t)) if lr is None else lr
            if param_scale:
                alpha *= max(1e-3, np.sqrt(np.mean(p[k] ** 2)))
            # parameters live in float32 between steps, in the crate as in the port
            p[k] = (p[k] - alpha * (u + wd * p[k])).astype(np.float32).astype(np.float64)
    return p


def run(tx, params, seq):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def rel_err(got, want, init):
    out = {}
    for k in want:
        den = np.max(np.abs(want[k] - np.asarray(init[k], np.float64)))
        out[k] = float(np.max(np.abs(np.asarray(got[k], np.float64) - want[k])) / den)
    return out


CASES = [
    ({}, {}),
    ({"learning_rate": 0.01, "weight_decay": 0.1}, {"lr": 0.01, "wd": 0.1}),
    ({"clipping_threshold": 0.5}, {"d": 0.5}),
    ({"clipping_threshold": 0.5, "clipping_rule": "paper"}, {"d": 0.5, "clip": "paper"}),
    (
        {"factored": "last_two", "factored_normalization": "mean"},
        {"factored": "last_two", "norm": "mean"},
    ),  # noqa: E501
    (
        {"factored": "last_two", "min_dim_size_to_factor": 20},
        {"factored": "last_two", "min_dim": 20},
    ),  # noqa: E501
    ({"factored": "none", "momentum": 0.9}, {"factored": "none", "momentum": 0.9}),
    (
        {"learning_rate": 0.01, "multiply_by_parameter_scale": True},
        {"lr": 0.01, "param_scale": True},
    ),  # noqa: E501
]


@pytest.mark.parametrize("ours,oracle", CASES)
def test_matches_float64_transcription(ours, oracle):
    params = _tree()
    seq = _grads(params, 6)
    got, _ = run(rlx_optax.adafactor(**ours), params, seq)
    err = rel_err(got, adafactor64(params, seq, **oracle), params)
    assert max(err.values()) < 1e-5, err


@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_floor_of_the_factored_second_moment_matches_transcription(norm):
    # rows of very different scales with a large eps1: V-hat falls under eps1 on the small
    # rows, where u = g / sqrt(eps1) (the floor), and stays above it elsewhere
    params = {"w": np.full((12, 10), 0.5, np.float32)}
    rng = np.random.default_rng(3)
    scales = np.logspace(-3, 0, 12)[:, None]
    seq = [{"w": (scales * rng.normal(size=(12, 10))).astype(np.float32)} for _ in range(5)]
    eps = 1e-4
    g0 = seq[0]["w"].astype(np.float64)  # first step: beta2 = 0, V-hat from g0 alone
    r, c = (g0 * g0 + eps).mean(-1), (g0 * g0 + eps).mean(-2)
    v_hat = np.outer(r, c) / (r.sum() if norm == "sum" else r.mean())
    assert 0.1 < np.mean(v_hat < eps) < 0.9  # guard: the floor binds on part of the leaf
    tx = rlx_optax.adafactor(0.01, eps=eps, factored_normalization=norm)
    got, _ = run(tx, params, seq)
    err = rel_err(got, adafactor64(params, seq, 0.01, norm=norm, eps=eps), params)
    assert max(err.values()) < 1e-5, err


def test_options_change_the_result():
    # guard: the clipping rules agree at d = 1 and must differ at d = 0.5
    params = _tree()
    seq = _grads(params, 3)
    a, _ = run(rlx_optax.adafactor(clipping_threshold=0.5), params, seq)
    b, _ = run(rlx_optax.adafactor(clipping_threshold=0.5, clipping_rule="paper"), params, seq)
    assert np.abs(np.asarray(a["b"]) - np.asarray(b["b"])).max() > 1e-4


def test_state_is_factored_and_float32():
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), _tree())
    state = rlx_optax.adafactor().init(params)
    sf = state[0]
    assert sf.v_row["w"].shape == (24,) and sf.v_col["w"].shape == (16,)
    # unused statistics are (1,) placeholders (orbax cannot save zero-size arrays)
    assert sf.v["w"].shape == (1,) and sf.v["k"].shape == (3, 5, 4, 8)  # crate: rank 4 unfactored
    assert sf.v_row["b"].shape == sf.v_col["b"].shape == (1,)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((sf.v_row, sf.v_col, sf.v)))
    nd = rlx_optax.adafactor(factored="last_two").init(params)[0]
    assert nd.v_row["k"].shape == (3, 5, 4) and nd.v_col["k"].shape == (3, 5, 8)


def test_first_step_of_a_vector_is_sign():
    # derived in the spec: beta2_1 = 0, so u = sign(g) and the step is alpha * sign(g)
    p = {"b": np.full(5, 2.0, np.float32)}
    g = {"b": np.array([0.3, -2.0, 1e-3, 4.0, -1e-6], np.float32)}
    got, _ = run(rlx_optax.adafactor(), p, [g])
    np.testing.assert_allclose(got["b"], 2.0 - 1e-2 * 2.0 * np.sign(g["b"]), rtol=1e-6)


def _quadratic(tx, target, steps):
    def body(carry, _):
        x, s = carry
        u, s = tx.update(x - target, s, x)
        return (optax.apply_updates(x, u), s), None

    x0 = jnp.zeros_like(target)
    (x, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((x0, tx.init(x0)))
    return float(jnp.linalg.norm(x - target))


def test_crate_quadratic_tests():
    vec = jnp.asarray(0.1 * np.arange(16) - 0.8, jnp.float32)
    assert _quadratic(rlx_optax.adafactor(0.1), vec, 3000) < 0.3
    mat = jnp.asarray(np.sin(0.03 * np.arange(24)).reshape(6, 4), jnp.float32)
    assert _quadratic(rlx_optax.adafactor(0.05), mat, 800) < 0.5


# --------------------------------------------------------------------------- optax


def test_parity_with_optax_adafactor():
    # optax factors the two largest axes (the last two here) from min_dim_size_to_factor up,
    # normalises by the mean, clips by RMS/d, and its momentum is an undebiased EMA; its decay is
    # not multiplied by the rate, so the comparison runs without decay.
    params = {k: v for k, v in _tree().items() if k != "k"}
    params["k"] = np.random.default_rng(3).normal(size=(2, 8, 6)).astype(np.float32)
    seq = _grads(params, 8)
    for momentum in (None, 0.9):
        ours = rlx_optax.adafactor(
            0.01,
            factored="last_two",
            factored_normalization="mean",
            clipping_rule="paper",
            momentum=momentum,
        )
        theirs = optax.adafactor(
            0.01, min_dim_size_to_factor=1, multiply_by_parameter_scale=False, momentum=momentum
        )
        got, _ = run(ours, params, seq)
        want, _ = run(theirs, params, seq)
        want = {k: np.asarray(v, np.float64) for k, v in want.items()}
        err = rel_err(got, want, params)
        assert max(err.values()) < 1e-5, (momentum, err)


def test_inject_hyperparams_needs_no_static_args():
    params = _tree()
    seq = _grads(params, 3)
    kwargs = {"learning_rate": 0.01, "min_dim_size_to_factor": 20, "factored": "last_two"}
    direct, _ = run(rlx_optax.adafactor(**kwargs), params, seq)
    injected, state = run(optax.inject_hyperparams(rlx_optax.adafactor)(**kwargs), params, seq)
    for k in params:
        np.testing.assert_allclose(injected[k], direct[k], rtol=1e-6, atol=1e-7)
    assert int(state.hyperparams["min_dim_size_to_factor"]) == 20
    # relative step (learning_rate=None stays static) works too
    rel, _ = run(optax.inject_hyperparams(rlx_optax.adafactor)(), params, seq)
    want = adafactor64(params, seq)
    assert max(rel_err(rel, want, params).values()) < 1e-5


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"beta2_decay": 0.5}, "beta2_decay"),
        ({"clipping_threshold": 0.0}, "clipping_threshold"),
        ({"factored": "all"}, "factored"),
        ({"clipping_rule": "hf"}, "clipping_rule"),
        ({"factored_normalization": "max"}, "factored_normalization"),
        ({"min_dim_size_to_factor": 0}, "min_dim_size_to_factor"),
        ({"eps_scale": -1.0}, "eps_scale"),
        ({"learning_rate": -1.0}, "learning_rate"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rlx_optax.adafactor(**kwargs)


def test_state_can_be_donated():
    # every state leaf is its own buffer (a shared placeholder would be donated twice)
    params = jax.tree.map(jnp.asarray, _tree())
    tx = rlx_optax.adafactor(0.01)
    state = tx.init(params)
    ids = [id(x) for x in jax.tree.leaves(state)]
    assert len(ids) == len(set(ids))

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    g = jax.tree.map(jnp.ones_like, params)
    jax.jit(step, donate_argnums=(0, 1))(params, state, g)


@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_a_saturated_factored_statistic_gives_zero_updates_not_nan(norm):
    # one |g| = 1e30 entry: its square overflows, so its row and column statistics become
    # +inf and so does the normaliser (inf/inf was NaN for the whole leaf). Those entries
    # now get zero updates, the rest stays finite, and no state entry is NaN.
    tx = rlx_optax.scale_by_adafactor(factored_normalization=norm)
    w = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    state = tx.init({"w": jnp.zeros((6, 4))})
    step = jax.jit(tx.update)
    for t in range(3):
        g = w.copy()
        if t == 0:
            g[1, 2] = -1e30
        u, state = step({"w": jnp.asarray(g)}, state)
        u = np.asarray(u["w"])
        assert np.all(np.isfinite(u)), (t, u)
        assert np.all(u[1, :] == 0) and np.all(u[:, 2] == 0), (t, u)
        assert np.all(u[[0, 2, 3, 4, 5]][:, [0, 1, 3]] != 0), (t, u)
        assert not any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(state))
    assert np.isposinf(np.asarray(state.v_row["w"])[1]) and np.isposinf(state.v_col["w"][2])
