"""The Stiefel manifold of row-orthonormal matrices: tangent projection and retraction."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlx_optax._src.linalg._precision import resolve_precision
from rlx_optax._src.linalg._sharding import explicit_shardings


def stiefel_tangent_projection(w: jax.Array, g: jax.Array, *, precision: Any = None) -> jax.Array:
    r"""Project a Euclidean gradient onto the tangent space of row-orthonormal matrices at `w`.

    For :math:`W \in \mathbb{R}^{m\times n}` with :math:`WW^\top = I_m` (m <= n),

    .. math::
        S = \tfrac12\,(W G^\top + G W^\top),\qquad G_r = G - S\,W ,

    which satisfies :math:`W G_r^\top + G_r W^\top = 0` (the tangent condition) and is the
    Riemannian gradient under the Euclidean metric. This is the crate's `Stiefel` projection
    in its row-orthonormal form.

    Args:
      w: array of shape (m, n), rows orthonormal.
      g: array of shape (m, n).
      precision: precision of the two products (default: the library's policy, ``HIGHEST``
        for float32; see `docs/numerics.md`).

    Returns:
      Array of shape (m, n) in the dtype of `g`.

    Example:
      >>> import jax.numpy as jnp
      >>> from rlx_optax._src.linalg import stiefel_tangent_projection
      >>> w = jnp.array([[1.0, 0.0, 0.0]])
      >>> stiefel_tangent_projection(w, jnp.array([[2.0, 1.0, -1.0]])).tolist()
      [[0.0, 1.0, -1.0]]

    References:
      Edelman, Arias & Smith, *The Geometry of Algorithms with Orthogonality Constraints*,
      https://arxiv.org/abs/physics/9806030
    """
    if w.ndim != 2 or w.shape != g.shape:
        raise ValueError(f"expected two matrices of one shape, got {w.shape} and {g.shape}")
    replicated, w_sharding = explicit_shardings(w)
    precision = resolve_precision(precision, jnp.promote_types(w.dtype, g.dtype))
    a = jax.lax.dot_general(
        w, g, (((1,), (1,)), ((), ())), precision=precision, out_sharding=replicated
    )
    sym = 0.5 * (a + a.T)
    return g - jax.lax.dot_general(
        sym, w, (((1,), (0,)), ((), ())), precision=precision, out_sharding=w_sharding
    )


def gram_schmidt_rows(y: jax.Array, *, eps: float = 1e-12, precision: Any = None) -> jax.Array:
    r"""Orthonormalise the rows of `y` in order (the Gram-Schmidt retraction).

    Row :math:`i` becomes :math:`q_i = z_i / \max(\|z_i\|, \epsilon)` with
    :math:`z_i = y_i - \sum_{j<i} \langle y_i, q_j\rangle q_j`. For full-rank `y` this is the
    Q factor of :math:`y^\top = QR` with a positive diagonal of R. The projection is applied
    twice per row (classical Gram-Schmidt with re-orthogonalisation, as stable as the crate's
    modified Gram-Schmidt); a zero residual stays zero (the norm floor), as in the crate.
    The loop runs over the m rows (`lax.fori_loop`), each step costs O(m n).

    Args:
      y: array of shape (m, n) with m <= n.
      eps: floor of the row norms.
      precision: precision of the projections (default: ``HIGHEST`` for float32).

    Returns:
      Array of shape (m, n), rows orthonormal, in the dtype of `y`.

    Example:
      >>> import jax.numpy as jnp
      >>> from rlx_optax._src.linalg import gram_schmidt_rows
      >>> q = gram_schmidt_rows(jnp.array([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]]))
      >>> [[round(float(v), 4) for v in r] for r in q]
      [[0.6, 0.8, 0.0], [0.1569, -0.1177, 0.9806]]

    References:
      Absil, Mahony & Sepulchre, *Optimization Algorithms on Matrix Manifolds* (2008), §4.1;
      Giraud et al., *Rounding error analysis of the classical Gram-Schmidt orthogonalization
      process* (2005).
    """
    if y.ndim != 2 or y.shape[0] > y.shape[1]:
        raise ValueError(f"gram_schmidt_rows expects shape (m, n) with m <= n, got {y.shape}")
    ct = jnp.promote_types(y.dtype, jnp.float32)
    precision = resolve_precision(precision, ct)
    y32 = y.astype(ct)
    replicated, y_sharding = explicit_shardings(y32)
    if replicated is not None:  # the row loop runs on a replicated copy (m x n, gathered once)
        y32 = jax.sharding.reshard(y32, replicated)
    m = y.shape[0]
    if y.size == 0:  # no rows to orthonormalise (or rows of length 0)
        return y

    def body(i, q):
        row = jax.lax.dynamic_index_in_dim(y32, i, keepdims=False)
        for _ in range(2):  # rows i.. of q are still zero, so they project out nothing
            coeffs = jnp.matmul(q, row, precision=precision)
            row = row - jnp.matmul(coeffs, q, precision=precision)
        row = row / jnp.maximum(jnp.sqrt(jnp.sum(row * row)), eps)
        return jax.lax.dynamic_update_index_in_dim(q, row, i, axis=0)

    q = jax.lax.fori_loop(0, m, body, jnp.zeros_like(y32))
    if replicated is not None:
        q = jax.sharding.reshard(q, y_sharding)
    return q.astype(y.dtype)
