"""Triangular factors for Kron-PSGD: solves, the Lie-group step, a cheap spectral-norm bound.

PSGD keeps its preconditioner as :math:`P = Q^\\top Q` with :math:`Q` upper triangular (or
diagonal) and moves :math:`Q` on the group of invertible upper-triangular matrices, where a step
:math:`Q \\leftarrow Q - \\mu\\,\\mathrm{triu}(M)\\,Q` (or :math:`Q - \\mu\\,Q\\,\\mathrm{triu}(M)`)
stays triangular by construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlx_optax._src.linalg import _lapack
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
    _lapack.check_cpu_blas_threads()
    out = jax.lax.linalg.triangular_solve(
        q.astype(ct), b.astype(ct), left_side=left, lower=False, transpose_a=transpose
    )
    return out if b_sharding is None else jax.sharding.reshard(out, b_sharding)


#: Upper-triangular products of matrices at least this long are split into blocks.
TRIANGULAR_BLOCK = 512


def upper_triangular_product(
    a: jax.Array, b: jax.Array, *, precision: Precision = HIGHEST, block: int = TRIANGULAR_BLOCK
) -> jax.Array:
    r"""``triu(a) @ triu(b)`` (upper triangular) in about a third of the dense FLOPs.

    With both factors split at :math:`h = \lceil n/2 \rceil`,

    .. math::
        \begin{pmatrix} A_{11} & A_{12} \\ 0 & A_{22} \end{pmatrix}
        \begin{pmatrix} B_{11} & B_{12} \\ 0 & B_{22} \end{pmatrix} =
        \begin{pmatrix} A_{11}B_{11} & A_{11}B_{12} + A_{12}B_{22} \\ 0 & A_{22}B_{22}
        \end{pmatrix}

    and the diagonal blocks recurse, so the product costs :math:`\tfrac23 n^3` multiply-adds
    instead of :math:`2n^3` (a dense product, as psgd-jax computes Kron's factor step, spends
    the rest on the zeros). Matrices shorter than `block` are one dense product. The entries
    are those of the dense product up to the order of float32 sums (blocks add the same terms
    in another order; an exact triangular input gives exact zeros below the diagonal).

    Args:
      a: array of shape (n, n); only its upper triangle is read.
      b: array of shape (n, n); only its upper triangle is read.
      precision: matmul precision of every block product.
      block: matrices shorter than this are multiplied densely.

    Returns:
      The upper-triangular product, shape (n, n).
    """
    n = a.shape[0]
    if n < block:
        return jnp.matmul(jnp.triu(a), jnp.triu(b), precision=precision)
    h = (n + 1) // 2
    c11 = upper_triangular_product(a[:h, :h], b[:h, :h], precision=precision, block=block)
    c22 = upper_triangular_product(a[h:, h:], b[h:, h:], precision=precision, block=block)
    c12 = jnp.matmul(jnp.triu(a[:h, :h]), b[:h, h:], precision=precision) + jnp.matmul(
        a[:h, h:], jnp.triu(b[h:, h:]), precision=precision
    )
    lower = jnp.zeros((n - h, h), c11.dtype)
    return jnp.block([[c11, c12], [lower, c22]])


def upper_triangular_matmul(
    q: jax.Array,
    x: jax.Array,
    *,
    left: bool = True,
    transpose: bool = False,
    precision: Precision = HIGHEST,
    block: int = TRIANGULAR_BLOCK,
) -> jax.Array:
    r"""A dense matrix times an upper-triangular one, skipping the zero blocks.

    ============================  =================================
    ``left``, ``transpose``        returns
    ============================  =================================
    True, False                    :math:`\mathrm{triu}(q)\, x`
    True, True                     :math:`\mathrm{triu}(q)^\top x`
    False, False                   :math:`x\, \mathrm{triu}(q)`
    False, True                    :math:`x\, \mathrm{triu}(q)^\top`
    ============================  =================================

    Split at :math:`h = \lceil n/2 \rceil`, e.g.
    :math:`\mathrm{triu}(q)\,x = (Q_{11}X_1 + Q_{12}X_2;\ Q_{22}X_2)`: three of the four block
    products, the diagonal ones recursing, down to about half the dense FLOPs for long `q`.
    Matrices shorter than `block` are one dense product. The result is the dense product's up
    to the order of float32 sums.

    Args:
      q: array of shape (n, n); only its upper triangle is read.
      x: array of shape (n, k) when `left`, else (k, n).
      precision: matmul precision of every block product.
      block: `q` shorter than this is applied densely.

    Returns:
      The product, shaped like `x`.
    """
    n = q.shape[0]

    def rec(q, x):
        return upper_triangular_matmul(
            q, x, left=left, transpose=transpose, precision=precision, block=block
        )

    def mm(a, b):
        return jnp.matmul(a, b, precision=precision)

    if n < block:
        t = jnp.triu(q)
        t = t.T if transpose else t
        return mm(t, x) if left else mm(x, t)
    h = (n + 1) // 2
    q11, q12, q22 = q[:h, :h], q[:h, h:], q[h:, h:]
    if left:
        x1, x2 = x[:h], x[h:]
        if transpose:  # (Q11^T X1 ; Q12^T X1 + Q22^T X2)
            parts = [rec(q11, x1), mm(q12.T, x1) + rec(q22, x2)]
        else:  # (Q11 X1 + Q12 X2 ; Q22 X2)
            parts = [rec(q11, x1) + mm(q12, x2), rec(q22, x2)]
        return jnp.concatenate(parts, axis=0)
    x1, x2 = x[:, :h], x[:, h:]
    if transpose:  # (X1 Q11^T + X2 Q12^T , X2 Q22^T)
        parts = [rec(q11, x1) + mm(x2, q12.T), rec(q22, x2)]
    else:  # (X1 Q11 , X1 Q12 + X2 Q22)
        parts = [rec(q11, x1), mm(x1, q12) + rec(q22, x2)]
    return jnp.concatenate(parts, axis=1)


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
    group as long as its diagonal stays non-zero (it is scaled by :math:`1 - \mu\,m_{ii}`);
    it is computed by blocks (`upper_triangular_product`, a third of the dense FLOPs), and
    only the upper triangle of `q` is read.
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
        new = q - step * upper_triangular_product(q, m, precision=precision)
    else:
        new = q - step * upper_triangular_product(m, q, precision=precision)
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
