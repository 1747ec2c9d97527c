"""The crate-style stateful API (`rlx_optax.Optimizer` and its classes), for every algorithm.

Parametrized over `registry.ALGORITHMS`: a newly registered algorithm is covered here with no
new test code. Small shapes; every test of one algorithm uses the same configuration, so the
compiled steps are shared.
"""

from __future__ import annotations

import inspect
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from rlx_optax._src import registry, stateful

ROWS = registry.ALGORITHMS
IDS = [row.stateful for row in ROWS]
TENSORS = (("w", (6, 4)), ("b", (5,)), ("k", (2, 3, 2)))
ALL_CLASSES = (
    "Sgd Adam AdamW NAdamW RAdam QHAdamW Lamb Adafactor Lion Soap KronPsgd Muon Sophia Mars Stiefel"
).split()


def make(row, **fields):
    return stateful.get(row.name)(row.contract_lr, **fields)


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in TENSORS}


def grads_for(k, seed=1):
    rng = np.random.default_rng(seed + 100 * k)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in TENSORS}


def run_loop(opt, params, iterations, start=0):
    for k in range(start, start + iterations):
        g = grads_for(k)
        for n, s in TENSORS:
            opt.step(n, s, params[n], g[n])
        opt.end_iteration()
    return params


def assert_state_equal(a, b):
    assert a["algorithm"] == b["algorithm"] and a["step"] == b["step"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for name, ta in a["tensors"].items():
        tb = b["tensors"][name]
        assert ta["shape"] == tb["shape"] and ta["dtype"] == tb["dtype"]
        assert ta["state"].keys() == tb["state"].keys()
        for key, va in ta["state"].items():
            np.testing.assert_array_equal(va, tb["state"][key], err_msg=f"{name}{key}")


# --------------------------------------------------------------------------- classes


def test_every_registered_algorithm_has_its_crate_class():
    for row in ROWS:
        cls = getattr(rlx_optax, row.stateful)
        assert issubclass(cls, rlx_optax.Optimizer) and cls.__name__ == row.stateful
        assert row.stateful in ALL_CLASSES
        assert stateful.get(row.crate_name) is cls and stateful.get(row.name) is cls
    with pytest.raises(TypeError):
        rlx_optax.Optimizer(0.1)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_constructor_takes_lr_first_and_crate_fields_with_crate_defaults(row):
    cls = stateful.get(row.name)
    params = list(inspect.signature(cls).parameters)
    assert params[0] == "lr"
    opt = cls(0.01)
    for field, default in row.crate_defaults.items():
        if field == "lr":  # Adafactor: None, the relative step size
            assert cls().lr is default is None
            continue
        assert getattr(opt, field) == default, field
        assert inspect.signature(cls).parameters[field].default == default
    assert set(row.crate_fields) - {"lr"} <= set(params)
    with pytest.raises(TypeError, match="no field"):
        cls(0.01, not_a_field=1.0)
    if row.crate_name == "adafactor":
        assert cls().lr is None
    else:
        with pytest.raises(TypeError, match="lr"):
            cls()


def test_constructor_keywords_and_bad_hyperparameters():
    opt = rlx_optax.AdamW(3e-4, weight_decay=0.1, beta1=0.8)
    assert (opt.lr, opt.weight_decay, opt.beta1, opt.beta2) == (3e-4, 0.1, 0.8, 0.999)
    assert "AdamW(lr=0.0003" in repr(opt)
    with pytest.raises(ValueError, match="AdamW.*b1"):
        rlx_optax.AdamW(0.1, beta1=1.5)
    with pytest.raises(ValueError, match="Sgd: lr must be a non-negative"):
        rlx_optax.Sgd(-1.0)


BUILDER_CALLS = {
    "with_betas": ((0.8, 0.9), {"beta1": 0.8, "beta2": 0.9}),
    "with_eps": ((1e-6,), {"eps": 1e-6}),
    "with_weight_decay": ((0.05,), {"weight_decay": 0.05}),
    "with_nus": ((0.6, 0.9), {"nu1": 0.6, "nu2": 0.9}),
    "with_ns_steps": ((3,), {"ns_steps": 3}),
    "with_lr": ((0.02,), {"lr": 0.02}),
    "with_f32_math": ((True,), {"f32_math": True}),
}


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_builders_chain_and_set_fields(row):
    names = row.crate_builders
    assert names, row.stateful
    for builder in names:
        opt = make(row)
        if builder == "with_momentum":
            args = (0.5, True) if row.stateful == "Sgd" else (0.5,)
            expect = {"momentum": 0.5, **({"nesterov": True} if row.stateful == "Sgd" else {})}
        else:
            args, expect = BUILDER_CALLS[builder]
        assert getattr(opt, builder)(*args) is opt
        for field, value in expect.items():
            assert getattr(opt, field) == value, (builder, field)


def test_builder_after_steps_takes_effect():
    p = np.ones(3, np.float32)
    opt = rlx_optax.Sgd(0.1)
    opt.step("p", (3,), p, np.ones(3, np.float32))
    np.testing.assert_allclose(p, 0.9)
    opt.with_weight_decay(1.0)  # g + 1.0 * p = 1.9
    opt.step("p", (3,), p, np.ones(3, np.float32))
    np.testing.assert_allclose(p, 0.9 - 0.1 * 1.9, rtol=1e-6)


# --------------------------------------------------------------------------- step


def pure_trajectory(row, iterations):
    """Oracle: the registry's pure transform on the dict of all tensors, one update per
    iteration (every tensor is stepped every iteration, so per-tensor counts = global)."""
    tx = row.from_crate(lr=row.contract_lr)
    params = jax.tree.map(jnp.asarray, init_params())
    state = tx.init(params)
    update = jax.jit(tx.update)
    for k in range(iterations):
        updates, state = update(jax.tree.map(jnp.asarray, grads_for(k)), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_step_updates_numpy_in_place_as_the_pure_transform(row):
    params = init_params()
    views = dict(params)
    opt = make(row)
    run_loop(opt, params, 3)
    ref = pure_trajectory(row, 3)
    for n, _ in TENSORS:
        assert params[n] is views[n]
        scale = np.max(np.abs(ref[n] - init_params()[n]))
        # Same per-tensor math; compiled separately, so matmuls may round differently.
        np.testing.assert_allclose(params[n], ref[n], rtol=1e-6, atol=1e-6 * scale, err_msg=n)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_step_jax_arrays_and_flat_buffers(row):
    shaped = init_params()
    opt_np = make(row)
    run_loop(opt_np, shaped, 2)

    opt_jax, opt_flat = make(row), make(row)
    jx = {n: jnp.asarray(v) for n, v in init_params().items()}
    flat = {n: v.reshape(-1).copy() for n, v in init_params().items()}
    for k in range(2):
        g = grads_for(k)
        for n, s in TENSORS:
            new = opt_jax.step(n, s, jx[n], jnp.asarray(g[n]))
            assert isinstance(new, jax.Array) and new.shape == s
            jx[n] = new
            out = opt_flat.step(n, s, flat[n], g[n].reshape(-1))
            assert out is flat[n] and out.shape == (int(np.prod(s)),)
        opt_jax.end_iteration()
        opt_flat.end_iteration()
    for n, s in TENSORS:
        np.testing.assert_array_equal(np.asarray(jx[n]), shaped[n])
        np.testing.assert_array_equal(flat[n].reshape(s), shaped[n])


def test_matrix_path_follows_the_logical_shape():
    # Muon-like algorithms treat a rank-2 shape as a matrix whatever the buffer layout, so a
    # flat buffer declared (6, 4) must move exactly like the (6, 4) array and unlike a (24,).
    row = next((r for r in ROWS if r.matrix), None)
    if row is None:
        pytest.skip("no matrix algorithm registered yet")
    g = grads_for(0)["w"]
    as_matrix, as_vector = (init_params()["w"].reshape(-1).copy() for _ in range(2))
    make(row).step("w", (6, 4), as_matrix, g.reshape(-1))
    make(row).step("w", (24,), as_vector, g.reshape(-1))
    ref = init_params()["w"].copy()
    make(row).step("w", (6, 4), ref, g)
    np.testing.assert_array_equal(as_matrix, ref.reshape(-1))
    assert np.max(np.abs(as_vector - as_matrix)) > 1e-4


ADAMW_LR, B1, B2, EPS, WD = 0.01, 0.9, 0.999, 1e-8, 0.01


def adamw_first_step(p, g, t):
    """float64 transcription of the crate's AdamW for a tensor whose moments are zero at t."""
    p, g = p.astype(np.float64), g.astype(np.float64)
    m, v = (1 - B1) * g, (1 - B2) * g * g
    u = (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
    return p - ADAMW_LR * (u + WD * p)


def test_global_counter_bias_corrects_a_late_tensor_with_the_global_t():
    opt = rlx_optax.AdamW(ADAMW_LR)
    a = np.ones(4, np.float32)
    for _ in range(2):
        opt.step("a", (4,), a, np.ones(4, np.float32))
        opt.end_iteration()
    assert opt.current_step() == 3
    b0 = np.linspace(-1, 1, 5).astype(np.float32)
    gb = np.linspace(0.5, -2, 5).astype(np.float32)
    b = b0.copy()
    opt.step("b", (5,), b, gb)  # first seen at iteration 3: t = 3, not 1
    ref = adamw_first_step(b0, gb, 3)
    np.testing.assert_allclose(b, ref, rtol=0, atol=1e-5 * np.max(np.abs(ref - b0)))
    assert np.max(np.abs(adamw_first_step(b0, gb, 3) - adamw_first_step(b0, gb, 1))) > 1e-4


def test_without_end_iteration_t_stays_one():
    opt = rlx_optax.AdamW(ADAMW_LR)
    p0 = np.linspace(-1, 1, 5).astype(np.float32)
    g = np.linspace(0.5, -2, 5).astype(np.float32)
    p = p0.copy()
    opt.step("p", (5,), p, g)
    opt.step("q", (5,), q := p0.copy(), g)
    ref = adamw_first_step(p0, g, 1)
    np.testing.assert_allclose(q, ref, rtol=0, atol=1e-5 * np.max(np.abs(ref - p0)))


def test_soap_basis_is_computed_for_a_tensor_first_seen_late():
    # The crate computes a tensor's eigenbasis when it was never computed, whatever the global
    # step. A square gradient keeps both Gram matrices full rank, so the basis is well defined;
    # in that basis G is diagonal up to float32 rounding, and eps = 1e-2 keeps that rounding
    # noise from being mapped to +-1 (tests/golden.py explains the crate's eps = 1e-8 case).
    if "Soap" not in stateful.CLASSES:
        pytest.skip("soap not registered yet")
    lr, b1, b2, sb, eps, wd = 0.01, 0.95, 0.95, 0.95, 1e-2, 0.01
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal((4, 4)).astype(np.float32)
    g = rng.standard_normal((4, 4)).astype(np.float32)
    late, fresh = rlx_optax.Soap(lr, eps=eps), rlx_optax.Soap(lr, eps=eps)
    a = np.ones(3, np.float32)
    for _ in range(2):
        late.step("a", (3,), a, np.ones(3, np.float32))
        late.end_iteration()
    w = w0.copy()
    late.step("w", (4, 4), w, g)  # first seen at t = 3
    fresh.step("w", (4, 4), w0.copy(), g)
    bases = [k for k in late.state_dict()["tensors"]["w"]["state"] if "bases" in k]
    assert bases
    for key in bases:
        np.testing.assert_array_equal(
            late.state_dict()["tensors"]["w"]["state"][key],
            fresh.state_dict()["tensors"]["w"]["state"][key],
        )
    # Oracle: float64 NumPy transcription of the crate's first SOAP step, at t = 3.
    G = g.astype(np.float64)
    ql = np.linalg.eigh((1 - sb) * G @ G.T)[1]
    qr = np.linalg.eigh((1 - sb) * G.T @ G)[1]
    gr = ql.T @ G @ qr
    m, v, t = (1 - b1) * gr, (1 - b2) * gr * gr, 3
    u = ql @ ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)) @ qr.T
    ref = w0 - lr * (u + wd * w0)
    np.testing.assert_allclose(w, ref, rtol=0, atol=1e-4 * np.max(np.abs(ref - w0)))


# --------------------------------------------------------------------------- lr


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_lr_scale_zero_freezes_a_tensor(row):
    if row.crate_name == "adafactor":
        pytest.skip("Adafactor's default is the relative step size: no lr to scale")
    params = init_params()
    opt = stateful.get(row.name)(row.contract_lr, lr_scale={"b": 0.0})
    run_loop(opt, params, 2)
    np.testing.assert_array_equal(params["b"], init_params()["b"])
    assert np.max(np.abs(params["w"] - init_params()["w"])) > 0


def test_lr_scale_mapping_callable_and_override_multiply_lr():
    g = np.linspace(-1, 1, 6).astype(np.float32)
    ref = np.ones(6, np.float32)
    rlx_optax.Adam(0.05).step("w", (6,), ref, g)

    class Scaled(rlx_optax.Adam):
        def lr_scale(self, name):
            return 0.5 if name == "w" else 1.0

    for opt in (
        rlx_optax.Adam(0.1, lr_scale={"w": 0.5}),
        rlx_optax.Adam(0.1, lr_scale=lambda name: 0.5),
        Scaled(0.1),
    ):
        p = np.ones(6, np.float32)
        opt.step("w", (6,), p, g)
        np.testing.assert_array_equal(p, ref)


def test_set_lr_does_not_recompile():
    opt = rlx_optax.Adam(0.1)
    p = np.ones(6, np.float32)
    g = np.linspace(-1, 1, 6).astype(np.float32)
    opt.step("w", (6,), p, g)
    traces = opt._transform().traces
    opt.set_lr(0.0)
    before = p.copy()
    opt.step("w", (6,), p, g)
    np.testing.assert_array_equal(p, before)
    opt.set_lr(0.05)
    opt.lr = 0.07  # assigning the field is the same
    opt.step("w", (6,), p, g)
    assert np.max(np.abs(p - before)) > 0
    assert opt._transform().traces == traces


def test_changing_a_field_recompiles_and_takes_effect():
    p = np.ones(2, np.float32)
    opt = rlx_optax.Sgd(0.1)
    opt.step("p", (2,), p, np.ones(2, np.float32))
    opt.weight_decay = 0.5
    opt.step("p", (2,), p, np.zeros(2, np.float32))
    np.testing.assert_allclose(p, 0.9 - 0.1 * 0.5 * 0.9, rtol=1e-6)


# --------------------------------------------------------------------------- step_batch


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_step_batch_equals_the_loop(row):
    loop = run_loop(make(row), init_params(), 3)
    opt, params = make(row), init_params()
    for k in range(3):
        g = grads_for(k)
        out = opt.step_batch([(n, s, params[n], g[n]) for n, s in TENSORS])
        assert all(o is params[n] for o, (n, _) in zip(out, TENSORS, strict=True))
        opt.end_iteration()
    for n, _ in TENSORS:
        np.testing.assert_array_equal(params[n], loop[n], err_msg=n)


def test_step_batch_with_a_late_tensor_equals_the_loop():
    for cls in (rlx_optax.AdamW, stateful.CLASSES.get("Soap")):
        if cls is None:
            continue
        a_loop, a_batch = cls(0.01), cls(0.01)
        p_loop, p_batch = init_params(), init_params()
        for k in range(3):
            g = grads_for(k)
            names = [(n, s) for n, s in TENSORS if k >= 2 or n != "w"]  # w appears at t = 3
            for n, s in names:
                a_loop.step(n, s, p_loop[n], g[n])
            a_batch.step_batch([(n, s, p_batch[n], g[n]) for n, s in names])
            a_loop.end_iteration()
            a_batch.end_iteration()
        for n, _ in TENSORS:
            np.testing.assert_array_equal(p_batch[n], p_loop[n], err_msg=n)


def test_step_batch_returns_new_jax_arrays():
    opt = rlx_optax.Sgd(0.5)
    out = opt.step_batch(
        [("a", (2,), jnp.ones(2), jnp.ones(2)), ("b", (1,), jnp.ones(1), jnp.ones(1))]
    )
    np.testing.assert_allclose(np.asarray(out[0]), 0.5)
    np.testing.assert_allclose(np.asarray(out[1]), 0.5)
    with pytest.raises(ValueError, match="repeated"):
        opt.step_batch([("a", (2,), jnp.ones(2), jnp.ones(2))] * 2)


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_state_dict_resume_is_bit_exact(row):
    straight = make(row)
    p_straight = run_loop(straight, init_params(), 5)

    first = make(row)
    params = run_loop(first, init_params(), 2)
    saved = pickle.loads(pickle.dumps(first.state_dict()))
    run_loop(first, init_params(), 1)  # keep using the first one: the saved copy is unaffected
    second = make(row)
    second.load_state_dict(saved)
    run_loop(second, params, 3, start=2)
    for n, _ in TENSORS:
        np.testing.assert_array_equal(params[n], p_straight[n], err_msg=n)
    assert_state_equal(second.state_dict(), straight.state_dict())


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_load_state_dict_refuses_another_algorithm_or_shape(row):
    opt = make(row)
    run_loop(opt, init_params(), 1)
    before = opt.state_dict()
    other = next(r for r in registry.ALGORITHMS if r.crate_name != row.crate_name)
    foreign = make(other)
    run_loop(foreign, init_params(), 1)
    with pytest.raises(ValueError, match=row.stateful):
        opt.load_state_dict(foreign.state_dict())
    reshaped = make(row)
    reshaped.step("w", (4, 6), np.ones((4, 6), np.float32), np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match="'w'"):
        opt.load_state_dict(reshaped.state_dict())
    with pytest.raises(ValueError, match="shape"):
        reshaped.load_state_dict(before)
    tampered = opt.state_dict()
    key = next(iter(tampered["tensors"]["b"]["state"]))
    tampered["tensors"]["b"]["state"].pop(key)
    with pytest.raises(ValueError, match="'b'"):
        opt.load_state_dict(tampered)
    assert_state_equal(opt.state_dict(), before)


# --------------------------------------------------------------------------- errors


def bad_calls():
    ok = np.ones((6, 4), np.float32)
    read_only = np.ones((6, 4), np.float32)
    read_only.flags.writeable = False
    return {
        "grad size": ("w", (6, 4), ok.copy(), np.ones(23, np.float32)),
        "shape vs array": ("w", (4, 6), ok.copy(), ok.copy()),
        "shape size": ("w", (6, 5), ok.copy(), ok.copy()),
        "name reused": ("b", (6, 4), ok.copy(), ok.copy()),
        "int param": ("w", (6, 4), np.ones((6, 4), np.int32), ok.copy()),
        "int grad": ("w", (6, 4), ok.copy(), np.ones((6, 4), np.int32)),
        "read-only": ("w", (6, 4), read_only, ok.copy()),
        "not an array": ("w", (6, 4), ok.copy(), [[1.0] * 4] * 6),
    }


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_bad_calls_raise_and_lose_nothing(row):
    opt = make(row)
    params = run_loop(opt, init_params(), 2)
    before_state = opt.state_dict()
    before = {n: v.copy() for n, v in params.items()}
    for what, (name, shape, param, grad) in bad_calls().items():
        kept = param.copy()
        with pytest.raises(ValueError, match=repr(name)):
            opt.step(name, shape, param, grad)
        np.testing.assert_array_equal(param, kept, err_msg=what)
        # In a batch, the good items before the bad one are not applied either.
        good = [(n, s, params[n], grads_for(9)[n]) for n, s in TENSORS if n != name]
        with pytest.raises(ValueError, match=repr(name)):
            opt.step_batch([*good, (name, shape, param, grad)])
        for n, v in before.items():
            np.testing.assert_array_equal(params[n], v, err_msg=f"{what}: {n}")
        assert_state_equal(opt.state_dict(), before_state)


def test_errors_name_the_parameter():
    opt = rlx_optax.Sgd(0.1)
    with pytest.raises(ValueError, match="'emb'.*23 elements"):
        opt.step("emb", (6, 4), np.ones((6, 4), np.float32), np.ones(23, np.float32))
    with pytest.raises(ValueError, match="'emb'.*non-float"):
        opt.step("emb", (3,), np.ones(3, np.int64), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="'emb'.*read-only"):
        ro = np.ones(3, np.float32)
        ro.flags.writeable = False
        opt.step("emb", (3,), ro, np.ones(3, np.float32))


# --------------------------------------------------------------------------- extras


def test_sophia_update_hessian_matches_the_pure_transform():
    if "Sophia" not in stateful.CLASSES:
        pytest.skip("sophia not registered yet")
    row = registry.get("sophia")
    opt = rlx_optax.Sophia(0.01, weight_decay=0.0, rho=100.0)
    params = init_params()
    h = {n: np.full(s, 2.0, np.float32) for n, s in TENSORS}
    for n, s in TENSORS:
        opt.update_hessian(n, h[n].reshape(-1), shape=s)  # a flat estimate, as in the crate
    run_loop(opt, params, 2)

    tx = row.from_crate(lr=0.01, weight_decay=0.0, rho=100.0)
    ref = jax.tree.map(jnp.asarray, init_params())
    state = tx.init(ref)
    for k in range(2):
        extra = {"hessian_diag": h} if k == 0 else {}
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads_for(k)), state, ref, **extra)
        ref = optax.apply_updates(ref, updates)
    for n, _ in TENSORS:
        np.testing.assert_allclose(params[n], np.asarray(ref[n]), rtol=1e-6, atol=1e-7)
    # A Hessian for a known name must have its size.
    before = opt.state_dict()
    with pytest.raises(ValueError, match="'w'"):
        opt.update_hessian("w", np.ones(5, np.float32))
    assert_state_equal(opt.state_dict(), before)


def test_adam_accepts_f32_math_and_current_step():
    opt = rlx_optax.Adam(0.1, f32_math=True).with_f32_math(False)
    assert opt.f32_math is False and opt.current_step() == 1
    opt.end_iteration()
    assert opt.current_step() == 2


def test_jax_grads_are_not_donated_with_the_state():
    # MARS stores the previous gradient: the caller's gradient array must stay usable.
    cls = stateful.CLASSES.get("Mars", rlx_optax.Sgd)
    opt = cls(0.01)
    g = jnp.ones(4)
    p = jnp.zeros(4)
    for _ in range(3):
        p = opt.step("p", (4,), p, g)
        p = opt.step_batch([("p", (4,), p, g)])[0]
    np.testing.assert_array_equal(np.asarray(g), 1.0)


def test_adafactor_relative_step_then_manual_lr():
    if "Adafactor" not in stateful.CLASSES:
        pytest.skip("adafactor not registered yet")
    relative = rlx_optax.Adafactor()
    params = run_loop(relative, init_params(), 2)
    saved = relative.state_dict()
    manual = rlx_optax.Adafactor(0.01)
    manual.load_state_dict(saved)  # the learning rate is not part of the state
    relative.set_lr(0.01)  # unlike the crate (a no-op), this switches to the manual rate
    other = {n: v.copy() for n, v in params.items()}
    run_loop(relative, params, 1, start=2)
    run_loop(manual, other, 1, start=2)
    for n, _ in TENSORS:
        np.testing.assert_array_equal(params[n], other[n])


def test_jax_params_are_donated_unless_asked_not_to():
    p, g = jnp.ones(3), jnp.ones(3)
    new = rlx_optax.Sgd(0.5).step("p", (3,), p, g)
    assert p.is_deleted() and not g.is_deleted()
    np.testing.assert_allclose(np.asarray(new), 0.5)
    kept = jnp.ones(3)
    opt = rlx_optax.Sgd(0.5, donate_params=False)
    opt.step("p", (3,), kept, g)
    opt.step_batch([("p", (3,), kept, g)])
    np.testing.assert_array_equal(np.asarray(kept), 1.0)
    with pytest.raises(ValueError, match="same param array"):
        rlx_optax.Sgd(0.5).step_batch([("a", (3,), new, g), ("b", (3,), new, g)])
    assert not new.is_deleted()
