"""Shared problems every registered algorithm is run against (the contract table)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def quadratic():
    """A diagonal quadratic over a vector leaf and a 3-D leaf; minimum 0 at `target`."""
    rng = np.random.default_rng(0)
    target = {
        "v": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
        "t": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
    }
    curv = {
        "v": jnp.asarray(np.linspace(0.5, 2.0, 16), jnp.float32),
        "t": jnp.asarray(rng.uniform(0.5, 2.0, size=(2, 3, 4)), jnp.float32),
    }

    def loss(params):
        return sum(0.5 * jnp.sum(curv[k] * (params[k] - target[k]) ** 2) for k in sorted(params))

    init = jax.tree.map(jnp.zeros_like, target)
    return loss, init


def least_squares():
    """min ||X W - Y||^2 / n with a rank-2 leaf `W` (8, 6) and a bias (6,)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    w_true = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    b_true = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
    y = x @ w_true + b_true[None, :]

    def loss(params):
        pred = x @ params["w"] + params["b"][None, :]
        return jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))

    init = {"w": jnp.zeros((8, 6), jnp.float32), "b": jnp.zeros((6,), jnp.float32)}
    return loss, init


PROBLEMS = {"quadratic": quadratic, "least_squares": least_squares}
