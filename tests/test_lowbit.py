"""Low-precision optimizer state: 8-bit block-wise moments and stochastic rounding.

Oracles: a brute-force nearest-code search in float64 NumPy (the quantizer), float64
transcriptions of the moving averages (bfloat16 moments with and without stochastic
rounding), the sampling distribution of a mean (unbiasedness), and uninterrupted runs
(checkpoint resumes).
"""

from __future__ import annotations

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import rlx_optax
from rlx_optax._src.transforms import _lowbit

ADAM_FAMILY = ("adam", "adamw", "nadamw", "radam", "qhadamw")
Q8_FACTORIES = {
    **{name: {"mu_dtype": "q8", "nu_dtype": "q8"} for name in ADAM_FAMILY},
    "lamb": {"mu_dtype": "q8", "nu_dtype": "q8"},
    "lion": {"mu_dtype": "q8"},
    "sgd": {"momentum": 0.9, "accumulator_dtype": "q8"},
    "sophia": {"mu_dtype": "q8"},
    "adafactor": {"momentum": 0.9, "mu_dtype": "q8"},
}


def update_extra(name: str, grads: dict) -> dict:
    """Sophia's Hessian estimate (|g|, a positive stand-in); nothing for the others."""
    return {"hessian_diag": jax.tree.map(jnp.abs, grads)} if name == "sophia" else {}


def params_tree(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 300)), jnp.float32),  # quantized, ragged blocks
        "e": jnp.asarray(rng.normal(size=(4096,)), jnp.float32),  # quantized, 1-d
        "s": jnp.asarray(rng.normal(size=(63, 64)), jnp.float32),  # 4032 < 4096: float32
        "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
        "c": jnp.asarray(rng.normal(size=(4096, 4)), jnp.float32),  # rows too short: float32
    }


def grads_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    # magnitudes spread over decades, so blocks hold small and large entries
    return {
        k: jnp.asarray(rng.normal(size=v.shape) * 10.0 ** rng.uniform(-4, 0, v.shape), v.dtype)
        for k, v in params_tree().items()
    }


# --------------------------------------------------------------------------- the quantizer


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("last", "size", "blocks"), [(700, 175, 4), (771, 256, 4)])
def test_every_code_is_the_nearest_code_of_its_block_scaled_value(signed, last, size, blocks):
    """700 = 175 * 4: four blocks of 175; 771 = 3 * 257 has no factor leaving a block of 32
    to 256 elements: blocks of 256, the last one of 3 (zero-padded)."""
    assert _lowbit.block_size(last) == size
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, last)) * 10.0 ** rng.uniform(-9, 1, (5, last))
    x = x if signed else x**2
    x[2, size : 2 * size] = 0.0  # an all-zero block
    x = x.astype(np.float32)
    q = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed)
    codes, scale = np.asarray(q.codes), np.asarray(q.scale, np.float64)
    assert codes.dtype == (np.int8 if signed else np.uint8) and codes.shape == x.shape
    assert scale.shape == (5, blocks)  # blocks along the last axis
    table = (_lowbit.signed_code() if signed else _lowbit.unsigned_code()).astype(np.float64)
    index = codes.astype(np.int64) + (127 if signed else 0)
    for row in range(5):
        for blk in range(blocks):
            cols = slice(blk * size, min((blk + 1) * size, last))
            part = x[row, cols].astype(np.float64)
            assert scale[row, blk] == np.max(np.abs(part))  # the scale: the block's absmax
            if scale[row, blk] == 0:
                continue
            y = part / scale[row, blk]
            chosen = table[index[row, cols]]
            best = np.min(np.abs(y[:, None] - table[None, :]), axis=1)
            # nearest up to the float32 rounding of y (1 ulp at 1.0)
            np.testing.assert_array_less(np.abs(y - chosen) - best, 1.2e-7)
    back = np.asarray(rlx_optax.dequantize_blockwise(q))
    np.testing.assert_array_equal(back[2, size : 2 * size], 0.0)
    want = table[index] * np.repeat(scale, size, axis=1)[:, :last]
    np.testing.assert_allclose(back, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_at_the_hard_places(signed):
    """Every code value, every midpoint between neighbours, the values one float32 ulp either
    side of them and the powers of ten, in blocks whose maximum is 1 (so the scaled value is
    the value itself): the chosen code is a nearest one (brute force over the table)."""
    table = (_lowbit.signed_code() if signed else _lowbit.unsigned_code()).astype(np.float32)
    mags = np.abs(table)
    mids = (mags[1:] + mags[:-1]) / 2
    points = np.concatenate([mags, mids, 10.0 ** -np.arange(0, 10), [0.0]]).astype(np.float32)
    points = np.concatenate(
        [points, np.nextafter(points, np.float32(2)), np.nextafter(points, np.float32(-1))]
    )
    points = np.clip(points, 0, 1)
    if signed:
        points = np.concatenate([points, -points])
    n = -(-len(points) // 255) * 255
    body = np.resize(points, n).reshape(-1, 255)
    x = np.concatenate([np.ones((body.shape[0], 1), np.float32), body], axis=1)  # max 1
    q = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed)
    assert np.all(np.asarray(q.scale) == 1.0)
    index = np.asarray(q.codes).astype(np.int64) + (127 if signed else 0)
    chosen = table.astype(np.float64)[index]
    best = np.min(np.abs(x[..., None].astype(np.float64) - table[None, None, :]), axis=-1)
    np.testing.assert_array_equal(np.abs(x - chosen), best)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_over_a_sweep_of_float32_values(signed):
    """Every 4099th float32 bit pattern in [0, 1] (and 1 itself), as the scaled value of a
    block whose maximum is 1: the arithmetic encoder picks a nearest code (brute force over
    the sorted table: the neighbours on either side), and decoding gives the table's values
    exactly."""
    table = (_lowbit.signed_code() if signed else _lowbit.unsigned_code()).astype(np.float32)
    top = int(np.float32(1).view(np.int32))
    bits = np.append(np.arange(0, top, 4099), top).astype(np.int32)
    a = bits.view(np.float32)
    a = np.concatenate([a, np.zeros(-len(a) % 255, np.float32)]).reshape(-1, 255)
    if signed:
        a[::2] *= -1
    x = np.concatenate([np.ones((a.shape[0], 1), np.float32), a], axis=1)
    q = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed)
    index = np.asarray(q.codes).astype(np.int64) + (127 if signed else 0)
    t64 = table.astype(np.float64)
    pos = np.searchsorted(t64, x.astype(np.float64))
    top = len(table) - 1
    near = np.stack([np.clip(pos - 1, 0, top), np.clip(pos, 0, top)])
    best = np.min(np.abs(x[None].astype(np.float64) - t64[near]), axis=0)
    np.testing.assert_array_equal(np.abs(x - t64[index]), best)
    np.testing.assert_array_equal(np.asarray(rlx_optax.dequantize_blockwise(q)), table[index])


def test_codes_have_the_documented_shape():
    signed, unsigned = _lowbit.signed_code(), _lowbit.unsigned_code()
    assert signed.shape == (255,) and unsigned.shape == (256,)
    assert np.all(np.diff(signed) > 0) and np.all(np.diff(unsigned) > 0)
    np.testing.assert_array_equal(signed, -signed[::-1])  # symmetric, zero in the middle
    assert signed[127] == 0 and signed[-1] == 1
    assert unsigned[0] > 0 and unsigned[-1] == 1  # no zero in the second-moment code
    # below the scale, binade by binade from the top: the values per binade and their
    # spacing (as a fraction of the binade). The signed code: 32, 16, 16, 8 (4 binades), 4
    # (8 binades, the lowest keeping its top 2); the unsigned one: 8 in each of 32 binades
    # (the lowest without its bottom value, 2^-32 itself)
    signed_spacing = [32, 16, 16] + [8] * 4 + [4] * 8
    for code, counts_want, spacing in (
        (signed[128:-1], signed_spacing[:-1] + [2], signed_spacing),
        (unsigned[:-1], [8] * 31 + [7], [8] * 32),
    ):
        fraction, exponent = np.frexp(code.astype(np.float64))
        binades, counts = np.unique(exponent, return_counts=True)
        assert list(counts[::-1]) == counts_want and np.all(np.diff(binades) == 1)
        for b, n in zip(binades[::-1], spacing, strict=True):
            steps = (fraction[exponent == b] * 2 - 1) * n  # evenly spaced: whole steps
            np.testing.assert_array_equal(steps, np.round(steps))


@pytest.mark.parametrize("signed", [True, False])
def test_a_given_scale_gives_the_nearest_code_of_the_clipped_quotient(signed):
    """With a scale given (the bound of an update), each code is the nearest code to
    ``min(|x| / scale, 1)`` with the sign of x (brute force), scales above and below the
    block maxima alike."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(4, 512)) * 10.0 ** rng.uniform(-6, 0, (4, 512))).astype(np.float32)
    x = x if signed else x * x
    top = np.abs(x).reshape(4, 2, 256).max(axis=-1)
    scale = (top * rng.choice([0.5, 1.0, 1.37, 4.0, 300.0], size=top.shape)).astype(np.float32)
    q = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed, scale=jnp.asarray(scale))
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    table = (_lowbit.signed_code() if signed else _lowbit.unsigned_code()).astype(np.float64)
    inverse = (1 / scale).astype(np.float32)  # the quotient as the encoder forms it
    y = (x.reshape(4, 2, 256) * inverse[..., None]).reshape(4, 512).astype(np.float64)
    y = np.sign(y) * np.minimum(np.abs(y), 1.0)
    index = np.asarray(q.codes).astype(np.int64) + (127 if signed else 0)
    best = np.min(np.abs(y[..., None] - table), axis=-1)
    np.testing.assert_array_equal(np.abs(y - table[index]), best)


# the leaf (64, 300) in blocks: two of 150 with 8-bit codes, four of 75 with 4-bit ones
@pytest.mark.parametrize(("storage", "blocks"), [("q8", 2), ("q4", 4)])
def test_first_moment_scale_is_the_update_bound(storage, blocks):
    """AdamW with 8- or 4-bit moments, one step from a quantized state: the first moment's
    scale is ``b1 * (largest stored |m|) + (1 - b1) * (largest |g|)`` per block (float64),
    which bounds the new moment; the second moment's scale is the largest new second moment."""
    tx = rlx_optax.scale_by_adam(b1=0.9, b2=0.999, mu_dtype=storage, nu_dtype=storage)
    b1, b2 = float(np.float32(0.9)), float(np.float32(0.999))  # the betas as float32 holds them
    p = params_tree()
    s = tx.init(p)
    step = jax.jit(tx.update)
    for i in range(3):
        _, s = step(grads_tree(i), s)
    g = np.asarray(grads_tree(3)["w"], np.float64)
    m_old = np.asarray(rlx_optax.dequantize_blockwise(s.mu["w"]), np.float64)
    v_old = np.asarray(rlx_optax.dequantize_blockwise(s.nu["w"]), np.float64)
    _, new = step(grads_tree(3), s)

    def block_max(a):
        return np.abs(a).reshape(64, blocks, 300 // blocks).max(axis=-1)

    want = b1 * block_max(m_old) + (1 - b1) * block_max(g)
    np.testing.assert_allclose(np.asarray(new.mu["w"].scale), want, rtol=1e-6)
    m_new = b1 * m_old + (1 - b1) * g
    assert np.all(block_max(m_new) <= want * (1 + 1e-6))
    v_new = b2 * v_old + (1 - b2) * g * g
    np.testing.assert_allclose(np.asarray(new.nu["w"].scale), block_max(v_new), rtol=1e-6)


def test_blocks_never_cross_the_first_axis():
    """A first-axis (FSDP) shard quantizes exactly as its rows of the whole array."""
    x = jax.random.normal(jax.random.key(0), (8, 1000))
    whole = rlx_optax.quantize_blockwise(x, signed=True)
    for part in range(4):
        rows = slice(2 * part, 2 * part + 2)
        shard = rlx_optax.quantize_blockwise(x[rows], signed=True)
        np.testing.assert_array_equal(shard.codes, whole.codes[rows])
        np.testing.assert_array_equal(shard.scale, whole.scale[rows])


# (last axis, block size, the power-of-two shard counts of the last axis whose shards hold
# whole blocks)
SHARDED_LAST_AXES = [
    (768, 192, (2, 4)),
    (1024, 256, (2, 4)),
    (3072, 192, (2, 4, 8, 16)),
    (4096, 256, (2, 4, 8, 16)),
    (300, 150, (2,)),
    (1000, 250, (2, 4)),
    (770, 77, (2,)),  # 2 * 385: the odd part above 256 split by 5
    (50304, 131, (2, 4, 8, 16, 32, 64, 128)),  # 2^7 * 3 * 131
]


@pytest.mark.parametrize(("last", "size", "shards"), SHARDED_LAST_AXES)
def test_blocks_never_cross_a_power_of_two_shard_boundary(last, size, shards):
    """The column indices each block covers lie in one shard for every listed split of the
    last axis into equal shards; one more halving (shards shorter than a block) would cut
    a block. Each shard quantized alone gives the whole array's codes and scales there."""
    assert _lowbit.block_size(last) == size
    cols = np.asarray(_lowbit._blocks(jnp.arange(1, last + 1, dtype=jnp.float32))[0]) - 1
    assert cols.shape == (last // size, size)  # the blocks tile the axis: no padding
    x = jax.random.normal(jax.random.key(last), (3, last)) * jnp.exp(
        4 * jax.random.normal(jax.random.key(1), (3, last))
    )
    # jitted: one compile per shard width instead of every shard's operations dispatched
    quantize = jax.jit(functools.partial(rlx_optax.quantize_blockwise, signed=True))
    whole = quantize(x)
    for n in shards:
        width = last // n
        assert np.all(cols[:, :1] // width == cols // width), n  # one shard per block
        per_shard = (last // size) // n
        for k in range(n):
            part = quantize(x[:, k * width : (k + 1) * width])
            np.testing.assert_array_equal(part.codes, whole.codes[:, k * width : (k + 1) * width])
            np.testing.assert_array_equal(
                part.scale, whole.scale[:, k * per_shard : (k + 1) * per_shard]
            )
    n = 2 * shards[-1]
    if last % n == 0:
        assert not np.all(cols[:, :1] // (last // n) == cols // (last // n))


# --------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("name", sorted(Q8_FACTORIES))
def test_small_leaves_stay_float32_and_large_ones_are_quantized(name):
    tx = getattr(rlx_optax, name)(1e-3, **Q8_FACTORIES[name])
    state = tx.init(params_tree())
    inner = next(s for s in state if hasattr(s, "mu") or hasattr(s, "trace"))
    fields = [f for f in ("mu", "nu", "trace") if hasattr(inner, f)]
    assert fields
    for field in fields:
        tree = getattr(inner, field)
        for key in ("w", "e"):
            assert isinstance(tree[key], rlx_optax.QuantizedArray), (field, key)
            want = jnp.int8 if field in ("mu", "trace") else jnp.uint8
            assert tree[key].codes.dtype == want
        for key in ("s", "b", "c"):
            assert tree[key].dtype == jnp.float32 and tree[key].shape == params_tree()[key].shape


@pytest.mark.parametrize("name", sorted(Q8_FACTORIES))
def test_quantized_state_follows_the_float32_run(name):
    """20 jitted steps with 8-bit moments stay near the float32 run: the displacement differs
    by less than 5% of its size (the codes resolve about 0.7% of a block's maximum near the
    top and a coarser relative step for entries decades below it)."""
    kw = dict(Q8_FACTORIES[name])
    base = {k: v for k, v in kw.items() if k == "momentum"}
    if name == "adafactor":  # also the reference's momentum of the update
        kw = dict(kw, behaviour="reference")
        base = dict(base, behaviour="reference")
    txs = [getattr(rlx_optax, name)(1e-3, **opts) for opts in (base, kw)]
    moved, diff = displacement_and_departure(name, *txs)
    assert moved > 0 and diff < 0.05 * moved


def displacement_and_departure(name, reference, other, steps: int = 20) -> tuple[float, float]:
    """`steps` jitted steps of `reference` and of `other` (optimizer `name`, for its extra
    update arguments) from `params_tree()` on `grads_tree(i)`: the norm of the reference's
    displacement, and of the difference between the two final parameter trees."""
    p0 = params_tree()
    out = []
    for tx in (reference, other):
        step = jax.jit(lambda p, s, g, tx=tx: tx.update(g, s, p, **update_extra(name, g)))
        p, s = p0, tx.init(p0)
        for i in range(steps):
            u, s = step(p, s, grads_tree(i))
            p = optax.apply_updates(p, u)
        out.append(p)
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, out[0], p0))
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, out[1], out[0]))
    return float(moved), float(diff)


def test_default_state_is_unchanged():
    """No dtype argument: the float32 state of before, leaf for leaf (no QuantizedArray)."""
    for name in ("adamw", "lamb", "lion"):
        state = getattr(rlx_optax, name)(1e-3).init(params_tree())
        for leaf in jax.tree.leaves(state):
            assert leaf.dtype in (jnp.float32, jnp.int32)
    with pytest.raises(ValueError, match="nu_dtype"):
        rlx_optax.adamw(1e-3, nu_dtype="int4")


# (storage, the updates' rtol injected vs plain, the code dtype, MultiSteps' rtol of every
# entry): a traced learning rate multiplies last, float32 rounding apart; with 4 bits the rare
# entry at a code boundary moves further than a few percent
@pytest.mark.parametrize(
    ("storage", "rtol", "code", "multi_rtol"),
    [("q8", 1e-6, jnp.int8, 0.05), ("q4", 1e-4, jnp.int4, None)],
)
def test_jit_inject_hyperparams_and_multisteps(storage, rtol, code, multi_rtol):
    p0 = params_tree()
    plain = rlx_optax.adamw(1e-3, mu_dtype=storage, nu_dtype=storage)
    injected = optax.inject_hyperparams(rlx_optax.adamw)(
        learning_rate=1e-3, mu_dtype=storage, nu_dtype=storage
    )
    s1, s2 = plain.init(p0), injected.init(p0)
    for i in range(3):
        u1, s1 = jax.jit(plain.update)(grads_tree(i), s1, p0)
        u2, s2 = jax.jit(injected.update)(grads_tree(i), s2, p0)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)
    assert isinstance(s2.inner_state[0].mu["w"], rlx_optax.QuantizedArray)
    assert s2.inner_state[0].mu["w"].codes.dtype == code
    if storage == "q4":
        # the state: a traced b1 rounds `1 - b1` apart from the constant, so the first
        # moment's scales may differ by an ulp and a rare code with them
        for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2.inner_state), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype == jnp.int4:
                assert np.mean(a != b) < 1e-3
            else:
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)

    # MultiSteps: two micro-steps of the same gradient are one step of that gradient. The
    # two programs fuse the float32 arithmetic differently (MultiSteps runs the inner update
    # in a lax.cond), so a moment lying within an ulp of a boundary between two codes may be
    # stored in the neighbouring code; such entries are rare (< 0.1%) and, with 8 bits, move
    # the next update by at most a few percent; everything else agrees to float32 rounding.
    assert_two_micro_steps_are_one_step(plain, p0, rtol=multi_rtol)


def assert_two_micro_steps_are_one_step(plain, p0, rtol=None) -> None:
    """`optax.MultiSteps(plain, 2)` given each gradient twice: a zero update, then `plain`'s
    update of that gradient, in all but < 0.1% of the entries to float32 rounding (and every
    entry within `rtol`, when given)."""
    multi = optax.MultiSteps(plain, every_k_schedule=2)
    sm, sp = multi.init(p0), plain.init(p0)
    step, plain_step = jax.jit(multi.update), jax.jit(plain.update)
    for i in range(2):
        g = grads_tree(i)
        u0, sm = step(g, sm, p0)
        assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u0))
        um, sm = step(g, sm, p0)
        up, sp = plain_step(g, sp, p0)
        assert jax.tree.structure(sm.inner_opt_state) == jax.tree.structure(sp)
        for a, b in zip(jax.tree.leaves(um), jax.tree.leaves(up), strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            close = np.abs(a - b) <= 1e-5 * np.abs(b) + 1e-12
            assert np.mean(~close) < 1e-3
            if rtol is not None:
                np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("form", ["name", "static_args"])
def test_inject_hyperparams_keeps_the_storage_static(form):
    """bf16 with stochastic rounding through inject_hyperparams: the same bits as without.
    A dtype object is callable, which inject_hyperparams takes for a schedule: name it in
    `static_args`, or pass the dtype's name."""
    p0 = params_tree()
    dtype = "bfloat16" if form == "name" else jnp.bfloat16
    kw = {"mu_dtype": dtype, "nu_dtype": dtype, "stochastic_rounding": True}
    static = () if form == "name" else ("mu_dtype", "nu_dtype")
    plain = rlx_optax.adamw(1e-3, **kw)
    injected = optax.inject_hyperparams(rlx_optax.adamw, static_args=static)(
        learning_rate=1e-3, **kw
    )
    s1, s2 = plain.init(p0), injected.init(p0)
    for i in range(3):
        _, s1 = jax.jit(plain.update)(grads_tree(i), s1, p0)
        _, s2 = jax.jit(injected.update)(grads_tree(i), s2, p0)
    assert s2.inner_state[0].mu["w"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(s1[0]), jax.tree.leaves(s2.inner_state[0]), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_complex_leaves_are_kept_unquantized():
    p = {"z": jnp.ones((64, 64), jnp.complex64), "w": jnp.ones((64, 64))}
    tx = rlx_optax.adamw(1e-3, mu_dtype="q8", nu_dtype="q8")
    state = tx.init(p)
    assert state[0].mu["z"].dtype == jnp.complex64
    assert isinstance(state[0].mu["w"], rlx_optax.QuantizedArray)
    g = {"z": jnp.full((64, 64), 1 - 2j, jnp.complex64), "w": jnp.ones((64, 64))}
    u, state = jax.jit(tx.update)(g, state, p)
    assert u["z"].dtype == jnp.complex64 and state[0].mu["z"].dtype == jnp.complex64
    assert bool(jnp.all(jnp.isfinite(u["z"]))) and bool(jnp.all(jnp.isfinite(u["w"])))


@pytest.mark.parametrize(
    "opts",
    [
        {"mu_dtype": "q8", "nu_dtype": "q8"},
        {"mu_dtype": "q4", "nu_dtype": "q4"},
        {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16, "stochastic_rounding": True},
    ],
    ids=["q8", "q4", "bf16-sr"],
)
def test_orbax_and_flax_resume_is_bit_exact(opts, tmp_path):
    tx = rlx_optax.adamw(1e-3, **opts)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def run(p, s, seeds):
        for i in seeds:
            p, s = step(p, s, grads_tree(i))
        return p, s

    p0 = params_tree()
    want = run(p0, tx.init(p0), range(6))
    half = run(p0, tx.init(p0), range(3))
    fresh = params_tree(5)
    target = {"p": fresh, "s": tx.init(fresh)}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "c", {"p": half[0], "s": half[1]})
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "c", target)
    ckpt.close()
    blob = flax.serialization.to_bytes({"p": half[0], "s": half[1]})
    from_flax = jax.tree.map(jnp.asarray, flax.serialization.from_bytes(target, blob))
    if opts["nu_dtype"] == "q4":  # the unsigned 4-bit code is int4, marked by its class
        assert isinstance(restored["s"][0].nu["w"], rlx_optax.QuantizedArrayUnsigned4)
        assert isinstance(from_flax["s"][0].nu["w"], rlx_optax.QuantizedArrayUnsigned4)
    for resumed in (restored, from_flax):
        got = run(resumed["p"], resumed["s"], range(3, 6))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("value", [1.0 + 0.3 / 128, -3.14159, 1e-3 + 1.7e-7, 7.7e4])
def test_stochastic_rounding_is_unbiased(value):
    """The mean of 100k roundings of one float32 value lies within 3e-5 of it, relative.

    One draw deviates from the value by at most one bfloat16 ulp (2^-7 relative) with
    standard deviation at most ulp/2, so the mean of 100k has a standard deviation of at
    most 2^-8 / sqrt(1e5) = 1.24e-5 relative: 3e-5 is about 2.4 of those.
    """
    x = jnp.full((100_000,), value, jnp.float32)
    r = rlx_optax.stochastic_round(x, jnp.bfloat16, seed=3)
    assert r.dtype == jnp.bfloat16
    mean = float(np.mean(np.asarray(r, np.float64)))
    x32 = float(np.float32(value))
    assert abs(mean - x32) <= 3e-5 * abs(x32)
    # and every draw is one of the two neighbours
    lo, hi = np.asarray(r, np.float64).min(), np.asarray(r, np.float64).max()
    assert lo <= x32 <= hi and (hi - lo) <= abs(x32) * 2**-7


def test_stochastic_rounding_keeps_non_finite_values():
    x = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0, -0.0], jnp.float32)
    r = np.asarray(rlx_optax.stochastic_round(x, jnp.bfloat16, seed=0), np.float32)
    assert r[0] == np.inf and r[1] == -np.inf and np.isnan(r[2]) and r[3] == 0 and r[4] == 0


def test_rounding_is_reproducible_per_step_and_leaf():
    p = {"a": jnp.full((4096,), 1.0, jnp.bfloat16), "b": jnp.full((4096,), 1.0, jnp.bfloat16)}
    u = {"a": jnp.full((4096,), 1e-3), "b": jnp.full((4096,), 1e-3)}
    r1 = rlx_optax.apply_updates_stochastic(p, u, step=7)
    r2 = jax.jit(rlx_optax.apply_updates_stochastic)(p, u, 7)
    r3 = rlx_optax.apply_updates_stochastic(p, u, step=8)
    np.testing.assert_array_equal(np.asarray(r1["a"]), np.asarray(r2["a"]))  # same bits
    assert not np.array_equal(np.asarray(r1["a"]), np.asarray(r3["a"]))  # another step
    assert not np.array_equal(np.asarray(r1["a"]), np.asarray(r1["b"]))  # another leaf
    # float32 leaves are applied as optax does
    q = {"x": jnp.ones(3)}
    np.testing.assert_array_equal(
        rlx_optax.apply_updates_stochastic(q, {"x": jnp.full(3, 0.1)}, 0)["x"],
        optax.apply_updates(q, {"x": jnp.full(3, 0.1)})["x"],
    )


def test_bf16_parameters_follow_float32_with_stochastic_rounding():
    """Updates of 1e-4 (1/40 of a bfloat16 ulp at 1.0) vanish with round-to-nearest; rounded
    stochastically they accumulate: after 1000 steps of -1e-4 the float32 parameter is 0.9,
    and the bfloat16 one is within 2e-3 of it on average over 4096 entries (each entry a sum
    of independent roundings, standard deviation about 4e-3 / sqrt(4096) per entry mean)."""
    n, steps_, du = 4096, 1000, -1e-4
    p_sr = {"w": jnp.ones((n,), jnp.bfloat16)}
    p_rn = {"w": jnp.ones((n,), jnp.bfloat16)}
    u = {"w": jnp.full((n,), du, jnp.float32)}
    sr = jax.jit(rlx_optax.apply_updates_stochastic)
    rn = jax.jit(optax.apply_updates)
    for t in range(steps_):
        p_sr = sr(p_sr, u, t)
        p_rn = rn(p_rn, u)
    want = 1.0 + steps_ * du
    assert float(jnp.mean(p_rn["w"].astype(jnp.float32))) == 1.0  # nothing moved
    assert abs(float(jnp.mean(p_sr["w"].astype(jnp.float32))) - want) < 2e-3


def _ema_float64(g: np.ndarray, b2: float, steps: int) -> np.ndarray:
    v = np.zeros_like(g, np.float64)
    for _ in range(steps):
        v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
    return v


def test_bf16_second_moment_with_stochastic_rounding_tracks_float64():
    """Adam's v with b2 = 0.999 in bfloat16: rounded to nearest it stalls once the increment
    (1e-3 of g^2) drops below half an ulp; rounded stochastically its mean over 8192 entries
    stays within 1% of the float64 moving average after 2000 steps."""
    g = {"w": jnp.ones((8192,), jnp.float32)}
    want = float(_ema_float64(np.ones(1), 0.999, 2000)[0])  # 1 - 0.999^2000 = 0.865
    got = {}
    for sr in (False, True):
        tx = rlx_optax.scale_by_adam(nu_dtype=jnp.bfloat16, stochastic_rounding=sr)
        s = tx.init(g)
        step = jax.jit(tx.update)
        for _ in range(2000):
            _, s = step(g, s)
        got[sr] = float(jnp.mean(s.nu["w"].astype(jnp.float32)))
    assert abs(got[True] - want) < 0.01 * want
    assert abs(got[False] - want) > 0.1 * want  # the stall stochastic rounding removes
