"""4-bit block-wise optimizer moments (``"q4"``): the codes, the blocks, and the wiring.

Oracles: the code tables written out as literals, a brute-force nearest-code search over the
table in float64 NumPy (ties to the smaller magnitude), a float64 NumPy transcription of
block-wise quantization (blocks, scales, codes, values), XLA's compiled memory analysis (the
int4 codes take half a byte), the float32 run, runs without `inject_hyperparams` /
`MultiSteps`, uninterrupted runs (bit-exact resumes) and the single-device run (a mesh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from rlx_optax._src.transforms import _lowbit
from tests.problems import assert_resume_bit_exact
from tests.test_lowbit import displacement_and_departure, params_tree

SIGNED = [-1, -0.625, -0.375, -0.25, -0.125, -0.0625, -0.03125, 0]
SIGNED += [-v for v in SIGNED[-2::-1]]
UNSIGNED = [2.0**e for e in range(-15, 1)]


def table(signed: bool) -> np.ndarray:
    return np.array(SIGNED if signed else UNSIGNED, np.float64)


def nearest_numpy(y: np.ndarray, signed: bool) -> np.ndarray:
    """The nearest code value of each of float64 `y` (clipped to [-1, 1]) by search over the
    whole table, ties to the smaller magnitude."""
    t = table(signed)
    y = np.clip(y, -1.0, 1.0)
    dist = np.abs(y[..., None] - t)
    best = dist.min(axis=-1, keepdims=True)
    # among the nearest, the smallest magnitude
    candidates = np.where(dist == best, np.abs(t), np.inf)
    pick = np.argmin(candidates, axis=-1)
    return t[pick]


def quantize_numpy(x: np.ndarray, signed: bool, size: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 block-wise quantization: blocks of `size` along the last axis (the last one
    shorter), scale = block max |x|, value = nearest code of x / scale times the scale."""
    x = np.asarray(x, np.float64)
    out, scales = np.zeros_like(x), []
    for start in range(0, x.shape[-1], size):
        part = x[..., start : start + size]
        scale = np.abs(part).max(axis=-1, keepdims=True)
        safe = np.where(scale > 0, scale, 1.0)
        out[..., start : start + size] = nearest_numpy(part / safe, signed) * scale
        scales.append(scale[..., 0])
    return out, np.stack(scales, axis=-1)


def codes_values(q: rlx_optax.QuantizedArray) -> np.ndarray:
    """The code value of each stored code, read off the literal table (int4 ``c`` is
    ``table[c + 7]`` signed, ``table[c + 8]`` unsigned)."""
    offset = 7 if q.signed else 8
    return table(q.signed)[np.asarray(q.codes).astype(np.int64) + offset]


# --------------------------------------------------------------------------- the codes


def test_code_tables_are_the_documented_values():
    signed, unsigned = _lowbit.signed_code_4bit(), _lowbit.unsigned_code_4bit()
    assert signed.dtype == np.float32 and unsigned.dtype == np.float32
    np.testing.assert_array_equal(signed, np.array(SIGNED, np.float32))
    np.testing.assert_array_equal(unsigned, np.array(UNSIGNED, np.float32))
    assert np.all(np.diff(signed) > 0) and np.all(np.diff(unsigned) > 0)
    assert signed.shape == (15,) and unsigned.shape == (16,)  # int4 -7..7 and -8..7
    assert np.all(unsigned > 0)  # no zero in the second-moment code


@pytest.mark.parametrize("signed", [True, False])
def test_encoder_is_the_nearest_code_over_a_dense_grid(signed):
    """Rows of 128 (one block each) whose first entry is 1 (scale 1): every code value, every
    midpoint (a tie: the smaller magnitude wins), one float32 ulp either side of both, zero,
    tiny and subnormal values, a sweep of every 65537th float32 bit pattern in [0, 1], and
    their negatives. Then the same values with given scales of 1/4 and 1/2 (quotients above
    1 get the largest code). Decoding gives the table's values exactly."""
    t = np.abs(table(signed)).astype(np.float32)
    mids = ((np.unique(t)[1:].astype(np.float64) + np.unique(t)[:-1]) / 2).astype(np.float32)
    sweep = np.arange(0, 0x3F800000, 65537, dtype=np.int32).view(np.float32)
    pts = np.concatenate([t, mids, [0.0, 1e-30, 1e-42, 2.0**-16, 2.0**-15 * 0.75], sweep])
    pts = np.concatenate([pts, np.nextafter(pts, np.float32(2)), np.nextafter(pts, -1)])
    pts = np.clip(pts.astype(np.float32), 0, 1)
    if signed:
        pts = np.concatenate([pts, -pts])
    n = -(-len(pts) // 127) * 127
    body = np.resize(pts, n).reshape(-1, 127)
    x = np.concatenate([np.ones((body.shape[0], 1), np.float32), body], axis=1)
    q = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed, bits=4)
    assert q.codes.dtype == jnp.int4 and q.codes.shape == x.shape
    assert isinstance(q, rlx_optax.QuantizedArrayUnsigned4) != signed and q.signed == signed
    assert q.scale.shape == (x.shape[0], 1) and np.all(np.asarray(q.scale) == 1)
    np.testing.assert_array_equal(codes_values(q), nearest_numpy(x.astype(np.float64), signed))
    np.testing.assert_array_equal(np.asarray(rlx_optax.dequantize_blockwise(q)), codes_values(q))
    # the ties: a midpoint takes the smaller magnitude
    at_mid = np.isin(np.abs(x), mids)
    assert at_mid.sum() > 0
    np.testing.assert_array_less(np.abs(codes_values(q))[at_mid], np.abs(x[at_mid]))
    # values above 1 (a given scale below the block's maximum): the largest code
    for s in (0.25, 0.5):
        scale = jnp.full((x.shape[0], 1), s, jnp.float32)
        qs = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed, scale=scale, bits=4)
        y = x.astype(np.float64) * np.float64(np.float32(1 / s))
        np.testing.assert_array_equal(codes_values(qs), nearest_numpy(y, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_encoder_picks_a_bracketing_code_without_bias(signed):
    """With a seed: each code is one of the two table values around the scaled value (the
    value itself when it is a code), and over 2^16 copies of a value the mean of the decoded
    values is the value (within 4 standard errors of a two-point distribution); below the
    smallest nonzero code (1/32 signed, 2^-15 unsigned) the nearest code. The same seed gives
    the same codes."""
    t = table(signed)
    pos = np.abs(t[t > 0]) if signed else t
    # values between codes (and the codes themselves), in rows whose first entry is 1
    probe = np.concatenate([pos, (pos[1:] + pos[:-1]) / 2, pos[:-1] * 1.3, [0.01, 0.02, 0.3]])
    probe = np.clip(probe, 0, 1).astype(np.float32)
    if signed:
        probe = np.concatenate([probe, -probe])
    reps = 1 << 16
    x = np.repeat(probe[:, None], reps, axis=1)
    x = x.reshape(-1, 128)
    x[:, 0] = 1.0  # the block maximum: scale 1 (and the value 1 is exact)
    q = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed, bits=4, seed=7)
    got = codes_values(q)
    np.testing.assert_array_equal(np.asarray(rlx_optax.dequantize_blockwise(q)), got)
    y = x.astype(np.float64)
    sorted_t = np.sort(t)
    hi = sorted_t[np.clip(np.searchsorted(sorted_t, y, side="left"), 0, len(t) - 1)]
    lo = sorted_t[np.clip(np.searchsorted(sorted_t, y, side="right") - 1, 0, len(t) - 1)]
    assert np.all((got == lo) | (got == hi))
    keep = np.arange(got.size) % 128 != 0  # without the forced 1.0 entries
    body, value = got.reshape(-1)[keep], y.reshape(-1)[keep]
    lows, highs = lo.reshape(-1)[keep], hi.reshape(-1)[keep]
    order = np.argsort(value, kind="stable")  # the entries of each value, grouped
    uniques, starts, counts = np.unique(value[order], return_index=True, return_counts=True)
    for v, start, count in zip(uniques, starts, counts, strict=True):
        members = order[start : start + count]
        sample, lower, upper = body[members], lows[members[0]], highs[members[0]]
        if abs(v) < (1 / 32 if signed else t[0]):
            assert np.all(sample == nearest_numpy(np.array([v]), signed)[0]), v
            continue
        spread = (upper - lower) / 2 / np.sqrt(len(sample))
        assert abs(sample.mean() - v) <= 4 * spread + 1e-12, (v, sample.mean())
    again = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed, bits=4, seed=7)
    np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
    with pytest.raises(ValueError, match="4-bit"):
        rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed, seed=7)


def test_a_moving_average_in_4_bits_moves_on_average():
    """Lion's momentum (b2 = 0.99) under a gradient that ramps up along each row for 100 steps,
    then down for 200: each step moves an entry by about 1% of its value, far below the 4-bit
    code gaps (25-60%), so rounding to nearest keeps the codes where they were. Rounded
    stochastically, the leaf's mean follows the float64 average within 2% and each column's
    mean within 10% of the largest (measured: 0.07% and 6.6%; rounded to nearest, the
    columns end 78% of the largest away)."""
    ramp = jnp.linspace(0.2, 1.0, 128)[None, :]
    up, down = {"w": jnp.ones((64, 128)) * ramp}, {"w": jnp.ones((64, 128)) * ramp[:, ::-1]}
    tx = rlx_optax.scale_by_lion(b1=0.9, b2=0.99, mu_dtype="q4")
    s = tx.init(up)
    step = jax.jit(tx.update)
    want = np.zeros((64, 128))
    for k in range(300):
        g = up if k < 100 else down
        _, s = step(g, s)
        want = 0.99 * want + 0.01 * np.asarray(g["w"], np.float64)
    got = np.asarray(rlx_optax.dequantize_blockwise(s.mu["w"]), np.float64)
    assert abs(got.mean() / want.mean() - 1) < 0.02
    columns = np.abs(got.mean(axis=0) - want.mean(axis=0))
    assert np.max(columns) < 0.1 * np.max(want), np.max(columns) / np.max(want)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("last", "size"), [(300, 75), (4096, 128), (771, 128), (96, 96)])
def test_round_trip_matches_a_float64_transcription(signed, last, size):
    """Blocks of at most 128 (300 = 75 * 4; 771 = 3 * 257 has no factor leaving 32 to 128:
    blocks of 128, the last one of 3), entries over ten decades and an all-zero block: the
    codes, scales and values of a float64 NumPy transcription, and the error bound per
    block (half the widest gap of the signed code, 3/16 of the scale; a third of the value
    or 2^-15 of the scale for the unsigned one)."""
    assert _lowbit.block_size(last, _lowbit.BLOCK_Q4) == size
    rng = np.random.default_rng(last)
    x = rng.normal(size=(6, last)) * 10.0 ** rng.uniform(-9, 1, (6, last))
    x = x if signed else x * x
    x[3, :size] = 0.0
    x = x.astype(np.float32)
    q = rlx_optax.quantize_blockwise(jnp.asarray(x), signed=signed, bits=4)
    want, scale = quantize_numpy(x, signed, size)
    np.testing.assert_array_equal(np.asarray(q.scale, np.float64), scale)
    back = np.asarray(rlx_optax.dequantize_blockwise(q), np.float64)
    np.testing.assert_allclose(back, want, rtol=2e-7, atol=0)
    np.testing.assert_array_equal(back[3, :size], 0.0)
    per_elem = np.repeat(scale, size, axis=-1)[:, :last]
    err = np.abs(back - x)
    if signed:
        assert np.all(err <= 3 / 16 * per_elem * (1 + 1e-6))
    else:
        assert np.all(err <= np.maximum(np.abs(x) / 3, 2.0**-15 * per_elem) * (1 + 1e-6))
        assert np.all(back[per_elem > 0] > 0)  # never zero


def test_blocks_keep_the_power_of_two_sharding_rule_with_the_smaller_cap():
    """Cap 128: the same rule as 8-bit's with the smaller cap, and the 8-bit sizes unchanged.
    Each shard of a power-of-two split of the last axis quantizes as the whole array there."""
    for last, size in [(768, 96), (1024, 128), (4096, 128), (300, 75), (770, 77), (100, 100)]:
        assert _lowbit.block_size(last, 128) == size
    for last, size in [(768, 192), (1024, 256), (4096, 256), (300, 150), (770, 77)]:
        assert _lowbit.block_size(last) == size
    x = jax.random.normal(jax.random.key(0), (3, 768)) * jnp.exp(
        3 * jax.random.normal(jax.random.key(1), (3, 768))
    )
    whole = rlx_optax.quantize_blockwise(x, signed=True, bits=4)
    assert whole.scale.shape == (3, 8)
    cols = np.asarray(_lowbit._blocks(jnp.arange(1, 769, dtype=jnp.float32), 128)[0]) - 1
    assert cols.shape == (8, 96)
    for n in (2, 4, 8):  # every block inside one shard
        assert np.all(cols[:, :1] // (768 // n) == cols // (768 // n)), n
    quantize = jax.jit(lambda a: rlx_optax.quantize_blockwise(a, True, bits=4))
    for k in range(4):
        part = quantize(x[:, k * 192 : (k + 1) * 192])
        np.testing.assert_array_equal(part.codes, whole.codes[:, k * 192 : (k + 1) * 192])
        np.testing.assert_array_equal(part.scale, whole.scale[:, 2 * k : 2 * k + 2])


def test_int4_codes_are_packed_in_compiled_programs():
    """XLA's memory analysis of the jitted init and update of AdamW on a 1024 x 1024 matrix:
    the state takes 0.5 byte per element per moment plus a float32 scale per 128 (about
    1.06 bytes per parameter for both moments), against about 2.03 for 8-bit. JAX's
    ``nbytes`` counts a 4-bit element as a byte; the compiled sizes do not."""
    p = {"w": jnp.zeros((1024, 1024), jnp.float32)}
    n = 1024 * 1024
    sizes = {}
    for storage in ("q8", "q4"):
        tx = rlx_optax.adamw(1e-3, mu_dtype=storage, nu_dtype=storage)
        init = jax.jit(tx.init).lower(p).compile().memory_analysis()
        sizes[storage] = init.output_size_in_bytes
        state = jax.eval_shape(tx.init, p)
        update = jax.jit(tx.update).lower(p, state, p).compile().memory_analysis()
        # the update returns the float32 updates and the new state
        assert abs(update.output_size_in_bytes - 4 * n - sizes[storage]) <= 64
    want_q4 = 2 * (n // 2) + 2 * 4 * (n // 128)
    assert want_q4 <= sizes["q4"] <= want_q4 + 64
    assert 2 * n + 2 * 4 * (n // 256) <= sizes["q8"] <= 2 * n + 2 * 4 * (n // 256) + 64
    state = rlx_optax.adamw(1e-3, mu_dtype="q4", nu_dtype="q4").init(p)
    assert state[0].mu["w"].codes.nbytes == n  # what JAX reports: one byte per element


# --------------------------------------------------------------------------- wiring

Q4_FACTORIES = {
    "adamw": {"mu_dtype": "q4", "nu_dtype": "q4"},
    "lamb": {"mu_dtype": "q4", "nu_dtype": "q4"},
    "lion": {"mu_dtype": "q4"},
    "sgd": {"momentum": 0.9, "accumulator_dtype": "q4"},
    "sophia": {"mu_dtype": "q4"},
    "adafactor": {"momentum": 0.9, "mu_dtype": "q4"},
    "muon": {"mu_dtype": "q4"},
    "mars": {"mu_dtype": "q4", "nu_dtype": "q4", "prev_grad_dtype": "q4"},
    "soap": {"mu_dtype": "q4", "nu_dtype": "q4", "weight_decay": 0.0},
    "kron_psgd": {"mu_dtype": "q4"},
}


def make(name: str, opts: dict, lr: float = 1e-3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Kron's crate-default probe note
        return getattr(rlx_optax, name)(lr, **opts)


@pytest.mark.parametrize("name", sorted(Q4_FACTORIES))
def test_every_family_stores_int4_codes_where_it_stores_int8(name):
    """The same leaves are quantized as under "q8" (large real ones), with int4 codes where
    q8 has int8 or uint8 (uint8's in a `QuantizedArrayUnsigned4`); small leaves stay
    float32."""
    q4 = jax.tree.leaves(make(name, Q4_FACTORIES[name]).init(params_tree()))
    q8_opts = {k: ("q8" if v == "q4" else v) for k, v in Q4_FACTORIES[name].items()}
    q8 = jax.tree.leaves(make(name, q8_opts).init(params_tree()))
    assert len(q4) == len(q8)
    swap = {jnp.dtype(jnp.int8): jnp.int4, jnp.dtype(jnp.uint8): jnp.int4}
    assert any(jnp.dtype(a.dtype) in swap for a in q8)
    for a, b in zip(q4, q8, strict=True):
        assert a.dtype == swap.get(jnp.dtype(b.dtype), b.dtype), (a.dtype, b.dtype)
        if jnp.dtype(b.dtype) in swap:
            assert a.shape == b.shape


# Distance between the final parameters of the 4-bit and the float32 runs (20 steps), as a
# fraction of the float32 displacement. Measured: AdamW 0.38 (first moment alone 0.34, second
# alone 0.12), LAMB 0.35, Lion 0.25, SGD 0.26, Muon 0.26; 8-bit: 0.02-0.04. The gradients of
# this tree spread over four decades inside every block: entries below 1/64 of a block's
# largest first moment are stored as zero, and the codes between are 25-60% apart, a hard
# case; the training runs are in benchmarks/RESULTS.md.
Q4_FOLLOW_BOUND = 0.45


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "muon"])
def test_quantized_state_follows_the_float32_run(name):
    """20 jitted steps with 4-bit moments stay near the float32 run: the displacement differs
    by less than 45% of its size (`Q4_FOLLOW_BOUND`)."""
    kw = dict(Q4_FACTORIES[name])
    base = {k: v for k, v in kw.items() if k == "momentum"}
    moved, diff = displacement_and_departure(name, make(name, base), make(name, kw))
    assert moved > 0 and diff < Q4_FOLLOW_BOUND * moved, diff / moved


@pytest.mark.parametrize(
    "name", ["muon", pytest.param("soap", marks=pytest.mark.slow), "kron_psgd"]
)
def test_matrix_families_resume_bit_exact_through_flax(name):
    def run(tx, p, s, seeds):
        from tests.problems import lowbit_grads

        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        for i in seeds:
            u, s = step(p, s, lowbit_grads(i))
            p = optax.apply_updates(p, u)
        return p, s

    assert_resume_bit_exact(make(name, Q4_FACTORIES[name], lr=1e-2), run)


def test_storage_arguments_name_q4_and_preconditioners_refuse_it():
    with pytest.raises(ValueError, match="'q4'"):
        rlx_optax.adamw(1e-3, nu_dtype="q5")
    for factory in (rlx_optax.soap, rlx_optax.kron_psgd):
        with pytest.raises(ValueError, match="precond_dtype"):
            factory(1e-3, precond_dtype="q4")
    assert _lowbit.is_quantized_storage("q4") and _lowbit.is_quantized_storage("q8")
    assert not _lowbit.is_quantized_storage(jnp.int4)


def test_complex_leaves_are_kept_unquantized():
    p = {"z": jnp.ones((64, 64), jnp.complex64), "w": jnp.ones((64, 64))}
    tx = rlx_optax.adamw(1e-3, mu_dtype="q4", nu_dtype="q4")
    state = tx.init(p)
    assert state[0].mu["z"].dtype == jnp.complex64
    assert state[0].mu["w"].codes.dtype == jnp.int4
    g = {"z": jnp.full((64, 64), 1 - 2j, jnp.complex64), "w": jnp.ones((64, 64))}
    u, state = jax.jit(tx.update)(g, state, p)
    assert state[0].mu["z"].dtype == jnp.complex64
    assert bool(jnp.all(jnp.isfinite(u["w"])))


def test_stateful_api_passes_q4_through():
    """`state_precision` with "q4": the same parameters as the pure transform's jitted train
    steps (`tests/test_stateful_precision.py`'s oracle), a bit-exact resume from
    ``state_dict``, and a smaller state than "q8"'s."""
    from tests import test_stateful_precision as sp

    precision = {"mu_dtype": "q4", "nu_dtype": "q4"}
    sp.test_equals_pure_transform_with_the_same_storage("adamw", precision)
    sp.test_state_dict_resumes_bit_for_bit("adamw", precision)
    q4, _ = sp._stateful("adamw", precision, 1)
    state = {k: v for k, v in q4.state_dict(flat=True).items() if "/" in k}
    assert any(np.asarray(v).dtype == jnp.int4 for v in state.values())


_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax, rlx_optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tests.test_lowbit import grads_tree, params_tree
tx = rlx_optax.adamw(1e-3, mu_dtype="q4", nu_dtype="q4")
def run(p, shardings=None):
    s = tx.init(p) if shardings is None else jax.jit(tx.init, out_shardings=shardings)(p)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(g, s, p)))
    for i in range(4):
        g = {k: v for k, v in grads_tree(i).items() if k in p}
        if shardings is not None:
            g = jax.device_put(g, jax.tree.map(lambda x: x.sharding, p))
        p, s = step(p, s, g)
    return p, s
p0 = {k: v for k, v in params_tree().items() if k in ("w", "e", "b")}
want = run(p0)
mesh = jax.make_mesh((2, 2), ("fsdp", "tp"))
specs = {"w": P("fsdp", "tp"), "e": P("tp"), "b": P()}
placed = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in p0.items()}
got = run(placed, rlx_optax.state_shardings(tx, placed))
assert got[1][0].mu["w"].codes.dtype == jnp.int4
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    if jnp.issubdtype(a.dtype, jnp.integer):  # codes: a rare one an ulp from a boundary
        assert np.mean(a != b) <= 1e-3
    else:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
print("OK")
"""


@pytest.mark.slow
def test_sharded_run_equals_the_single_device_run():
    """AdamW with 4-bit moments on a 2 x 2 CPU mesh (rows and the last axis split: 300 / 2 =
    150 = two blocks of 75 per shard): the parameters and scales of the one-device run to
    float32 rounding (the sharded program rounds a few entries an ulp apart, as with 8-bit),
    the codes equal but for at most 0.1% (measured: all equal)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT], env=env, cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_state_bytes_per_parameter_of_the_model_benchmark():
    """`benchmarks/memory.py --precision` on the model tree (3.15M parameters): AdamW's q4
    state about 1.07 bytes per parameter (two 0.5-byte codes and two float32 scales per 128),
    the same by XLA's compiled memory analysis as counted at 4 bits per code; the one-buffer
    families about 0.54."""
    from benchmarks import memory

    payload = memory.run_precision(256, 4)
    table = {r["name"]: r for r in payload["results"]}
    assert 1.0 < table["adamw"]["q4"] <= 1.2
    assert payload["adamw_q4_compiled"] == pytest.approx(table["adamw"]["q4"], abs=1e-3)
    for name in ("sgd", "lion", "muon"):
        assert 0.5 < table[name]["q4"] < 0.55
    for name, r in table.items():
        assert (r["q4"] is None) == (r["q8"] is None), name
        if r["q4"] is not None:
            assert r["q4"] < r["q8"], name
