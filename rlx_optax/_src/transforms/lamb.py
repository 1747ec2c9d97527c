"""LAMB: Adam direction plus decay, rescaled per leaf by a trust ratio."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common


class LambState(NamedTuple):
    """State of `scale_by_lamb`."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def _norm_finite(x: jax.Array) -> jax.Array:
    """L2 norm over the finite entries (the crate's `l2_norm`), in float32."""
    x = x.astype(common.compute_dtype(x.dtype))
    return jnp.sqrt(jnp.sum(jnp.where(jnp.isfinite(x), x * x, 0.0)))


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

    beta1, beta2 = b1, b2

    def init_fn(params):
        return LambState(
            count=jnp.zeros([], jnp.int32),
            mu=common.zeros_like_tree(params, mu_dtype),
            nu=common.zeros_like_tree(params),
        )

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
            ct = common.compute_dtype(g.dtype)
            b1, b2 = jnp.asarray(beta1, ct), jnp.asarray(beta2, ct)
            g32, p32 = g.astype(ct), p.astype(ct)
            m = b1 * m.astype(ct) + (1 - b1) * g32
            v = b2 * v.astype(ct) + (1 - b2) * g32 * g32
            r = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
            if use_decay:
                r = r + weight_decay * p32
            if use_trust:
                w_norm, r_norm = _norm_finite(p32), _norm_finite(r)
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
