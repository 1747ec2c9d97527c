"""Norms and clipping over pytrees: the crate's helpers and a clip that records the norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common


def l2_norm(tree: Any, *, skip_nonfinite: bool = False) -> jax.Array:
    r"""Global L2 norm :math:`\sqrt{\sum x^2}` over every leaf of `tree`, in float32.

    By default a NaN or Inf anywhere makes the norm NaN or Inf: the norm is usually logged or
    used to clip, and a hidden non-finite gradient would otherwise reach the parameters.
    ``skip_nonfinite=True`` is the crate's `l2_norm`, which sums only the finite entries.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> rlx_optax.l2_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0, jnp.nan])})
      Array(nan, dtype=float32)
      >>> rlx_optax.l2_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0, jnp.nan])},
      ...                   skip_nonfinite=True)
      Array(5., dtype=float32)
    """
    xs = []
    for x in jax.tree.leaves(tree):
        x = jnp.asarray(x)
        x = x.astype(common.compute_dtype(x.dtype))
        xs.append(jnp.where(jnp.isfinite(x), x, 0.0) if skip_nonfinite else x)
    if not xs:
        return jnp.zeros([], jnp.float32)
    # Scale by the largest magnitude first: squares of 1e-20 underflow in float32 (the crate
    # accumulates in float64), and squares of 1e20 overflow.
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in xs]))
    safe = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
    total = sum(jnp.sum(jnp.square(x / safe)) for x in xs)
    return (safe * jnp.sqrt(total)).astype(jnp.float32)


def global_grad_clip_scale(
    grads: Any, max_norm: float, *, skip_nonfinite: bool = False
) -> jax.Array:
    r"""The factor that scales `grads` to global norm at most `max_norm` (the crate's helper).

    Returns :math:`\min(\text{max\_norm}/\lVert g\rVert, 1)`, and 1 for a zero gradient. With a
    non-finite norm (a NaN or Inf anywhere) the factor is NaN, so the problem shows, unless
    ``skip_nonfinite=True``, which follows the crate and measures only the finite entries.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> rlx_optax.global_grad_clip_scale([jnp.array([3.0, 4.0])], 1.0)
      Array(0.2, dtype=float32)
    """
    common.check_range("max_norm", max_norm, 0.0, low_open=True)
    norm = l2_norm(grads, skip_nonfinite=skip_nonfinite)
    factor = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jnp.where(jnp.isfinite(norm), factor, jnp.nan)


def clip_grad_norm(grads: Any, max_norm: float, *, eps: float = 0.0) -> tuple[Any, jax.Array]:
    r"""Clip `grads` to global norm `max_norm`; return ``(clipped, norm_before)``.

    The factor is :math:`c = \text{max\_norm}/(\lVert g\rVert + \epsilon)`, applied unless
    :math:`c \ge 1` (so a NaN norm makes every leaf NaN and an infinite one zeroes the finite
    entries, as in RUMUS and optax). The default ``eps=0`` is `optax.clip_by_global_norm`'s rule;
    ``eps=1e-6`` is RUMUS's `clip_grad_norm_` (which also clips at exactly `max_norm`). The
    returned norm is always the pre-clip one, for logging. Works under `jax.jit`.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> clipped, norm = rlx_optax.clip_grad_norm({"w": jnp.array([6.0, 8.0])}, 5.0)
      >>> clipped["w"], norm
      (Array([3., 4.], dtype=float32), Array(10., dtype=float32))
    """
    common.check_range("max_norm", max_norm, 0.0, low_open=True)
    common.check_non_negative("eps", eps)
    norm = l2_norm(grads)
    factor = max_norm / (norm + eps)
    # "not >= 1" rather than "< 1": a NaN norm must propagate into every leaf (as in RUMUS
    # and optax), never leave the other leaves looking healthy.
    clip = ~(factor >= 1.0)
    clipped = common.tree_map_none(
        lambda g: jnp.where(clip, g * factor.astype(g.dtype), g).astype(g.dtype), grads
    )
    return clipped, norm


class ClipByGlobalNormState(NamedTuple):
    """State of `clip_by_global_norm_logged`: the last pre-clip norm and whether it clipped."""

    norm: jax.Array
    clipped: jax.Array


def clip_by_global_norm_logged(
    max_norm: float, *, eps: float = 0.0
) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` that keeps the pre-clip norm in its state.

    After `update`, read the norm with ``state.norm`` (or, inside a chain,
    ``optax.tree.get(opt_state, "norm")``). The rule is `clip_grad_norm`'s.

    Example:
      >>> import jax.numpy as jnp, optax, rlx_optax
      >>> tx = optax.chain(rlx_optax.clip_by_global_norm_logged(1.0), optax.sgd(0.1))
      >>> state = tx.init(jnp.zeros(2))
      >>> _, state = tx.update(jnp.array([3.0, 4.0]), state)
      >>> optax.tree.get(state, "norm")
      Array(5., dtype=float32)
    """
    common.check_range("max_norm", max_norm, 0.0, low_open=True)
    common.check_non_negative("eps", eps)

    def init_fn(params):
        del params
        return ClipByGlobalNormState(norm=jnp.zeros([], jnp.float32), clipped=jnp.zeros([], bool))

    def update_fn(updates, state, params=None):
        del params, state
        clipped, norm = clip_grad_norm(updates, max_norm, eps=eps)
        return clipped, ClipByGlobalNormState(norm=norm, clipped=~(max_norm / (norm + eps) >= 1.0))

    return optax.GradientTransformation(init_fn, update_fn)
