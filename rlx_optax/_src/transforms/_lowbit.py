"""Optimizer state below float32: 8- and 4-bit block-wise quantized moments, stochastic rounding.

One mechanism for every element-wise family. A moment's storage is chosen by a dtype-like
argument (`mu_dtype`, `nu_dtype`, `accumulator_dtype`):

- ``None``: the parameter dtype (the default; the numbers are those of a float32 state);
- a floating dtype (``jnp.bfloat16``, ``jnp.float32``): stored in it; a float32 result rounded
  into bfloat16 either to nearest or, with ``stochastic_rounding=True``, stochastically;
- ``"q8"`` (`Q8`): 8-bit codes plus one float32 scale per block of at most `BLOCK` elements
  along the last axis (`QuantizedArray`; `block_size`: blocks never cross the boundary of
  a power-of-two sharding of the last axis whose shards hold whole blocks). First moments
  use a signed code with zero and a resolution that falls with the distance below the
  block scale (as Dettmers et al.'s dynamic code), second moments an unsigned small-float
  code without zero (5 exponent, 3 mantissa bits); both are float32 values read off the
  float's bits, encoded to the nearest code by integer arithmetic. The scale of a block is
  its largest magnitude, except for first moments in an update: there it is a bound known
  before the new moment is (`ema_bound`: ``decay * (largest stored magnitude) + weight *
  (largest increment)``), so that no pass over the new moment has to precede its encoding.
  Leaves under `MIN_QUANTIZED_SIZE` elements, leaves whose last axis is shorter than
  `MIN_QUANTIZED_LAST_AXIS` and complex leaves are kept unquantized, in float32 (the
  compute dtype).
- ``"q4"`` (`Q4`): the same, with 4-bit codes (``jnp.int4``, stored two per byte) and blocks
  of at most `BLOCK_Q4` = 128 elements (same sharding rule; twice the scales per element of
  8-bit: 0.5 + 4/128 = 0.53 bytes per element instead of 1.02). First moments use zero and
  ``±{1/32, 1/16, 1/8, 1/4, 3/8, 5/8, 1}`` of the block scale (int4 -7..7; -8 is never
  written and reads as -1), second moments the sixteen powers of two ``2^-15 .. 2^0``, no
  zero (int4 ``c`` = -8..7 standing for ``2^(c - 7)``, in a `QuantizedArrayUnsigned4`: both
  codes are int4 because checkpoints cannot hold uint4: orbax's tensorstore writer refuses
  the type). The optimizers' moments are rounded stochastically to one of the two codes
  around each value (unbiased; the random bits from the stream described below), because to
  nearest a moving average freezes: with ``b`` = 0.9-0.99 an entry moves by 1-10% per step,
  below the 25-60% gaps between 4-bit codes (Lion's and Muon's q4 momenta ended the char LM
  benchmark +0.33 and +0.39 above float32). Below the smallest nonzero code, the nearest
  code still (a first moment far below 1/32 of its block, rounded up to 1/32 at random, would
  be multiplied by up to 64 before Adam divides it by its own second moment).
  `quantize_blockwise` rounds to the nearest code unless given a seed, ties to the smaller
  magnitude as in 8-bit: the signed code counts the midpoints below ``|y|`` (seven
  compares), the unsigned one rounds the float's bits like the 8-bit code with no mantissa
  bit left; decoding is a chain of seven selects (signed) or a shift of the exponent
  (unsigned), no table lookup. On a CPU, XLA writes int4 arrays slowly (about 4.6 ns per
  element, 20x an int8 array): a step with 4-bit moments measured 17x the float32 step.
  Why these codes:

  * signed: on blocks of 128 Gaussian, Student-t (3 degrees of freedom) and log-uniformly
    scaled Gaussian samples divided by their block maximum, the uniform code ``k/7`` has the
    smallest mean squared error on Gaussian blocks (1.7e-3) but rounds 16-40% of the entries
    to zero and misses entries a decade below the maximum by 40-60% (root mean square
    relative error of the entries above 1/64 of the maximum); powers of two ``2^-6 .. 1``
    have the best relative error (0.20) but the worst squared error (4.8e-3 Gaussian, 2.2e-3
    log-scaled). The chosen code keeps powers of two from 1/32 to 1/4 (the relative
    resolution of the entries well below the maximum, 4-10% rounded to zero) and splits the
    top binades at 3/8 and 5/8, where a Gaussian block's entries lie: squared error 2.5e-3
    (Gaussian), 1.0e-3 (Student-t), 1.3e-3 (log-scaled), relative error 0.19-0.23, within
    1.5x of the best squared error and 1.2x of the best relative error of the candidates
    measured (with a scale 1.3x above the maximum, as `ema_bound` can give, the same order).
    Its midpoints (1/64, 3/64, 3/32, 3/16, 5/16, 1/2, 13/16) are exact float32 numbers, so
    the compares round to nearest exactly.
  * unsigned: a second moment's values span the squares of the gradients' range, so range
    matters more than resolution: the powers of two reach ``2^-15`` (gradients 180x below the
    block's largest) and overestimate anything smaller (the safe direction: a smaller
    step). The relative error of a stored value is at most 1/3 (at most 1/5 after the square
    root Adam takes).

The randomness of stochastic rounding is a counter-based stream: a hash of the element's
index within its leaf and of a seed that hashes the step count, the leaf's index and the
stored quantity. There is no key to thread, a resumed run rounds as the uninterrupted one did,
and the bits of an element do not depend on how the array is sharded.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlx_optax._src import common

#: The dtype-like value that selects 8-bit block-wise quantized storage.
Q8 = "q8"
#: The dtype-like value that selects 4-bit block-wise quantized storage.
Q4 = "q4"
#: The quantized storages and their code widths in bits.
_STORAGE_BITS = {Q8: 8, Q4: 4}
#: The most elements per quantization block of 8-bit codes (along the last axis; `block_size`).
BLOCK = 256
#: The most elements per quantization block of 4-bit codes (coarser codes, so more scales).
BLOCK_Q4 = 128
#: Below this size a block would cost more in scales than it saves: `block_size` falls back
#: to blocks of the cap (the last one shorter).
_MIN_BLOCK = 32
#: Leaves with fewer elements are kept unquantized (float32).
MIN_QUANTIZED_SIZE = 4096
#: Leaves whose last axis is shorter are kept unquantized (float32): one float32 scale per
#: row of fewer than 8 elements would cost more than it saves.
MIN_QUANTIZED_LAST_AXIS = 8

# Streams of the stochastic rounding: one per stored quantity, so that two moments of one
# leaf never share random bits.
SALT_MU, SALT_NU, SALT_PARAMS = 1, 2, 3
_BASE_SEED = 0x5EED


# --------------------------------------------------------------------------- the codes

# The code values are float32 numbers read off the float's bits, so that encoding is an
# integer rounding of the bits and decoding a few shifts and adds (no table, no search, no
# transcendental function).
#
# First moments (int8, sign and magnitude ``c`` in 0..127): zero, 1.0 (``c = 127``) and,
# below 1, binades with fewer values the further they lie below the block scale, as in the
# dynamic code of Dettmers et al. (https://arxiv.org/abs/2110.02861): tier ``t`` = 0..3
# holds 32 values in ``2^t`` binades, ``2^(5-t)`` evenly spaced values per binade (the
# binade below 1 has 32, the next two 16 each, the next four 8, the next eight 4, down to
# ``1.5 * 2^-15``).
# Second moments (uint8, 256 values, no zero): 5 exponent and 3 mantissa bits, values
# ``2^e (1 + k/8)`` from ``1.125 * 2^-32`` to 1: a second moment needs range (its values
# span the squares of the gradients' range) more than resolution near the top (its square
# root halves relative errors).
_SIGNED_TOP = 127  # the code of 1.0
_UNSIGNED_SHIFT = 20
_ONE_BITS = 0x3F800000  # float32 1.0
#: ``c + offset`` is the top of the float32 bits of the value of the unsigned code ``c``;
#: the largest code, 255, is 1.0.
_UNSIGNED_OFFSET = (_ONE_BITS >> _UNSIGNED_SHIFT) - 255


def _bits_value(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, np.int32).view(np.float32)


def _signed_magnitudes_numpy() -> np.ndarray:
    """The 127 positive values of the signed code, ascending, built binade by binade."""
    values = [1.0]
    for t in range(4):
        width = 5 - t
        for binade in range(2**t - 1, 2 ** (t + 1) - 1):  # below 1: [2^-(b+1), 2^-b)
            k = np.arange(2**width - 1, -1, -1)
            values.extend(2.0 ** -(binade + 1) * (1 + k / 2**width))
    return np.array(values[:_SIGNED_TOP][::-1], np.float64)


@functools.cache
def signed_code() -> np.ndarray:
    """The 255 values of the signed code for first moments: ``0`` and ``±`` 127 magnitudes
    from ``1.5 * 2^-15`` (4.6e-5) to 1 of the block scale, 32 per binade just below 1, 16 in
    each of the next two binades, 8 in each of the next four and 4 in each of the next
    eight; ascending, float32. Stored as int8 ``c`` meaning ``code[c + 127]``."""
    pos = _signed_magnitudes_numpy()
    out = np.concatenate([-pos[::-1], [0.0], pos]).astype(np.float32)
    assert np.array_equal(out, np.concatenate([-pos[::-1], [0.0], pos]))  # exact in float32
    return out


@functools.cache
def unsigned_code() -> np.ndarray:
    """The 256 values of the unsigned code for second moments: magnitudes ``2^e (1 + k/8)``
    from ``1.125 * 2^-32`` (2.6e-10) to 1 of the block scale (5 exponent and 3 mantissa
    bits), **without zero** (a second moment rounded to zero would turn
    ``m / (sqrt(v) + eps)`` into ``m / eps``); ascending, float32. Stored as uint8."""
    return _bits_value((np.arange(256) + _UNSIGNED_OFFSET) << _UNSIGNED_SHIFT)


#: The smallest nonzero magnitude of the signed code.
_SIGNED_SMALLEST = float(signed_code()[128])
#: The largest float32 below 1.
_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


# 4-bit codes. Signed (int4, sign and magnitude 0..7): the values below; the encoder counts
# the midpoints below |y| (all exact float32 numbers, so the compares are exact), the decoder
# selects. Unsigned (no zero, held in int4 as c - 8): 2^(c - 15), the float's exponent alone,
# so encoding is the 8-bit unsigned rounding with no mantissa bit kept.
_SIGNED4_MAGNITUDES = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 5 / 8, 1.0)
_SIGNED4_MIDPOINTS = tuple(
    (a + b) / 2 for a, b in zip(_SIGNED4_MAGNITUDES, _SIGNED4_MAGNITUDES[1:], strict=False)
)
_UNSIGNED4_SHIFT = 23
#: ``c + offset`` is the float32 exponent field of the value of the stored (int4) unsigned
#: code ``c``; the largest code, 7, is 1.0.
_UNSIGNED4_OFFSET = (_ONE_BITS >> _UNSIGNED4_SHIFT) - 7


@functools.cache
def signed_code_4bit() -> np.ndarray:
    """The 15 values of the signed 4-bit code for first moments: ``0`` and
    ``±{1/32, 1/16, 1/8, 1/4, 3/8, 5/8, 1}`` of the block scale; ascending, float32. Stored
    as int4 ``c`` in -7..7 meaning ``code[c + 7]``."""
    pos = np.array(_SIGNED4_MAGNITUDES[1:], np.float32)
    return np.concatenate([-pos[::-1], [0.0], pos]).astype(np.float32)


@functools.cache
def unsigned_code_4bit() -> np.ndarray:
    """The 16 values of the unsigned 4-bit code for second moments: ``2^-15 .. 2^0`` of the
    block scale, **without zero**; ascending, float32. Stored as int4 ``c`` in -8..7 meaning
    ``code[c + 8]`` (in a `QuantizedArrayUnsigned4`)."""
    return _bits_value((np.arange(-8, 8) + _UNSIGNED4_OFFSET) << _UNSIGNED4_SHIFT)


def _is_4bit(dtype: Any) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(jnp.int4)


def _cap(bits: int) -> int:
    """The block cap of `bits`-bit codes."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return BLOCK_Q4 if bits == 4 else BLOCK


def _log2_int(n: jax.Array) -> jax.Array:
    """``floor(log2(n))`` of int32 ``n`` in [1, 2^24) (its float32 exponent)."""
    f = jax.lax.bitcast_convert_type(n.astype(jnp.float32), jnp.int32)
    return (f >> 23) - 127


class QuantizedArray(NamedTuple):
    """An array stored as 8- or 4-bit codes with one float32 scale per block of the last axis.

    `codes` has the array's shape: int8 for the signed code (first moments), uint8 for the
    unsigned one (second moments), int4 for both 4-bit codes (the unsigned one in the
    subclass `QuantizedArrayUnsigned4`); 4-bit codes are stored two per byte, although
    ``codes.nbytes`` counts one byte per element. `scale` has shape
    ``shape[:-1] + (ceil(shape[-1] / B),)`` with ``B = block_size(shape[-1], cap)`` (cap
    `BLOCK` for 8-bit codes, `BLOCK_Q4` for 4-bit ones): an upper bound of the magnitudes
    of each block of the last axis (a block never crosses a shard boundary of a sharding
    along any other axis, nor of a power-of-two sharding of the last axis whose shards hold
    whole blocks).
    The value of an element is ``code[c] * scale[block]``, and ``c`` is the code nearest to
    ``min(|x| / scale, 1)`` (with the sign of ``x``). A pytree of two arrays (jit,
    checkpoints and `optax.tree` utilities see them as leaves).
    """

    codes: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def signed(self) -> bool:
        return self.codes.dtype in (jnp.dtype(jnp.int8), jnp.dtype(jnp.int4))

    @property
    def bits(self) -> int:
        """The code width: 8 or 4."""
        return 4 if _is_4bit(self.codes.dtype) else 8


class QuantizedArrayUnsigned4(QuantizedArray):
    """A `QuantizedArray` of the unsigned 4-bit code (second moments under ``"q4"``): int4
    ``c`` in -8..7 standing for ``2^(c - 7)`` of the block scale. The class, not the dtype,
    says the code is unsigned: checkpoints cannot hold uint4."""

    __slots__ = ()

    @property
    def signed(self) -> bool:
        return False


def _quantized(codes: jax.Array, scale: jax.Array, signed: bool) -> QuantizedArray:
    if _is_4bit(codes.dtype) and not signed:
        return QuantizedArrayUnsigned4(codes=codes, scale=scale)
    return QuantizedArray(codes=codes, scale=scale)


def _signed4_magnitude(m: jax.Array) -> jax.Array:
    """The float32 value of the signed 4-bit magnitude index `m` (int32, 0..8; 8 reads as 7)."""
    value = jnp.zeros(m.shape, jnp.float32)
    for k, v in enumerate(_SIGNED4_MAGNITUDES[1:], start=1):
        value = jnp.where(m >= k, jnp.float32(v), value)
    return value


def _encode4(y: jax.Array, signed: bool, noise: Any = None) -> jax.Array:
    """`_encode` with the 4-bit codes: to nearest, or, with `noise` (uint32 random bits of
    ``y``'s shape), stochastically to one of the two codes around ``y`` (unbiased: the upper
    one with probability ``(|y| - lower) / (upper - lower)``). Below the smallest nonzero
    code the nearest code still (the signed code's 0 or 1/32, the unsigned code's smallest):
    rounding an entry far below 1/32 of its block up to 1/32 at random would multiply it by
    up to 64, and Adam divides a first moment by its own, possibly as small, second moment."""
    if not signed:
        bits = jax.lax.bitcast_convert_type(jnp.minimum(y, 1.0), jnp.int32)
        if noise is None:
            add = (1 << (_UNSIGNED4_SHIFT - 1)) - 1
        else:  # a carry out of the mantissa, with probability the mantissa's fraction
            add = (noise >> (32 - _UNSIGNED4_SHIFT)).astype(jnp.int32)
        c = ((bits + add) >> _UNSIGNED4_SHIFT) - _UNSIGNED4_OFFSET
        return jnp.clip(c, -8, 7).astype(jnp.int4)
    a = jnp.abs(y)
    if noise is None:
        c = sum((a > t).astype(jnp.int32) for t in _SIGNED4_MIDPOINTS)
    else:
        a = jnp.minimum(a, 1.0)
        c = sum((a >= v).astype(jnp.int32) for v in _SIGNED4_MAGNITUDES[1:])  # the lower code
        lower, upper = _signed4_magnitude(c), _signed4_magnitude(c + 1)
        u = (noise >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # uniform in [0, 1)
        up = jnp.where(c == 0, a > _SIGNED4_MIDPOINTS[0], u * (upper - lower) < a - lower)
        c = c + up.astype(jnp.int32)
    return jnp.where(y < 0, -c, c).astype(jnp.int4)


def _decode4(codes: jax.Array, signed: bool) -> jax.Array:
    """`_decode` of int4 `codes`."""
    c = codes.astype(jnp.int32)
    if not signed:
        return jax.lax.bitcast_convert_type(
            (c + _UNSIGNED4_OFFSET) << _UNSIGNED4_SHIFT, jnp.float32
        )
    value = _signed4_magnitude(jnp.abs(c))  # -8 reads as -1
    bits = jax.lax.bitcast_convert_type(value, jnp.int32) | (c & jnp.int32(-(2**31)))
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _encode(y: jax.Array, signed: bool, bits: int = 8, noise: Any = None) -> jax.Array:
    """The nearest code (ties to the smaller magnitude) of float32 ``y`` clipped to [-1, 1].

    Within a binade the code values are evenly spaced, so adding half a code step less one
    to the float's bits and dropping the bits below the code's resolution rounds to
    nearest; a carry out of the mantissa lands on the next binade's first value, which is
    the next code. Below the smallest code the signed code picks zero or the smallest code,
    the unsigned one (no zero) the smallest code. `bits` = 4: `_encode4`.
    """
    if bits == 4:
        return _encode4(y, signed, noise)
    if not signed:
        bits = jax.lax.bitcast_convert_type(jnp.minimum(y, 1.0), jnp.int32)
        c = ((bits + ((1 << (_UNSIGNED_SHIFT - 1)) - 1)) >> _UNSIGNED_SHIFT) - _UNSIGNED_OFFSET
        return jnp.maximum(c, 0).astype(jnp.uint8)
    # |y| below 1 (1 itself is the carry out of the largest float below it)
    a = jnp.minimum(jnp.abs(y), _BELOW_ONE)
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)
    # binade b: a in [2^-(b+1), 2^-b); tier t = floor(log2(b + 1)) keeps 5 - t mantissa
    # bits; binades from 15 on (tier 4) lie below the smallest code
    tier = _log2_int(jnp.minimum(127 - (bits >> 23), 16))
    # the bits rounded to 5 - t mantissa bits, as an index that counts 2^(5-t) per binade,
    # less the index of 1.0 at that resolution: the codes of tier t run from 1.0 downwards
    # 32 per tier (the constant puts 1.0 at 127)
    rounded = (bits + (jnp.left_shift(1 << 17, tier) - 1)) >> (18 + tier)
    c = rounded - jnp.right_shift(4096, tier) - 32 * tier + 159
    c = jnp.maximum(c, (a + a > _SIGNED_SMALLEST).astype(jnp.int32))  # zero or the smallest
    return jnp.where(y < 0, -c, c).astype(jnp.int8)


def _decode(codes: jax.Array, signed: bool = True) -> jax.Array:
    """The float32 code values of int8 (signed) or uint8 (unsigned) `codes`, or of int4
    `codes` of the code `signed` says (exact)."""
    if _is_4bit(codes.dtype):
        return _decode4(codes, signed)
    c = codes.astype(jnp.int32)
    if codes.dtype != jnp.int8:
        return jax.lax.bitcast_convert_type((c + _UNSIGNED_OFFSET) << _UNSIGNED_SHIFT, jnp.float32)
    m = jnp.abs(c)
    # the encoder's index inverted; a tier's first value (0.5, 0.125, 2^-7) is also the
    # carry of the tier below, so either tier gives its bits
    tier = (_SIGNED_TOP - m) >> 5
    bits = (m + jnp.right_shift(4096, tier) + 32 * tier - 159) << (18 + tier)
    # zero, and the sign bit of the code as the float's (a select of -v was 1.4x slower)
    bits = jnp.where(m == 0, 0, bits) | (c & jnp.int32(-(2**31)))
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@functools.cache
def block_size(last: int, cap: int = BLOCK) -> int:
    """Elements per quantization block of a last axis of `last` elements, at most `cap`
    (`BLOCK` for 8-bit codes, `BLOCK_Q4` for 4-bit ones; ``B`` below).

    `last` halved while it is above `cap` and even; an odd part still above `cap` is
    divided by its smallest factor that brings it to at most `cap` (blocks of `cap`, the
    last one shorter, when no such factor leaves `_MIN_BLOCK` or more). So ``last = B 2^k d``
    (``d`` odd, 1 unless the odd part of `last` exceeds `BLOCK`), blocks start at multiples
    of ``B``, and a shard boundary of the last axis split into ``2, 4, ..., 2^k`` equal parts
    (at multiples of ``B d 2^(k-j)``) is always a block boundary: tensor-parallel shardings
    of power-of-two sizes whose shards hold ``B d`` or more elements keep whole blocks, with
    no knowledge of the mesh. For example, with ``cap = 256``: 768 -> blocks of 192 (2 or 4
    shards), 1024 -> 256 (2 or 4), 4096 -> 256 (up to 16), 300 -> 150 (2), 200 -> 200 (a
    single block); with ``cap = 128``: 768 -> 96, 4096 -> 128 (up to 32), 300 -> 75.
    """
    b = last
    while b > cap and b % 2 == 0:
        b //= 2
    if b <= cap:
        return b
    for d in range(3, b // _MIN_BLOCK + 1, 2):
        if b % d == 0 and b // d <= cap:
            return b // d
    return cap


def _blocks(x: jax.Array, cap: int = BLOCK) -> tuple[jax.Array, int]:
    """`x` reshaped to ``(..., n_blocks, block_size)`` (zero-padded along the last axis when
    the blocks do not divide it)."""
    last = x.shape[-1]
    size = block_size(last, cap)
    nb = -(-last // size)
    pad = nb * size - last
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], nb, size), last


def _unblocks(b: jax.Array, last: int) -> jax.Array:
    return b.reshape(*b.shape[:-2], -1)[..., :last]


def block_absmax(x: jax.Array, cap: int = BLOCK) -> jax.Array:
    """The largest magnitude of each block of `x` (float32, the shape of a scale)."""
    b, _ = _blocks(jnp.asarray(x, jnp.float32), cap)
    return jnp.max(jnp.abs(b), axis=-1)


def quantize_blockwise(
    x: jax.Array, signed: bool, scale: Any = None, *, bits: int = 8, seed: Any = None
) -> QuantizedArray:
    """`x` (real, at least 1-d) to the nearest code of its block-scaled value.

    `bits` = 8: int8 / uint8 codes, blocks of at most `BLOCK`; 4: int4 codes (the unsigned
    ones in a `QuantizedArrayUnsigned4`), blocks of at most `BLOCK_Q4` (the codes are
    described in this module's docstring). `seed` (4-bit codes only): round stochastically
    to one of the two codes around each scaled value instead, unbiased, with the random bits
    of `random_bits` (``x``'s shape, `seed`): what the optimizers' 4-bit moments do.

    The scale of a block is its largest magnitude (0 for an all-zero block, which then
    dequantizes to exact zeros), or `scale` when given (an upper bound of the block's
    magnitudes; larger magnitudes get the largest code). Each element gets the code nearest
    to ``min(|x| / scale, 1)`` with the sign of ``x`` (ties to the smaller magnitude; the
    quotient is ``x`` times the float32 reciprocal of the scale).
    """
    cap = _cap(bits)
    if seed is not None and bits != 4:
        raise ValueError("seed (stochastic rounding) is for 4-bit codes only")
    x32 = jnp.asarray(x, jnp.float32)
    b, last = _blocks(x32, cap)
    if scale is None:
        scale = jnp.max(jnp.abs(b), axis=-1)
    scale = jnp.asarray(scale, jnp.float32)
    inverse = 1 / jnp.where(scale > 0, scale, 1.0)
    noise = None if seed is None else _blocks(random_bits(x32.shape, seed), cap)[0]
    codes = _encode(b * inverse[..., None], signed, bits, noise)
    return _quantized(_unblocks(codes, last), scale, signed)


def dequantize_blockwise(q: QuantizedArray) -> jax.Array:
    """The float32 array `q` stands for (the code values computed, not looked up)."""
    values, last = _blocks(_decode(jnp.asarray(q.codes), q.signed), _cap(q.bits))
    return _unblocks(values * jnp.asarray(q.scale, jnp.float32)[..., None], last)


def stored_absmax(q: QuantizedArray) -> jax.Array:
    """The largest magnitude `q` stands for in each block: the value of its largest code
    times the scale (a reduction over the 8- or 4-bit codes only)."""
    codes = jnp.asarray(q.codes)
    if q.bits == 4:  # reduced as int8 (the 4-bit type has no arithmetic of its own)
        codes = codes.astype(jnp.int8)
    codes, _ = _blocks(codes, _cap(q.bits))
    # a signed block's largest magnitude as max(max c, -min c): XLA's CPU backend reduces
    # |c| of int8 codes 6x slower than their plain maximum and minimum (0.19 ms against
    # 0.03 for a 1024 x 1024 moment); the codes never hold the one value -c cannot (-128)
    top = jnp.max(codes, axis=-1)
    if q.signed:
        top = jnp.maximum(top, -jnp.min(codes, axis=-1))
    return _decode(top.astype(q.codes.dtype), q.signed) * jnp.asarray(q.scale, jnp.float32)


def ema_bound(stored: Any, decay: Any, weight: Any, increment: jax.Array) -> Any:
    """The scale for a moment updated as ``decay * old + weight * x``, without a pass over
    the new moment: ``|decay| * (largest stored magnitude) + |weight| * (largest |x|)`` per
    block, an upper bound of the new block's magnitudes (up to float32 rounding, which the
    encoder's clip to 1 absorbs). `increment` is ``x`` (its block maxima are taken over the
    blocks of `stored`). None when `stored` is not quantized."""
    if not isinstance(stored, QuantizedArray):
        return None
    decay = jnp.abs(jnp.asarray(decay, jnp.float32))
    weight = jnp.abs(jnp.asarray(weight, jnp.float32))
    return decay * stored_absmax(stored) + weight * block_absmax(increment, _cap(stored.bits))


def quantized_like(p: Any, signed: bool, bits: int = 8) -> QuantizedArray:
    """The all-zero quantized state of the shape of `p` (`bits`-bit codes)."""
    shape = tuple(p.shape)
    nb = -(-shape[-1] // block_size(shape[-1], _cap(bits)))
    dtype = jnp.int4 if bits == 4 else (jnp.int8 if signed else jnp.uint8)
    return _quantized(jnp.zeros(shape, dtype), jnp.zeros(shape[:-1] + (nb,), jnp.float32), signed)


# --------------------------------------------------------------------------- rounding


def _mix(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash (xor-shift / multiply rounds with constants of low
    bias, after C. Wellons' hash-prospector search): consecutive inputs give unrelated
    outputs."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _round_key(step: Any, leaf: int, salt: int) -> jax.Array:
    """The uint32 seed of the stream of (`step`, `leaf`, `salt`)."""
    seed = _mix(jnp.uint32(_BASE_SEED) ^ jnp.uint32(salt))
    seed = _mix(seed + jnp.uint32(leaf))
    return _mix(seed + jnp.asarray(step).astype(jnp.uint32))


def random_bits(shape: tuple[int, ...], seed: Any) -> jax.Array:
    """uint32 bits of `shape`, element ``i`` (row-major index) a hash of ``i`` and `seed`:
    the same for the same seed on every backend and under every sharding."""
    n = math.prod(shape)
    index = jax.lax.iota(jnp.uint32, n).reshape(shape)
    seed = jnp.asarray(seed).astype(jnp.uint32)
    return _mix(index * jnp.uint32(0x9E3779B9) + seed)


def stochastic_round(x: jax.Array, dtype: Any = jnp.bfloat16, *, seed: Any = 0) -> jax.Array:
    """`x` (float32) rounded to `dtype` (bfloat16) up or down at random, unbiased:
    ``E[result] = x`` for every finite `x` within `dtype`'s range.

    Adds 16 random bits below bfloat16's last mantissa bit and truncates: the result rounds
    away from zero with probability equal to the dropped fraction. Non-finite values are
    rounded to nearest (they stay what they are). Other target dtypes: a plain cast.

    Args:
      x: a float32 array.
      dtype: the target dtype (bfloat16 is rounded stochastically).
      seed: an integer (or uint32 scalar) selecting the random stream: the same seed gives
        the same bits.

    Returns:
      `x` in `dtype`.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> x = jnp.full(10_000, 1.0 + 2.0**-10)  # 1/8 of the way from 1 to the next bfloat16
      >>> r = rlx_optax.stochastic_round(x, jnp.bfloat16, seed=0)
      >>> sorted({float(v) for v in r})
      [1.0, 1.0078125]
      >>> round(float(r.astype(jnp.float32).mean()), 3)
      1.001
    """
    dtype = jnp.dtype(dtype)
    x = jnp.asarray(x)
    if dtype != jnp.bfloat16 or x.dtype != jnp.float32:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = random_bits(x.shape, seed) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    sr = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
    return jnp.where(jnp.isfinite(x), sr, x.astype(jnp.bfloat16))


# --------------------------------------------------------------------------- storage


def _inexact_dtype(value: Any, kind: Any = jnp.inexact) -> Any:
    """`value` as a dtype of `kind`, or None when it is not one."""
    try:
        dt = jnp.dtype(value)
    except TypeError:
        return None
    return dt if jnp.issubdtype(dt, kind) else None


def is_quantized_storage(value: Any) -> bool:
    """Whether a state dtype argument selects block-wise quantized storage (`Q8` or `Q4`)."""
    return isinstance(value, str) and value in _STORAGE_BITS


def check_storage(name: str, value: Any) -> None:
    """A state dtype argument: None, `Q8`, `Q4`, or a floating dtype."""
    if value is None or is_quantized_storage(value):
        return
    if _inexact_dtype(value) is None:
        raise ValueError(
            f"{name} must be None (the parameter dtype), a floating dtype such as "
            f"jnp.bfloat16, {Q8!r} (8-bit block-wise quantized) or {Q4!r} (4-bit block-wise "
            f"quantized), got {value!r}"
        )


def quantizes(p: Any) -> bool:
    """True when a leaf like `p` is quantized under `Q8` or `Q4`."""
    dt = jnp.dtype(p.dtype)
    return (
        jnp.issubdtype(dt, jnp.floating)
        and len(p.shape) >= 1
        and math.prod(p.shape) >= MIN_QUANTIZED_SIZE
        and p.shape[-1] >= MIN_QUANTIZED_LAST_AXIS
    )


def init_leaf(p: Any, storage: Any, signed: bool) -> Any:
    """The zero state of one leaf like `p` stored as `storage`."""
    if is_quantized_storage(storage):
        if quantizes(p):
            return quantized_like(p, signed, _STORAGE_BITS[storage])
        return jnp.zeros(p.shape, common.compute_dtype(p.dtype))
    return jnp.zeros_like(p, dtype=storage or p.dtype)


def init_tree(params: Any, storage: Any, signed: bool) -> Any:
    """`init_leaf` over a tree; `None` leaves stay `None`."""
    if storage is None:
        return common.zeros_like_tree(params)
    return jax.tree.map(lambda p: init_leaf(p, storage, signed), params)


def read(stored: Any, dtype: Any) -> jax.Array:
    """A stored leaf in `dtype` (the compute dtype)."""
    if isinstance(stored, QuantizedArray):
        return dequantize_blockwise(stored).astype(dtype)
    return stored.astype(dtype)


def write(
    value: jax.Array,
    stored: Any,
    *,
    stochastic: bool = False,
    step: Any = None,
    leaf: int = 0,
    salt: int = 0,
    bound: Any = None,
) -> Any:
    """`value` (compute dtype) stored like `stored` (the previous state of this leaf).

    Quantized stays quantized with the same code, scaled by `bound` (from `ema_bound`) when
    given, else by the block maxima of `value` (one more pass over it); 4-bit codes are
    rounded stochastically from the stream of (`step`, `leaf`, `salt`) whatever
    `stochastic` says (to nearest only without a `step`); a narrower float
    dtype is rounded to nearest, or stochastically (bfloat16 only) with `stochastic`, from
    the stream of (`step`, `leaf`, `salt`).
    """
    if isinstance(stored, QuantizedArray):
        seed = None
        if stored.bits == 4 and step is not None:  # 4-bit moments: always stochastic
            seed = _round_key(step, leaf, salt)
        return quantize_blockwise(value, stored.signed, bound, bits=stored.bits, seed=seed)
    dtype = stored.dtype
    if stochastic and dtype == jnp.bfloat16 and value.dtype == jnp.float32:
        return stochastic_round(value, dtype, seed=_round_key(step, leaf, salt))
    return value.astype(dtype)


def leaf_indices(tree: Any) -> Any:
    """A tree like `tree` whose leaves (empty places kept empty) are their flat indices: the
    `leaf` argument of `write`, the same in every step."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=common.is_empty)
    return treedef.unflatten([x if common.is_empty(x) else i for i, x in enumerate(leaves)])


# --------------------------------------------------------------------------- apply_updates


def apply_updates_stochastic(params: Any, updates: Any, step: Any) -> Any:
    """`optax.apply_updates` that rounds bfloat16 parameters stochastically.

    Each parameter is updated in float32 (``p + u``) and rounded back to its dtype: bfloat16
    leaves stochastically (unbiased, so updates far below a bfloat16 ulp still move the
    parameter on average instead of vanishing), others as `optax.apply_updates` does. The
    random bits come from `step` (an integer, for example the optimizer's step count) and the
    leaf's position: the same step gives the same bits, so a resumed run reproduces them.

    Args:
      params: the parameters (a pytree; `None` leaves pass through).
      updates: the updates, a pytree of the parameters' structure.
      step: an int or int32 scalar, different at every step.

    Returns:
      The new parameters, each in its own dtype.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> p = {"w": jnp.ones(4, jnp.bfloat16)}
      >>> u = {"w": jnp.full(4, 1e-3)}  # 1/8 of a bfloat16 ulp at 1.0
      >>> rlx_optax.apply_updates_stochastic(p, u, step=0)["w"].dtype
      dtype(bfloat16)
    """
    index = leaf_indices(params)

    def one(p, u, i):
        p = jnp.asarray(p)
        if p.dtype == jnp.bfloat16:
            new = p.astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)
            return stochastic_round(new, p.dtype, seed=_round_key(step, i, SALT_PARAMS))
        return jnp.asarray(p + u).astype(p.dtype)

    return common.tree_map_none(one, params, updates, index)


# --------------------------------------------------------------------------- preconditioners


def check_precond_dtype(name: str, dtype: Any) -> Any:
    """A floating storage dtype for preconditioner matrices (or None); 8- and 4-bit codes are
    refused (eigenbases and triangular factors do not survive them)."""
    if dtype is None:
        return None
    resolved = _inexact_dtype(dtype, jnp.floating)
    if resolved is None:
        raise ValueError(
            f"{name} must be a floating dtype such as jnp.bfloat16 (the preconditioner's "
            f"storage; it is computed in float32), got {dtype!r}"
        )
    return resolved


def widened(matrices: Any, dtype: Any) -> Any:
    """A tuple of stored matrices (None kept) in the compute dtype `dtype`."""
    return tuple(None if m is None else m.astype(dtype) for m in matrices)
