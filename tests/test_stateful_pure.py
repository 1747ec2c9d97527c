"""Stateful == pure: the stateful API computes bit for bit what the pure transform computes.

For every registered algorithm, ``step`` and ``step_batch`` over tensors of rank 1, 2 and 3 give
exactly the parameters of a jitted train step of the pure transform (``tx.update`` followed by
``optax.apply_updates`` in one `jax.jit`, one tensor per call) with the same hyperparameters,
including after ``set_lr``.

Why the comparison is with a *jitted train step*: XLA contracts a multiply followed by an add
into one fused multiply-add when both land in one fusion (on CPU and GPU alike, with no flag to
turn it off), so the same pure transform gives results that differ in the last bit depending on
whether ``apply_updates`` runs inside the jitted update or eagerly after it, and on which
tensors share one compiled program. The stateful step is such a jitted train step for one
tensor; the learning rate being traced data (for ``set_lr`` without recompiling) changes
nothing, which this test checks.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from rlx_optax._src import registry, stateful

ROWS = registry.ALGORITHMS
IDS = [row.stateful for row in ROWS]
TENSORS = (("w", (6, 4)), ("b", (5,)), ("k", (2, 3, 2)))
STEPS = 4


def _grads(k):
    rng = np.random.default_rng(100 + k)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in TENSORS}


def _init():
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in TENSORS}


def _pure_run(row, lrs, extra=None):
    """Per tensor: a jitted train step of the pure transform, learning rate `lrs[k]` at step k."""
    steps = {}
    for lr in set(lrs):
        tx = row.from_crate(lr=lr)

        def train_step(p, state, g, tx=tx, **kw):
            u, state = tx.update(g, state, p, **kw)
            return optax.apply_updates(p, u), state

        steps[lr] = (tx, jax.jit(train_step))
    out = {}
    for name, _ in TENSORS:
        p = jax.numpy.asarray(_init()[name])
        state = steps[lrs[0]][0].init(p)
        for k, lr in enumerate(lrs):
            train_step = steps[lr][1]
            kw = {} if extra is None else extra(name, k)
            p, state = train_step(p, state, jax.numpy.asarray(_grads(k)[name]), **kw)
        out[name] = np.asarray(p)
    return out


def _stateful_run(row, lrs, batch, hessian=None):
    opt = stateful.get(row.name)(lrs[0])
    params = _init()
    for k, lr in enumerate(lrs):
        opt.set_lr(lr)
        g = _grads(k)
        if hessian is not None:
            for n, _ in TENSORS:
                opt.update_hessian(n, hessian(n, k))
        if batch:
            opt.step_batch([(n, s, params[n], g[n]) for n, s in TENSORS])
        else:
            for n, s in TENSORS:
                opt.step(n, s, params[n], g[n])
        opt.end_iteration()
    return params


def _lrs(row):
    lr = row.contract_lr
    return [lr, lr, lr / 3, lr / 3][:STEPS]


@pytest.mark.parametrize("batch", [False, True], ids=["step", "step_batch"])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_stateful_equals_pure_train_step_bit_for_bit(row, batch):
    lrs = _lrs(row)
    got = _stateful_run(row, lrs, batch)
    want = _pure_run(row, lrs)
    for name, _ in TENSORS:
        assert not np.array_equal(got[name], _init()[name]), name  # it moved
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{row.stateful} {name}")


def test_adafactor_relative_step_equals_pure_bit_for_bit():
    row = registry.get("adafactor")
    got = _stateful_run(row, [None] * STEPS, batch=False)
    want = _pure_run(row, [None] * STEPS)
    for name, _ in TENSORS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_sophia_with_hessian_estimates_equals_pure_bit_for_bit():
    row = registry.get("sophia")

    def hessian(name, k):
        shape = dict(TENSORS)[name]
        return np.random.default_rng(7 + k).uniform(0.5, 2.0, shape).astype(np.float32)

    lrs = _lrs(row)
    got = _stateful_run(row, lrs, batch=False, hessian=hessian)
    want = _pure_run(row, lrs, extra=lambda n, k: {"hessian_diag": hessian(n, k)})
    for name, _ in TENSORS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
