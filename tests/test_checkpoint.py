"""The pure state of every registered algorithm survives orbax and flax.serialization.

Run `SPLIT` jitted steps, save parameters and optimizer state, restore them into a fresh
template (`tx.init` of other parameters), run `SPLIT` more steps with the same compiled step,
and compare with `2 * SPLIT` uninterrupted steps: bit for bit.
"""

from __future__ import annotations

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from rlx_optax._src import registry

ROWS = registry.ALGORITHMS
IDS = [row.name for row in ROWS]
SPLIT = 3
SHAPES = {"w": (6, 4), "b": (4,), "t": (2, 3, 4)}


def tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


@functools.cache
def stepper(name: str):
    row = registry.get(name)
    tx = row.factory(row.contract_lr, **row.contract_kwargs)

    @jax.jit
    def step(params, state, grads):
        extra = row.update_extra(params, grads) if row.update_extra else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step, tx


def steps(name, params, state, seeds):
    step, _ = stepper(name)
    for seed in seeds:
        params, state = step(params, state, tree(seed))
    return params, state


def uninterrupted(name):
    _, tx = stepper(name)
    params = tree(0)
    return steps(name, params, tx.init(params), range(100, 100 + 2 * SPLIT))


def first_half(name):
    _, tx = stepper(name)
    params = tree(0)
    return steps(name, params, tx.init(params), range(100, 100 + SPLIT))


def template(name):
    """What a resuming process has before loading: fresh parameters and a fresh state."""
    _, tx = stepper(name)
    params = tree(1, scale=0.0)
    return {"params": params, "opt_state": tx.init(params)}


def assert_bit_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def resume_and_compare(name, restored):
    assert_bit_equal(restored, dict(zip(("params", "opt_state"), first_half(name), strict=True)))
    params, state = steps(
        name, restored["params"], restored["opt_state"], range(100 + SPLIT, 100 + 2 * SPLIT)
    )
    want_params, want_state = uninterrupted(name)
    assert_bit_equal(params, want_params)
    assert_bit_equal(state, want_state)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_orbax_round_trip_resumes_bit_exactly(row, tmp_path):
    params, state = first_half(row.name)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", template(row.name))
    checkpointer.close()
    resume_and_compare(row.name, restored)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_flax_serialization_round_trip_resumes_bit_exactly(row):
    params, state = first_half(row.name)
    blob = flax.serialization.to_bytes({"params": params, "opt_state": state})
    restored = flax.serialization.from_bytes(template(row.name), blob)
    restored = jax.tree.map(jnp.asarray, restored)
    resume_and_compare(row.name, restored)
