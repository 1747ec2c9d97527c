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

Precision = jax.lax.Precision | None

HIGHEST = jax.lax.Precision.HIGHEST


def symmetric_eigenbasis(s: jax.Array) -> jax.Array:
    r"""Orthonormal eigenvectors of a symmetric matrix, by decreasing eigenvalue.

    Args:
      s: array of shape (n, n), symmetric (only its symmetric part is used: ``eigh`` reads
        one triangle). Computed in float32 whatever its dtype (float64 stays float64).

    Returns:
      ``q`` of shape (n, n) with :math:`s = q\,\mathrm{diag}(\lambda)\,q^\top` and
      :math:`\lambda_0 \ge \lambda_1 \ge \dots`. Eigenvectors of repeated eigenvalues are any
      orthonormal basis of their eigenspace; signs are not normalised. A zero matrix gives an
      orthonormal basis (the identity with XLA's ``eigh``), never NaN.
    """
    ct = jnp.promote_types(s.dtype, jnp.float32)
    s = s.astype(ct)
    _, q = jnp.linalg.eigh(0.5 * (s + s.T))
    return q[:, ::-1]  # eigh sorts ascending


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

    Args:
      s: array of shape (n, n), symmetric positive semi-definite.
      q: array of shape (n, n), orthonormal columns (the previous basis).
      precision: matmul precision.

    Returns:
      ``(q_new, order)``: the refreshed basis (n, n) and the permutation ``order`` (n,) int32
      applied to the previous columns before the QR step. Finite for a zero `s`.
    """
    ct = jnp.promote_types(s.dtype, jnp.float32)
    s, q = s.astype(ct), q.astype(ct)
    sq = jnp.matmul(s, q, precision=precision)
    estimated = jnp.sum(q * sq, axis=0)  # diag(q^T s q) without forming q^T s q
    order = jnp.argsort(-estimated).astype(jnp.int32)
    q_new, _ = jnp.linalg.qr(sq[:, order])
    return q_new, order


def apply_along_axes(
    x: jax.Array,
    mats: Sequence[jax.Array | None],
    *,
    transpose: bool = False,
    precision: Precision = HIGHEST,
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
        if transpose:
            m = m.T
        if x.ndim == 2 and axis == 0:
            x = jnp.matmul(m, x, precision=precision)
        elif x.ndim == 2:
            x = jnp.matmul(x, m.T, precision=precision)
        else:
            x = jnp.moveaxis(jnp.tensordot(m, x, axes=(1, axis), precision=precision), 0, axis)
    return x


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
    if x.ndim == 2:
        if axis == 0:
            return jnp.matmul(x, x.T, precision=precision)
        return jnp.matmul(x.T, x, precision=precision)
    others = [a for a in range(x.ndim) if a != axis]
    return jnp.tensordot(x, x, axes=(others, others), precision=precision)
