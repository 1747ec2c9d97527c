"""Lion: sign of an interpolated momentum, decoupled weight decay."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common


class LionState(NamedTuple):
    """State of `scale_by_lion`."""

    count: jax.Array
    mu: optax.Updates


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Lion's update direction.

    .. math::
        u_t = \operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t),\qquad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    with :math:`\operatorname{sign}(0) = 0`. The direction and the new moment are produced by
    one fused element-wise pass.

    Args:
      b1: interpolation weight of the update direction, in [0, 1).
      b2: decay of the stored moment, in [0, 1).
      mu_dtype: dtype of the moment (default: the parameter dtype).

    Returns:
      An `optax.GradientTransformation`.
    """
    common.check_beta("b1", b1)
    common.check_beta("b2", b2)

    beta1, beta2 = b1, b2

    def init_fn(params):
        return LionState(
            count=jnp.zeros([], jnp.int32), mu=common.zeros_like_tree(params, mu_dtype)
        )

    def update_fn(updates, state, params=None):
        del params

        def leaf(g, m):
            ct = common.compute_dtype(g.dtype)
            b1, b2 = jnp.asarray(beta1, ct), jnp.asarray(beta2, ct)
            g32, m32 = g.astype(ct), m.astype(ct)
            u = jnp.sign(b1 * m32 + (1 - b1) * g32)
            return u.astype(g.dtype), (b2 * m32 + (1 - b2) * g32).astype(m.dtype)

        u, mu = common.tree_map_multi(leaf, 2, updates, state.mu)
        return u, LionState(count=optax.safe_increment(state.count), mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def lion(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    *,
    mu_dtype: Any = None,
    mask: common.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Lion, as the crate's `Lion` and the authors' reference.

    :math:`\theta \leftarrow \theta - \eta(\operatorname{sign}(c_t) + \lambda\theta)`. The
    crate's default decay is 0 (optax's is 1e-3). Use a learning rate 3-10x smaller than
    AdamW's and a decay 3-10x larger.

    Args:
      learning_rate: a float or an optax schedule.
      b1: interpolation weight of the update direction.
      b2: decay of the stored moment.
      weight_decay: decoupled decay coefficient (multiplied by the learning rate).
      mu_dtype: dtype of the moment.
      mask: pytree (or callable) of booleans selecting the leaves decayed.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> tx = rlx_optax.lion(1e-3)
      >>> state = tx.init(jnp.zeros(3))
      >>> tx.update(jnp.array([0.5, -2.0, 0.0]), state)[0]
      Array([-0.001,  0.001, -0.   ], dtype=float32)

    References:
      Chen et al., *Symbolic Discovery of Optimization Algorithms*,
      https://arxiv.org/abs/2302.06675
    """
    return common.alias(scale_by_lion(b1, b2, mu_dtype), learning_rate, weight_decay, mask)
