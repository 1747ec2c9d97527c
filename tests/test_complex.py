"""Complex parameters: supported as optax supports them, or refused at init naming the leaf.

The Adam family, SGD and Lion take complex leaves the way optax does (second moments of
|g|^2, updates complex): they must equal optax's float32 result and a complex128 NumPy
transcription. The families without a complex form here must raise at `init`, naming the leaf,
instead of dropping the imaginary part.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from rlx_optax._src import registry

LR = 1e-2
STEPS = 10


def _problem():
    rng = np.random.default_rng(11)

    def c(shape):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)

    params = {"w": c((4, 3)), "b": c((3,))}
    grads = [{k: c(v.shape) for k, v in params.items()} for _ in range(STEPS)]
    return params, grads


def _run(tx, params, grads):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for g in grads:
        updates, state = step(p, state, {k: jnp.asarray(v) for k, v in g.items()})
        assert all(u.dtype == jnp.complex64 for u in jax.tree.leaves(updates))
        p = optax.apply_updates(p, updates)
    return {k: np.asarray(v, np.complex128) for k, v in p.items()}


PEERS = {
    "adam": (lambda: rlx_optax.adam(LR), lambda: optax.adam(LR)),
    "adamw": (
        lambda: rlx_optax.adamw(LR, weight_decay=0.1),
        lambda: optax.adamw(LR, 0.9, 0.999, weight_decay=0.1),
    ),
    "sgd": (lambda: rlx_optax.sgd(LR, momentum=0.9), lambda: optax.sgd(LR, momentum=0.9)),
    "lion": (lambda: rlx_optax.lion(LR), lambda: optax.lion(LR, weight_decay=0.0)),
}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_complex_parameters_match_optax(name):
    ours, peer = PEERS[name]
    params, grads = _problem()
    got, want = _run(ours(), params, grads), _run(peer(), params, grads)
    for k in params:
        span = np.max(np.abs(want[k] - params[k]))
        assert np.max(np.abs(got[k] - want[k])) / span < 2e-5, k
        assert np.max(np.abs((got[k] - params[k]).imag)) > 0.1 * span  # the imaginary part moves


def _qhadamw_np(p, g, s, t, b1=0.995, b2=0.999, nu1=0.7, nu2=1.0, eps=1e-8, wd=0.01):
    s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0) + (1 - b2) * np.abs(g) ** 2
    num = (1 - nu1) * g + nu1 * s["m"] / (1 - b1**t)
    den = np.sqrt((1 - nu2) * np.abs(g) ** 2 + nu2 * s["v"] / (1 - b2**t)) + eps
    return p - LR * (num / den + wd * p)


def _nadamw_np(p, g, s, t, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0) + (1 - b2) * np.abs(g) ** 2
    m_bar = b1 * s["m"] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
    return p - LR * (m_bar / (np.sqrt(s["v"] / (1 - b2**t)) + eps) + wd * p)


@pytest.mark.parametrize(
    "name,make,rule",
    [
        ("qhadamw", lambda: rlx_optax.qhadamw(LR), _qhadamw_np),
        ("nadamw", lambda: rlx_optax.nadamw(LR), _nadamw_np),
    ],
)
def test_complex_parameters_match_a_complex128_transcription(name, make, rule):
    params, grads = _problem()
    got = _run(make(), params, grads)
    want = {k: v.astype(np.complex128) for k, v in params.items()}
    states = {k: {} for k in params}
    for t, g in enumerate(grads, start=1):
        for k in want:
            want[k] = rule(want[k], g[k].astype(np.complex128), states[k], t)
    for k in params:
        span = np.max(np.abs(want[k] - params[k]))
        assert np.max(np.abs(got[k] - want[k])) / span < 2e-5, (name, k)


REFUSED = ["adafactor", "kron_psgd", "lamb", "mars", "muon", "soap", "sophia", "stiefel"]


@pytest.mark.parametrize("name", REFUSED)
def test_families_without_a_complex_form_refuse_at_init_naming_the_leaf(name):
    row = registry.get(name)
    tx = row.factory(row.contract_lr, **row.contract_kwargs)
    params = {"real": jnp.ones((3, 3)), "layer": {"kernel": jnp.ones((3, 2), jnp.complex64)}}
    with pytest.raises(ValueError, match=r"complex.*\['layer'\]\['kernel'\].*complex64"):
        tx.init(params)


def test_every_family_is_classified():
    assert set(PEERS) | {"nadamw", "qhadamw", "radam"} | set(REFUSED) == set(registry.names())
