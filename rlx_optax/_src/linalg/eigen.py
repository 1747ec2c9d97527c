"""Eigenbases of symmetric matrices, for SOAP's rotated Adam.

Two ways to get the basis :math:`Q` of a symmetric positive semi-definite statistic
:math:`S = Q \\Lambda Q^\\top`:

- `symmetric_eigenbasis`: the exact eigenvectors (``eigh`` in float32), columns sorted by
  decreasing eigenvalue;
- `qr_refresh`: one step of simultaneous power iteration from a previous basis, as the SOAP
  authors refresh it (:math:`Q \\leftarrow \\operatorname{qr}(S Q)`), after sorting the previous
  columns by their Rayleigh quotients.

`apply_along_axes` rotates a tensor by one matrix per axis (the Kronecker product acting on the
flattened tensor without forming it); SOAP and Kron both use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from rlx_optax._src.linalg import _lapack
from rlx_optax._src.linalg._sharding import explicit_shardings, unshard_axis
from rlx_optax._src.linalg.triangular import upper_triangular_matmul

Precision = jax.lax.Precision | None

HIGHEST = jax.lax.Precision.HIGHEST


def power_of_two_scale(x: jax.Array, *, at_least_one: bool = False) -> jax.Array:
    r"""A power of two :math:`2^e` just above :math:`\max|x|`, to rescale `x` exactly.

    Dividing by a power of two is exact in floating point (away from the subnormal range), so
    ``f(x / k) * k**p`` equals ``f(x)`` bit for bit for a homogeneous ``f`` of degree ``p``
    (a product, a Gram matrix, a norm) while its intermediate results cannot overflow:
    :math:`\max|x/k| < 2` (< 4 above 2^126).

    Args:
      x: array of any shape.
      at_least_one: never scale up (return 1 for :math:`\max|x| < 1`), so small inputs are
        computed exactly as without the scale.

    Returns:
      A scalar of dtype float32 or wider: :math:`2^e` with ``e`` in [-126, 126] (0 to 126 with
      `at_least_one`); 1 for a zero `x`, and for a non-finite `x` (whose NaN or Inf then shows
      in the result as it would without the scale).
    """
    ct = jnp.promote_types(x.dtype, jnp.float32)
    _, e = jnp.frexp(jnp.max(jnp.abs(x), initial=0).astype(ct))  # max|x| = m 2^e, 0.5 <= m < 1
    # 2^126 at most: XLA may divide by multiplying with the reciprocal, and 2^-127 is subnormal
    e = jnp.clip(e, 0 if at_least_one else -126, 126)
    return jnp.ldexp(jnp.ones([], ct), e)


def canonical_column_signs(q: jax.Array) -> jax.Array:
    r"""Flip columns of `q` so that each one's leading large entry is positive.

    An eigenvector (or a Q-factor column) is defined up to its sign; LAPACK, XLA's own
    solvers, GPUs and a different compilation each pick one. The convention here: the first
    entry (lowest row index) whose magnitude is within 0.1% of the column's largest is made
    positive. The tolerance makes near-ties (``(1, -1)/\sqrt2``) resolve to the same entry on
    every machine instead of to whichever rounding made larger.

    Args:
      q: array of shape (n, k).

    Returns:
      `q` with some columns negated; a zero column stays zero.
    """
    mag = jnp.abs(q)
    lead = jnp.argmax(mag >= (1 - 1e-3) * jnp.max(mag, axis=0, keepdims=True), axis=0)
    sign = jnp.sign(jnp.take_along_axis(q, lead[None, :], axis=0))
    return q * jnp.where(sign == 0, 1, sign).astype(q.dtype)


def _rank_tolerance(n: int, dtype) -> float:
    """Eigenvalues below this fraction of the largest are rounding noise of a null space.

    Measured (float32, Gram statistics up to 2048 x 2048): the zero eigenvalues of a rank-
    deficient statistic come out below 5e-7 of the largest, about 4 ulp, for every size; the
    threshold n ulp is 10x to 1000x above that.
    """
    return max(n, 8) * float(jnp.finfo(dtype).eps)


def _null_space_completion(
    q: jax.Array, rank: jax.Array, precision: Precision = HIGHEST
) -> jax.Array:
    r"""Replace the columns ``rank..n-1`` of orthonormal `q` by a fixed basis of their span.

    The span is the orthogonal complement of the first `rank` columns; its basis is the
    eigenvectors of :math:`P D P` with :math:`P` the projector onto it and
    :math:`D = \mathrm{diag}(n, n-1, \dots, 1)`, by decreasing eigenvalue: a function of the
    subspace only (for a complement spanned by standard basis vectors, those vectors in
    order), whatever basis the solver returned.
    """
    n = q.shape[0]
    kept = q * (jnp.arange(n) < rank).astype(q.dtype)[None, :]
    p = jnp.eye(n, dtype=q.dtype) - jnp.matmul(kept, kept.T, precision=precision)
    d = jnp.arange(n, 0, -1).astype(q.dtype)
    m = jnp.matmul(p * d[None, :], p, precision=precision)
    _, v = _lapack.eigh(0.5 * (m + m.T))
    v = v[:, ::-1]  # the complement first (eigenvalues >= 1), the range last (0)
    take = jnp.clip(jnp.arange(n) - rank, 0, n - 1)
    return jnp.where(jnp.arange(n)[None, :] < rank, q, v[:, take])


def symmetric_eigenbasis(s: jax.Array, *, precision: Precision = HIGHEST) -> jax.Array:
    r"""Orthonormal eigenvectors of a symmetric matrix, by decreasing eigenvalue, canonical.

    Args:
      s: array of shape (n, n), symmetric (only its symmetric part is used: ``eigh`` reads
        one triangle). Computed in float32 whatever its dtype (float64 stays float64).
      precision: matmul precision of the null-space completion.

    Returns:
      ``q`` of shape (n, n) with :math:`s = q\,\mathrm{diag}(\lambda)\,q^\top` and
      :math:`\lambda_0 \ge \lambda_1 \ge \dots`. What the mathematics leaves arbitrary is
      made canonical, so that every backend, CPU vendor, compilation and sharding returns the
      same basis up to rounding whenever the non-negligible eigenvalues are distinct:

      * the sign of each column (`canonical_column_signs`);
      * the basis of the (numerical) null space, the eigenvalues below ``n`` ulp of the
        largest: a rank-deficient statistic (SOAP's first steps on a non-square gradient)
        gets the fixed completion of `_null_space_completion` (a zero matrix: the identity).

      `s` is divided by a power of two near its largest entry first (exact, and the
      eigenvectors do not depend on the scale), so any finite `s`, up to the largest float,
      gives a finite basis.
    """
    ct = jnp.promote_types(s.dtype, jnp.float32)
    s = s.astype(ct)
    s = s / power_of_two_scale(s)  # exact; `s + s.T` and eigh's norms cannot overflow
    w, q = _lapack.eigh(0.5 * (s + s.T))
    w, q = w[::-1], q[:, ::-1]  # eigh sorts ascending
    n = s.shape[0]
    rank = jnp.sum(w > _rank_tolerance(n, ct) * jnp.maximum(w[0], 0)).astype(jnp.int32)
    rank = jnp.where(w[0] > 0, rank, 0)
    q = jax.lax.cond(
        rank < n, lambda q, r: _null_space_completion(q, r, precision), lambda q, r: q, q, rank
    )
    return canonical_column_signs(q)


def qr_refresh(
    s: jax.Array, q: jax.Array, *, precision: Precision = HIGHEST
) -> tuple[jax.Array, jax.Array]:
    r"""One power-iteration step towards the eigenbasis of `s`, starting from `q`.

    .. math::
        \hat\lambda = \mathrm{diag}(q^\top s\, q),\quad
        \pi = \operatorname{argsort}(-\hat\lambda),\quad
        q' = \operatorname{qr}(s\, q_{:, \pi}).Q

    Sorting first keeps the columns ordered by decreasing (estimated) eigenvalue, so state kept
    per column (SOAP's second moment) can follow them with the returned permutation.

    The Q factor is made canonical: the diagonal of R is non-negative (the unique QR of a full-
    rank matrix; solvers differ in the signs they return). When :math:`s\,q` is numerically
    rank-deficient (a diagonal entry of R below ``n`` ulp of the largest), the columns past the
    deficiency are not determined by `s` at all (every solver completes them differently), so
    the refresh takes the canonical eigenbasis `symmetric_eigenbasis` of `s` instead.

    Args:
      s: array of shape (n, n), symmetric positive semi-definite.
      q: array of shape (n, n), orthonormal columns (the previous basis).
      precision: matmul precision.

    Returns:
      ``(q_new, order)``: the refreshed basis (n, n) and the permutation ``order`` (n,) int32
      applied to the previous columns before the QR step. Finite for a zero `s` and for any
      finite `s` (it is divided by a power of two near its largest entry first, which changes
      neither the order nor the basis).
    """
    ct = jnp.promote_types(s.dtype, jnp.float32)
    s, q = s.astype(ct), q.astype(ct)
    s = s / power_of_two_scale(s)  # exact, scale-free result; `s q` cannot overflow
    sq = jnp.matmul(s, q, precision=precision)
    estimated = jnp.sum(q * sq, axis=0)  # diag(q^T s q) without forming q^T s q
    order = jnp.argsort(-estimated).astype(jnp.int32)
    q_new, r = _lapack.qr(sq[:, order])
    diag = jnp.abs(jnp.diagonal(r))
    deficient = jnp.any(diag <= _rank_tolerance(s.shape[0], ct) * jnp.max(diag))
    signs = jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(ct)
    q_new = jax.lax.cond(
        deficient,
        lambda: symmetric_eigenbasis(s, precision=precision),
        lambda: q_new * signs[None, :],
    )
    return q_new, order


def apply_along_axes(
    x: jax.Array,
    mats: Sequence[jax.Array | None],
    *,
    transpose: bool = False,
    precision: Precision = HIGHEST,
    upper_triangular: bool = False,
) -> jax.Array:
    r"""Multiply every axis of `x` by its own matrix: :math:`x \times_0 M_0 \times_1 M_1 \dots`.

    For a matrix ``x`` and ``mats = (a, b)`` this is :math:`a\,x\,b^\top`
    (``transpose=True``: :math:`a^\top x\, b`). A ``None`` entry leaves that axis alone; a 1-D
    entry is a diagonal matrix.

    Args:
      x: array of any rank k.
      mats: k entries: a (d_i, d_i) matrix, a (d_i,) diagonal, or None.
      transpose: use the transposes of the matrices.
      precision: matmul precision.
      upper_triangular: the matrices are upper triangular (their upper triangles are used):
        a matrix `x` is multiplied by blocks that skip the zero ones
        (`triangular.upper_triangular_matmul`; about half the FLOPs for long factors), except
        on an explicit mesh, where the product keeps the layout of `x`.

    Returns:
      An array of the shape and dtype of `x`.
    """
    if len(mats) != x.ndim:
        raise ValueError(f"need one matrix per axis: {x.ndim} axes, {len(mats)} matrices")
    for axis, m in enumerate(mats):
        if m is None:
            continue
        if m.ndim == 1:
            shape = [1] * x.ndim
            shape[axis] = m.shape[0]
            x = x * m.reshape(shape)
            continue
        _, x_sharding = explicit_shardings(x)  # the product keeps the layout of `x`
        if upper_triangular and x.ndim == 2 and x_sharding is None:
            # x (.) M along axis 0 is M x; along axis 1 it is x M^T
            x = upper_triangular_matmul(
                m, x, left=axis == 0, transpose=transpose == (axis == 0), precision=precision
            )
            continue
        if upper_triangular:
            m = jnp.triu(m)
        if transpose:
            m = m.T
        if x.ndim == 2 and axis == 0:
            x = jnp.matmul(m, x, precision=precision, out_sharding=x_sharding)
        elif x.ndim == 2:
            x = jnp.matmul(x, m.T, precision=precision, out_sharding=x_sharding)
        else:
            moved = _moved_to_front(x_sharding, axis)
            y = jnp.tensordot(m, x, axes=(1, axis), precision=precision, out_sharding=moved)
            x = jnp.moveaxis(y, 0, axis)
    return x


def _moved_to_front(sharding, axis: int):
    """`sharding` with the entry of `axis` moved first (the layout of ``moveaxis(., axis, 0)``)."""
    if sharding is None:
        return None
    spec = list(sharding.spec)
    spec += [None] * (axis + 1 - len(spec))
    spec.insert(0, spec.pop(axis))
    return sharding.update(spec=jax.sharding.PartitionSpec(*spec))


def axis_gram(x: jax.Array, axis: int, *, precision: Precision = HIGHEST) -> jax.Array:
    r"""The Gram matrix of `x` along one axis, contracting all others.

    For a matrix, axis 0 gives :math:`x x^\top` and axis 1 gives :math:`x^\top x`.

    Args:
      x: array of rank k >= 1.
      axis: the kept axis.
      precision: matmul precision.

    Returns:
      Array of shape (x.shape[axis], x.shape[axis]).
    """
    replicated, _ = explicit_shardings(x)  # on an explicit mesh the (d, d) result is replicated
    if x.ndim == 2:
        if axis == 0:
            return jnp.matmul(x, x.T, precision=precision, out_sharding=replicated)
        return jnp.matmul(x.T, x, precision=precision, out_sharding=replicated)
    others = [a for a in range(x.ndim) if a != axis]
    return jnp.tensordot(x, x, axes=(others, others), precision=precision, out_sharding=replicated)


def axis_cross_gram(
    x: jax.Array, y: jax.Array, axis: int, *, precision: Precision = HIGHEST
) -> jax.Array:
    r"""The symmetrised cross Gram matrix of `x` and `y` along one axis.

    For matrices and axis 0, :math:`\tfrac12(x y^\top + y x^\top)`; with ``d = a - b``,
    ``s = a + b`` it equals :math:`a a^\top - b b^\top` in exact arithmetic, but it is exactly
    zero whenever ``a == b`` (``d`` is then exactly zero) and it does not subtract two rounded
    products of similar size.

    Args:
      x, y: arrays of one shape, rank k >= 1.
      axis: the kept axis.
      precision: matmul precision.

    Returns:
      A symmetric array of shape (x.shape[axis], x.shape[axis]).
    """
    replicated, _ = explicit_shardings(x)
    others = [a for a in range(x.ndim) if a != axis]
    c = jnp.tensordot(x, y, axes=(others, others), precision=precision, out_sharding=replicated)
    return 0.5 * (c + c.T)


def permute_axis(x: jax.Array, order: jax.Array, axis: int) -> jax.Array:
    """``jnp.take(x, order, axis)``: reorder the entries of `x` along one axis.

    On an explicit mesh the gather needs `axis` whole on every device: `x` is resharded to
    that layout and the result given back in the layout of `x`.

    Args:
      x: array of any rank.
      order: integer array of shape (x.shape[axis],), a permutation.
      axis: the permuted axis.

    Returns:
      An array of the shape, dtype (and explicit sharding) of `x`.
    """
    x, sharding = unshard_axis(x, axis)
    out = jnp.take(x, order, axis=axis)
    return out if sharding is None else jax.sharding.reshard(out, sharding)
