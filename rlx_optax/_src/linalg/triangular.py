"""Triangular factors for Kron-PSGD: solves, the Lie-group step, a cheap spectral-norm bound.

PSGD keeps its preconditioner as :math:`P = Q^\\top Q` with :math:`Q` upper triangular (or
diagonal) and moves :math:`Q` on the group of invertible upper-triangular matrices, where a step
:math:`Q \\leftarrow Q - \\mu\\,\\mathrm{triu}(M)\\,Q` (or :math:`Q - \\mu\\,Q\\,\\mathrm{triu}(M)`)
stays triangular by construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlx_optax._src.linalg._sharding import explicit_shardings, like_explicit, unshard_axis

Precision = jax.lax.Precision | None

HIGHEST = jax.lax.Precision.HIGHEST


def solve_upper_triangular(
    q: jax.Array, b: jax.Array, *, left: bool = True, transpose: bool = False
) -> jax.Array:
    r"""Solve with an upper-triangular matrix, reading only its upper triangle.

    ============================  =================================
    ``left``, ``transpose``        returns
    ============================  =================================
    True, False                    :math:`q^{-1} b`
    True, True                     :math:`q^{-\top} b`
    False, False                   :math:`b\, q^{-1}`
    False, True                    :math:`b\, q^{-\top}`
    ============================  =================================

    Args:
      q: array of shape (n, n), upper triangular with a non-zero diagonal (entries below the
        diagonal are ignored).
      b: array of shape (n, k) when ``left`` else (k, n).
      transpose: solve with :math:`q^\top` (lower triangular) instead of :math:`q`.

    Under explicit sharding (``jax.make_mesh(..., axis_types=Explicit)``) the solve needs the
    contracting axis of `b` (its rows when ``left``, else its columns) whole on every device:
    `b` is resharded to that layout (its other axis keeps its sharding), `q` is replicated, and
    the solution is given back sharded like `b`. On other meshes the compiler chooses.

    Returns:
      The solution, shaped and (on an explicit mesh) sharded like `b`, in the promoted float
      dtype (float32 at least).
    """
    ct = jnp.promote_types(jnp.promote_types(q.dtype, b.dtype), jnp.float32)
    q_replicated, _ = explicit_shardings(q)
    if q_replicated is not None:
        q = jax.sharding.reshard(q, q_replicated)
    b, b_sharding = unshard_axis(b, 0 if left else 1)
    out = jax.lax.linalg.triangular_solve(
        q.astype(ct), b.astype(ct), left_side=left, lower=False, transpose_a=transpose
    )
    return out if b_sharding is None else jax.sharding.reshard(out, b_sharding)


def lie_group_factor_step(
    q: jax.Array,
    m: jax.Array,
    step: jax.Array | float,
    *,
    side: str = "right",
    precision: Precision = HIGHEST,
) -> jax.Array:
    r"""One descent step of a triangular (or diagonal) factor on its Lie group.

    .. math::
        q \leftarrow q - \mu\, q\, \mathrm{triu}(m) \quad (\text{side="right"}),\qquad
        q \leftarrow q - \mu\, \mathrm{triu}(m)\, q \quad (\text{side="left"})

    The product of two upper-triangular matrices is upper triangular, so `q` stays in the
    group as long as its diagonal stays non-zero (it is scaled by :math:`1 - \mu\,m_{ii}`).
    For a diagonal factor (1-D `q`, 1-D `m`) both sides are :math:`q - \mu\, m \odot q`.

    Args:
      q: array of shape (n, n), upper triangular; or (n,), a diagonal.
      m: array of shape (n, n) (only its upper triangle is used) or (n,).
      step: the step size :math:`\mu` (already normalised by the caller).
      side: ``"right"`` (the crate's `KronPsgd`) or ``"left"`` (Li's PSGD, psgd_torch/psgd-jax).
      precision: matmul precision.

    Returns:
      The new factor, shaped like `q` (and, on an explicit mesh, sharded like it).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if q.ndim == 1:
        new = q - step * m * q
    elif side == "right":
        new = q - step * jnp.matmul(q, jnp.triu(m), precision=precision)
    else:
        new = q - step * jnp.matmul(jnp.triu(m), q, precision=precision)
    return like_explicit(new, q)  # `m` may come sharded (a sum over a sharded axis)


def spectral_norm_lower_bound(a: jax.Array, *, precision: Precision = HIGHEST) -> jax.Array:
    r"""A cheap lower bound of :math:`\|a\|_2`: two power steps from the heaviest row or column.

    With :math:`x` the column of largest Euclidean norm, :math:`y = a^\top x` and the bound is
    :math:`\|a\,y\| / \|y\|` (from the heaviest row :math:`x`: :math:`y = a x`, bound
    :math:`\|a^\top y\|/\|y\|`). Any unit vector gives a lower bound of the spectral norm;
    this one is within a small factor of it in practice, which is why Li's PSGD normalises the
    factor step with it. Computed on :math:`a / \max|a|` to avoid overflow; 0 for a zero matrix.

    Args:
      a: array of shape (n, k).
      precision: matmul precision.

    Returns:
      A scalar array, float32 at least.
    """
    ct = jnp.promote_types(a.dtype, jnp.float32)
    a = a.astype(ct)
    scale = jnp.max(jnp.abs(a))
    b = a / jnp.where(scale > 0, scale, 1.0)
    sq = b * b
    col = jnp.sum(sq, axis=0)
    row = jnp.sum(sq, axis=1)

    def from_column():
        y = jnp.matmul(b[:, jnp.argmax(col)], b, precision=precision)  # a^T x, shape (k,)
        return jnp.linalg.norm(jnp.matmul(b, y, precision=precision)), jnp.linalg.norm(y)

    def from_row():
        y = jnp.matmul(b, b[jnp.argmax(row), :], precision=precision)  # a x, shape (n,)
        return jnp.linalg.norm(jnp.matmul(y, b, precision=precision)), jnp.linalg.norm(y)

    num, den = jax.lax.cond(jnp.max(col) > jnp.max(row), from_column, from_row)
    return jnp.where(den > 0, scale * num / jnp.where(den > 0, den, 1.0), 0.0)
