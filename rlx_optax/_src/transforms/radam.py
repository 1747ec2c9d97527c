"""RAdam: Adam with a variance-rectified step and an un-rectified warm-up."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _moments


class RAdamState(NamedTuple):
    """State of `scale_by_radam`."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


_TABLE_STEPS = 256


def _rectifier_table(
    b2: Any, threshold: float, *, widen: bool = True
) -> tuple[np.ndarray, np.ndarray] | None:
    """Rectification flags and factors r_t for t = 1.._TABLE_STEPS, computed in float64.

    The crate evaluates rho_t in float64; in float32, 1 - b2^t loses about four digits for small
    t, which moves r_t by 1e-4 near the threshold. None when b2 is traced (injected).
    """
    b2 = common._concrete_float(b2)
    if b2 is None:
        return None
    b2 = float(np.float32(b2)) if widen else float(b2)  # the crate widens its float32 field
    t = np.arange(1, _TABLE_STEPS + 1, dtype=np.float64)
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    b2t = b2**t
    rho_t = rho_inf - 2.0 * t * b2t / (1.0 - b2t)
    on = rho_t > threshold
    safe = np.where(on, rho_t, rho_inf)
    r = np.sqrt((safe - 4) * (safe - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * safe))
    return on, r


def _rectifier_f32(count, b2, rho_inf, threshold):
    """(rectified, r_t) in `common.scalar_dtype()` (float32 unless float64 is enabled), with
    1 - b2^t taken through expm1 for accuracy."""
    dt = common.scalar_dtype()
    t = count.astype(dt)
    log_b2 = jnp.log1p(jnp.asarray(b2, dt) - 1.0)
    b2t = jnp.exp(t * log_b2)
    rho_t = rho_inf - 2.0 * t * b2t / -jnp.expm1(t * log_b2)
    rectified = rho_t > threshold
    # Guard the square root: its value only matters where `rectified` holds.
    safe = jnp.where(rectified, rho_t, rho_inf)
    r = jnp.sqrt((safe - 4.0) * (safe - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * safe))
    return rectified, r


_EPS_PLACEMENTS = ("corrected", "uncorrected")
#: The switches each `behaviour` sets (explicit arguments take precedence).
PRESETS = {
    "crate": {
        "threshold": 4.0,
        "degenerate_to_sgd": True,
        "eps_placement": "corrected",
        "decay": "l2",
    },
    "reference": {
        "threshold": 5.0,
        "degenerate_to_sgd": False,
        "eps_placement": "uncorrected",
        "decay": "decoupled",
    },
}


def _rectifier(b2: Any, threshold: float):
    """`prepare(count) -> (rectified, r_t)`: the table while it lasts, float32 formula after."""
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    # float32 scalars: the crate's b2 (a float32 field widened); float64: b2 itself
    tables = {
        np.dtype(np.float32): _rectifier_table(b2, threshold),
        np.dtype(np.float64): _rectifier_table(b2, threshold, widen=False),
    }

    def prepare(count):
        rectified, r = _rectifier_f32(count, b2, rho_inf, threshold)
        exact = tables[common.scalar_dtype()]
        if exact is not None:
            # rho_t cancels catastrophically in float32 while t is small; use the table there.
            table_on, table_r = jnp.asarray(exact[0]), jnp.asarray(exact[1], common.scalar_dtype())
            idx = jnp.clip(count - 1, 0, table_r.shape[0] - 1)
            early = count <= table_r.shape[0]
            rectified = jnp.where(early, table_on[idx], rectified)
            r = jnp.where(early, table_r[idx], r)
        return rectified, r

    return prepare


class DecayWhenSteppingState(NamedTuple):
    """State of `add_decayed_weights_when_stepping`."""

    count: jax.Array
    inner: optax.OptState


def add_decayed_weights_when_stepping(
    weight_decay: Any,
    mask: common.MaskOrFn,
    b2: Any,
    threshold: float,
    degenerate_to_sgd: bool,
) -> optax.GradientTransformation:
    """Decoupled decay on the steps where RAdam moves, as in the authors' code.

    With ``degenerate_to_sgd=False`` the reference leaves a parameter untouched during the
    warm-up, decay included; every other step decays as `add_decayed_weights`.
    """
    inner = common.add_decayed_weights(weight_decay, mask)
    prepare = _rectifier(b2, threshold)

    def init_fn(params):
        return DecayWhenSteppingState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        state = common.check_state("radam decay", state, DecayWhenSteppingState, updates)
        count = optax.safe_increment(state.count)
        zeros = common.tree_map_none(jnp.zeros_like, updates)
        decay, inner_state = inner.update(zeros, state.inner, params)
        moves = jnp.logical_or(prepare(count)[0], degenerate_to_sgd)
        new = common.tree_map_none(
            lambda u, d: u + jnp.where(moves, d, jnp.zeros_like(d)), updates, decay
        )
        return new, DecayWhenSteppingState(count, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_radam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    threshold: float | None = None,
    degenerate_to_sgd: bool | None = None,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
    eps_placement: str | None = None,
    behaviour: str = "crate",
) -> optax.GradientTransformation:
    r"""Rectified Adam direction.

    .. math::
        \rho_\infty = \tfrac{2}{1-\beta_2} - 1,\quad
        \rho_t = \rho_\infty - \tfrac{2t\beta_2^t}{1-\beta_2^t},\quad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    When :math:`\rho_t > \text{threshold}` the direction is
    :math:`r_t\,\hat m_t/(\sqrt{\hat v_t}+\epsilon)`; otherwise it is :math:`\hat m_t`
    (``degenerate_to_sgd=True``, the crate and optax) or zero (``False``, the authors' current
    reference, which leaves the parameters untouched during warm-up).

    ``eps_placement="uncorrected"`` adds :math:`\epsilon` where the authors' code, PyTorch and
    pytorch-optimizer add it, to the uncorrected root:
    :math:`r_t \sqrt{1-\beta_2^t}\,\hat m_t/(\sqrt{v_t}+\epsilon)`, the same as
    :math:`\epsilon/\sqrt{1-\beta_2^t}` in the crate's form.

    The crate's threshold is 4 (the paper's); optax and PyTorch use 5 (and compare with >=,
    which differs from > only when rho_t hits the threshold exactly).

    Args:
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term outside the square root.
      threshold: the rectification starts once :math:`\rho_t` exceeds it.
      degenerate_to_sgd: during warm-up, step along :math:`\hat m` (True) or not at all.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically
        (unbiased; randomness from the step and the leaf) instead of to nearest.
      eps_placement: ``"corrected"`` (crate, optax: :math:`\sqrt{\hat v_t}+\epsilon`) or
        ``"uncorrected"`` (the reference: :math:`\sqrt{v_t}+\epsilon`).
      behaviour: ``"crate"`` (threshold 4, momentum steps in warm-up, corrected eps) or
        ``"reference"`` (the authors' current code: threshold 5, no warm-up step,
        uncorrected eps); arguments given explicitly take precedence.

    Returns:
      An `optax.GradientTransformation`.
    """
    opts = common.resolve_preset(
        behaviour,
        PRESETS,
        threshold=threshold,
        degenerate_to_sgd=degenerate_to_sgd,
        eps_placement=eps_placement,
    )
    threshold, degenerate_to_sgd = opts["threshold"], opts["degenerate_to_sgd"]
    common.check_choice("eps_placement", opts["eps_placement"], _EPS_PLACEMENTS)
    raw_eps = opts["eps_placement"] == "uncorrected"
    common.check_beta("b2", b2)  # before it divides by 1 - b2
    common.check_non_negative("eps", eps)
    common.check_range("threshold", threshold, 4.0)
    prepare = _rectifier(b2, threshold)

    def direction(g, m, v, ctx):
        rectified, r = ctx.extra
        m_hat = m / ctx.bc1
        warm = m_hat if degenerate_to_sgd else jnp.zeros_like(m_hat)
        if raw_eps:
            step = r * jnp.sqrt(ctx.bc2) * m_hat / (jnp.sqrt(v) + eps)
        else:
            step = r * m_hat / (jnp.sqrt(v / ctx.bc2) + eps)
        return jnp.where(rectified, step, warm)

    return _moments.scale_by_moments(
        RAdamState,
        b1,
        b2,
        mu_dtype,
        direction,
        prepare,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic_rounding,
    )


def radam(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    threshold: float | None = None,
    degenerate_to_sgd: bool | None = None,
    eps_placement: str | None = None,
    decay: str | None = None,
    behaviour: str = "crate",
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
    mask: common.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""RAdam with L2 decay folded into the gradient, as the crate's `RAdam`.

    ``behaviour="reference"`` is the authors' current code (LiyuanLucasLiu/RAdam, the same
    rule as pytorch-optimizer's `RAdam`): threshold 5, no step during warm-up,
    :math:`\epsilon` on the uncorrected root, and decoupled decay (times the rate) applied
    only on the steps that move the parameters. Arguments given explicitly override the
    preset: ``behaviour="reference", degenerate_to_sgd=True`` is torch.optim.RAdam with
    ``decoupled_weight_decay=True``.

    With the defaults (threshold 4, SGD-style warm-up) steps 1-4 move along the bias-corrected
    momentum and rectification starts at step 5 (b2 = 0.999). ``threshold=5`` gives optax's
    `radam`; ``degenerate_to_sgd=False`` the authors' reference, which does not move during
    warm-up. See `scale_by_radam`.

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term outside the square root.
      weight_decay: L2 coefficient folded into the gradient.
      threshold: rectification threshold on :math:`\rho_t` (>= 4).
      degenerate_to_sgd: warm-up along :math:`\hat m` (True) or no step (False).
      eps_placement: ``"corrected"`` or ``"uncorrected"`` (see `scale_by_radam`).
      decay: ``"l2"`` (crate: folded into the gradient) or ``"decoupled"`` (reference:
        :math:`\theta \leftarrow \theta - \eta\lambda\theta` on the steps that move).
      behaviour: ``"crate"`` or ``"reference"``: sets the four switches above at once.
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
      >>> # a toy rate; to train from scratch start at 3e-2, also with behaviour="reference"
      >>> # (docs/guides/choosing.md)
      >>> tx = rlx_optax.radam(1.0)
      >>> state = tx.init(jnp.zeros(2))
      >>> tx.update(jnp.array([1.0, -2.0]), state)[0]  # warm-up: -lr * m_hat
      Array([-1.,  2.], dtype=float32)

    References:
      Liu et al., *On the Variance of the Adaptive Learning Rate and Beyond*,
      https://arxiv.org/abs/1908.03265
    """
    opts = common.resolve_preset(
        behaviour,
        PRESETS,
        threshold=threshold,
        degenerate_to_sgd=degenerate_to_sgd,
        eps_placement=eps_placement,
        decay=decay,
    )
    common.check_choice("decay", opts["decay"], ("l2", "decoupled"))
    scale = scale_by_radam(
        b1,
        b2,
        eps,
        opts["threshold"],
        opts["degenerate_to_sgd"],
        mu_dtype,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic_rounding,
        eps_placement=opts["eps_placement"],
    )
    if opts["decay"] == "l2":
        return common.alias(scale, learning_rate, weight_decay, mask, decay="l2", name="radam")
    common.check_learning_rate(learning_rate)
    decayed = add_decayed_weights_when_stepping(
        weight_decay, mask, b2, opts["threshold"], opts["degenerate_to_sgd"]
    )
    return common.chain("radam", scale, decayed, optax.scale_by_learning_rate(learning_rate))
