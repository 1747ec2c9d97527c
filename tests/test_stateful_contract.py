"""The stateful API's contract on bad input: a clear error, and nothing changed.

Each test is one hole found by an adversarial harness (issue "stateful-API contract holes"):
a grad of another shape, float64 parameters, malformed checkpoints, a bad learning rate, a
misspelled field, and checkpoints through ``np.savez``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import rlx_optax
from rlx_optax._src import registry, stateful


def _snapshot(opt):
    return opt.state_dict()


def _assert_same_state(a, b):
    assert a["step"] == b["step"] and a["tensors"].keys() == b["tensors"].keys()
    for name, ta in a["tensors"].items():
        tb = b["tensors"][name]
        assert (ta["shape"], ta["dtype"]) == (tb["shape"], tb["dtype"])
        for key, va in ta["state"].items():
            np.testing.assert_array_equal(va, tb["state"][key], err_msg=f"{name}{key}")


def _stepped_adamw():
    opt = rlx_optax.AdamW(0.01)
    p = np.arange(12, dtype=np.float32).reshape(4, 3)
    opt.step("w", (4, 3), p, np.ones((4, 3), np.float32))
    opt.end_iteration()
    return opt, p


# --------------------------------------------------------------------------- grad shapes


@pytest.mark.parametrize("batch", [False, True])
def test_grad_of_another_shape_with_the_same_size_is_refused(batch):
    opt, p = _stepped_adamw()
    before, p0 = _snapshot(opt), p.copy()
    g = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"'w'.*grad has shape \(3, 4\)"):
        if batch:
            opt.step_batch([("w", (4, 3), p, g)])
        else:
            opt.step("w", (4, 3), p, g)
    np.testing.assert_array_equal(p, p0)
    _assert_same_state(opt.state_dict(), before)


def test_flat_grad_of_the_right_size_is_accepted_and_equals_the_shaped_one():
    a, pa = _stepped_adamw()
    b, pb = _stepped_adamw()
    g = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    a.step("w", (4, 3), pa, g)
    b.step("w", (4, 3), pb, g.reshape(-1))
    np.testing.assert_array_equal(pa, pb)


# --------------------------------------------------------------------------- dtypes


def test_float64_param_without_x64_is_refused_without_a_jax_warning():
    opt = rlx_optax.AdamW(0.01)
    p = np.ones((2, 3), np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # JAX's truncation UserWarning would fail here
        with pytest.raises(ValueError, match=r"'w'.*float64.*jax_enable_x64"):
            opt.step("w", (2, 3), p, np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(p, 1.0)
    assert opt.state_dict()["tensors"] == {}


def test_float64_grad_for_float32_param_computes_in_float32():
    a = rlx_optax.AdamW(0.01)
    b = rlx_optax.AdamW(0.01)
    pa, pb = np.ones(3, np.float32), np.ones(3, np.float32)
    g = np.array([0.1, -0.2, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.step("w", (3,), pa, g)
    b.step("w", (3,), pb, g.astype(np.float32))
    np.testing.assert_array_equal(pa, pb)
    assert a.state_dict()["tensors"]["w"]["dtype"] == "float32"


_X64 = textwrap.dedent(
    """
    import warnings
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np, optax, rlx_optax
    warnings.simplefilter("error")
    opt = rlx_optax.AdamW(0.01)
    p = np.linspace(-1, 1, 6).reshape(2, 3)                     # float64
    g = np.linspace(0.3, -0.2, 6, dtype=np.float32).reshape(2, 3)  # float32
    opt.step("w", (2, 3), p, g)
    sd = opt.state_dict()["tensors"]["w"]
    assert sd["dtype"] == "float64", sd["dtype"]
    moments = [v for k, v in sd["state"].items() if k.endswith(("mu", "nu"))]
    assert moments and all(v.dtype == np.float64 for v in moments), sd
    tx = rlx_optax.adamw(0.01)
    p0 = jax.numpy.asarray(np.linspace(-1, 1, 6).reshape(2, 3))
    u, _ = tx.update(jax.numpy.asarray(g, jax.numpy.float64), tx.init(p0), p0)
    want = np.asarray(optax.apply_updates(p0, u))
    assert want.dtype == np.float64 and p.dtype == np.float64
    np.testing.assert_allclose(p, want, rtol=0, atol=1e-15)
    print("ok")
    """
)


def test_float64_param_with_float32_grad_under_x64_computes_in_float64():
    out = subprocess.run([sys.executable, "-c", _X64], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --------------------------------------------------------------------------- checkpoints


def test_load_state_dict_without_step_is_refused_and_changes_nothing():
    opt, _ = _stepped_adamw()
    before = _snapshot(opt)
    other, p = _stepped_adamw()
    other.step("w", (4, 3), p, np.full((4, 3), 3.0, np.float32))
    broken = other.state_dict()
    del broken["step"]
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(broken)
    _assert_same_state(opt.state_dict(), before)
    broken = other.state_dict()
    broken["step"] = -1
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(broken)
    _assert_same_state(opt.state_dict(), before)


def test_load_state_dict_with_other_tensor_names_is_refused_unless_not_strict():
    opt, _ = _stepped_adamw()
    before = _snapshot(opt)
    other = rlx_optax.AdamW(0.01)
    other.step("v", (4, 3), np.ones((4, 3), np.float32), np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\['v'\].*\['w'\]"):
        opt.load_state_dict(other.state_dict())
    _assert_same_state(opt.state_dict(), before)
    opt.load_state_dict(other.state_dict(), strict=False)
    assert list(opt.state_dict()["tensors"]) == ["v"]
    fresh = rlx_optax.AdamW(0.01)  # an optimizer without tensors takes any names
    fresh.load_state_dict(other.state_dict())
    assert list(fresh.state_dict()["tensors"]) == ["v"]


def test_load_state_dict_refuses_non_mappings_and_malformed_tensors():
    opt, _ = _stepped_adamw()
    before = _snapshot(opt)
    for bad in (None, [1, 2], {"algorithm": "adamw", "step": 1, "tensors": {"w": {}}}):
        with pytest.raises(ValueError, match="AdamW.load_state_dict"):
            opt.load_state_dict(bad)
    _assert_same_state(opt.state_dict(), before)


_SAVEZ_ROWS = ("adamw", "soap", "sophia", "adafactor", "kron_psgd")


@pytest.mark.parametrize("name", _SAVEZ_ROWS)
def test_state_dict_round_trips_through_np_savez_and_resumes_bit_exactly(name, tmp_path):
    row = registry.get(name)
    shapes = {"layer/w": (5, 4), "b": (4,)}  # a name with a slash, as model paths have

    def grads(k):
        rng = np.random.default_rng(k)
        return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}

    def run(opt, params, ks):
        for k in ks:
            g = grads(k)
            for n, s in shapes.items():
                opt.step(n, s, params[n], g[n])
            opt.end_iteration()

    init = {n: np.full(s, 0.5, np.float32) for n, s in shapes.items()}
    straight = stateful.get(name)(row.contract_lr)
    p_straight = {n: v.copy() for n, v in init.items()}
    run(straight, p_straight, range(4))

    first = stateful.get(name)(row.contract_lr)
    params = {n: v.copy() for n, v in init.items()}
    run(first, params, range(2))
    np.savez(tmp_path / "opt.npz", **first.state_dict(flat=True))
    second = stateful.get(name)(row.contract_lr)
    with np.load(tmp_path / "opt.npz") as saved:
        second.load_state_dict(saved)
    run(second, params, range(2, 4))
    for n in shapes:
        np.testing.assert_array_equal(params[n], p_straight[n], err_msg=n)
    _assert_same_state(second.state_dict(), straight.state_dict())


# --------------------------------------------------------------------------- set_lr, fields


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1x"])
def test_set_lr_refuses_negative_and_non_finite(bad):
    opt, p = _stepped_adamw()
    with pytest.raises(ValueError, match="lr must be a non-negative finite number"):
        opt.set_lr(bad)
    assert opt.lr == 0.01
    with pytest.raises(ValueError, match="lr"):
        rlx_optax.Lion(bad)
    opt.set_lr(0.0)  # zero is a valid rate: the parameters stay
    p0 = p.copy()
    opt.step("w", (4, 3), p, np.ones((4, 3), np.float32))
    np.testing.assert_array_equal(p, p0 * (1 - 0.0))


def test_a_negative_lr_scale_is_refused_before_anything_changes():
    opt = rlx_optax.AdamW(0.01, lr_scale={"w": -2.0})
    p = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"'w'.*lr_scale"):
        opt.step("w", (4, 3), p, np.ones((4, 3), np.float32))
    np.testing.assert_array_equal(p, 1.0)
    assert opt.state_dict()["tensors"] == {}


def test_adafactor_lr_may_be_none_others_may_not():
    opt = rlx_optax.Adafactor()
    opt.set_lr(None)
    opt.set_lr(0.1)
    with pytest.raises(ValueError, match="lr"):
        rlx_optax.AdamW(0.1).set_lr(None)


def test_setting_an_unknown_attribute_raises_attribute_error():
    opt = rlx_optax.AdamW(0.01)
    with pytest.raises(AttributeError, match="weight_deacy.*weight_decay"):
        opt.weight_deacy = 0.5
    assert not hasattr(opt, "weight_deacy")
    opt.weight_decay = 0.5  # the real field is settable and takes effect
    assert opt.weight_decay == 0.5
    opt.donate_params = False


def test_a_subclass_may_declare_its_own_attributes():
    class Scaled(rlx_optax.AdamW):
        scale = 1.0

        def lr_scale(self, name):
            return self.scale

    opt = Scaled(0.01)
    opt.scale = 0.5
    assert opt.lr_scale("w") == 0.5
    with pytest.raises(AttributeError):
        opt.scael = 0.5


def test_jax_grad_of_another_shape_is_refused_too():
    opt = rlx_optax.Muon(0.02)
    p = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="'w'.*grad has shape"):
        opt.step("w", (4, 3), p, jnp.ones((3, 4)))
    assert opt.state_dict()["tensors"] == {}


# --------------------------------------------------------------------------- every class


@pytest.mark.parametrize("row", registry.ALGORITHMS, ids=[r.stateful for r in registry.ALGORITHMS])
def test_every_class_refuses_bad_calls_and_changes_nothing(row):
    """The holes above, for every registered class: after a good step, a transposed grad, a
    float64 param (x64 off), a bad rate, a misspelled field and a state without `step` all
    raise, and the parameter and the whole state are as they were."""
    cls = stateful.get(row.name)
    opt = cls(row.contract_lr)
    p = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    opt.step("w", (4, 3), p, np.full((4, 3), 0.1, np.float32))
    opt.end_iteration()
    before, p0 = opt.state_dict(), p.copy()
    with pytest.raises(ValueError, match="'w'"):
        opt.step("w", (4, 3), p, np.full((3, 4), 0.1, np.float32))
    with pytest.raises(ValueError, match="'v'.*float64"):
        opt.step("v", (2,), np.ones(2), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="lr"):
        opt.set_lr(-1.0)
    with pytest.raises(AttributeError):
        opt.not_a_field = 1.0
    broken = opt.state_dict()
    del broken["step"]
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(broken)
    np.testing.assert_array_equal(p, p0)
    _assert_same_state(opt.state_dict(), before)
    assert opt.lr == row.contract_lr
