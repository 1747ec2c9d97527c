"""Errors and warnings of the pure API, generated from `registry.ALGORITHMS`.

A wrong state, a non-numeric learning rate, a gradient of the wrong shape and a float64 leaf
that JAX would narrow are refused with a ValueError naming what is wrong (the algorithm, the
argument, the leaf) before any computation; the defaults that are not the named algorithm
(crate-mode Kron, Sophia without a Hessian) say so once. Valid use under `optax.chain`,
`inject_hyperparams`, `MultiSteps`, `masked` and `flax.nnx.Optimizer` is
`tests/test_contract.py`'s.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from rlx_optax._src import common, registry

ROWS = registry.ALGORITHMS
IDS = [row.name for row in ROWS]


def make(row, lr=None, **overrides):
    return row.factory(
        row.contract_lr if lr is None else lr, **{**row.contract_kwargs, **overrides}
    )


def extra(row, params, grads):
    return row.update_extra(params, grads) if row.update_extra else {}


def _params():
    return {
        "layer": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "bias": jnp.ones(3)},
    }


def _grads(params):
    return jax.tree.map(lambda p: 0.1 * jnp.ones_like(p) + 0.01 * p, params)


# --------------------------------------------------------------------------- wrong state


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("row", [r for r in ROWS if r.name != "adamw"], ids=lambda r: r.name)
def test_an_adamw_state_is_refused_naming_the_algorithm(row, jit):
    params = _params()
    grads = _grads(params)
    wrong = rlx_optax.adamw(0.1).init(params)
    tx = make(row)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError) as info:
        update(grads, wrong, params, **extra(row, params, grads))
    message = str(info.value)
    assert message.startswith(f"{row.name}:"), message
    # the expected state (its class, or the chain's length) and what was given
    assert "State" in message or "chain of" in message, message
    assert "got" in message, message


@pytest.mark.parametrize(
    "other", ["lion", "sophia", "muon", "soap", "adafactor", "mars", "kron_psgd", "lamb"]
)
def test_adamw_refuses_other_families_states(other):
    params = _params()
    grads = _grads(params)
    row = registry.get(other)
    wrong = make(row).init(params)
    with pytest.raises(ValueError, match=r"^(adam|adamw): .*(AdamState|chain of 3)"):
        rlx_optax.adamw(0.1).update(grads, wrong, params)


def test_state_of_a_sibling_with_the_same_fields_is_refused():
    # AdamState and QHAdamWState both hold (count, mu, nu): the type tells them apart
    params = _params()
    state = rlx_optax.qhadamw(0.1).init(params)
    with pytest.raises(ValueError, match=r"nadamw: .*NAdamWState.*got QHAdamWState"):
        rlx_optax.nadamw(0.1).update(_grads(params), state, params)


def test_a_state_made_for_other_parameters_is_refused():
    params = _params()
    state = rlx_optax.lion(0.1).init({"kernel": params["layer"]["kernel"]})
    with pytest.raises(ValueError, match=r"lion: the state's 'mu' does not have the structure"):
        rlx_optax.lion(0.1).update(_grads(params), state, params)


def test_check_state_accepts_containers_a_framework_may_hand_back():
    from rlx_optax._src.transforms.lion import LionState

    mu = {"w": jnp.zeros(3)}
    g = {"w": jnp.ones(3)}
    count = jnp.zeros([], jnp.int32)
    for given in ({"count": count, "mu": mu}, {0: count, 1: mu}, [count, mu]):
        state = common.check_state("lion", given, LionState, g, ("mu",))
        assert isinstance(state, LionState)
    for refused in ((LionState(count, mu), optax.EmptyState()), optax.EmptyState(), {"mu": mu}):
        with pytest.raises(ValueError, match="lion: update expected its own state, LionState"):
            common.check_state("lion", refused, LionState, g, ("mu",))


def test_flax_nnx_hands_the_named_tuples_back():
    """`nnx.Optimizer` keeps the transforms' NamedTuple states (only their per-leaf trees
    become nnx containers), so the type check holds there (the contract runs every row)."""
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, rlx_optax.lion(0.1), wrt=nnx.Param)
    chain_state = opt.opt_state
    assert type(chain_state[0]).__name__ == "LionState"
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3))) ** 2))(model)
    opt.update(model, grads)
    assert type(opt.opt_state[0]).__name__ == "LionState"


# --------------------------------------------------------------------------- learning rate


@pytest.mark.parametrize("bad", ["3e-3", [0.1], (0.1,), True, np.array([0.1, 0.2]), {"lr": 1}])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_non_numeric_learning_rate_is_refused_at_construction(row, bad):
    with pytest.raises(ValueError, match="learning_rate"):
        make(row, lr=bad)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_none_learning_rate_only_where_optional(row):
    if row.lr_optional:
        row.factory(None, **row.contract_kwargs)
    else:
        with pytest.raises(ValueError, match="learning_rate"):
            row.factory(None, **row.contract_kwargs)


@pytest.mark.parametrize("good", [1, 0.1, np.float32(0.1), np.array(0.1), jnp.asarray(0.1)])
def test_numeric_learning_rates_are_accepted(good):
    params = {"w": jnp.ones(3)}
    tx = rlx_optax.adamw(good)
    u, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    assert np.isfinite(np.asarray(u["w"])).all()
    rlx_optax.adamw(optax.linear_schedule(0.1, 0.0, 10))


# --------------------------------------------------------------------------- gradient shape


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_wrong_shape_gradient_names_the_leaf_and_both_shapes(row, jit):
    params = _params()
    grads = _grads(params)
    tx = make(row)
    state = tx.init(params)
    bad = {"layer": {"kernel": jnp.ones((5, 3)), "bias": grads["layer"]["bias"]}}
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError) as info:
        update(bad, state, params, **extra(row, params, grads))
    message = str(info.value)
    assert "['layer']['kernel']" in message, message
    assert "(5, 3)" in message, message
    assert "(4, 3)" in message or "lengths (4, 3)" in message, message


# --------------------------------------------------------------------------- float64 without x64


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_float64_params_without_x64_are_refused_at_init(row):
    params = {"layer": {"kernel": np.ones((4, 3)), "bias": np.ones(3, np.float32)}}
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\] is float64.*jax_enable_x64"):
            make(row).init(params)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_float64_gradients_without_x64_are_refused_at_update(row):
    params = _params()
    grads = _grads(params)
    tx = make(row)
    state = tx.init(params)
    bad = {"layer": {"kernel": np.ones((4, 3)), "bias": grads["layer"]["bias"]}}
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"gradient leaf \['layer'\]\['kernel'\] is float64"):
            tx.update(bad, state, params, **extra(row, params, grads))


def test_float64_params_with_x64_are_kept():
    with jax.enable_x64(True):
        params = {"w": np.ones(3)}
        tx = rlx_optax.adamw(0.1)
        state = tx.init(params)
        u, _ = tx.update({"w": np.ones(3)}, state, params)
        assert u["w"].dtype == jnp.float64
        assert state[0].mu["w"].dtype == jnp.float64


# --------------------------------------------------------------------------- one-time warnings


def _matching(records, prefix):
    return [w for w in records if str(w.message).startswith(prefix)]


def test_crate_kron_warns_once_at_construction(monkeypatch):
    monkeypatch.setattr(common, "_WARNED", set())
    with pytest.warns(UserWarning, match="kron_psgd with factor_update='crate'") as first:
        rlx_optax.kron_psgd(0.05)
    assert len(_matching(first, "kron_psgd")) == 1
    assert "behaviour='reference'" in str(first[0].message)
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        rlx_optax.kron_psgd(0.05)
        rlx_optax.scale_by_kron_psgd()
    assert not _matching(later, "kron_psgd")


def test_reference_kron_does_not_warn(monkeypatch):
    monkeypatch.setattr(common, "_WARNED", set())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        rlx_optax.kron_psgd(0.05, behaviour="reference")
        rlx_optax.kron_psgd(0.05, factor_update="reference")
    assert not _matching(records, "kron_psgd")


def test_the_kron_warning_is_true():
    """What the warning says: with the crate defaults the factors stay the identity and the
    update is clipped SGD momentum; the reference configuration moves them."""
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
    keys = jax.random.split(jax.random.key(0), 5)
    grads = [{"w": jax.random.normal(k, (4, 3))} for k in keys]

    def factors_after(tx):
        state = tx.init(params)
        for g in grads:
            _, state = tx.update(g, state, params)
        return [np.asarray(f["w"]) for f in optax.tree.get(state, "factors")]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crate = factors_after(rlx_optax.kron_psgd(0.05))
        reference = factors_after(rlx_optax.kron_psgd(0.05, behaviour="reference"))
    for f in crate:
        np.testing.assert_array_equal(f, np.eye(f.shape[0]))
    assert any(np.max(np.abs(f - np.eye(f.shape[0]))) > 1e-3 for f in reference)


def test_sophia_without_a_hessian_warns_once_at_the_first_update(monkeypatch):
    monkeypatch.setattr(common, "_WARNED", set())
    params = {"w": jnp.ones(3)}
    tx = rlx_optax.sophia(0.1)
    state = tx.init(params)
    with warnings.catch_warnings(record=True) as construction:
        warnings.simplefilter("always")
        tx = rlx_optax.sophia(0.1)
    assert not _matching(construction, "sophia")
    with pytest.warns(UserWarning, match="sophia: update without a Hessian estimate") as first:
        u, state = tx.update(params, state, params)
    assert len(_matching(first, "sophia")) == 1
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        tx.update(params, state, params)
        jax.jit(tx.update)(params, state, params)
    assert not _matching(later, "sophia")


def test_sophia_with_a_hessian_does_not_warn(monkeypatch):
    monkeypatch.setattr(common, "_WARNED", set())
    params = {"w": jnp.ones(3)}
    h = rlx_optax.constant_hessian_diag(params)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        tx = rlx_optax.sophia(0.1)
        state = tx.init(params)
        _, state = tx.update(params, state, params, hessian_diag=h)
        # later steps without a new estimate keep the first one: no warning either
        tx.update(params, state, params)
        est = rlx_optax.sophia(0.1, hessian_estimator=rlx_optax.hutchinson_diag)
        est.update(
            params,
            est.init(params),
            params,
            obj_fn=lambda p: jnp.sum(p["w"] ** 2),
            key=jax.random.key(0),
        )
    assert not _matching(records, "sophia")


# --------------------------------------------------------------------------- adversarial leftovers


def test_sophia_misspelled_keyword_is_a_type_error():
    tx = rlx_optax.sophia(0.1)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'hessian'") as info:
        tx.update(params, state, params, hessian=params)
    for accepted in ("hessian_diag", "obj_fn", "key"):
        assert accepted in str(info.value)


@pytest.mark.parametrize("empty", [(5, 0), (0, 3)])
def test_mars_shampoo_passes_an_empty_matrix(empty):
    """An empty leaf gets an empty (zero) update and leaves the others as they are without it
    (the oracle: the same run without the empty leaf)."""
    v = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    with_empty = {"v": v, "w": jnp.ones(empty)}
    tx = rlx_optax.mars(0.01, variant="shampoo")
    state = tx.init(with_empty)
    alone_tx = rlx_optax.mars(0.01, variant="shampoo")
    alone_state = alone_tx.init({"v": v})
    for step in range(3):
        g = {"v": v * (step + 1), "w": jnp.ones(empty)}
        u, state = tx.update(g, state, with_empty)
        ua, alone_state = alone_tx.update({"v": g["v"]}, alone_state, {"v": v})
        assert u["w"].shape == empty
        np.testing.assert_array_equal(u["v"], ua["v"])
    jitted, _ = jax.jit(tx.update)(g, state, with_empty)
    assert jitted["w"].shape == empty
