"""Reference Muon (bf16 Newton-Schulz) inside one jitted train step (gradient + update).

XLA:CPU's generic dot kernel has no bf16 x bf16 -> f32 product; a jitted step that computes
the gradient of a tall matrix folds the transpose of the iteration into a dot that lands on
that kernel (``Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32``). On the CPU
backend `newton_schulz` therefore multiplies the bf16 operands widened to float32, and every
rounding to bf16 is explicit, so eager calls, an update-only jit and a full jitted step give
the same numbers. The oracle is a float64 NumPy transcription of the bf16-rounded iteration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import rlx_optax
from rlx_optax import newton_schulz
from rlx_optax._src.linalg.newton_schulz import _dot

COEFFS = (3.4445, -4.7750, 2.0315)
SHAPES = [(32, 16), (16, 32), (24, 24), (64, 8)]  # tall, wide, square, very tall
# One bf16 ulp of a number in [0.5, 1): the iterate's entries are below 1 in magnitude.
BF16_ULP = 2.0**-8


def _bf16(x):
    """Round to bfloat16 (round to nearest even), returned as float64."""
    return np.asarray(np.asarray(x, np.float64).astype(ml_dtypes.bfloat16), np.float64)


def ns_bf16_64(x, steps=5, coeffs=COEFFS, eps=1e-7):
    """The bf16 Newton-Schulz of torch.optim.Muon, float64 products, explicit bf16 roundings:
    X0 = bf16(bf16(x) / bf16(|x|_F)); A = bf16(X X^T); B = bf16(bA + cA^2); X = bf16(aX + BX)."""
    x = np.asarray(x, np.float64)
    t = x.shape[0] > x.shape[1]
    X = _bf16(x.T if t else x)
    X = _bf16(X / _bf16(max(np.sqrt(np.sum(X * X)), eps)))
    a, b, c = coeffs
    for _ in range(steps):
        A = _bf16(X @ X.T)
        B = _bf16(b * A + c * (A @ A))
        X = _bf16(a * X + B @ X)
    return X.T if t else X


def _close_to_oracle(got, want):
    """The products are exact in float32 and summed in float32 (the oracle: float64), which
    can move a bf16 rounding only when a sum lies within about K * 2^-24 (relative) of a
    rounding midpoint; such a flip changes an entry by one bf16 ulp, and the entries below it
    by about as much. So: at most one ulp anywhere, and almost every entry identical."""
    got = np.asarray(got, np.float64)
    assert np.max(np.abs(got - want)) <= BF16_ULP
    assert np.mean(got == want) >= 0.95


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_newton_schulz_eager_and_jit_match_the_rounded_transcription(shape):
    x = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    want = ns_bf16_64(x)

    def f(v):
        return newton_schulz(v, 5, eps=1e-7, ns_dtype=jnp.bfloat16)

    _close_to_oracle(f(jnp.asarray(x)), want)
    _close_to_oracle(jax.jit(f)(x), want)
    # discriminating: the float32 iteration (no bf16 rounding) is not close in this sense
    f32 = np.asarray(newton_schulz(jnp.asarray(x), 5, eps=1e-7), np.float64)
    assert np.mean(f32 == want) < 0.5


def test_cpu_fallback_products_are_exact_in_float32():
    # the fallback's premise: a product of two bf16 numbers has at most 16 significant bits,
    # so it is exact in float32; a dot of bf16 operands then differs from the float64 dot only
    # by the float32 summation, |err| <= K * 2^-24 * sum |a_i b_i|
    rng = np.random.default_rng(3)
    a = _bf16(rng.normal(size=(7, 40)))
    b = _bf16(rng.normal(size=(40, 5)))

    def dot(u, v):
        return _dot(u, v, ((1,), (0,)), jax.lax.Precision.DEFAULT, jnp.float32, None)

    got = jax.jit(dot)(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
    assert got.dtype == jnp.float32
    bound = 40 * 2.0**-24 * (np.abs(a) @ np.abs(b))
    assert np.all(np.abs(np.asarray(got, np.float64) - a @ b) <= bound)


def _loss(params, xs):
    # one layer per kernel, each fed 64 samples of its own: the gradients have full rank (a
    # rank-deficient matrix would make Newton-Schulz amplify rounding noise in its null space)
    return sum(jnp.sum(jnp.tanh(xs[k] @ params[k]) ** 2) for k in params)


def _chain(shapes, seed=0):
    """A chain of layers whose kernels have the given shapes (in, out)."""
    rng = np.random.default_rng(seed)
    return {
        f"l{i}": jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
        for i, s in enumerate(shapes)
    }


@pytest.mark.parametrize(
    "shapes", [[(32, 16)], [(16, 32)], [(24, 24)], [(32, 16), (16, 32), (32, 32)]]
)
def test_full_jitted_step_with_reference_muon(shapes):
    """grad + update + apply in one jit: runs (the reported crash was the (32, 16) kernel),
    equals the eager step, and its first step is -lr * keller * NS_bf16(d) of the oracle."""
    params = _chain(shapes)
    rng = np.random.default_rng(9)
    x = {k: jnp.asarray(rng.normal(size=(64, p.shape[0])), jnp.float32) for k, p in params.items()}
    tx = rlx_optax.muon(0.02, behaviour="reference")

    @jax.jit
    def step(p, s):
        g = jax.grad(_loss)(p, x)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), u, g

    def eager_step(p, s):
        g = jax.grad(_loss)(p, x)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), u, s

    state = tx.init(params)
    got, updates, grads = step(params, state)
    eager, _, _ = eager_step(params, state)
    mu = np.float32(0.95)
    for k, p in params.items():
        rows, cols = p.shape
        scale = 0.02 * np.sqrt(max(1.0, cols / rows))  # keller, (in, out) layout
        np.testing.assert_allclose(got[k], eager[k], rtol=0, atol=scale * BF16_ULP)
        # EMA Nesterov on a zero buffer: d = (1 - mu) g + mu (1 - mu) g, in float32
        g = np.asarray(grads[k], np.float32)
        d = (np.float32(1) - mu) * g + mu * ((np.float32(1) - mu) * g)
        want_o = ns_bf16_64(d)
        got_o = -np.asarray(updates[k], np.float64) / scale
        assert np.max(np.abs(got_o - want_o)) <= 2 * BF16_ULP
        assert np.mean(np.abs(got_o - want_o) <= 1e-6) >= 0.9


def test_nnx_optimizer_and_nnx_jit_with_reference_muon():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(32, 16, use_bias=False, rngs=rngs)  # tall (32, 16) kernel
            self.b = nnx.Linear(16, 32, use_bias=False, rngs=rngs)  # wide

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    model = MLP(nnx.Rngs(0))
    before = {k: np.asarray(m.kernel[...]) for k, m in (("a", model.a), ("b", model.b))}
    opt = nnx.Optimizer(model, rlx_optax.muon(0.02, behaviour="reference"), wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 32)), jnp.float32)

    def loss_fn(m):
        return jnp.mean(m(x) ** 2)

    grads = nnx.grad(loss_fn)(model)

    @nnx.jit
    def train_step(model, opt):
        loss, g = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, g)
        return loss

    loss = train_step(model, opt)
    assert np.isfinite(float(loss))
    mu = np.float32(0.95)
    for k, layer in (("a", grads.a), ("b", grads.b)):
        g = np.asarray(layer.kernel[...], np.float32)
        rows, cols = g.shape
        scale = 0.02 * np.sqrt(max(1.0, cols / rows))
        d = (np.float32(1) - mu) * g + mu * ((np.float32(1) - mu) * g)
        after = np.asarray(getattr(model, k).kernel[...], np.float64)
        got_o = (before[k] - after) / scale
        assert np.max(np.abs(got_o - ns_bf16_64(d))) <= 2 * BF16_ULP
