"""float64 parameters get float64 arithmetic: every per-update scalar at the parameter's precision.

With `jax_enable_x64` (scoped here with `jax.enable_x64`, so no other test sees it), the Adam
family on float64 parameters must equal a float64 NumPy transcription of its rule to 1e-12 of
the displacement: a bias correction, rectifier or step size left in float32 shows up at 1e-7.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax

STEPS = 30
LR = 1e-2


def _problem():
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=(6, 5)), "b": rng.normal(size=(5,))}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


def _adam_core(s, g, t, b1, b2):
    s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
    return s["m"] / (1 - b1**t), s["v"] / (1 - b2**t)


def _adam_l2(p, g, s, t, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    m_hat, v_hat = _adam_core(s, g + wd * p, t, b1, b2)
    return p - LR * m_hat / (np.sqrt(v_hat) + eps)


def _adamw(p, g, s, t, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    m_hat, v_hat = _adam_core(s, g, t, b1, b2)
    return p - LR * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)


def _nadamw(p, g, s, t, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    # the crate's NAdamW: constant beta1, the look-ahead moment corrected by 1 - b1^(t+1)
    s["m"] = b1 * s.get("m", 0.0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0.0) + (1 - b2) * g * g
    m_bar = b1 * s["m"] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
    return p - LR * (m_bar / (np.sqrt(s["v"] / (1 - b2**t)) + eps) + wd * p)


def _radam(p, g, s, t, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, threshold=4.0):
    m_hat, v_hat = _adam_core(s, g + wd * p, t, b1, b2)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho <= threshold:
        return p - LR * m_hat
    r = np.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return p - LR * r * m_hat / (np.sqrt(v_hat) + eps)


def _qhadamw(p, g, s, t, b1=0.995, b2=0.999, nu1=0.7, nu2=1.0, eps=1e-8, wd=0.1):
    m_hat, v_hat = _adam_core(s, g, t, b1, b2)
    num = (1 - nu1) * g + nu1 * m_hat
    den = np.sqrt((1 - nu2) * g * g + nu2 * v_hat) + eps
    return p - LR * (num / den + wd * p)


CASES = {
    "adam": (lambda: rlx_optax.adam(LR, weight_decay=0.1), _adam_l2),
    "adamw": (lambda: rlx_optax.adamw(LR, weight_decay=0.1), _adamw),
    "nadamw": (lambda: rlx_optax.nadamw(LR, weight_decay=0.1), _nadamw),
    "radam": (lambda: rlx_optax.radam(LR, weight_decay=0.1), _radam),
    "qhadamw": (lambda: rlx_optax.qhadamw(LR, weight_decay=0.1), _qhadamw),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float64_parameters_match_a_float64_transcription(name):
    make, rule = CASES[name]
    params, grads = _problem()
    want = {k: v.copy() for k, v in params.items()}
    states = {k: {} for k in params}
    worst, span = 0.0, 0.0
    with jax.enable_x64(True):
        tx = make()
        p = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        state = tx.init(p)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        for t, g in enumerate(grads, start=1):
            updates, state = step(p, state, {k: jnp.asarray(v) for k, v in g.items()})
            p = optax.apply_updates(p, updates)
            for k in want:
                want[k] = rule(want[k], g[k], states[k], t)
                assert p[k].dtype == jnp.float64
                worst = max(worst, float(np.max(np.abs(np.asarray(p[k]) - want[k]))))
                span = max(span, float(np.max(np.abs(want[k] - params[k]))))
        assert all(leaf.dtype != jnp.float32 for leaf in jax.tree.leaves(state))
    print(f"{name}: {worst / span:.3g}")
    assert worst / span < 1e-12, f"{name}: {worst / span:.3g} of the displacement"


def test_float32_parameters_keep_float32_state_under_x64():
    with jax.enable_x64(True):
        tx = rlx_optax.adamw(LR)
        p = {"w": jnp.ones((3, 2), jnp.float32)}
        state = tx.init(p)
        updates, state = tx.update({"w": jnp.ones((3, 2), jnp.float32)}, state, p)
        assert updates["w"].dtype == jnp.float32
        floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
