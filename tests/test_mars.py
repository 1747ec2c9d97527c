"""MARS against a float64 NumPy transcription, optax.adamw, and the SVD polar factor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax

SHAPES = {"w": (6, 4), "v": (5,), "k": (2, 3, 2)}


def _tree(key, scale=1.0):
    keys = jax.random.split(key, len(SHAPES))
    return {
        n: scale * jax.random.normal(k, s, jnp.float32)
        for (n, s), k in zip(SHAPES.items(), keys, strict=True)
    }


def _grads(n, seed=0):
    # alternate small and large gradients so the unit-norm clip is both active and idle
    keys = jax.random.split(jax.random.key(seed), n)
    return [_tree(k, 0.05 if i % 2 else 1.0) for i, k in enumerate(keys)]


def _np_mars(p0, grads, *, lr, b1, b2, eps, wd, gamma, clip_c, variant="adamw", prev=None):
    """Float64 MARS (spec §4.14 for adamw; reference §1.14 for lion), per leaf.

    `prev` (optional) lists the control variates for MARS-exact; otherwise the previous
    gradient, starting at zero.
    """
    p = {k: np.asarray(v, np.float64) for k, v in p0.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    last = {k: np.zeros_like(x) for k, x in p.items()}
    traj = []
    for t, g in enumerate(grads, start=1):
        for k in p:
            gk = np.asarray(g[k], np.float64)
            control = last[k] if prev is None else np.asarray(prev[t - 1][k], np.float64)
            c = gk + gamma * b1 / (1 - b1) * (gk - control)
            last[k] = gk
            norm = np.sqrt(np.sum(c * c))
            if clip_c and norm > 1:
                c = c / norm
            m[k] = b1 * m[k] + (1 - b1) * c
            if variant == "lion":
                u = np.sign(m[k])
            else:
                v[k] = b2 * v[k] + (1 - b2) * c * c
                u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            p[k] = p[k] - lr * (u + wd * p[k])
        traj.append({k: x.copy() for k, x in p.items()})
    return traj


def _run(tx, params, grads, extras=None):
    state = tx.init(params)
    update = jax.jit(tx.update)
    traj = []
    for i, g in enumerate(grads):
        u, state = update(g, state, params, **(extras[i] if extras else {}))
        params = optax.apply_updates(params, u)
        traj.append(params)
    return traj, state


def _assert_close(traj, ref, p0, tol=1e-5):
    for k in p0:
        got = np.stack([np.asarray(t[k]) for t in traj])
        want = np.stack([r[k] for r in ref])
        disp = np.max(np.abs(want - np.asarray(p0[k])[None]))
        assert np.max(np.abs(got - want)) / disp < tol, k


HP = dict(lr=0.01, b1=0.95, b2=0.99, eps=1e-8, wd=0.0, gamma=0.025, clip_c=True)


@pytest.mark.parametrize(
    "overrides",
    # lr 0.05 in the last case: with lr 0.01 the displacement (0.05) is so small against params
    # of size 2.6 that float32 storage of the parameters alone is 1e-5 of it
    [{}, {"clip_c": False, "gamma": 0.05, "wd": 0.01}, {"gamma": 0.5, "wd": 0.1, "lr": 0.05}],
    ids=["crate", "noclip", "large_gamma"],
)
def test_adamw_variant_matches_float64_oracle(overrides):
    hp = {**HP, **overrides}
    p0 = _tree(jax.random.key(1))
    grads = _grads(10)
    tx = rlx_optax.mars(
        hp["lr"],
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        weight_decay=hp["wd"],
        gamma=hp["gamma"],
        clip_c=hp["clip_c"],
    )
    traj, _ = _run(tx, p0, grads)
    _assert_close(traj, _np_mars(p0, grads, **hp), p0)


def test_lion_variant_matches_float64_oracle():
    hp = {**HP, "wd": 0.1, "gamma": 0.3}
    p0 = _tree(jax.random.key(2))
    grads = _grads(8, seed=3)
    tx = rlx_optax.mars(hp["lr"], weight_decay=0.1, gamma=0.3, variant="lion")
    traj, state = _run(tx, p0, grads)
    _assert_close(traj, _np_mars(p0, grads, **hp, variant="lion"), p0)
    assert all(x is None for x in jax.tree.leaves(state[0].nu, is_leaf=lambda x: x is None))


def test_gamma_zero_without_clip_is_optax_adamw():
    p0 = _tree(jax.random.key(4))
    grads = _grads(10, seed=5)
    ours, _ = _run(
        rlx_optax.mars(3e-3, gamma=0.0, clip_c=False, weight_decay=0.05, b1=0.9, b2=0.999),
        p0,
        grads,
    )
    ref, _ = _run(optax.adamw(3e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05), p0, grads)
    for a, b in zip(ours, ref, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_exact_variant_uses_the_given_control_variate():
    p0 = _tree(jax.random.key(6))
    grads = _grads(6, seed=7)
    prev = _grads(6, seed=8)  # stand-ins for gradients at the previous parameters
    tx = rlx_optax.mars(0.01, gamma=0.2, exact=True)
    traj, state = _run(tx, p0, grads, [{"previous_grads": p} for p in prev])
    _assert_close(traj, _np_mars(p0, grads, **{**HP, "gamma": 0.2}, prev=prev), p0)
    assert jax.tree.leaves(state[0].prev_grad) == []  # nothing stored
    # exact with the previous step's gradients is the approximate variant
    shifted = [jax.tree.map(jnp.zeros_like, grads[0]), *grads[:-1]]
    exact_traj, _ = _run(tx, p0, grads, [{"previous_grads": p} for p in shifted])
    approx_traj, _ = _run(rlx_optax.mars(0.01, gamma=0.2), p0, grads)
    for a, b in zip(exact_traj, approx_traj, strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(ValueError, match="previous_grads"):
        tx.update(grads[0], tx.init(p0), p0)


def test_non_matrix_leaves_routed_to_adamw():
    p0 = _tree(jax.random.key(9))
    grads = _grads(6, seed=10)
    traj, _ = _run(rlx_optax.mars(0.01, gamma=0.3, non_matrix="adamw"), p0, grads)
    # the matrix leaf is exactly what default MARS does with it
    mars_traj, _ = _run(rlx_optax.mars(0.01, gamma=0.3), p0, grads)
    for a, b in zip(traj, mars_traj, strict=True):
        np.testing.assert_array_equal(a["w"], b["w"])
    # the other leaves are optax.adamw with the reference's (0.9, 0.95) on the raw gradient
    ref, _ = _run(optax.adamw(0.01, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0), p0, grads)
    for a, b in zip(traj, ref, strict=True):
        for k in ("v", "k"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_shampoo_variant_orthogonalises_matrix_momentum():
    """With the cubic Newton-Schulz run to convergence the matrix direction is U V^T (SVD of
    the momentum, float64 NumPy) times sqrt(max(1, rows/cols)); other leaves take AdamW."""
    p0 = {"w": jnp.zeros((6, 4)), "t": jnp.zeros((3, 8)), "v": jnp.zeros(5)}
    g = {
        "w": jax.random.normal(jax.random.key(0), (6, 4)),
        "t": jax.random.normal(jax.random.key(1), (3, 8)),
        "v": jax.random.normal(jax.random.key(2), (5,)),
    }
    tx = rlx_optax.scale_by_mars(
        variant="shampoo", clip_c=False, gamma=0.0, ns_steps=60, ns_coeffs=(1.5, -0.5, 0.0)
    )
    u, state = tx.update(g, tx.init(p0), p0)
    for k in ("w", "t"):
        m = 0.05 * np.asarray(g[k], np.float64)
        uu, _, vt = np.linalg.svd(m, full_matrices=False)
        rows, cols = m.shape
        want = uu @ vt * np.sqrt(max(1.0, rows / cols))
        np.testing.assert_allclose(u[k], want, atol=2e-5)
        assert state.nu[k] is None
    # the vector leaf: first AdamW step on c = g is g / (|g| + eps)
    np.testing.assert_allclose(u["v"], np.asarray(g["v"]) / (np.abs(g["v"]) + 1e-8), rtol=1e-6)


def test_clip_is_per_leaf_unit_norm():
    tx = rlx_optax.scale_by_mars(gamma=0.0, b1=0.0, b2=0.0, eps=0.0)
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    _, state = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(state.mu["a"], [0.6, 0.8], rtol=1e-6)  # norm 5 -> 1
    np.testing.assert_allclose(state.mu["b"], [0.3, 0.4], rtol=1e-6)  # norm 0.5 untouched


def test_masked_exact_with_full_previous_grads():
    p0 = _tree(jax.random.key(11))
    grads, prev = _grads(3, seed=12), _grads(3, seed=13)
    mask = {"w": True, "v": False, "k": True}
    tx = optax.masked(rlx_optax.mars(0.01, exact=True), mask)
    ref = rlx_optax.mars(0.01, exact=True)
    sub = lambda t: {k: t[k] for k in ("w", "k")}  # noqa: E731
    state, ref_state = tx.init(p0), ref.init(sub(p0))
    for g, pg in zip(grads, prev, strict=True):
        u, state = tx.update(g, state, p0, previous_grads=pg)
        ru, ref_state = ref.update(sub(g), ref_state, sub(p0), previous_grads=sub(pg))
        for k in ("w", "k"):
            np.testing.assert_allclose(u[k], ru[k], rtol=1e-6, atol=1e-8)
        np.testing.assert_array_equal(u["v"], g["v"])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gamma"):
        rlx_optax.mars(0.01, gamma=-0.1)
    with pytest.raises(ValueError, match="variant"):
        rlx_optax.mars(0.01, variant="sgd")
    with pytest.raises(ValueError, match="non_matrix"):
        rlx_optax.mars(0.01, non_matrix="all")
    with pytest.raises(ValueError, match="adamw_b2"):
        rlx_optax.mars(0.01, adamw_b2=1.0)


def _donated_step(tx):
    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    return step


@pytest.mark.parametrize("variant", ["adamw", "lion"])
def test_stored_gradient_is_a_new_array_under_donation(variant):
    # prev_grad must never be the caller's gradient array: with the state donated and the
    # gradients passed in as an argument, an aliased output would hand one buffer to the next
    # step twice (donated as state, read as gradient)
    tx = rlx_optax.mars(0.01, gamma=0.3, variant=variant)
    p0 = _tree(jax.random.key(14))
    grads = _grads(4, seed=15)
    grads[2] = grads[1]  # the same gradient arrays passed to two consecutive steps

    # traced: no state output is one of the gradient inputs
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(grads[0], tx.init(p0), p0).jaxpr
    n_grads = len(jax.tree.leaves(grads[0]))
    grad_vars = {id(v) for v in jaxpr.invars[:n_grads]}
    assert not any(id(v) in grad_vars for v in jaxpr.outvars)
    # eager: a buffer of its own, equal to the gradient bit for bit
    _, state = tx.update(grads[0], tx.init(p0), p0)
    for k, g in grads[0].items():
        assert state[0].prev_grad[k].unsafe_buffer_pointer() != g.unsafe_buffer_pointer()
        np.testing.assert_array_equal(state[0].prev_grad[k], g)

    plain = jax.jit(_donated_step(tx))
    donated = jax.jit(_donated_step(tx), donate_argnums=(0, 1))
    want_p, want_s = p0, tx.init(p0)
    got_p, got_s = jax.tree.map(jnp.copy, p0), tx.init(p0)
    for g in grads:
        want_p, want_s = plain(want_p, want_s, g)
        got_p, got_s = donated(got_p, got_s, g)
        jax.tree.map(np.testing.assert_array_equal, got_p, want_p)
        jax.tree.map(np.testing.assert_array_equal, got_s, want_s)
        jax.tree.map(np.testing.assert_array_equal, got_s[0].prev_grad, g)
    assert not any(x.is_deleted() for g in grads for x in jax.tree.leaves(g))


@pytest.mark.parametrize("clip_c", [True, False])
@pytest.mark.parametrize("variant", ["adamw", "lion"])
def test_donated_step_compiles_without_parameter_sized_copies(variant, clip_c):
    # storing the (undonated) gradient used to make XLA copy the old prev_grad and then the
    # gradient into the donated buffer: two extra passes over every matrix, each step
    tx = rlx_optax.mars(1e-3, variant=variant, clip_c=clip_c)
    params = {"w": jnp.ones((64, 48)), "u": jnp.ones((48, 64))}
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    step = jax.jit(_donated_step(tx), donate_argnums=(0, 1))
    hlo = step.lower(params, tx.init(params), grads).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    copies = [line for line in entry.splitlines() if " copy(" in line and "[64,48]" in line]
    copies += [line for line in entry.splitlines() if " copy(" in line and "[48,64]" in line]
    assert not copies, copies
