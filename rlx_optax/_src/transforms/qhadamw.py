"""QHAdamW: quasi-hyperbolic Adam with decoupled weight decay."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _moments


class QHAdamWState(NamedTuple):
    """State of `scale_by_qhadamw`."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_qhadamw(
    b1: float = 0.995,
    b2: float = 0.999,
    nu1: float = 0.7,
    nu2: float = 1.0,
    eps: float = 1e-8,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""Quasi-hyperbolic Adam direction.

    .. math::
        u_t = \frac{(1-\nu_1) g_t + \nu_1 \hat m_t}
                   {\sqrt{(1-\nu_2) g_t^2 + \nu_2 \hat v_t} + \epsilon}

    with the bias-corrected Adam moments :math:`\hat m_t, \hat v_t` (the reference folds the
    correction into the averaging weights, which is the same number up to rounding: in float64
    the two orders differ by ~1e-15 on the same gradients; see docs/robustness.md, "Float64
    agreement with references"). ``nu1 = nu2 = 1`` is Adam.

    Args:
      b1: first-moment decay (crate default 0.995, the paper's recommendation).
      b2: second-moment decay.
      nu1: weight of the momentum in the numerator, in [0, 1].
      nu2: weight of the second moment in the denominator, in [0, 1].
      eps: denominator term outside the square root.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically
        (unbiased; randomness from the step and the leaf) instead of to nearest.

    Returns:
      An `optax.GradientTransformation`.
    """
    common.check_range("nu1", nu1, 0.0, 1.0)
    common.check_range("nu2", nu2, 0.0, 1.0)
    common.check_non_negative("eps", eps)

    def direction(g, m, v, ctx):
        # |g| for complex g; ((1 - nu2) g) g keeps nu2 = 1 finite for a huge g (0 * inf = NaN)
        a = jnp.abs(g) if jnp.iscomplexobj(g) else g
        num = (1 - nu1) * g + nu1 * (m / ctx.bc1)
        return num / (jnp.sqrt((1 - nu2) * a * a + nu2 * (v / ctx.bc2)) + eps)

    return _moments.scale_by_moments(
        QHAdamWState,
        b1,
        b2,
        mu_dtype,
        direction,
        None,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic_rounding,
    )


def scale_by_qhadam(*args: Any, **kwargs: Any) -> optax.GradientTransformation:
    """Deprecated name of `scale_by_qhadamw` (the building block is named after its alias)."""
    warnings.warn(
        "rlx_optax.scale_by_qhadam is deprecated: use rlx_optax.scale_by_qhadamw",
        DeprecationWarning,
        stacklevel=2,
    )
    return scale_by_qhadamw(*args, **kwargs)


def qhadamw(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.995,
    b2: float = 0.999,
    nu1: float = 0.7,
    nu2: float = 1.0,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
    mask: common.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""QHAdamW, as the crate's `QHAdamW` and qhoptim's `QHAdamW`.

    Decoupled decay multiplied by the learning rate. Defaults are the crate's (the paper's
    recommended betas (0.995, 0.999) and nus (0.7, 1.0)); qhoptim's own defaults are Adam's.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      nu1: numerator interpolation.
      nu2: denominator interpolation.
      eps: denominator term outside the square root.
      weight_decay: decoupled decay coefficient.
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
      >>> tx = rlx_optax.qhadamw(0.1, nu1=1.0, nu2=1.0, weight_decay=0.0)  # = Adam
      >>> state = tx.init(jnp.zeros(2))
      >>> tx.update(jnp.array([3.0, -0.5]), state)[0]
      Array([-0.1,  0.1], dtype=float32)

    References:
      Ma & Yarats, *Quasi-hyperbolic momentum and Adam for deep learning*,
      https://arxiv.org/abs/1810.06801
    """
    return common.alias(
        scale_by_qhadamw(
            b1,
            b2,
            nu1,
            nu2,
            eps,
            mu_dtype,
            nu_dtype=nu_dtype,
            stochastic_rounding=stochastic_rounding,
        ),
        learning_rate,
        weight_decay,
        mask,
        name="qhadamw",
    )
