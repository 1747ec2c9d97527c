"""Muon's per-leaf matrix views (`matrix_axes`, `MuonLabels`) on a Flax NNX model.

Oracles: Newton-Schulz written out in float64 NumPy and the SVD polar factor on the matrix the
layer multiplies by (q/k/v kernels ``(in, heads, head_dim)`` read as ``(in, heads*head_dim)``,
the out kernel ``(heads, head_dim, out)`` as ``(heads*head_dim, out)``), and optax.adamw for
the leaves sent to AdamW.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from rlx_optax import MatrixAxes, MuonLabels
from tests.problems import ns64

nnx = pytest.importorskip("flax.nnx")

LR = 0.02
CUBIC = (1.5, -0.5, 0.0)


def polar64(x):
    u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    return u @ vt


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(40, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=16, qkv_features=32, decode=False, rngs=rngs
        )
        # RMSNorm before attention: a LayerNorm output has zero-mean rows, so the q/k/v
        # gradients would have rank in_features - 1 and no unique polar factor
        self.rms = nnx.RMSNorm(16, rngs=rngs)
        self.norm = nnx.LayerNorm(24, rngs=rngs)  # on the wide side: no rank lost
        self.mlp = nnx.Linear(16, 24, rngs=rngs)
        self.lm_head = nnx.Linear(24, 40, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.attn(self.rms(h))
        return self.lm_head(self.norm(jnp.tanh(self.mlp(h))))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 40, size=(8, 12)))


def _loss(model):
    return jnp.mean(model(TOKENS) ** 2)


def _model_and_grads():
    model = Tiny(nnx.Rngs(0))
    grads = nnx.grad(_loss)(model)
    return model, nnx.state(model, nnx.Param), grads


def _flat(tree):
    """{'attn/query/kernel': array} of a dict or an nnx.State (without the Variable field)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: x is None or isinstance(x, MatrixAxes)
    ):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if keys[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
            keys = keys[:-1]
        out["/".join(str(k) for k in keys)] = leaf
    return out


ADAM_LEAVES = [
    "embed/embedding",
    "lm_head/kernel",
    "lm_head/bias",
    "mlp/bias",
    "norm/scale",
    "norm/bias",
    "rms/scale",
    "attn/query/bias",
    "attn/key/bias",
    "attn/value/bias",
    "attn/out/bias",
]
MUON_LEAVES = ["attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "attn/out/kernel"]


def test_labels_of_an_nnx_model_and_of_its_pure_dict_agree():
    _, params, _ = _model_and_grads()
    labels = MuonLabels()
    from_state = _flat(labels.axes(params))
    from_dict = _flat(labels.axes(nnx.to_pure_dict(params)))
    assert from_state == from_dict
    assert set(from_state) == set(ADAM_LEAVES + MUON_LEAVES + ["mlp/kernel"])
    for k in ADAM_LEAVES:
        assert from_state[k] is None, k
    for k in ("query", "key", "value"):
        assert from_state[f"attn/{k}/kernel"] == MatrixAxes((0,), (1, 2))
    assert from_state["attn/out/kernel"] == MatrixAxes((0, 1), (2,))
    assert from_state["mlp/kernel"] == MatrixAxes((0,), (1,))
    mask = _flat(labels.adam_mask(params))
    assert mask == {k: v is None for k, v in from_state.items()}


def _first_update(tx, params, grads):
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    return _flat(updates)


@pytest.mark.parametrize("kernel", ["query", "key", "value", "out"])
def test_attention_kernels_are_orthogonalised_as_the_layer_matrix(kernel):
    """Cubic Newton-Schulz run to convergence is the SVD polar factor of the (in, heads*dim)
    (or (heads*dim, out)) matrix: the update is -lr * keller scale * polar, reshaped."""
    _, params, grads = _model_and_grads()
    tx = rlx_optax.muon(
        LR, matrix_axes=MuonLabels(), shape_scale="keller", ns_coeffs=CUBIC, ns_steps=60
    )
    got = _flat(_first_update(tx, params, grads))
    g = _flat(grads)[f"attn/{kernel}/kernel"]
    shape = g.shape
    m = g.reshape(shape[0], -1) if kernel != "out" else g.reshape(-1, shape[-1])
    scale = np.sqrt(max(1.0, m.shape[1] / m.shape[0]))
    want = (-LR * scale * polar64(1.95 * np.asarray(m, np.float64))).reshape(shape)
    np.testing.assert_allclose(got[f"attn/{kernel}/kernel"], want, rtol=0, atol=1e-6)
    # and not the old fallback: the leaf's own momentum (SGD) is a different direction
    assert np.max(np.abs(np.asarray(got[f"attn/{kernel}/kernel"]) + LR * 1.95 * g)) > 1e-3


def test_quintic_update_of_every_matrix_matches_float64_newton_schulz():
    _, params, grads = _model_and_grads()
    tx = rlx_optax.muon(LR, matrix_axes=MuonLabels())  # crate scale sqrt(max(R, C))
    got = _flat(_first_update(tx, params, grads))
    flat_g = _flat(grads)
    views = {
        "attn/query/kernel": (16, 32),
        "attn/key/kernel": (16, 32),
        "attn/value/kernel": (16, 32),
        "attn/out/kernel": (32, 16),
        "mlp/kernel": (16, 24),
    }
    for k, (r, c) in views.items():
        g = np.asarray(flat_g[k], np.float64)
        want = -LR * np.sqrt(max(r, c)) * ns64(1.95 * g.reshape(r, c))
        err = np.max(np.abs(np.asarray(got[k], np.float64) - want.reshape(g.shape)))
        assert err < 1e-4 * np.max(np.abs(want)), (k, err)


def test_adam_leaves_get_optax_adamw_updates():
    """Embeddings, the head, biases and norm scales: optax.adamw with Muon's documented aux
    hyperparameters (b1 0.9, b2 0.95, eps 1e-10, adam_weight_decay, adam_learning_rate)."""
    _, params, _ = _model_and_grads()
    model = Tiny(nnx.Rngs(0))
    kw = {"adam_learning_rate": 3e-3, "adam_weight_decay": 0.01}
    tx = rlx_optax.muon(LR, weight_decay=0.1, matrix_axes=MuonLabels(), **kw)
    ref = optax.adamw(3e-3, b1=0.9, b2=0.95, eps=1e-10, weight_decay=0.01)
    p = params
    ref_p = {k: v for k, v in _flat(params).items() if k in ADAM_LEAVES}
    state, ref_state = tx.init(p), ref.init(ref_p)
    for _ in range(3):
        nnx.update(model, p)
        g = nnx.grad(_loss)(model)
        g = nnx.state(g, nnx.Param) if not isinstance(g, nnx.State) else g
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
        ref_g = {k: v for k, v in _flat(g).items() if k in ADAM_LEAVES}
        ru, ref_state = ref.update(ref_g, ref_state, ref_p)
        flat_u = _flat(u)
        for k in ADAM_LEAVES:
            np.testing.assert_allclose(flat_u[k], ru[k], rtol=1e-6, atol=1e-9, err_msg=k)
        ref_p = optax.apply_updates(ref_p, ru)


def test_nnx_optimizer_and_jit_step_apply_the_same_updates():
    model, params, grads = _model_and_grads()
    before = _flat(params)
    tx = rlx_optax.muon(LR, behaviour="reference", matrix_axes=MuonLabels())
    want = _first_update(tx, params, grads)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(_loss)(model)
        opt.update(model, g)
        return loss

    step(model, opt)
    after = _flat(nnx.state(model, nnx.Param))
    for k in want:
        if k == "attn/key/bias":  # its gradient is zero up to rounding (softmax shift
            continue  # invariance): AdamW's first step is sign(noise) * lr
        # one float32 rounding of param + update, and gradients that may differ in the last
        # bits between the jitted step and the eager grad (bf16 Newton-Schulz: one ulp)
        delta = np.asarray(after[k], np.float64) - np.asarray(before[k], np.float64)
        np.testing.assert_allclose(delta, want[k], rtol=0, atol=1e-5 * LR + 2e-3 * LR, err_msg=k)


def test_stacked_layers_are_one_matrix_each():
    rng = np.random.default_rng(4)
    params = {"blocks": {"mlp": {"kernel": jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)}}}
    grads = {"blocks": {"mlp": {"kernel": jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)}}}
    labels = MuonLabels(stacked_axes=1)
    assert labels.axes(params)["blocks"]["mlp"]["kernel"] == MatrixAxes((1,), (2,))
    tx = rlx_optax.muon(LR, matrix_axes=labels)
    u, _ = tx.update(grads, tx.init(params), params)
    g = np.asarray(grads["blocks"]["mlp"]["kernel"], np.float64)
    for i in range(3):
        want = -LR * np.sqrt(6) * ns64(1.95 * g[i])
        np.testing.assert_allclose(u["blocks"]["mlp"]["kernel"][i], want, rtol=1e-4, atol=1e-6)


def test_explicit_pytree_of_matrix_axes_and_out_in_layout():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(4, 2, 3)), jnp.float32)  # read as (in=2*3? no: axes)
    params = {"w": w, "b": jnp.zeros(3)}
    grads = {"w": jnp.asarray(rng.normal(size=(4, 2, 3)), jnp.float32), "b": jnp.ones(3)}
    spec = {"w": MatrixAxes(reduction=(1, 2), output=(0,)), "b": None}  # a (6, 4) matrix
    tx = rlx_optax.muon(LR, matrix_axes=spec, shape_scale="keller")
    u, _ = tx.update(grads, tx.init(params), params)
    g = np.asarray(grads["w"], np.float64)
    m = np.transpose(g, (1, 2, 0)).reshape(6, 4)
    want = -LR * 1.0 * ns64(1.95 * m)  # keller: fan_in 6 > fan_out 4 -> scale 1
    np.testing.assert_allclose(
        np.transpose(np.asarray(u["w"]), (1, 2, 0)).reshape(6, 4), want, rtol=1e-4, atol=1e-6
    )
    adam = optax.adamw(LR, b1=0.9, b2=0.95, eps=1e-10, weight_decay=0.0)
    ub, _ = adam.update({"b": grads["b"]}, adam.init({"b": params["b"]}), {"b": params["b"]})
    np.testing.assert_allclose(u["b"], ub["b"], rtol=1e-6)


def test_inject_hyperparams_needs_no_static_args():
    _, params, _ = _model_and_grads()
    params = nnx.to_pure_dict(params)
    model = Tiny(nnx.Rngs(0))
    seq = []
    p = params
    for i in range(3):
        nnx.update(model, jax.tree.map(lambda x, f=1 + 0.1 * i: x * f, p))
        seq.append(nnx.to_pure_dict(nnx.state(nnx.grad(_loss)(model), nnx.Param)))

    def run(tx):
        s, q = tx.init(params), params
        for g in seq:
            u, s = jax.jit(tx.update)(g, s, q)
            q = optax.apply_updates(q, u)
        return _flat(q)

    kw = {"matrix_axes": MuonLabels(), "adam_leaves": MuonLabels(), "ns_steps": 5}
    direct = run(rlx_optax.muon(LR, **kw))
    injected = run(optax.inject_hyperparams(rlx_optax.muon)(LR, **kw))
    for k in direct:
        np.testing.assert_allclose(injected[k], direct[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_meta_gradient_through_injected_muon_without_static_args():
    """Reverse mode through `update` with a traced ns_steps: equal to a central difference."""
    tx = optax.inject_hyperparams(rlx_optax.muon)(learning_rate=0.02, ns_steps=5)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
    state = tx.init({"w": w})
    assert state.hyperparams["ns_steps"].shape == ()  # traced, not static

    def loss(scale):
        updates, _ = tx.update({"w": w * scale + jnp.eye(5, 3)}, state, {"w": w})
        return jnp.sum(updates["w"] * w)

    grad = jax.grad(loss)(1.0)
    fd = (loss(1.0 + 1e-2) - loss(1.0 - 1e-2)) / 2e-2
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=1e-6)
    static = optax.inject_hyperparams(rlx_optax.muon, static_args=("ns_steps",))(0.02, ns_steps=5)
    s2 = static.init({"w": w})
    u_static, _ = static.update({"w": w}, s2, {"w": w})
    u_traced, _ = tx.update({"w": w}, state, {"w": w})
    np.testing.assert_allclose(u_traced["w"], u_static["w"], rtol=1e-6, atol=1e-7)


def test_a_callable_under_inject_hyperparams_fails_naming_static_args():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    tx = optax.inject_hyperparams(rlx_optax.muon)(
        0.02, adam_leaves=lambda p: jax.tree.map(lambda x: x.ndim < 2, p)
    )
    with pytest.raises(ValueError, match=r"adam_leaves.*static_args=\('adam_leaves',\)"):
        tx.init(params)


@pytest.mark.parametrize(
    "bad,match",
    [
        (True, r"adam_leaves must be a pytree of booleans"),
        (["embed"], r"adam_leaves must be a pytree of booleans with the structure"),
        ({"w": True}, r"adam_leaves must be a pytree of booleans with the structure"),
        ({"w": True, "b": "yes"}, r"adam_leaves at \['b'\] must be a boolean"),
    ],
)
def test_wrong_adam_leaves_is_a_value_error_naming_it(bad, match):
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=match):
        rlx_optax.muon(0.02, adam_leaves=bad).init(params)


def test_wrong_matrix_axes_names_the_leaf():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"matrix_axes at \['w'\].*out of range"):
        tx = rlx_optax.muon(0.02, matrix_axes={"w": MatrixAxes((0,), (2,)), "b": None})
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match=r"matrix_axes at \['w'\] must be a rlx_optax.MatrixAxes"):
        rlx_optax.muon(0.02, matrix_axes={"w": (0, 1), "b": None}).init(params)
    with pytest.raises(ValueError, match="MuonLabels: layout"):
        MuonLabels(layout="rows")


def test_no_spec_keeps_the_rank_rule():
    # default behaviour: a rank-3 q kernel takes the fallback (SGD momentum), as before
    params = {"attn": {"query": {"kernel": jnp.ones((4, 2, 3))}}, "w": jnp.ones((4, 3))}
    g = jax.tree.map(lambda x: 0.5 * x, params)
    tx = rlx_optax.muon(LR)
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u["attn"]["query"]["kernel"], -LR * 1.95 * 0.5, rtol=1e-6)


def test_a_callable_spec_equals_the_labels_object():
    _, params, grads = _model_and_grads()
    by_object = _first_update(rlx_optax.muon(LR, matrix_axes=MuonLabels()), params, grads)
    by_callable = _first_update(
        rlx_optax.muon(LR, matrix_axes=lambda tree: MuonLabels().axes(tree)), params, grads
    )
    for k in by_object:
        np.testing.assert_array_equal(by_callable[k], by_object[k], err_msg=k)


@pytest.mark.parametrize("steps", [0, 7, 32])
def test_traced_step_count_equals_the_static_one(steps):
    x = jnp.asarray(np.random.default_rng(6).normal(size=(5, 8)), jnp.float32)
    # the cubic iteration contracts, so float32 rounding does not build up over 32 steps
    static = rlx_optax.newton_schulz(x, steps, CUBIC)
    traced = jax.jit(rlx_optax.newton_schulz, static_argnums=2)(x, jnp.asarray(steps), CUBIC)
    np.testing.assert_allclose(traced, static, rtol=0, atol=1e-6)
    if steps == 32:
        np.testing.assert_allclose(traced, polar64(x), rtol=0, atol=1e-5)


def test_traced_step_count_above_the_bound_is_nan():
    from rlx_optax._src.linalg.newton_schulz import MAX_TRACED_STEPS

    x = jnp.eye(3, 4)
    out = jax.jit(rlx_optax.newton_schulz)(x, jnp.asarray(MAX_TRACED_STEPS + 1))
    assert np.all(np.isnan(np.asarray(out)))
