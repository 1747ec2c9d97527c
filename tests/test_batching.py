"""Same-shaped matrices run as one batched computation, with the per-leaf results.

The oracle of each test is the same transform applied to every leaf on its own (a one-leaf
tree, where nothing can be batched; that path is the one the golden and reference tests
check). Batched products sum in another order, so agreement is to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import rlx_optax
from rlx_optax._src.transforms import _batching


@pytest.fixture(autouse=True)
def batched_on_cpu():
    """The batched path is the accelerator default; force it here so CPU CI checks it."""
    with _batching.force_batching(True):
        yield


def test_cpu_runs_leaf_by_leaf_unless_forced():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU default")
    with _batching.force_batching(False):
        assert not _batching.batching_enabled()
    assert _batching.batching_enabled()  # inside the fixture
    calls = []

    def fn(x):
        calls.append(x.shape)
        return (x * 2,)

    xs = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))}
    with _batching.force_batching(False):
        (out,) = _batching.grouped_map(fn, 1, xs)
    assert calls == [(2, 3), (2, 3)]  # one call per leaf, no stack
    np.testing.assert_array_equal(np.asarray(out["b"]), 2 * np.ones((2, 3)))


SHAPES = {
    "a": (8, 12),
    "b": (8, 12),
    "c": (8, 12),
    "d": (12, 8),
    "e": (12, 8),
    "f": (6, 6),
    "v": (12,),
}


def tree(seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}


def run_steps(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads_seq:
        u, state = step(g, state, params)
        params = jax.tree.map(lambda p, x: p + x, params, u)
    return params, state


def per_leaf_steps(make, params, grads_seq):
    """Every leaf alone through its own copy of the transform."""
    out = {}
    for k in params:
        p, _ = run_steps(make(), {k: params[k]}, [{k: g[k]} for g in grads_seq])
        out[k] = p[k]
    return out


FACTORIES = {
    "muon": lambda: rlx_optax.muon(0.02),
    "muon_keller_conv": lambda: rlx_optax.muon(0.02, shape_scale="keller", flatten_conv=True),
    "muon_traced_steps": lambda: rlx_optax.muon(0.02, ns_steps=jnp.asarray(3)),
    "mars_shampoo": lambda: rlx_optax.mars(3e-3, variant="shampoo"),
    "soap": lambda: rlx_optax.soap(3e-3, precond_freq=2),
    "soap_reference": lambda: rlx_optax.soap(
        3e-3,
        precond_freq=2,
        skip_first_step=True,
        reproject_moments=True,
        refresh="qr",
        precondition_nd=True,
        precondition_1d=True,
    ),
    "kron_psgd": lambda: rlx_optax.kron_psgd(0.01),
    "kron_psgd_reference_gradient_probe": lambda: rlx_optax.kron_psgd(
        0.01,
        momentum_before=True,
        factor_update="reference",
        clip_mode="rms",
        precondition_nd=True,
        max_size_triangular=10,
    ),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_batched_matches_per_leaf(name):
    make = FACTORIES[name]
    params = tree(0, 0.1)
    grads_seq = [tree(i + 1) for i in range(3)]
    got, _ = run_steps(make(), params, grads_seq)
    want = per_leaf_steps(make, params, grads_seq)
    for k in params:
        disp = float(jnp.max(jnp.abs(want[k] - params[k])))
        err = float(jnp.max(jnp.abs(got[k] - want[k])))
        assert err <= 2e-5 * disp, (k, err, disp)


def _count(jaxpr, primitive: str = "dot_general") -> int:
    """`primitive` equations in a jaxpr, sub-jaxprs (loops, conds, pjit) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == primitive
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count(sub, primitive)
    return n


def test_muon_newton_schulz_traced_once_per_shape():
    """Three (8, 12) and two (12, 8) matrices: two shape groups, so the products of two
    Newton-Schulz chains (three products per step), not five."""
    tx = rlx_optax.muon(0.02, ns_steps=2)
    params = {k: v for k, v in tree(0).items() if k in "abcde"}
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, params))(params, tx.init(params))
    assert _count(jaxpr.jaxpr) == 2 * 2 * 3


@pytest.mark.parametrize(
    ("make", "primitive"),
    [
        (lambda: rlx_optax.kron_psgd(0.01), "triangular_solve"),
        (lambda: rlx_optax.kron_psgd(0.01), "dot_general"),
        (lambda: rlx_optax.soap(3e-3), "eigh"),
        (lambda: rlx_optax.soap(3e-3), "dot_general"),
        (lambda: rlx_optax.soap(3e-3, behaviour="reference"), "qr"),
    ],
    ids=["kron-solve", "kron-dot", "soap-eigh", "soap-dot", "soap-qr"],
)
def test_one_factor_computation_per_shape_group(make, primitive):
    """Three (8, 12), two (12, 8) and one (6, 6) matrix trace the factor (Kron) or statistics
    and eigenbasis (SOAP) work of three leaves (one per shape), not six."""
    tx = make()

    def count(params):
        jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, params))(params, tx.init(params))
        return _count(jaxpr.jaxpr, primitive)

    params = {k: v for k, v in tree(0).items() if k != "v"}
    one_per_shape = {k: params[k] for k in ("a", "d", "f")}
    assert count(one_per_shape) > 0
    assert count(params) == count(one_per_shape)


def test_grouped_map_groups_by_shape_dtype_and_static_values():
    calls = []

    def fn(x, flag):
        calls.append((x.shape, flag))
        return (x * 2 if flag else x,)

    xs = {
        "a": jnp.ones((2, 3)),
        "b": jnp.ones((2, 3)),
        "c": jnp.ones((2, 3), jnp.bfloat16),
        "d": jnp.ones((2, 3)),
        "n": None,
    }
    flags = {"a": True, "b": True, "c": True, "d": False, "n": None}
    (out,) = _batching.grouped_map(fn, 1, xs, flags)
    # a and b share a call (vmapped: the function sees one unbatched (2, 3) slice)
    assert sorted(calls, key=str) == sorted([((2, 3), True)] * 2 + [((2, 3), False)], key=str)
    assert out["n"] is None
    np.testing.assert_array_equal(out["a"], 2 * np.ones((2, 3)))
    np.testing.assert_array_equal(out["d"], np.ones((2, 3)))
    assert out["c"].dtype == jnp.bfloat16


def _operand_ranks(jaxpr, primitive: str) -> list[int]:
    """Ranks of the first operand of every `primitive` equation, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            out.append(eqn.invars[0].aval.ndim)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _operand_ranks(sub, primitive)
    return out


@pytest.mark.parametrize(
    ("kwargs", "primitive"),
    [({}, "eigh"), ({"behaviour": "reference"}, "qr")],
    ids=["eigh", "qr"],
)
def test_batched_soap_calls_lapack_one_matrix_at_a_time_on_cpu(kwargs, primitive):
    """jaxlib's batched CPU LAPACK kernels block an intra-op pool thread while their batch
    runs on the pool: two at once deadlocked a 2-core machine (SOAP's batched step on a d=64
    tree, seen under gdb, racy). On the CPU the batched step must therefore call LAPACK on
    single matrices (a loop over the group), and only there."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU path")
    tx = rlx_optax.soap(3e-3, **kwargs)
    params = {k: v for k, v in tree(0).items() if k != "v"}
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, params))(params, tx.init(params))
    ranks = _operand_ranks(jaxpr.jaxpr, primitive)
    assert ranks and set(ranks) == {2}, ranks


@pytest.mark.parametrize("name", ["eigh", "qr"])
def test_lapack_wrappers_equal_jnp_batched_nested_and_differentiated(name):
    from rlx_optax._src.linalg import _lapack

    ours, theirs = getattr(_lapack, name), getattr(jnp.linalg, name)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 6, 6)), jnp.float32)
    s = x @ jnp.swapaxes(x, -1, -2) if name == "eigh" else x
    got = jax.jit(jax.vmap(jax.vmap(ours)))(s)
    want = theirs(s)
    for a, b in zip(got, want, strict=True):  # the same LAPACK routine per matrix
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # derivatives are jnp's own (forward and reverse, batched)
    f_ours = lambda m: jnp.sum(ours(m)[0] ** 2)  # noqa: E731
    f_theirs = lambda m: jnp.sum(theirs(m)[0] ** 2)  # noqa: E731
    np.testing.assert_allclose(
        np.asarray(jax.vmap(jax.grad(f_ours))(s[0])),
        np.asarray(jax.vmap(jax.grad(f_theirs))(s[0])),
        rtol=1e-5,
        atol=1e-5,
    )
