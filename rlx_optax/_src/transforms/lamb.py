"""LAMB: Adam direction plus decay, rescaled per leaf by a trust ratio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _moments


class LambState(NamedTuple):
    """State of `scale_by_lamb`."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _norm_finite(
    fn: Callable[..., jax.Array], *args: jax.Array, masked_pass: bool | None = None
) -> jax.Array:
    """L2 norm over the finite entries of ``fn(*args)`` (the crate's `l2_norm`), in float32.

    Speed, not semantics, shapes this function: on CPU the plain sum of squares fuses into one
    read of `args` (XLA folds the element-wise `fn` into the reduction), whereas a masked sum,
    or a `fn(*args)` held for a second use, is a parameter-sized temporary written and read
    again. There the masked sum runs only when the plain one is not finite (a non-finite entry,
    or an overflow, where both agree), and it recomputes `fn` rather than keeping it. On
    other backends a conditional waits for its predicate on the host (one synchronisation per
    leaf) while the masked sum fuses into one pass, so the masked sum runs always.
    `masked_pass` forces one form (None: by platform); both give the same value.
    """

    def values():
        x = fn(*args)
        return x.astype(common.compute_dtype(x.dtype))

    x = values()
    total = jnp.sum(x * x)

    def masked():
        x = values()
        return jnp.sum(jnp.where(jnp.isfinite(x), x * x, 0.0))

    def guarded():
        return jax.lax.cond(jnp.isfinite(total), lambda: total, masked)

    if masked_pass is None:
        squares = jax.lax.platform_dependent(cpu=guarded, default=masked)
    else:
        squares = masked() if masked_pass else guarded()
    # A safe square root: the same value, and a zero (not NaN) derivative at a zero norm, so
    # that gradients through an update (meta-learning) stay finite on leaves that are zero.
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def scale_by_lamb(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    bias_correction: bool = True,
    trust_ratio_mask: common.MaskOrFn = None,
    weight_decay_mask: common.MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""LAMB's layer-wise adapted direction.

    .. math::
        r_t = \frac{\hat m_t}{\sqrt{\hat v_t}+\epsilon} + \lambda\theta,\qquad
        u_t = \frac{\lVert\theta\rVert}{\lVert r_t\rVert}\, r_t

    per leaf, with ratio 1 when either norm is 0 and no clamp. Norms skip non-finite entries
    as the crate does. Leaves where `trust_ratio_mask` is False get ratio 1 (biases and norm
    scales are commonly excluded); leaves where `weight_decay_mask` is False get no decay.
    ``bias_correction=False`` drops the Adam corrections (the paper's v3 form).

    Args:
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term (crate and TF-Addons: 1e-6).
      weight_decay: decay added inside the trust ratio.
      bias_correction: bias-correct the moments.
      trust_ratio_mask: pytree (or callable) of booleans: leaves that get the trust ratio.
      weight_decay_mask: pytree (or callable) of booleans: leaves that get weight decay.
      mu_dtype: dtype of the first moment.

    Returns:
      An `optax.GradientTransformation` (it needs `params`).
    """
    common.check_beta("b1", b1)
    common.check_beta("b2", b2)
    common.check_non_negative("eps", eps)
    common.check_non_negative("weight_decay", weight_decay)

    def resolve(mask, params):
        if mask is None:
            return _tree_full(params, True)
        return mask(params) if callable(mask) else mask

    def init_fn(params):
        common.reject_complex(params, "lamb")
        return _moments.init_moments(LambState, params, mu_dtype)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("lamb needs params: call update(grads, state, params)")
        count = optax.safe_increment(state.count)
        if bias_correction:
            bc1 = common.bias_correction(b1, count)
            bc2 = common.bias_correction(b2, count)
        else:
            bc1 = bc2 = jnp.ones([], jnp.float32)
        trust_on = resolve(trust_ratio_mask, params)
        decay_on = resolve(weight_decay_mask, params)

        def leaf(g, m, v, p, use_trust, use_decay):
            g32, m, v = _moments.update_moments(g, m, v, b1, b2)
            ct = g32.dtype
            p32 = p.astype(ct)

            scalars = (bc1, bc2, jnp.asarray(eps, ct), jnp.asarray(weight_decay, ct))

            def direction(m, v, p32, scalars):
                bc1, bc2, eps, weight_decay = scalars
                r = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
                return r + weight_decay * p32 if use_decay else r

            r = direction(m, v, p32, scalars)
            if use_trust:
                # The barrier keeps the norm's copy of `direction` (and of its broadcast
                # scalars) apart from the update's, so each fuses into its own pass over
                # memory instead of sharing a materialised `r`.
                w_norm = _norm_finite(lambda x: x, p32)
                r_norm = _norm_finite(
                    direction, *jax.lax.optimization_barrier((m, v, p32, scalars))
                )
                ok = (w_norm > 0) & (r_norm > 0)
                r = r * jnp.where(ok, w_norm / jnp.where(ok, r_norm, 1.0), 1.0)
            return r.astype(g.dtype), m, v

        u, mu, nu = common.tree_map_multi(
            leaf, 3, updates, state.mu, state.nu, params, trust_on, decay_on
        )
        return u, LambState(
            count=count,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _tree_full(tree: Any, value: Any) -> Any:
    return common.tree_map_none(lambda _: value, tree)


def lamb(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    *,
    bias_correction: bool = True,
    mask: common.MaskOrFn = None,
    trust_ratio_mask: common.MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LAMB, as the crate's `Lamb` and TF-Addons' reference.

    :math:`\theta \leftarrow \theta - \eta\phi_t(\hat m/(\sqrt{\hat v}+\epsilon)+\lambda\theta)`
    with the per-leaf trust ratio :math:`\phi_t = \lVert\theta\rVert/\lVert\cdot\rVert` (each
    pytree leaf is a "layer"). `mask` selects the leaves that are decayed; `trust_ratio_mask`
    the leaves that are layer-adapted (default: all, as the crate and `optax.lamb`).

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term.
      weight_decay: decay inside the trust ratio.
      bias_correction: bias-correct the moments (False: the paper's v3).
      mask: pytree (or callable) of booleans selecting the leaves decayed.
      trust_ratio_mask: pytree (or callable) of booleans selecting the leaves adapted.
      mu_dtype: dtype of the first moment.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> tx = rlx_optax.lamb(0.1, weight_decay=0.0)
      >>> params = jnp.array([3.0, 4.0])
      >>> state = tx.init(params)
      >>> tx.update(jnp.array([1.0, 1.0]), state, params)[0].round(4)  # |u| = lr * |params|
      Array([-0.3536, -0.3536], dtype=float32)

    References:
      You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76 minutes*,
      https://arxiv.org/abs/1904.00962
    """
    common.check_learning_rate(learning_rate)
    return optax.chain(
        scale_by_lamb(b1, b2, eps, weight_decay, bias_correction, trust_ratio_mask, mask, mu_dtype),
        optax.scale_by_learning_rate(learning_rate),
    )
