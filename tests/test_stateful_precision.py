"""The stateful API at a chosen state precision (``state_precision=``).

The oracle is the pure transform built with the same storage arguments, run as a jitted train
step per tensor (as in `tests/test_stateful_pure.py`); the state's size is read from
``state_dict``; a resume from ``state_dict`` must continue bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from rlx_optax._src import registry, stateful

# the matrix is large enough (>= 4096 elements) for 8-bit moments to be quantized
TENSORS = (("w", (64, 96)), ("b", (96,)))
STEPS = 4
CASES = [
    ("adamw", {"mu_dtype": "q8", "nu_dtype": "q8"}),
    ("adamw", {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16, "stochastic_rounding": True}),
    ("lion", {"mu_dtype": "q8"}),
    ("muon", {"mu_dtype": "q8"}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for name, p in CASES]


def _grads(k):
    rng = np.random.default_rng(100 + k)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in TENSORS}


def _init():
    rng = np.random.default_rng(0)
    return {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in TENSORS}


def _pure(name, precision, steps):
    row = registry.get(name)
    tx = row.factory(**row.factory_kwargs(lr=row.contract_lr), **precision)

    @jax.jit
    def train_step(p, state, g):
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state

    out = {}
    for n, _ in TENSORS:
        p = jnp.asarray(_init()[n])
        state = tx.init(p)
        for k in range(steps):
            p, state = train_step(p, state, jnp.asarray(_grads(k)[n]))
        out[n] = np.asarray(p)
    return out


def _stateful(name, precision, steps, start=0, opt=None, params=None):
    row = registry.get(name)
    opt = opt or stateful.get(name)(row.contract_lr, state_precision=precision)
    params = params if params is not None else _init()
    for k in range(start, steps):
        g = _grads(k)
        for n, s in TENSORS:
            opt.step(n, s, params[n], g[n])
        opt.end_iteration()
    return opt, params


@pytest.mark.parametrize(("name", "precision"), CASES, ids=IDS)
def test_equals_pure_transform_with_the_same_storage(name, precision):
    _, got = _stateful(name, precision, STEPS)
    want = _pure(name, precision, STEPS)
    for n, _ in TENSORS:
        assert not np.array_equal(got[n], _init()[n]), n
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


@pytest.mark.parametrize(("name", "precision"), CASES, ids=IDS)
def test_state_dict_resumes_bit_for_bit(name, precision):
    row = registry.get(name)
    _, straight = _stateful(name, precision, STEPS)
    opt, params = _stateful(name, precision, 2)
    saved = opt.state_dict(flat=True)
    fresh = stateful.get(name)(row.contract_lr, state_precision=precision)
    fresh.load_state_dict(saved)
    _, resumed = _stateful(name, precision, STEPS, start=2, opt=fresh, params=params)
    for n, _ in TENSORS:
        np.testing.assert_array_equal(resumed[n], straight[n], err_msg=n)


def _state_bytes(opt) -> int:
    return sum(np.asarray(v).nbytes for k, v in opt.state_dict(flat=True).items() if "/" in k)


def test_eight_bit_state_is_smaller():
    """AdamW's state with both moments in 8 bits: at most 0.3x the float32 state's bytes."""
    full, _ = _stateful("adamw", None, 1)
    small, _ = _stateful("adamw", {"mu_dtype": "q8", "nu_dtype": "q8"}, 1)
    assert _state_bytes(small) <= 0.3 * _state_bytes(full)


def test_unknown_precision_argument_is_named():
    with pytest.raises(ValueError, match="nu_dtype"):
        rlx_optax.Lion(1e-3, state_precision={"nu_dtype": jnp.bfloat16})
    with pytest.raises(TypeError, match="state_precision"):
        rlx_optax.AdamW(1e-3, state_precision="q8")
