"""Adam with L2 decay folded into the gradient, and AdamW with decoupled decay."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _moments


class AdamState(NamedTuple):
    """State of `scale_by_adam`."""

    count: jax.Array  # int32, number of `update` calls so far
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""Rescale updates by Adam's bias-corrected moment ratio.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}

    The arithmetic runs in float32 (or wider) whatever the gradient dtype; `mu` is stored in
    `mu_dtype` (default: the parameter dtype) and `nu` in the parameter dtype.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root.
      eps_root: added inside the square root (optax's knob; the crate has none).
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically
        (unbiased; randomness from the step and the leaf) instead of to nearest.

    Returns:
      An `optax.GradientTransformation`.
    """
    common.check_non_negative("eps", eps)
    common.check_non_negative("eps_root", eps_root)

    def direction(g, m, v, ctx):
        return (m / ctx.bc1) / (jnp.sqrt(v / ctx.bc2 + eps_root) + eps)

    return _moments.scale_by_moments(
        AdamState,
        b1,
        b2,
        mu_dtype,
        direction,
        None,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic_rounding,
    )


def adam(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
    mask: common.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with classical L2 regularisation, as the crate's `Adam`.

    The decay is folded into the gradient before the moments, :math:`\hat g = g + \lambda\theta`
    (so with `weight_decay > 0` this is *not* AdamW). Defaults are the crate's.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term outside the square root.
      weight_decay: L2 coefficient :math:`\lambda` folded into the gradient.
      eps_root: denominator term inside the square root.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically
        (unbiased; randomness from the step and the leaf) instead of to nearest.
      mask: pytree (or callable returning one) of booleans selecting the leaves decayed.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax, rlx_optax
      >>> # a toy rate; to train a network from scratch start at 3e-3 (docs/guides/choosing.md)
      >>> tx = rlx_optax.adam(0.1)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, state, params)
      >>> [round(float(x), 4) for x in optax.apply_updates(params, updates)["w"]]
      [0.9, 1.1, 0.9]

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, https://arxiv.org/abs/1412.6980
    """
    return common.alias(
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            nu_dtype=nu_dtype,
            stochastic_rounding=stochastic_rounding,
        ),
        learning_rate,
        weight_decay,
        mask,
        decay="l2",
        name="adam",
    )


def adamw(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
    mask: common.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW: Adam with decoupled weight decay multiplied by the learning rate.

    .. math::
        \theta \leftarrow \theta - \eta\,\big(\hat m/(\sqrt{\hat v}+\epsilon) + \lambda\theta\big)

    Same rule as `optax.adamw` and PyTorch's AdamW, but with the crate's default
    `weight_decay=0.01` (optax defaults to 1e-4).

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term outside the square root.
      weight_decay: decoupled decay coefficient.
      eps_root: denominator term inside the square root.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically
        (unbiased; randomness from the step and the leaf) instead of to nearest.
      mask: pytree (or callable returning one) of booleans selecting the leaves decayed.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rlx_optax
      >>> # 3e-3 to 1e-2 trains a network from scratch (docs/guides/choosing.md)
      >>> tx = rlx_optax.adamw(1e-2, weight_decay=0.1)
      >>> params = {"w": jnp.ones((2, 2))}
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> round(float(optax.apply_updates(params, updates)["w"][0, 0]), 4)
      0.989

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*,
      https://arxiv.org/abs/1711.05101
    """
    return common.alias(
        scale_by_adam(
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            nu_dtype=nu_dtype,
            stochastic_rounding=stochastic_rounding,
        ),
        learning_rate,
        weight_decay,
        mask,
        name="adamw",
    )
