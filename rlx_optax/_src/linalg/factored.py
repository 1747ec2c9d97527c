"""Factored second moments (Adafactor): row/column statistics and their reconstruction."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def factored_second_moment(x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Row and column means of a non-negative array over its last two axes.

    .. math::
        r_i = \frac{1}{C}\sum_j x_{ij},\qquad c_j = \frac{1}{R}\sum_i x_{ij}

    Adafactor keeps moving averages of these two vectors instead of the full second moment
    :math:`\mathbb{E}[g^2]` of an (R, C) matrix: :math:`R + C` numbers instead of :math:`RC`.

    Args:
      x2: array of shape (..., R, C), usually :math:`g^2 + \epsilon_1`.

    Returns:
      ``(row, col)`` of shapes (..., R) and (..., C).

    Example:
      >>> import jax.numpy as jnp
      >>> from rlx_optax._src.linalg import factored_second_moment
      >>> row, col = factored_second_moment(jnp.array([[1.0, 3.0], [5.0, 7.0]]))
      >>> row.tolist(), col.tolist()
      ([2.0, 6.0], [3.0, 5.0])

    References:
      Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*,
      https://arxiv.org/abs/1804.04235
    """
    if x2.ndim < 2:
        raise ValueError(f"factored_second_moment needs rank >= 2, got shape {x2.shape}")
    return jnp.mean(x2, axis=-1), jnp.mean(x2, axis=-2)


def reconstruct_second_moment(
    row: jax.Array,
    col: jax.Array,
    *,
    normalization: str = "mean",
    eps: float = 0.0,
) -> jax.Array:
    r"""The rank-1 estimate of the second moment from its row and column statistics.

    .. math::
        \hat V_{ij} = \frac{r_i\, c_j}{\max(\nu(r), \epsilon)},\qquad
        \nu(r) = \tfrac{1}{R}\textstyle\sum_k r_k \ (\text{"mean"})\ \text{or}\
        \textstyle\sum_k r_k \ (\text{"sum"})

    With row and column *means* (`factored_second_moment`), ``"mean"`` is the paper's
    :math:`R C^\top / 1^\top R` (which the paper writes with row and column sums) and is exact
    for a rank-1 non-negative matrix. ``"sum"`` is the crate's `Adafactor`: it divides the
    means by their sum, so its :math:`\hat V` is R times smaller (the update clipping then
    absorbs most of the difference).

    Args:
      row: array of shape (..., R).
      col: array of shape (..., C).
      normalization: ``"mean"`` (paper) or ``"sum"`` (crate).
      eps: floor of the normaliser (the crate uses its :math:`\epsilon_1` = 1e-30).

    Returns:
      Array of shape (..., R, C).

    Example:
      >>> import jax.numpy as jnp
      >>> from rlx_optax._src.linalg import factored_second_moment, reconstruct_second_moment
      >>> x = jnp.outer(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0, 5.0]))  # rank 1
      >>> v = reconstruct_second_moment(*factored_second_moment(x))
      >>> bool(jnp.allclose(v, x))
      True

    References:
      Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*,
      https://arxiv.org/abs/1804.04235 (Algorithm 4)
    """
    if normalization == "mean":
        denom = jnp.mean(row, axis=-1, keepdims=True)
    elif normalization == "sum":
        denom = jnp.sum(row, axis=-1, keepdims=True)
    else:
        raise ValueError(f"normalization must be 'mean' or 'sum', got {normalization!r}")
    denom = jnp.maximum(denom, jnp.asarray(eps, denom.dtype))
    return (row / denom)[..., :, None] * col[..., None, :]
