"""Lion: sign of an interpolated momentum, decoupled weight decay."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _lowbit


class LionState(NamedTuple):
    """State of `scale_by_lion`."""

    count: jax.Array
    mu: optax.Updates


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""Lion's update direction.

    .. math::
        u_t = \operatorname{sign}(\beta_1 m_{t-1} + (1-\beta_1) g_t),\qquad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    with :math:`\operatorname{sign}(0) = 0`. With concrete betas the direction is evaluated as
    :math:`\tfrac{\beta_1}{\beta_2} m_t + \tfrac{\beta_2-\beta_1}{\beta_2} g_t`, the same
    number up to rounding, so that a donated step reads the old moment once (no copy).

    Args:
      b1: interpolation weight of the update direction, in [0, 1).
      b2: decay of the stored moment, in [0, 1).
      mu_dtype: storage of the moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      stochastic_rounding: round the float32 moment into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformation`.
    """
    common.check_beta("b1", b1)
    common.check_beta("b2", b2)
    _lowbit.check_storage("mu_dtype", mu_dtype)

    beta1, beta2 = b1, b2
    # Static: the rewrite needs concrete betas (not injected hyperparameters) and b2 > 0.
    from_new_moment = all(common._concrete_float(b) is not None for b in (b1, b2)) and b2 > 0

    def init_fn(params):
        common.check_params(params, "lion")
        return LionState(
            count=jnp.zeros([], jnp.int32), mu=_lowbit.init_tree(params, mu_dtype, signed=True)
        )

    def update_fn(updates, state, params=None):
        del params
        state = common.check_state("lion", state, LionState, updates, ("mu",))

        count = optax.safe_increment(state.count)

        def leaf(g, m, i):
            ct = common.compute_dtype(g.dtype)
            b1, b2 = jnp.asarray(beta1, ct), jnp.asarray(beta2, ct)
            g32, m32 = g.astype(ct), _lowbit.read(m, ct)
            m_new = b2 * m32 + (1 - b2) * g32
            if from_new_moment and not isinstance(m, _lowbit.QuantizedArray) and m.dtype == ct:
                # b1 m + (1 - b1) g, written through the new moment. Read from the old one, the
                # old moment has two readers and an in-place writer (the donated state), which
                # XLA resolves with a parameter-sized copy per leaf and step (~5x slower on
                # CPU). Equal up to rounding; sign() can differ only where c is ~1 ulp from 0.
                c = (
                    jnp.asarray(beta1 / beta2, ct) * m_new
                    + jnp.asarray((beta2 - beta1) / beta2, ct) * g32
                )
            else:
                c = b1 * m32 + (1 - b1) * g32
            # sign(+-inf) is finite: a NaN/Inf gradient entry (or a moment it left non-finite)
            # makes c non-finite; pass c through there, so that the step shows it
            # (docs/robustness.md; optax.apply_if_finite then skips it). Same fused pass.
            u = jnp.where(jnp.isfinite(c), jnp.sign(c), c)
            bound = None
            if isinstance(m, _lowbit.QuantizedArray):
                bound = _lowbit.ema_bound(m, b2, 1 - b2, g32)
            m_s = _lowbit.write(
                m_new,
                m,
                bound=bound,
                stochastic=stochastic_rounding,
                step=count,
                leaf=i,
                salt=_lowbit.SALT_MU,
            )
            return u.astype(g.dtype), m_s

        index = _lowbit.leaf_indices(updates)
        u, mu = common.tree_map_multi(leaf, 2, updates, state.mu, index)
        return u, LionState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def lion(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    *,
    mu_dtype: Any = None,
    stochastic_rounding: bool = False,
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
      mu_dtype: storage of the moment: None (the parameter dtype), a floating dtype or
        ``"q8"`` (docs/guides/state_precision.md).
      stochastic_rounding: round the float32 moment into bfloat16 storage stochastically.
      mask: pytree (or callable) of booleans selecting the leaves decayed.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> # 1e-3 to 3e-3 trains a network from scratch (docs/guides/choosing.md)
      >>> tx = rlx_optax.lion(1e-3)
      >>> state = tx.init(jnp.zeros(3))
      >>> tx.update(jnp.array([0.5, -2.0, 0.0]), state)[0]
      Array([-0.001,  0.001, -0.   ], dtype=float32)

    References:
      Chen et al., *Symbolic Discovery of Optimization Algorithms*,
      https://arxiv.org/abs/2302.06675
    """
    return common.alias(
        scale_by_lion(b1, b2, mu_dtype, stochastic_rounding=stochastic_rounding),
        learning_rate,
        weight_decay,
        mask,
        name="lion",
    )
