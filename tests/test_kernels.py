"""Kernels of the compiled element-wise steps, and `optax.flatten` over element-wise rules.

Kernel counts are compared only where the margin does not depend on XLA's fusion details:
LAMB's guard of its norms (one conditional per leaf on CPU, one per step in the accelerator
form), and our steps launching no more kernels than optax's for the same rule. The step
times live in `benchmarks/model.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from benchmarks import elementwise
from rlx_optax._src.transforms import _batching


def _tree(n_blocks: int, seed: int, scale: float) -> dict[str, jax.Array]:
    """`n_blocks` blocks of a matrix, a long vector and two short norm-scale vectors."""
    shapes = {}
    for i in range(n_blocks):
        shapes |= {f"{i}/w": (64, 96), f"{i}/u": (5000,), f"{i}/n1": (64,), f"{i}/n2": (64,)}
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: scale * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }


def _kernels(tx, params, grads):
    return elementwise.kernel_census(tx, params, grads)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts the CPU program")
@pytest.mark.parametrize("batched", [False, True])
def test_lamb_guards_its_norms_with_one_conditional_per_group(batched):
    # The masked norms run only when a plain one is not finite. One test guards both norms of
    # a leaf (CPU: leaf by leaf), or every leaf at once (accelerators; forced here).
    for n_blocks in (1, 3):
        params, grads = _tree(n_blocks, 0, 0.1), _tree(n_blocks, 1, 1.0)
        with _batching.force_batching(batched):
            census = _kernels(rlx_optax.lamb(1e-2), params, grads)
        want = 1 if batched else len(params)
        assert census["by_op"].get("conditional", 0) == want, census["by_op"]


@pytest.mark.parametrize("case", ["finite", "nonfinite"])
def test_lamb_batched_trust_ratios_equal_the_per_leaf_ones(case):
    """The accelerator form (all leaves' ratios as one vector, small leaves summed as one
    stack) against the CPU form (leaf by leaf), with masks, a zero leaf and, in one case,
    non-finite gradient entries (the masked norms)."""
    params, grads = _tree(2, 0, 0.1), _tree(2, 1, 1.0)
    params["0/n2"] = jnp.zeros_like(params["0/n2"])
    if case == "nonfinite":
        grads["1/w"] = grads["1/w"].at[3, 4].set(jnp.nan)
        grads["0/n1"] = grads["0/n1"].at[7].set(jnp.inf)
    trust = {k: not k.endswith("n2") or k.startswith("0") for k in params}
    decay = {k: not k.endswith("n1") for k in params}

    def run(batched):
        with _batching.force_batching(batched):
            tx = rlx_optax.lamb(1e-2, weight_decay=0.1, mask=decay, trust_ratio_mask=trust)
            step = jax.jit(lambda g, s, p: tx.update(g, s, p))
            state, out = tx.init(params), []
            for _ in range(3):
                u, state = step(grads, state, params)
                out.append(u)
        return out

    for a, b in zip(run(False), run(True), strict=True):
        for k in params:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=0, equal_nan=True, err_msg=k)
    if case == "nonfinite":  # the norms skipped the non-finite entries: the rest is finite
        u = run(False)[0]
        assert np.isfinite(np.delete(np.asarray(u["1/w"]).ravel(), 3 * 96 + 4)).all()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="counts the CPU program")
@pytest.mark.parametrize(
    "name, ours, theirs",
    [
        ("adamw", rlx_optax.adamw(1e-2), optax.adamw(1e-2, weight_decay=0.01)),
        ("lion", rlx_optax.lion(1e-3, weight_decay=0.01), optax.lion(1e-3, weight_decay=0.01)),
        ("lamb", rlx_optax.lamb(1e-2), optax.lamb(1e-2, weight_decay=0.01)),
    ],
)
def test_no_more_kernels_than_optax(name, ours, theirs):
    params, grads = _tree(2, 0, 0.1), _tree(2, 1, 1.0)
    mine = _kernels(ours, params, grads)
    peer = _kernels(theirs, params, grads)
    assert len(mine["kernels"]) <= len(peer["kernels"]), (name, mine["by_op"], peer["by_op"])


# --------------------------------------------------------------------------- optax.flatten


def _trajectory(tx, params, grads_seq):
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
    )
    state = tx.init(params)
    out = []
    for g in grads_seq:
        params, state = step(params, state, g)
        out.append(params)
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda: rlx_optax.adamw(1e-2, weight_decay=0.1),
        lambda: rlx_optax.lion(1e-3, weight_decay=0.1),
    ],
    ids=["adamw", "lion"],
)
def test_flatten_gives_the_tree_step(make):
    """An element-wise rule over the parameters as one flat vector is the same rule: the
    trajectories agree to float32 rounding (oracle: the tree step)."""
    params = _tree(2, 0, 0.1)
    grads_seq = [_tree(2, 10 + t, 1.0) for t in range(8)]
    tree = _trajectory(make(), params, grads_seq)
    flat = _trajectory(optax.flatten(make()), params, grads_seq)
    for a, b in zip(tree, flat, strict=True):
        for k in params:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-8, err_msg=k)


def test_flatten_changes_a_per_leaf_rule():
    """LAMB's trust ratio is per leaf: flattened, the whole model is one "layer" and the
    steps differ (why the flatten advice is for element-wise rules only)."""
    params = _tree(2, 0, 0.1)
    grads_seq = [_tree(2, 10 + t, 1.0) for t in range(2)]
    tree = _trajectory(rlx_optax.lamb(1e-2), params, grads_seq)[-1]
    flat = _trajectory(optax.flatten(rlx_optax.lamb(1e-2)), params, grads_seq)[-1]
    moved = max(float(jnp.max(jnp.abs(tree[k] - params[k]))) for k in params)
    diff = max(float(jnp.max(jnp.abs(tree[k] - flat[k]))) for k in params)
    assert diff > 0.1 * moved
