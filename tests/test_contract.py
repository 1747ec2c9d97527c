"""The contract every registered algorithm meets, generated from `registry.ALGORITHMS`.

Adding a row to the registry adds the algorithm to every test here.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlx_optax._src import registry
from tests import problems

ROWS = registry.ALGORITHMS
IDS = [row.name for row in ROWS]
STEPS = 300


def make(row, lr=None, **overrides):
    kwargs = {**row.contract_kwargs, **overrides}
    return row.factory(row.contract_lr if lr is None else lr, **kwargs)


def extra(row, params, grads):
    return row.update_extra(params, grads) if row.update_extra else {}


def run(row, tx, loss, params, steps):
    state = tx.init(params)

    def body(carry, _):
        params, state = carry
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params, **extra(row, params, grads))
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))(
        (params, state)
    )
    return params, state


@pytest.mark.parametrize("problem", sorted(problems.PROBLEMS))
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_converges(row, problem):
    loss, init = problems.PROBLEMS[problem]()
    final, _ = run(row, make(row), loss, init, STEPS)
    start, end = float(loss(init)), float(loss(final))
    assert np.isfinite(end)
    assert end < 0.02 * start, f"{row.name} on {problem}: {start:.3g} -> {end:.3g}"


def _grads_sequence(params, n, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [
        jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape, p.dtype), params) for k in keys
    ]


def _apply(row, tx, params, grads_seq, jit=True):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads_seq:
        u, state = update(g, state, params, **extra(row, params, g))
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_jit_does_not_recompile(row):
    _, params = problems.least_squares()
    tx = make(row)
    traces = 0

    @jax.jit
    def step(params, state, grads):
        nonlocal traces
        traces += 1
        u, state = tx.update(grads, state, params, **extra(row, params, grads))
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    for g in _grads_sequence(params, 3):
        params, state = step(params, state, g)
    assert traces == 1


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_inject_hyperparams_matches_direct(row):
    _, params = problems.least_squares()
    seq = _grads_sequence(params, 4)
    direct, _ = _apply(row, make(row), params, seq)
    injected_tx = optax.inject_hyperparams(row.factory)(
        learning_rate=row.contract_lr, **row.contract_kwargs
    )
    injected, state = _apply(row, injected_tx, params, seq)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), direct, injected
    )
    # the rate lives in the state and can be changed without rebuilding the optimizer
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(row.contract_lr)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_inside_chain(row):
    _, params = problems.least_squares()
    seq = [jax.tree.map(lambda g: 3.0 * g, g) for g in _grads_sequence(params, 3)]
    chained, _ = _apply(row, optax.chain(optax.clip_by_global_norm(1.0), make(row)), params, seq)
    clipped = [optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0] for g in seq]
    direct, _ = _apply(row, make(row), params, clipped)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chained, direct
    )


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_multisteps_accumulates(row):
    _, params = problems.least_squares()
    seq = _grads_sequence(params, 4)
    multi = optax.MultiSteps(make(row), every_k_schedule=2)
    accumulated, _ = _apply(row, multi, params, seq)
    means = [jax.tree.map(lambda a, b: (a + b) / 2, seq[i], seq[i + 1]) for i in (0, 2)]
    direct, _ = _apply(row, make(row), params, means)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), accumulated, direct
    )


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_masked_leaves_untouched(row):
    _, params = problems.least_squares()
    seq = _grads_sequence(params, 3)
    tx = optax.masked(make(row), {"w": True, "b": False})
    state = tx.init(params)
    ref_tx = make(row)
    ref_state = ref_tx.init({"w": params["w"]})
    for g in seq:
        u, state = tx.update(g, state, params, **extra(row, params, g))
        ref_u, ref_state = ref_tx.update(
            {"w": g["w"]},
            ref_state,
            {"w": params["w"]},
            **extra(row, {"w": params["w"]}, {"w": g["w"]}),
        )
        np.testing.assert_array_equal(u["b"], g["b"])  # masked-out: passed through as is
        np.testing.assert_allclose(u["w"], ref_u["w"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_bfloat16_params(row):
    _, params = problems.least_squares()
    params = jax.tree.map(lambda p: (p + 0.5).astype(jnp.bfloat16), params)
    tx = make(row)
    state = tx.init(params)
    before = jax.tree.map(lambda x: x.dtype, state)
    for g in _grads_sequence(params, 2):
        u, state = jax.jit(tx.update)(g, state, params, **extra(row, params, g))
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
        assert jax.tree.map(lambda x: x.dtype, state) == before
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_none_leaves_pass_through(row):
    _, params = problems.least_squares()
    params = {**params, "frozen": None}
    tx = make(row)
    state = tx.init(params)
    g = {**_grads_sequence({"w": params["w"], "b": params["b"]}, 1)[0], "frozen": None}
    u, _ = tx.update(g, state, params, **extra(row, params, g))
    assert u["frozen"] is None
    assert u["w"].shape == params["w"].shape


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_schedule_learning_rate(row):
    _, params = problems.least_squares()
    seq = _grads_sequence(params, 4)
    lr = row.contract_lr
    constant, _ = _apply(row, make(row, lr=optax.constant_schedule(lr)), params, seq)
    direct, _ = _apply(row, make(row), params, seq)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), constant, direct
    )
    # a schedule that drops to zero after two steps freezes the parameters (no decay either)
    stop = make(row, lr=lambda count: jnp.where(count < 2, lr, 0.0))
    two, _ = _apply(row, stop, params, seq[:2])
    four, _ = _apply(row, stop, params, seq)
    jax.tree.map(np.testing.assert_array_equal, two, four)


_INVALID = {
    "learning_rate": [-1.0],
    "b1": [1.0, -0.1],
    "b2": [1.0, -0.1],
    "beta": [1.0, -0.1],
    "momentum": [1.0, -0.5],
    "eps": [-1e-8],
    "weight_decay": [-0.1],
}


def _invalid_cases():
    for row in ROWS:
        sig = inspect.signature(row.factory)
        for arg, values in _INVALID.items():
            if arg in sig.parameters:
                for v in values:
                    yield pytest.param(row, arg, v, id=f"{row.name}-{arg}={v}")


@pytest.mark.parametrize("row,arg,value", list(_invalid_cases()))
def test_invalid_hyperparameters_raise(row, arg, value):
    kwargs = {**row.contract_kwargs, arg: value}
    lr = kwargs.pop("learning_rate", row.contract_lr)
    with pytest.raises(ValueError, match=arg):
        row.factory(lr, **kwargs)


def test_every_algorithm_validates_learning_rate():
    for row in ROWS:
        assert "learning_rate" in inspect.signature(row.factory).parameters, row.name


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_flax_nnx_optimizer_matches_pure(row):
    """Inside `nnx.Optimizer` and `nnx.jit` (nnx hands the state back in its own containers)."""
    from flax import nnx

    model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    params = {"kernel": model.kernel[...], "bias": model.bias[...] + 0.1}
    model.bias[...] = params["bias"]
    x = jax.random.normal(jax.random.key(1), (8, 6))
    opt = nnx.Optimizer(model, make(row), wrt=nnx.Param)

    def loss(m):
        return jnp.mean((m(x) - 1.0) ** 2)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(loss)(model)
        pure_params = nnx.as_pure(nnx.state(model, nnx.Param))
        pure_grads = nnx.as_pure(nnx.state(grads, nnx.Param))
        opt.update(model, grads, **extra(row, pure_params, pure_grads))

    tx = make(row)
    state = tx.init(params)
    ref = params
    for _ in range(3):
        step(model, opt)
        g = jax.grad(lambda p: jnp.mean((x @ p["kernel"] + p["bias"][None, :] - 1.0) ** 2))(ref)
        u, state = tx.update(g, state, ref, **extra(row, ref, g))
        ref = optax.apply_updates(ref, u)
    np.testing.assert_allclose(model.kernel[...], ref["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bias[...], ref["bias"], rtol=1e-5, atol=1e-6)
