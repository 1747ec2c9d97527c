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


def mixed_params(seed: int = 0, conv: tuple[int, ...] = (3, 3, 4, 8)) -> dict[str, np.ndarray]:
    """The golden files' layout: a tall and a wide matrix, a vector and a rank-4 kernel."""
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(24, 16)).astype(np.float32),
        "u": rng.normal(size=(16, 40)).astype(np.float32),
        "b": rng.normal(size=(16,)).astype(np.float32),
        "k": rng.normal(size=conv).astype(np.float32),
    }


def random_grads(params: dict, n: int, seed: int = 1, scale: float = 1.0) -> list[dict]:
    """`n` float32 normal gradients shaped like `params`, times `scale`."""
    rng = np.random.default_rng(seed)
    return [
        {k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
        for _ in range(n)
    ]


PROBLEMS = {"quadratic": quadratic, "least_squares": least_squares}


def ns64(x, steps=5, coeffs=(3.4445, -4.7750, 2.0315)):
    """The crate's newton_schulz_orth, float64, written out directly."""
    x = np.asarray(x, np.float64)
    t = x.shape[0] > x.shape[1]
    X = x.T if t else x
    X = X / max(np.linalg.norm(X), 1e-12)
    a, b, c = coeffs
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if t else X


def lowbit_params(seed: int = 0) -> dict:
    """The low-precision state tests' tree: a quantized matrix, a quantized vector (>= 4096
    elements) and a small vector that 8-bit state keeps in float32."""
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 300)) * 0.1, jnp.float32),
        "e": jnp.asarray(rng.normal(size=(4096,)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
    }


def lowbit_grads(seed: int) -> dict:
    """Gradients for `lowbit_params` with magnitudes over three decades, so that blocks hold
    small and large entries."""
    rng = np.random.default_rng(seed + 100)
    return {
        k: jnp.asarray(rng.normal(size=v.shape) * 10.0 ** rng.uniform(-3, 0, v.shape), v.dtype)
        for k, v in lowbit_params().items()
    }


def assert_injected_keeps_state(plain, injected, params, grads, steps: int = 3) -> None:
    """`injected` (an `optax.inject_hyperparams` of `plain`'s factory) keeps `plain`'s state
    bit for bit over `steps` jitted updates on ``grads(i)``. The updates agree to float32
    rounding: the two programs compile the matrix products apart (Newton-Schulz, rotations)
    and a traced learning rate multiplies last."""
    s1, s2 = plain.init(params), injected.init(params)
    for i in range(steps):
        u1, s1 = jax.jit(plain.update)(grads(i), s1, params)
        u2, s2 = jax.jit(injected.update)(grads(i), s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            atol = 1e-4 * float(np.max(np.abs(np.asarray(b))))
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2.inner_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_resume_bit_exact(tx, run) -> None:
    """Six steps of `tx` on `lowbit_params` equal three, a save and restore through
    `flax.serialization` into other arrays, and three more, bit for bit and dtype for dtype.
    ``run(tx, params, state, seeds)`` takes one step per seed and returns (params, state)."""
    import flax.serialization

    p0 = lowbit_params()
    want = run(tx, p0, tx.init(p0), range(6))
    half = run(tx, p0, tx.init(p0), range(3))
    fresh = lowbit_params(5)
    target = {"p": fresh, "s": tx.init(fresh)}
    blob = flax.serialization.to_bytes({"p": half[0], "s": half[1]})
    resumed = jax.tree.map(jnp.asarray, flax.serialization.from_bytes(target, blob))
    got = run(tx, resumed["p"], resumed["s"], range(3, 6))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
