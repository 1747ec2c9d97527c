"""Muon against a float64 NumPy transcription of the crate's rule and of the reference options,
and against optax.contrib.muon configured to the same rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from tests import problems
from tests.problems import ns64

STEPS = 4


def _tree(seed=0):
    return problems.mixed_params(seed)


def _grads(params, n, seed=1):
    return problems.random_grads(params, n, seed)


def muon64(params, grads_seq, lr, mu=0.95, nesterov=True, wd=0.0, *, scale="crate",
           layout="in_out", form="sum", flatten=False):  # fmt: skip
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    for g in grads_seq:
        for k in p:
            gk = np.asarray(g[k], np.float64)
            if form == "sum":
                m[k] = mu * m[k] + gk
                d = gk + mu * m[k] if nesterov else m[k]
            else:
                m[k] = mu * m[k] + (1 - mu) * gk
                d = (1 - mu) * gk + mu * m[k] if nesterov else m[k]
            shape = gk.shape
            if len(shape) == 2 or (flatten and len(shape) >= 3):
                if len(shape) == 2:
                    r, c = shape
                elif layout == "in_out":
                    r, c = int(np.prod(shape[:-1])), shape[-1]
                else:
                    r, c = shape[0], int(np.prod(shape[1:]))
                o = ns64(d.reshape(r, c))
                if scale == "crate":
                    s = np.sqrt(max(r, c))
                elif scale == "moonlight":
                    s = 0.2 * np.sqrt(max(r, c))
                else:
                    fan_in, fan_out = (r, c) if layout == "in_out" else (c, r)
                    s = np.sqrt(max(1.0, fan_out / fan_in))
                d = (s * o).reshape(shape)
            p[k] = p[k] - lr * (d + wd * p[k])
    return p


def run(tx, params, grads_seq):
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads_seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params


def rel_err(got, want, init):
    out = {}
    for k in want:
        den = np.max(np.abs(want[k] - np.asarray(init[k], np.float64)))
        out[k] = float(np.max(np.abs(np.asarray(got[k], np.float64) - want[k])) / den)
    return out


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"nesterov": False, "weight_decay": 0.1},
        {"shape_scale": "keller"},
        {"shape_scale": "keller", "layout": "out_in"},
        {"shape_scale": "moonlight", "momentum_form": "ema"},
        {"momentum_form": "ema", "nesterov": False},
        {"flatten_conv": True, "shape_scale": "keller"},
        {"flatten_conv": True, "layout": "out_in"},
    ],
)
def test_matches_float64_transcription(kwargs):
    params = _tree()
    seq = _grads(params, STEPS)
    got = run(rlx_optax.muon(0.02, **kwargs), params, seq)
    want = muon64(
        params,
        seq,
        0.02,
        nesterov=kwargs.get("nesterov", True),
        wd=kwargs.get("weight_decay", 0.0),
        scale=kwargs.get("shape_scale", "crate"),
        layout=kwargs.get("layout", "in_out"),
        form=kwargs.get("momentum_form", "sum"),
        flatten=kwargs.get("flatten_conv", False),
    )
    err = rel_err(got, want, params)
    assert max(err.values()) < 1e-4, err


def test_first_step_is_scale_free_and_has_crate_scale():
    # derived in the spec: the first step is -lr * sqrt(max(R, C)) * NS(g), whatever |g|
    params = {"w": np.zeros((6, 4), np.float32)}
    g = {"w": np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)}
    small = run(rlx_optax.muon(0.1), params, [{"w": 1e-3 * g["w"]}])
    big = run(rlx_optax.muon(0.1), params, [g])
    np.testing.assert_allclose(small["w"], big["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(big["w"], -0.1 * np.sqrt(6) * ns64(g["w"]), atol=1e-5)


def test_matrix_path_differs_from_vector_path():
    # the crate's muon_synth_kan check: [8, 4] is orthogonalised, [32] is not
    g = np.sin(0.13 * np.arange(32, dtype=np.float32))
    mat = run(rlx_optax.muon(0.1), {"p": np.zeros((8, 4), np.float32)}, [{"p": g.reshape(8, 4)}])
    vec = run(rlx_optax.muon(0.1), {"p": np.zeros(32, np.float32)}, [{"p": g}])
    assert np.abs(np.ravel(mat["p"]) - np.asarray(vec["p"])).sum() > 1e-2
    assert np.all(np.isfinite(mat["p"]))


# --------------------------------------------------------------------------- optax parity


def _optax_parity(ours, theirs, params, seq):
    got = run(ours, params, seq)
    want = run(theirs, params, seq)
    want = {k: np.asarray(v, np.float64) for k, v in want.items()}
    return rel_err(got, want, params)


@pytest.mark.parametrize("form", ["sum", "ema"])
def test_parity_with_optax_contrib_muon(form):
    # optax: EMA momentum with bias correction, then NS; without Nesterov the debiased EMA is a
    # positive multiple of both our forms, which Newton-Schulz removes. Scale: (in, out) layout.
    params = {"w": _tree()["w"], "u": _tree()["u"], "b": _tree()["b"]}
    seq = _grads(params, 6)
    ours = rlx_optax.muon(
        0.02,
        nesterov=False,
        weight_decay=0.05,
        shape_scale="keller",
        momentum_form=form,
        fallback="adamw",
        adam_b1=0.9,
        adam_b2=0.999,
        adam_eps=1e-8,
    )
    theirs = optax.contrib.muon(0.02, nesterov=False, weight_decay=0.05)
    err = _optax_parity(ours, theirs, params, seq)
    assert max(err.values()) < 1e-4, err


def test_parity_with_optax_moonlight_scale():
    params = {"w": _tree()["w"], "u": _tree()["u"]}
    seq = _grads(params, 6)
    ours = rlx_optax.muon(0.02, nesterov=False, shape_scale="moonlight")
    theirs = optax.contrib.muon(0.02, nesterov=False, consistent_rms=0.2)
    err = _optax_parity(ours, theirs, params, seq)
    assert max(err.values()) < 1e-4, err


def test_crate_defaults_differ_from_optax():
    # guard for the parity tests: with defaults the two are different algorithms
    params = {"w": _tree()["w"]}
    seq = _grads(params, 3)
    err = _optax_parity(rlx_optax.muon(0.02), optax.contrib.muon(0.02), params, seq)
    assert max(err.values()) > 0.5


# --------------------------------------------------------------------------- routing


def test_adam_leaves_and_fallback_go_to_adamw():
    params = {"emb": _tree()["w"], "w": _tree()["u"], "b": _tree()["b"]}
    seq = _grads(params, 3)
    tx = rlx_optax.muon(
        0.02, fallback="adamw", adam_leaves={"emb": True, "w": False, "b": False},
        adam_learning_rate=1e-3,
    )  # fmt: skip
    got = run(tx, params, seq)
    adam_part = run(
        rlx_optax.adamw(1e-3, 0.9, 0.95, 1e-10, 0.0),
        {k: params[k] for k in ("emb", "b")},
        [{k: g[k] for k in ("emb", "b")} for g in seq],
    )
    muon_part = run(rlx_optax.muon(0.02), {"w": params["w"]}, [{"w": g["w"]} for g in seq])
    for k in ("emb", "b"):
        np.testing.assert_allclose(got[k], adam_part[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["w"], muon_part["w"], rtol=1e-6, atol=1e-7)
    # a callable label works too, and the default fallback keeps 1-D leaves on SGD momentum
    tx2 = rlx_optax.muon(0.02, adam_leaves=lambda p: {k: k == "emb" for k in p})
    got2 = run(tx2, params, seq)
    sgd_b = muon64({"b": params["b"]}, [{"b": g["b"]} for g in seq], 0.02)["b"]
    np.testing.assert_allclose(got2["b"], sgd_b, rtol=1e-5)
    adam_emb = run(rlx_optax.adamw(0.02, 0.9, 0.95, 1e-10, 0.0), {"emb": params["emb"]},
                   [{"emb": g["emb"]} for g in seq])  # fmt: skip
    np.testing.assert_allclose(got2["emb"], adam_emb["emb"], rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_with_traced_ns_steps():
    params = {"w": _tree()["w"], "b": _tree()["b"]}
    seq = _grads(params, 3)
    direct = run(rlx_optax.muon(0.02, ns_steps=3), params, seq)
    injected = run(optax.inject_hyperparams(rlx_optax.muon)(0.02, ns_steps=3), params, seq)
    for k in params:
        np.testing.assert_allclose(injected[k], direct[k], rtol=1e-5, atol=1e-6)


def test_bfloat16_newton_schulz_is_close():
    params = {"w": _tree()["w"]}
    seq = _grads(params, 3)
    got = run(rlx_optax.muon(0.02, ns_dtype=jnp.bfloat16), params, seq)
    want = muon64(params, seq, 0.02)
    assert max(rel_err(got, want, params).values()) < 5e-2


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"shape_scale": "max"}, "shape_scale"),
        ({"layout": "rows"}, "layout"),
        ({"momentum_form": "lerp"}, "momentum_form"),
        ({"fallback": "adam"}, "fallback"),
        ({"ns_steps": -1}, "ns_steps"),
        ({"adam_b2": 1.0}, "adam_b2"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rlx_optax.muon(0.02, **kwargs)


def test_meta_gradient_through_injected_muon_with_static_ns_steps():
    """Reverse mode through `update` under inject_hyperparams (the docstring's recipe): finite,
    and equal to a central finite difference."""
    tx = optax.inject_hyperparams(rlx_optax.muon, static_args=("ns_steps",))(
        learning_rate=0.02, ns_steps=5
    )
    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    state = tx.init({"w": w})

    def loss(scale):
        updates, _ = tx.update({"w": w * scale + jnp.eye(5, 3)}, state, {"w": w})
        return jnp.sum(updates["w"] * w)

    grad = jax.grad(loss)(1.0)
    fd = (loss(1.0 + 1e-2) - loss(1.0 - 1e-2)) / 2e-2
    assert np.isfinite(grad)
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=1e-6)
