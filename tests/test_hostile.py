"""Hostile gradients for every registered algorithm: the policy of docs/robustness.md.

* zero and tiny (1e-30) gradients give finite updates and finite state, from random and from
  zero parameters, and training continues normally afterwards;
* huge finite gradients (1e30, whose squares overflow float32) never give a NaN update or NaN
  state; behind a global-norm clip they leave everything finite and training continues;
* a NaN or Inf entry in a gradient shows in the update of its leaf (never silently absorbed),
  and `optax.apply_if_finite` skips such steps: the run equals the run without them.

State leaves that are already non-finite after `init` are sentinels by design (for example a
NaN "not measured" diagnostic) and are not held to the finiteness checks.
Generated from `registry.ALGORITHMS`: a new row is covered with no new test code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from rlx_optax._src import registry

ROWS = registry.ALGORITHMS
IDS = [row.name for row in ROWS]
SHAPES = {"w": (6, 4), "b": (4,), "s": (), "t": (2, 3, 4)}


def params_like(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def constant_grads(value: float, seed: int) -> dict:
    """`value` with random signs (a constant-sign gradient is a special case for Lion, Muon)."""
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(value * np.where(rng.random(size=s) < 0.5, -1.0, 1.0), jnp.float32)
        for k, s in SHAPES.items()
    }


def make(row):
    return row.factory(row.contract_lr, **row.contract_kwargs)


@functools.cache
def stepper(name: str, guard: str = "none"):
    """A jitted ``(params, state, grads) -> (params, updates, state)`` and its transform."""
    row = registry.get(name)
    tx = make(row)
    if guard == "clip":
        tx = optax.chain(rlx_optax.clip_by_global_norm_logged(1.0), tx)
    elif guard == "if_finite":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=5)

    @jax.jit
    def step(params, state, grads):
        extra = row.update_extra(params, grads) if row.update_extra else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), updates, state

    return step, tx


def float_leaves(tree):
    return [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]


def sentinels(state) -> set[str]:
    return {label for label, leaf in float_leaves(state) if not bool(jnp.all(jnp.isfinite(leaf)))}


def bad_leaves(tree, skip=frozenset(), check=jnp.isfinite) -> list[str]:
    return [
        label
        for label, leaf in float_leaves(tree)
        if label not in skip and not bool(jnp.all(check(leaf)))
    ]


def not_nan(x):
    return ~jnp.isnan(x)


def run(name, params, grads_seq, guard="none"):
    """Apply `grads_seq`; return final params, state, and the labels that went bad."""
    step, tx = stepper(name, guard)
    state = tx.init(params)
    skip = sentinels(state)
    problems = []
    for i, grads in enumerate(grads_seq):
        params, updates, state = step(params, state, grads)
        problems += [f"step {i}: update {b}" for b in bad_leaves(updates)]
        problems += [f"step {i}: state {b}" for b in bad_leaves(state, skip)]
        problems += [f"step {i}: param {b}" for b in bad_leaves(params)]
    return params, state, problems


def normal_grads(n: int, seed: int = 10) -> list[dict]:
    return [params_like(seed + i) for i in range(n)]


@pytest.mark.parametrize("start", ["random", "zero"])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_zero_gradients_stay_finite(row, start):
    params = params_like(0, scale=1.0 if start == "random" else 0.0)
    zeros = [constant_grads(0.0, i) for i in range(3)]
    _, _, problems = run(row.name, params, zeros + normal_grads(2))
    assert not problems, f"{row.name} from {start} parameters: {problems}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_tiny_gradients_stay_finite(row):
    tiny = [constant_grads(1e-30, i) for i in range(3)]
    for start in (params_like(0), params_like(0, scale=0.0)):
        _, _, problems = run(row.name, start, tiny + normal_grads(2))
        assert not problems, f"{row.name}: {problems}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_huge_gradients_never_nan(row):
    """Squares of 1e30 overflow float32; second moments may saturate at +inf, but no NaN."""
    step, tx = stepper(row.name)
    params = params_like(0)
    state = tx.init(params)
    skip = sentinels(state)
    for i in range(2):
        params, updates, state = step(params, state, constant_grads(1e30, i))
        assert not bad_leaves(updates), f"{row.name} step {i}: updates {bad_leaves(updates)}"
        nan_state = bad_leaves(state, skip, check=not_nan)
        assert not nan_state, f"{row.name} step {i}: NaN in state {nan_state}"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_huge_gradients_behind_a_clip_stay_finite(row):
    huge = [constant_grads(1e30, i) for i in range(3)]
    _, _, problems = run(row.name, params_like(0), huge + normal_grads(2), guard="clip")
    assert not problems, f"{row.name}: {problems}"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_nonfinite_gradient_shows_in_the_update(row, bad):
    step, tx = stepper(row.name)
    params = params_like(0)
    state = tx.init(params)
    params, _, state = step(params, state, params_like(1))
    grads = params_like(2)
    grads["w"] = grads["w"].at[1, 2].set(bad)
    _, updates, _ = step(params, state, grads)
    assert not bool(jnp.all(jnp.isfinite(updates["w"]))), f"{row.name} absorbed a {bad} silently"


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_apply_if_finite_skips_bad_steps(row):
    good = normal_grads(3)
    nan_grads, inf_grads = params_like(20), params_like(21)
    nan_grads["w"] = nan_grads["w"].at[0, 0].set(jnp.nan)
    inf_grads["b"] = inf_grads["b"].at[1].set(jnp.inf)
    with_bad = [good[0], nan_grads, good[1], inf_grads, good[2]]
    start = params_like(0)

    step, tx = stepper(row.name, "if_finite")
    results = []
    for seq in (good, with_bad):
        params, state = start, tx.init(start)
        for grads in seq:
            params, _, state = step(params, state, grads)
        results.append((params, state))
    (p_good, s_good), (p_bad, s_bad) = results
    assert int(s_bad.total_notfinite) == 2 and int(s_good.total_notfinite) == 0
    # skipped steps leave parameters and the inner state exactly as they were
    jax.tree.map(np.testing.assert_array_equal, p_bad, p_good)
    jax.tree.map(np.testing.assert_array_equal, s_bad.inner_state, s_good.inner_state)
    # and the guarded run is the plain run (same arithmetic, behind a lax.cond)
    plain_params, plain_state, problems = run(row.name, start, good)
    assert not problems
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p_good, plain_params
    )
