"""Property tests (hypothesis) over every registered algorithm.

Random pytrees of five leaves, each of random rank (0 to 4), dims (1 to 48, at most
`MAX_SIZE` entries per leaf, so rank 4 gets small dims) and dtype (float32 or bfloat16), with
random finite parameters and gradients of random magnitude (1e-3 to 1e3). For three jitted
steps: updates are finite and have the gradient's shape and dtype, the state keeps its tree
structure, shapes and dtypes, and every state leaf that was finite after `init` stays finite.

Bounded for CI: `MAX_EXAMPLES` examples per algorithm, derandomized (the same examples on
every run), no deadline (each example compiles). `(1, n)`, `(n, 1)` and scalar leaves are
always among the examples. `-m slow` runs `SLOW_EXAMPLES` per algorithm.
"""

from __future__ import annotations

import collections
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlx_optax._src import registry

ROWS = registry.ALGORITHMS
IDS = [row.name for row in ROWS]
MAX_EXAMPLES = 3  # per algorithm in CI (plus the 2 explicit examples); each compiles once
SLOW_EXAMPLES = 25  # `-m slow`
MAX_SIZE = 2048
STEPS = 3
TRIED: collections.Counter = collections.Counter()


@st.composite
def shapes(draw) -> tuple[int, ...]:
    rank = draw(st.integers(0, 4))
    dims: list[int] = []
    for _ in range(rank):
        room = MAX_SIZE // max(math.prod(dims), 1)
        dims.append(draw(st.integers(1, min(48, room))))
    return tuple(dims)


leaf_specs = st.lists(
    st.tuples(shapes(), st.sampled_from(["float32", "bfloat16"])), min_size=5, max_size=5
)


def build(specs, seed: int, log_scale: int):
    rng = np.random.default_rng(seed)
    params, grads_seq = {}, [{} for _ in range(STEPS)]
    for i, (shape, dtype) in enumerate(specs):
        params[f"p{i}"] = jnp.asarray(rng.normal(size=shape) + 0.1, dtype)
        for grads in grads_seq:
            grads[f"p{i}"] = jnp.asarray(10.0**log_scale * rng.normal(size=shape), dtype)
    return params, grads_seq


def signature(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def check(row, specs, seed, log_scale):
    params, grads_seq = build(specs, seed, log_scale)
    tx = row.factory(row.contract_lr, **row.contract_kwargs)

    @jax.jit
    def step(params, state, grads):
        extra = row.update_extra(params, grads) if row.update_extra else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), updates, state

    state = tx.init(params)
    before = signature(state)
    finite_at_init = [bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)]
    for t, grads in enumerate(grads_seq):
        params, updates, state = step(params, state, grads)
        for name, g in grads.items():
            u = updates[name]
            where = f"{row.name} step {t} leaf {name} {g.shape} {g.dtype}"
            assert u.shape == g.shape and u.dtype == g.dtype, f"{where}: update {u.shape} {u.dtype}"
            assert params[name].dtype == g.dtype, where
            assert bool(jnp.all(jnp.isfinite(u))), f"{where}: non-finite update"
        assert signature(state) == before, f"{row.name} step {t}: state shapes/dtypes changed"
        for was_finite, (path, x) in zip(
            finite_at_init, jax.tree_util.tree_leaves_with_path(state), strict=True
        ):
            if was_finite and jnp.issubdtype(x.dtype, jnp.inexact):
                assert bool(jnp.all(jnp.isfinite(x))), (
                    f"{row.name} step {t}: state {jax.tree_util.keystr(path)} non-finite"
                )
    TRIED[row.name, "examples"] += 1
    for shape, dtype in specs:
        TRIED[row.name, "shapes"] += 1
        TRIED[row.name, dtype] += 1
        TRIED["all", f"rank{len(shape)}"] += 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nproperty examples tried:", dict(sorted(TRIED.items())))


def _property_test(max_examples: int):
    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )
    @hypothesis.example(
        specs=[((1, 48), "float32"), ((48, 1), "bfloat16"), ((), "float32")] * 2,
        seed=0,
        log_scale=0,
    )
    @hypothesis.example(
        specs=[((1, 1), "bfloat16"), ((1, 7), "float32"), ((7, 1), "float32")] * 2,
        seed=1,
        log_scale=2,
    )
    @hypothesis.given(specs=leaf_specs, seed=st.integers(0, 2**16), log_scale=st.integers(-3, 3))
    def test(row, specs, seed, log_scale):
        check(row, specs, seed, log_scale)

    return test


test_finite_inputs_give_finite_outputs = pytest.mark.parametrize("row", ROWS, ids=IDS)(
    _property_test(MAX_EXAMPLES)
)
test_finite_inputs_give_finite_outputs_many = pytest.mark.slow(
    pytest.mark.parametrize("row", ROWS, ids=IDS)(_property_test(SLOW_EXAMPLES))
)
