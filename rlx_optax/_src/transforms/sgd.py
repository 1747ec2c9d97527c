"""SGD with heavy-ball or Nesterov momentum and L2 decay folded into the gradient."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _lowbit


class SgdState(NamedTuple):
    """State of `scale_by_sgd`; `trace` is None when momentum is the Python number 0."""

    count: jax.Array
    trace: optax.Updates | None


def scale_by_sgd(
    momentum: float = 0.0,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""Momentum without dampening, as PyTorch's SGD and the crate's `Sgd`.

    .. math::
        v_t = \mu v_{t-1} + g_t,\qquad
        u_t = g_t + \mu v_t \ \text{(Nesterov)}\quad\text{or}\quad u_t = v_t

    With `momentum=0` (the Python number) no buffer is kept and the update is the gradient.

    Args:
      momentum: :math:`\mu` in [0, 1).
      nesterov: use the Nesterov look-ahead form.
      accumulator_dtype: storage of the momentum buffer: None (the parameter dtype), a
        floating dtype (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (8- or 4-bit block-wise;
        docs/guides/state_precision.md).
      stochastic_rounding: round the float32 buffer into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformation`.
    """
    common.check_beta("momentum", momentum)
    use_trace = not common._is_zero(momentum)
    _lowbit.check_storage("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        common.check_params(params, "sgd")
        trace = _lowbit.init_tree(params, accumulator_dtype, signed=True) if use_trace else None
        return SgdState(count=jnp.zeros([], jnp.int32), trace=trace)

    def update_fn(updates, state, params=None):
        del params
        state = common.check_state("sgd", state, SgdState, updates, ("trace",))
        count = optax.safe_increment(state.count)
        if not use_trace:
            return updates, SgdState(count=count, trace=None)

        def leaf(g, stored, i):
            ct = common.compute_dtype(g.dtype)
            g32 = g.astype(ct)
            v = momentum * _lowbit.read(stored, ct) + g32
            u = g32 + momentum * v if nesterov else v
            bound = None
            if isinstance(stored, _lowbit.QuantizedArray):
                bound = _lowbit.ema_bound(stored, momentum, 1.0, g32)
            v_s = _lowbit.write(
                v,
                stored,
                bound=bound,
                stochastic=stochastic_rounding,
                step=count,
                leaf=i,
                salt=_lowbit.SALT_MU,
            )
            return u.astype(g.dtype), v_s

        index = _lowbit.leaf_indices(updates)
        u, trace = common.tree_map_multi(leaf, 2, updates, state.trace, index)
        return u, SgdState(count=count, trace=trace)

    return optax.GradientTransformation(init_fn, update_fn)


def sgd(
    learning_rate: common.ScalarOrSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    accumulator_dtype: Any = None,
    stochastic_rounding: bool = False,
    mask: common.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Stochastic gradient descent, as the crate's `Sgd`.

    Weight decay is classical L2 folded into the gradient, :math:`\hat g = g + \lambda\theta`,
    before the momentum (the crate's documentation calls it decoupled; its code folds it).
    With `weight_decay=0` this equals `optax.sgd(learning_rate, momentum, nesterov)`.

    Args:
      learning_rate: a float or an optax schedule.
      momentum: :math:`\mu` in [0, 1); 0 keeps no buffer.
      nesterov: Nesterov momentum.
      weight_decay: L2 coefficient folded into the gradient.
      accumulator_dtype: storage of the momentum buffer: None (the parameter dtype), a
        floating dtype, ``"q8"`` or ``"q4"`` (docs/guides/state_precision.md).
      stochastic_rounding: round the float32 buffer into bfloat16 storage stochastically.
      mask: pytree (or callable) of booleans selecting the leaves decayed.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax, rlx_optax
      >>> # sgd() (no momentum) trains a network from scratch at 0.3 (docs/guides/choosing.md)
      >>> tx = rlx_optax.sgd(0.1, momentum=0.9, nesterov=True)
      >>> params = jnp.array([1.0, 2.0])
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jnp.array([1.0, 1.0]), state)
      >>> updates
      Array([-0.19, -0.19], dtype=float32)

    References:
      Sutskever et al., *On the importance of initialization and momentum in deep learning*,
      ICML 2013.
    """
    return common.alias(
        scale_by_sgd(
            momentum, nesterov, accumulator_dtype, stochastic_rounding=stochastic_rounding
        ),
        learning_rate,
        weight_decay,
        mask,
        decay="l2",
        name="sgd",
    )
