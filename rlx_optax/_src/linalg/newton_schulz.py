"""Newton-Schulz orthogonalisation: the one copy used by Muon, Stiefel and MARS-shampoo."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlx_optax._src.linalg._precision import check_precision, resolve_precision
from rlx_optax._src.linalg._sharding import explicit_shardings

#: The crate's quintic coefficients (Keller Jordan's Muon): a, b, c of
#: :math:`X \leftarrow aX + (bA + cA^2)X`.
DEFAULT_NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

#: The most iterations a traced (not Python) `steps` may ask for.
MAX_TRACED_STEPS = 32

#: The classical cubic iteration :math:`X \leftarrow \tfrac32 X - \tfrac12 X X^\top X`; it
#: converges to the polar factor for singular values in (0, sqrt(3)), slowly for small ones.
CUBIC_NS_COEFFS: tuple[float, float, float] = (1.5, -0.5, 0.0)


def _coefficient_table(coeffs: Any) -> np.ndarray:
    """`coeffs` as a float64 array of shape (K, 3): one row per iteration (the last repeats)."""
    table = np.asarray(coeffs, dtype=np.float64)
    if table.ndim == 1:
        table = table[None, :]
    if table.ndim != 2 or table.shape[1] != 3 or table.shape[0] < 1:
        raise ValueError(
            "coeffs must be (a, b, c) or a sequence of (a, b, c) rows, got shape "
            f"{np.shape(coeffs)}"
        )
    if not np.all(np.isfinite(table)):
        raise ValueError(f"coeffs must be finite, got {coeffs!r}")
    return table


def _dot(a, b, contracting, precision, acc, out_sharding):
    """`a . b` over the `contracting` axes, accumulated in `acc`.

    Operands below float32 (a bf16 iteration) take the native reduced-precision product,
    except on the CPU backend: XLA:CPU's generic dot kernel has no bf16 x bf16 -> f32 product
    (``Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32``), and which dots
    reach that kernel depends on fusion (a transposed operand folded into the dot, as when the
    gradient of a tall matrix is produced in the same jit, does). There the operands, already
    rounded to bf16, are widened to float32 and multiplied in float32: every product of two
    bf16 numbers is exact in float32 and the sum accumulates in float32, which is what the
    native product computes, up to the order of the float32 summation.
    """

    def product(x, y, precision):
        return jax.lax.dot_general(
            x,
            y,
            (contracting, ((), ())),
            precision=precision,
            preferred_element_type=acc,
            out_sharding=out_sharding,
        )

    if jnp.dtype(a.dtype) == jnp.dtype(acc) and jnp.dtype(b.dtype) == jnp.dtype(acc):
        return product(a, b, precision)

    def widened(x, y):
        return product(x.astype(acc), y.astype(acc), jax.lax.Precision.HIGHEST)

    return jax.lax.platform_dependent(
        a, b, cpu=widened, default=lambda x, y: product(x, y, precision)
    )


def newton_schulz(
    x: jax.Array,
    steps: int | jax.Array | None = None,
    coeffs: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_NS_COEFFS,
    *,
    eps: float = 1e-12,
    ns_dtype: Any = None,
    compute_dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    r"""Approximate the orthogonal polar factor :math:`UV^\top` of a matrix.

    With :math:`x = U\Sigma V^\top`, normalise :math:`X_0 = x / \max(\|x\|_F, \epsilon)` and
    iterate, for :math:`k = 0, \dots, \text{steps}-1`,

    .. math::
        A = X_k X_k^\top,\qquad X_{k+1} = a_k X_k + (b_k A + c_k A^2)\,X_k .

    Every iterate is :math:`U p_k(\Sigma/\|x\|_F) V^\top` for the scalar polynomial
    :math:`p_{k+1}(\sigma) = a_k p_k + b_k p_k^3 + c_k p_k^5`, so the singular vectors are
    exact and only the singular values are approximate. With the crate's quintic
    coefficients (3.4445, -4.7750, 2.0315) and 5 steps, every singular value of at least
    3e-3 of the Frobenius norm lands in [0.68, 1.21] (smaller ones are only partly lifted:
    the polynomial maps 1e-3 to 0.47): the iteration trades exact
    orthogonality for speed (Keller Jordan's choice, the crate's `newton_schulz_orth`). A
    cubic schedule :math:`(1.5, -0.5, 0)` converges to :math:`UV^\top` itself.

    The iteration runs on the orientation with rows <= columns, so the Gram matrix is
    :math:`\min(m,n)^2` (the crate's R2+ orientation; :math:`p(XX^\top)X = X p(X^\top X)`
    makes the result independent of the orientation up to rounding). The norm floor
    :math:`\epsilon` = 1e-12 is the crate's; Keller's reference adds 1e-7 instead (the two
    agree for any gradient whose norm is far above 1e-7).

    Under explicit sharding (``jax.make_mesh(..., axis_types=Explicit)``) the Gram products are
    given an explicit replicated output sharding and the update keeps the sharding of
    :math:`X`, so sharded parameters work (one all-reduce of a :math:`\min(m,n)^2` matrix per
    product).

    Args:
      x: array of shape (m, n).
      steps: number of iterations (default 5, or the schedule's length). A traced integer is
        accepted (it runs a `lax.scan` of `MAX_TRACED_STEPS` = 32 iterations, those past
        `steps` skipped by `lax.cond`; a traced count above 32 gives NaN), which JAX
        differentiates in both modes, so the count works under
        `optax.inject_hyperparams`.
      coeffs: (a, b, c) for every iteration, or a sequence of (a, b, c) rows, one per
        iteration; when `steps` exceeds the rows, the last row repeats. `c = 0` in every row
        skips the :math:`A^2` product.
      eps: floor of the Frobenius norm.
      ns_dtype: dtype of the iteration (default: float32, or the input dtype if wider), the
        same name as `muon`'s argument. ``jnp.bfloat16`` follows the reference's bf16 cast:
        the products accumulate in float32 and each fused step (:math:`A`,
        :math:`bA + cA^2`, :math:`aX + BX`) and the normalised input are rounded to bf16
        once, explicitly (`lax.reduce_precision`), so an eager call, a jitted update and a
        whole jitted train step give the same numbers (XLA would otherwise be free to skip a
        float32 -> bf16 -> float32 round trip inside a jit). On GPU and TPU the products are
        the native bf16 x bf16 -> float32 pass. On the CPU backend, whose generic dot kernel
        has no bf16 x bf16 -> float32 product (a jitted step that also computes the gradient
        of a tall matrix reached it: ``Unsupported element type for DotThunk::Execute``),
        the bf16 operands are widened to float32 and multiplied at ``HIGHEST``: the product
        of two bf16 numbers is exact in float32 and the sums accumulate in float32, so the
        result is the native one up to the order of the float32 summation (chosen at
        lowering with `jax.lax.platform_dependent`).
      compute_dtype: deprecated name of `ns_dtype`.
      precision: precision of the matrix products (a `jax.lax.Precision`, its name, or a
        `jax.lax.DotAlgorithmPreset`). Default: ``HIGHEST`` for a float32 iteration, so the
        result is float32-accurate on every backend (the backend default would be TF32 on
        NVIDIA GPUs and one bfloat16 pass on TPUs), and the native ``DEFAULT`` pass for a
        bfloat16 iteration.

    Returns:
      Array of shape (m, n) and the dtype of `x`.

    Example:
      >>> import jax.numpy as jnp
      >>> from rlx_optax import newton_schulz
      >>> o = newton_schulz(jnp.array([[3.0, 0.0], [0.0, 0.5]]), steps=30, coeffs=(1.5, -0.5, 0))
      >>> [round(float(v), 4) for v in o.ravel()]
      [1.0, 0.0, 0.0, 1.0]

    References:
      Jordan et al., *Muon: An optimizer for hidden layers in neural networks* (2024),
      https://kellerjordan.github.io/posts/muon/ ;
      Bernstein & Newhouse, *Old Optimizer, New Norm: An Anthology*,
      https://arxiv.org/abs/2409.20325 ;
      Amsel et al., *The Polar Express* (per-iteration coefficient schedules),
      https://arxiv.org/abs/2505.16932
    """
    if x.ndim != 2:
        raise ValueError(f"newton_schulz expects a matrix of shape (m, n), got shape {x.shape}")
    table = _coefficient_table(coeffs)
    if steps is None:
        steps = 5 if table.shape[0] == 1 else table.shape[0]
    static_steps = None if isinstance(steps, jax.core.Tracer) else int(steps)
    if static_steps is not None and static_steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    cubic_only = bool(np.all(table[:, 2] == 0.0))
    check_precision("precision", precision)

    if compute_dtype is not None:
        warnings.warn(
            "newton_schulz(compute_dtype=) is deprecated; use ns_dtype= (as in muon)",
            DeprecationWarning,
            stacklevel=2,
        )
        if ns_dtype is not None and jnp.dtype(ns_dtype) != jnp.dtype(compute_dtype):
            raise ValueError("pass ns_dtype only (compute_dtype is its deprecated name)")
        ns_dtype = compute_dtype
    ct = ns_dtype or jnp.promote_types(x.dtype, jnp.float32)
    precision = resolve_precision(precision, ct)
    transposed = x.shape[0] > x.shape[1]
    # Below float32 (bf16) the products accumulate in float32 and each fused step is rounded
    # once, as torch.optim.Muon's `addmm` iteration: A, B = bA + cA^2 and aX + BX. The
    # roundings are explicit (`lax.reduce_precision`): XLA may otherwise drop a
    # float32 -> bf16 -> float32 round trip inside a jit (excess precision), and a jitted step
    # would give other numbers than an eager call.
    acc = jnp.float32 if jnp.finfo(ct).bits < 32 else ct
    narrow = jnp.dtype(acc) != jnp.dtype(ct)

    def rounded(v):  # v rounded to ct, explicitly when ct is narrower than v
        if narrow and jnp.finfo(v.dtype).bits > jnp.finfo(ct).bits:
            fi = jnp.finfo(ct)
            v = jax.lax.reduce_precision(v, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
        return v.astype(ct)

    X = rounded(x.T if transposed else x)
    # Under explicit sharding the Gram matrix (min(m, n) square) is made replicated, one
    # all-reduce of partial sums, and `B @ X` keeps the layout of X: no gather of X is needed
    # when its long dimension is sharded (optax.contrib.muon raises ShardingTypeError there).
    gram_sharding, x_sharding = explicit_shardings(X)

    def gram(a):  # a @ a.T without materialising the transpose
        return _dot(a, a, ((1,), (1,)), precision, acc, gram_sharding)

    def matmul(a, b, out_sharding):
        return _dot(a, b, ((1,), (0,)), precision, acc, out_sharding)

    norm = jnp.sqrt(jnp.sum(jnp.square(X.astype(jnp.promote_types(ct, jnp.float32)))))
    X = rounded(X.astype(acc) / rounded(jnp.maximum(norm, eps)).astype(acc))

    def iteration(X, a, b, c):
        A = rounded(gram(X))
        A_acc = A.astype(acc)
        B = b * A_acc if cubic_only else b * A_acc + c * matmul(A, A, gram_sharding)
        return rounded(a * X.astype(acc) + matmul(rounded(B), X, x_sharding))

    if static_steps is not None:
        for k in range(static_steps):
            a, b, c = (float(v) for v in table[min(k, table.shape[0] - 1)])
            X = iteration(X, a, b, c)
    else:
        rows = jnp.asarray(table, acc)  # the coefficients are not rounded to a bf16 ct

        # A scan of MAX_TRACED_STEPS guarded iterations rather than a fori_loop to a traced
        # bound: JAX differentiates a scan in reverse mode (meta-gradients through
        # `optax.inject_hyperparams`), not a loop of traced length.
        def body(X, k):
            a, b, c = rows[jnp.minimum(k, rows.shape[0] - 1)]
            X = jax.lax.cond(k < steps, lambda X: iteration(X, a, b, c), lambda X: X, X)
            return X, None

        X, _ = jax.lax.scan(body, X, jnp.arange(MAX_TRACED_STEPS))
        X = jnp.where(steps <= MAX_TRACED_STEPS, X, jnp.asarray(jnp.nan, X.dtype))
    return (X.T if transposed else X).astype(x.dtype)
