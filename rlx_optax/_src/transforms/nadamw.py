"""NAdamW: Adam with a Nesterov look-ahead of the first moment, decoupled decay."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _moments


class NAdamWState(NamedTuple):
    """State of `scale_by_nadamw`."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_nadamw(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    variant: Literal["crate", "algoperf"] = "crate",
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""Nesterov-Adam direction with a constant :math:`\beta_1` (no momentum-decay schedule).

    With :math:`m_t, v_t` the Adam moments and :math:`\hat v_t = v_t/(1-\beta_2^t)`:

    * ``variant="crate"`` (the crate's `NAdamW`, equal to `optax.nadamw` with `eps_root=0`):
      :math:`\bar m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t)`.
    * ``variant="algoperf"`` (the MLCommons AlgoPerf baseline):
      :math:`\bar m_t = (\beta_1 m_t + (1-\beta_1) g_t)/(1-\beta_1^t)`, both terms sharing one
      correction. Its first step is about 1.9 g where the crate's is 1.47 g (b1 = 0.9).

    The direction is :math:`\bar m_t/(\sqrt{\hat v_t}+\epsilon)`.

    Args:
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term outside the square root.
      variant: ``"crate"`` or ``"algoperf"``.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically
        (unbiased; randomness from the step and the leaf) instead of to nearest.

    Returns:
      An `optax.GradientTransformation`.
    """
    common.check_non_negative("eps", eps)
    common.check_choice("variant", variant, ("crate", "algoperf"))

    def prepare(count):
        return common.bias_correction(b1, count + 1)

    def direction(g, m, v, ctx):
        beta1 = jnp.asarray(b1, g.dtype)
        if variant == "crate":
            m_bar = beta1 * m / ctx.extra + (1 - beta1) * g / ctx.bc1
        else:
            m_bar = (beta1 * m + (1 - beta1) * g) / ctx.bc1
        return m_bar / (jnp.sqrt(v / ctx.bc2) + eps)

    return _moments.scale_by_moments(
        NAdamWState,
        b1,
        b2,
        mu_dtype,
        direction,
        prepare,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic_rounding,
    )


def nadamw(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    variant: Literal["crate", "algoperf"] = "crate",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
    mask: common.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""NAdamW with decoupled, learning-rate-scaled decay, as the crate's `NAdamW`.

    "NAdamW" has three incompatible definitions in use (optax, AlgoPerf, PyTorch's `NAdam`
    with a momentum-decay schedule). The default is the crate's, which is optax's; pass
    ``variant="algoperf"`` for the benchmark baseline. See `scale_by_nadamw`.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term outside the square root.
      weight_decay: decoupled decay coefficient.
      variant: ``"crate"`` or ``"algoperf"``.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically
        (unbiased; randomness from the step and the leaf) instead of to nearest.
      mask: pytree (or callable) of booleans selecting the leaves decayed.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> # a toy rate; to train a network from scratch start at 3e-3 (docs/guides/choosing.md)
      >>> tx = rlx_optax.nadamw(1.0, weight_decay=0.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> [round(float(u), 3) for u in tx.update(jnp.array([1.0, -1.0]), state)[0]]
      [-1.474, 1.474]

    References:
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR 2016 workshop;
      Dahl et al., *Benchmarking Neural Network Training Algorithms* (AlgoPerf),
      https://arxiv.org/abs/2306.07179
    """
    return common.alias(
        scale_by_nadamw(
            b1,
            b2,
            eps,
            variant,
            mu_dtype,
            nu_dtype=nu_dtype,
            stochastic_rounding=stochastic_rounding,
        ),
        learning_rate,
        weight_decay,
        mask,
        name="nadamw",
    )
