"""Optimizer state below float32: 8-bit block-wise quantized moments and stochastic rounding.

One mechanism for every element-wise family. A moment's storage is chosen by a dtype-like
argument (`mu_dtype`, `nu_dtype`, `accumulator_dtype`):

- ``None``: the parameter dtype (the default; the numbers are those of a float32 state);
- a floating dtype (``jnp.bfloat16``, ``jnp.float32``): stored in it; a float32 result rounded
  into bfloat16 either to nearest or, with ``stochastic_rounding=True``, stochastically;
- ``"q8"`` (`Q8`): 8-bit codes plus one float32 scale per block of `BLOCK` elements along the
  last axis (`QuantizedArray`). First moments use a signed dynamic code, second moments an
  unsigned dynamic code without zero. Leaves under `MIN_QUANTIZED_SIZE` elements, leaves
  whose last axis is shorter than `MIN_QUANTIZED_LAST_AXIS` and complex leaves are kept
  unquantized, in float32 (the compute dtype).

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
#: Elements per quantization block (along the last axis).
BLOCK = 256
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

#: Octaves per group of the dynamic codes: group ``j`` spans a factor ``2**3 = 8``.
_GROUP_OCTAVES = 3
_SIGNED_GROUPS, _UNSIGNED_GROUPS = 7, 8


def _dynamic_magnitudes(groups: int) -> np.ndarray:
    """Positive code values in (0, 1], ascending, 1.0 included; exact in float32.

    Group ``j`` (0 = smallest) spans ``(8^(j-G), 8^(j-G+1)]`` (``G`` = `groups`) and holds
    ``n = 2^j`` evenly spaced values ``8^(j-G) (1 + 7k/n)``, ``k = 1..n``: coarse where values
    are tiny, fine near the block maximum (the dynamic code of Dettmers et al.,
    https://arxiv.org/abs/2110.02861, with groups of three octaves instead of decades, so that
    every value is a float32 and the nearest one is found with exact arithmetic).
    """
    values = []
    for j in range(groups):
        n = 2**j
        k = np.arange(1, n + 1)
        values.append(2.0 ** (_GROUP_OCTAVES * (j - groups)) * (1 + 7 * k / n))
    out = np.concatenate(values)
    assert np.all(np.diff(out) > 0) and np.array_equal(out, out.astype(np.float32))
    return out


@functools.cache
def signed_code() -> np.ndarray:
    """The 255 values of the signed code for first moments: ``0``, and ``±`` 127 dynamic
    magnitudes down to ``8^-6`` (3.8e-6) of the block maximum; ascending, float32. Stored as
    int8 ``c`` meaning ``code[c + 127]``."""
    pos = _dynamic_magnitudes(_SIGNED_GROUPS)  # 127 values
    return np.concatenate([-pos[::-1], [0.0], pos]).astype(np.float32)


@functools.cache
def unsigned_code() -> np.ndarray:
    """The 255 values of the unsigned code for second moments: 255 dynamic magnitudes from
    ``8^-7`` (4.8e-7) to 1 of the block maximum, **without zero** (a second moment rounded
    to zero would turn ``m / (sqrt(v) + eps)`` into ``m / eps``); ascending, float32. Stored
    as uint8."""
    return _dynamic_magnitudes(_UNSIGNED_GROUPS).astype(np.float32)


class QuantizedArray(NamedTuple):
    """An array stored as 8-bit codes with one float32 scale per block of `BLOCK` elements.

    `codes` has the array's shape: int8 for the signed code (first moments), uint8 for the
    unsigned one (second moments). `scale` has shape ``shape[:-1] + (ceil(shape[-1] /
    BLOCK),)``: the largest magnitude of each block of the last axis, so that a block never
    crosses a shard boundary of a sharding along any axis but the last. The value of an
    element is ``code[c] * scale[block]``. A pytree of two arrays (jit, checkpoints and
    `optax.tree` utilities see them as leaves).
    """

    codes: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def signed(self) -> bool:
        return self.codes.dtype == jnp.int8


def _pow2(e: jax.Array) -> jax.Array:
    """``2.0 ** e`` (float32, exact) for int32 ``e`` in the normal range."""
    return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def _nearest_magnitude(a: jax.Array, groups: int, zero: bool) -> jax.Array:
    """The index into ``[0] + dynamic`` (when `zero`) or the dynamic magnitudes of `groups`
    groups of the value nearest to each float32 ``a`` in [0, 1] (ties to the smaller).

    No search: the float's exponent gives the group ``j``; scaled by a power of two into
    ``[1, 8)`` (exact), the group's values are the grid ``1 + 7k/n`` and ``x = (a' - 1) n``
    is exact, so ``k0 = floor(x / 7)`` (possibly one too small next to a grid point) and one
    exact comparison ``2x > 7 (2 k0 + 1)`` (the midpoint) pick the nearest ``k``. About 25
    vector operations per element, no table lookup.
    """
    g3 = _GROUP_OCTAVES * groups
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)
    octave = jnp.clip((bits >> 23) - 127 + g3, 0, g3 - 1)  # the clip puts a = 1 in the top group
    j = octave // _GROUP_OCTAVES
    scaled = jax.lax.bitcast_convert_type(
        bits + ((g3 - _GROUP_OCTAVES * j) << 23), jnp.float32
    )  # a 8^(G-j): in [1, 8] for j >= 1
    n = jnp.left_shift(1, j)
    x = (scaled - 1) * n.astype(jnp.float32)
    k0 = jnp.clip(jnp.floor(x * np.float32(1 / 7)).astype(jnp.int32), 0, n - 1)
    up = (x + x) > (14 * k0 + 7).astype(jnp.float32)
    index = n - 2 + k0 + up.astype(jnp.int32) + (1 if zero else 0)
    # group 0 (a below the smallest code): zero or the smallest code, whichever is nearer
    smallest = np.float32(2.0 ** (_GROUP_OCTAVES * (1 - groups)))
    low = (a + a > smallest).astype(jnp.int32) if zero else jnp.zeros_like(index)
    return jnp.where(j == 0, low, index)


def _magnitude_value(r: jax.Array, groups: int) -> jax.Array:
    """The dynamic code value (float32, exact) of index ``r`` (int32, ``0 <= r < 2^G - 1``).

    ``w = r + 1`` lies in group ``j = floor(log2 w)`` (its float exponent): with ``n = 2^j``
    and ``k = w + 1 - n``, the value ``8^(j-G) (1 + 7k/n)`` is ``(7 (w + 1) - 6n) 2^(2j-3G)``.
    """
    w = r + 1
    j = (jax.lax.bitcast_convert_type(w.astype(jnp.float32), jnp.int32) >> 23) - 127
    n = jnp.left_shift(1, j)
    return (7 * (w + 1) - 6 * n).astype(jnp.float32) * _pow2(2 * j - _GROUP_OCTAVES * groups)


def _blocks(x: jax.Array) -> tuple[jax.Array, int]:
    """`x` zero-padded along the last axis and reshaped to ``(..., n_blocks, BLOCK)``."""
    last = x.shape[-1]
    nb = -(-last // BLOCK)
    pad = nb * BLOCK - last
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], nb, BLOCK), last


def quantize_blockwise(x: jax.Array, signed: bool) -> QuantizedArray:
    """`x` (real, at least 1-d) to the nearest code of its block-scaled value.

    The scale of a block is its largest magnitude (0 for an all-zero block, which then
    dequantizes to exact zeros); each element gets the code nearest to ``x / scale`` (ties to
    the smaller magnitude; the quotient is ``x`` times the float32 reciprocal of the scale).
    """
    x32 = jnp.asarray(x, jnp.float32)
    b, last = _blocks(x32)
    scale = jnp.max(jnp.abs(b), axis=-1)
    inverse = 1 / jnp.where(scale > 0, scale, 1.0)
    y = b * inverse[..., None]
    if signed:  # the code is symmetric: the nearest magnitude, with the sign of y
        m = _nearest_magnitude(jnp.abs(y), _SIGNED_GROUPS, True)
        codes = jnp.where(y < 0, -m, m).astype(jnp.int8)
    else:
        codes = _nearest_magnitude(y, _UNSIGNED_GROUPS, False).astype(jnp.uint8)
    codes = codes.reshape(*codes.shape[:-2], -1)[..., :last]
    return QuantizedArray(codes=codes, scale=scale)


def dequantize_blockwise(q: QuantizedArray) -> jax.Array:
    """The float32 array `q` stands for (the code values computed, not looked up)."""
    codes = jnp.asarray(q.codes).astype(jnp.int32)
    if q.codes.dtype == jnp.int8:
        m = jnp.abs(codes)
        value = _magnitude_value(jnp.maximum(m - 1, 0), _SIGNED_GROUPS)
        value = jnp.where(codes < 0, -value, jnp.where(m == 0, 0.0, value))
    else:
        value = _magnitude_value(codes, _UNSIGNED_GROUPS)
    values, last = _blocks(value)
    out = values * jnp.asarray(q.scale, jnp.float32)[..., None]
    return out.reshape(*out.shape[:-2], -1)[..., :last]


def quantized_like(p: Any, signed: bool) -> QuantizedArray:
    """The all-zero quantized state of the shape of `p`."""
    shape = tuple(p.shape)
    nb = -(-shape[-1] // BLOCK)
    return QuantizedArray(
        codes=jnp.zeros(shape, jnp.int8 if signed else jnp.uint8),
        scale=jnp.zeros(shape[:-1] + (nb,), jnp.float32),
    )


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


def check_storage(name: str, value: Any) -> None:
    """A state dtype argument: None, `Q8`, or a floating dtype."""
    if value is None or (isinstance(value, str) and value == Q8):
        return
    if _inexact_dtype(value) is None:
        raise ValueError(
            f"{name} must be None (the parameter dtype), a floating dtype such as "
            f"jnp.bfloat16, or {Q8!r} (8-bit block-wise quantized), got {value!r}"
        )


def quantizes(p: Any) -> bool:
    """True when a leaf like `p` is quantized under `Q8`."""
    dt = jnp.dtype(p.dtype)
    return (
        jnp.issubdtype(dt, jnp.floating)
        and len(p.shape) >= 1
        and math.prod(p.shape) >= MIN_QUANTIZED_SIZE
        and p.shape[-1] >= MIN_QUANTIZED_LAST_AXIS
    )


def init_leaf(p: Any, storage: Any, signed: bool) -> Any:
    """The zero state of one leaf like `p` stored as `storage`."""
    if isinstance(storage, str) and storage == Q8:
        if quantizes(p):
            return quantized_like(p, signed)
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
) -> Any:
    """`value` (compute dtype) stored like `stored` (the previous state of this leaf).

    Quantized stays quantized with the same code; a narrower float dtype is rounded to
    nearest, or stochastically (bfloat16 only) with `stochastic`, from the stream of
    (`step`, `leaf`, `salt`).
    """
    if isinstance(stored, QuantizedArray):
        return quantize_blockwise(value, stored.signed)
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
    """A floating storage dtype for preconditioner matrices (or None); 8-bit codes are refused
    (eigenbases and triangular factors do not survive them)."""
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
