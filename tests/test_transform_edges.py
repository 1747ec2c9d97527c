"""Edges of single transforms that users hit: Sophia's keywords, LAMB meta-gradients on zero
leaves, Adafactor's state under `optax.tree.get` and `jax.jit(init)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax

# --------------------------------------------------------------------------- Sophia


@pytest.mark.parametrize("keyword", ["hessian", "hess_diag", "hessian_diagonal", "Hessian"])
def test_sophia_refuses_a_misspelled_hessian_keyword(keyword):
    tx = rlx_optax.sophia(0.1)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(TypeError, match=f"'{keyword}'.*hessian_diag="):
        tx.update(params, state, params, **{keyword: params})


def test_sophia_takes_other_members_keywords_inside_a_chain():
    # optax.chain passes every extra argument to every member: MARS's previous_grads too.
    tx = optax.chain(rlx_optax.sophia(0.1), optax.scale(1.0))
    params = {"w": jnp.ones(3)}
    u, _ = tx.update(params, tx.init(params), params, previous_grads=params, hessian_diag=params)
    assert np.isfinite(np.asarray(u["w"])).all()


def test_sophia_without_an_estimate_is_sign_descent_as_documented():
    tx = rlx_optax.sophia(0.1, weight_decay=0.0)
    g = {"w": jnp.array([0.3, -2.0, 0.0])}
    u, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(u["w"], -0.1 * 0.04 * np.sign([0.3, -2.0, 0.0]), rtol=1e-6)
    assert "sign descent" in rlx_optax.sophia.__doc__


# --------------------------------------------------------------------------- LAMB


def _meta_grad(tx, params, grads):
    def loss(p):
        state = tx.init(p)
        u, _ = tx.update(grads, state, p)
        new = optax.apply_updates(p, u)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(new))

    return jax.grad(loss)(params)


def test_lamb_meta_gradient_is_finite_on_a_leaf_that_starts_at_zero():
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.zeros(3)}
    grads = {"w": jnp.full((2, 3), 0.1), "b": jnp.array([0.2, -0.1, 0.3])}
    tx = rlx_optax.lamb(0.01)
    meta = _meta_grad(tx, params, grads)
    for name, g in meta.items():
        assert np.isfinite(np.asarray(g)).all(), name
    # The non-zero leaf's meta-gradient is that of the leaf on its own (the safe norm of the
    # zero leaf does not leak into it).
    alone = _meta_grad(tx, {"w": params["w"]}, {"w": grads["w"]})
    np.testing.assert_allclose(meta["w"], alone["w"], rtol=1e-6)
    # The zero leaf has trust ratio 1: its update is -lr * (adam direction + decay * 0);
    # d/dp of (p - lr * (r + wd * p))**2 at p = 0 is 2 * (-lr * r) * (1 - lr * wd).
    r = np.sign(np.asarray(grads["b"]))  # Adam's first step is sign(g) (eps aside)
    want = 2 * (-0.01 * r) * (1 - 0.01 * 0.01)
    np.testing.assert_allclose(meta["b"], want, rtol=1e-4)


def test_lamb_update_values_unchanged_by_the_safe_norm():
    params = {"w": jnp.zeros((2, 3)), "b": jnp.array([1.0, 2.0, 3.0])}
    grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.array([0.2, -0.1, 0.3])}
    tx = rlx_optax.lamb(0.1, weight_decay=0.0)
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["w"], -0.1 * np.ones((2, 3)), rtol=1e-5)  # ratio 1
    r = np.sign([0.2, -0.1, 0.3])
    ratio = np.linalg.norm([1.0, 2.0, 3.0]) / np.linalg.norm(r)
    np.testing.assert_allclose(u["b"], -0.1 * ratio * r, rtol=1e-5)


# --------------------------------------------------------------------------- Adafactor


def test_adafactor_state_has_one_field_named_count():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    tx = rlx_optax.adafactor()
    state = tx.init(params)
    tx.update(params, state, params)
    count = optax.tree.get(state, "count")
    assert int(count) == 0
    _, state = tx.update(params, state, params)
    assert int(optax.tree.get(state, "count")) == 1


@pytest.mark.parametrize("lr", [None, 0.1])
def test_adafactor_init_jits_under_inject_hyperparams(lr):
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    tx = optax.inject_hyperparams(rlx_optax.adafactor)(learning_rate=lr)
    jitted = jax.jit(tx.init)(params)
    eager = tx.init(params)
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    u, _ = jax.jit(tx.update)(params, jitted, params)
    assert np.isfinite(np.asarray(u["w"])).all()


def test_adafactor_explicit_min_dim_under_inject_hyperparams_says_static_args():
    params = {"w": jnp.ones((4, 3))}
    tx = optax.inject_hyperparams(rlx_optax.adafactor)(min_dim_size_to_factor=2)
    with pytest.raises(ValueError, match="static_args=\\('min_dim_size_to_factor',\\)"):
        jax.jit(tx.init)(params)
    static = optax.inject_hyperparams(rlx_optax.adafactor, static_args="min_dim_size_to_factor")
    state = jax.jit(static(min_dim_size_to_factor=4).init)(params)
    # (4, 3) has an axis shorter than 4: not factored, so the full second moment is kept.
    assert optax.tree.get(state, "v")["w"].shape == (4, 3)
