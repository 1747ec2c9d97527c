"""Degenerate leaves: empty arrays, and leaves whose crate preconditioner would not fit.

Every registered algorithm must accept zero-size leaves ((0,), (0, 5), (5, 0), (0, 0),
(2, 0, 3)) beside ordinary ones: an empty update of the leaf's shape and dtype, and the other
leaves updated exactly as without the empty one (the oracle). SOAP and Kron with the crate's
unbounded factor sizes refuse, at `init` and naming the leaf, a leaf that would build a
200000 x 200000 matrix; the argument the message names avoids it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlx_optax
from rlx_optax._src import registry

EMPTY = [(0,), (0, 5), (5, 0), (0, 0), (2, 0, 3)]


def _step(tx, row, params, grads):
    state = tx.init(params)
    extra = row.update_extra(params, grads) if row.update_extra else {}
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state, params)
    return updates


@pytest.mark.parametrize("name", registry.names())
def test_zero_size_leaves(name):
    row = registry.get(name)
    rng = np.random.default_rng(0)
    base = {"w": jnp.asarray(rng.normal(size=(4, 6)) / 4, jnp.float32)}
    base_g = {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}
    want = _step(row.factory(row.contract_lr, **row.contract_kwargs), row, base, base_g)
    params = dict(base, **{f"e{i}": jnp.zeros(s) for i, s in enumerate(EMPTY)})
    grads = dict(base_g, **{f"e{i}": jnp.zeros(s) for i, s in enumerate(EMPTY)})
    got = _step(row.factory(row.contract_lr, **row.contract_kwargs), row, params, grads)
    for i, s in enumerate(EMPTY):
        assert got[f"e{i}"].shape == s and got[f"e{i}"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_muon_keller_scale_on_empty_leaves(shape):
    tx = rlx_optax.muon(0.02, shape_scale="keller")
    p = {"z": jnp.zeros(shape)}
    updates, _ = tx.update(p, tx.init(p), p)
    assert updates["z"].shape == shape


@pytest.mark.parametrize(
    "factory,argument",
    [(rlx_optax.soap, "max_precond_dim"), (rlx_optax.kron_psgd, "max_size_triangular")],
)
def test_crate_defaults_refuse_a_huge_dense_factor_naming_the_leaf(factory, argument):
    params = {"embed": {"table": jax.ShapeDtypeStruct((1, 200000), jnp.float32)}}
    with pytest.raises(ValueError, match=rf"\['embed'\]\['table'\].*200000 x 200000.*{argument}"):
        factory(1e-3).init(params)
    # the named argument avoids it: the long axis keeps no dense matrix
    state = jax.eval_shape(factory(1e-3, **{argument: 10000}).init, params)
    sizes = [x.size for x in jax.tree.leaves(state)]
    assert max(sizes) < 10**6


@pytest.mark.parametrize("name", ["kron_psgd", "soap", "lamb"])
def test_meta_gradients_through_an_update_are_finite(name):
    """jax.grad through `update` (learned-optimizer and hyper-gradient use): finite with the
    default arguments, and equal to a central finite difference. The preconditioner statistics
    (Kron's factors, SOAP's statistics and bases) carry no gradient."""
    row = registry.get(name)
    tx = row.factory(0.05)
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    params = {"w": w, "z": jnp.zeros(3)}  # a leaf that starts at zero (LAMB's trust ratio)
    state = tx.init(params)

    def outcome(scale):
        grads = {"w": w * scale, "z": jnp.full(3, scale)}
        updates, _ = tx.update(grads, state, params)
        return jnp.sum(updates["w"] * w) + jnp.sum(updates["z"])

    grad = float(jax.grad(outcome)(1.0))
    fd = float((outcome(1.0 + 1e-2) - outcome(1.0 - 1e-2)) / 2e-2)
    assert np.isfinite(grad)
    np.testing.assert_allclose(grad, fd, rtol=5e-2, atol=1e-5)
