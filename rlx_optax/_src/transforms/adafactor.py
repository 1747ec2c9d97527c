"""Adafactor: factored second moments, update clipping and a relative step size."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _lowbit

_FACTORED = ("rank2", "last_two", "none")
_CLIPPING_RULES = ("crate", "paper")
_NORMALIZATIONS = ("sum", "mean")
_MOMENTUM_OF = ("direction", "update")
#: The switches each `behaviour` of `adafactor` sets (explicit arguments take precedence).
PRESETS = {
    "crate": {
        "factored": "rank2",
        "factored_normalization": "sum",
        "clipping_rule": "crate",
        "momentum_of": "direction",
        "multiply_by_parameter_scale": "relative",  # only with the relative step
    },
    "reference": {
        "factored": "last_two",
        "factored_normalization": "mean",
        "clipping_rule": "paper",
        "momentum_of": "update",
        "multiply_by_parameter_scale": True,
    },
}


class AdafactorState(NamedTuple):
    """State of `scale_by_adafactor`.

    A factored leaf of shape (..., R, C) keeps `v_row` (..., R) and `v_col` (..., C) and a
    one-element placeholder `v` of shape (1,); any other leaf keeps the full `v` (the
    parameter's shape) and (1,)-shaped placeholders `v_row`/`v_col`. Which one a leaf uses is
    read from these shapes in `update` (a factored leaf has rank >= 2, so its shape is never
    (1,)), so no integer hyperparameter is needed there (`optax.inject_hyperparams` works
    without static arguments). The placeholders are not zero-size because orbax refuses to
    save zero-size arrays. Statistics are float32 (float64 for float64 parameters).
    """

    count: jax.Array
    v_row: optax.Updates
    v_col: optax.Updates
    v: optax.Updates
    mu: optax.Updates | None  # EMA of the clipped update, when momentum is used


def _static_int(name: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} decides the state's shapes, so it must be a concrete integer when the "
            f"state is created: under optax.inject_hyperparams name it static "
            f"(static_args=({name!r},)), or leave it at its default None"
        )
    return int(value)


def _placeholder(dtype: Any) -> jax.Array:
    """The stand-in for a statistic a leaf does not use: one zero, in a buffer of its own."""
    return jnp.zeros((1,), dtype)


def _row_col_means_of_squares(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Row and column means of :math:`g^2` over the last two axes, each reading `g` once.

    The column reduction squares an `optimization_barrier` of `g` (it moves no data): with
    one shared ``g * g``, XLA's CPU backend stores :math:`g^2` for the two reductions, a
    write and two reads of a parameter-sized array more than these two reads of `g`.
    """
    h = jax.lax.optimization_barrier(g)
    return jnp.mean(g * g, axis=-1), jnp.mean(h * h, axis=-2)


def _inverse_root_factors(v_row, v_col, normalization, eps):
    r"""Row and column factors of :math:`1/\sqrt{\hat V}`, zero where a statistic saturated.

    :math:`\hat V_{ij} = a_i c_j` with :math:`a = r/\max(\nu(r), \epsilon_1)` (``"sum"``:
    :math:`\nu(r) = \sum_k r_k`, ``"mean"``: their mean) and :math:`c` the column
    statistics, so :math:`1/\sqrt{\hat V_{ij}} = a_i^{-1/2} c_j^{-1/2}`: the step needs two
    vectors and a product per entry instead of a parameter-sized :math:`\hat V`, a square
    root and a division per entry (the same numbers up to rounding).

    A row or column statistic saturates at +inf when a square in it overflows (|g| above
    ~1.8e19 in float32); its normaliser is then +inf too and :math:`a_i` would be inf/inf =
    NaN. The factor of a saturated row or column is 0, and `_direction` gives its entries a
    zero update (as an unfactored saturated moment gives). The other entries keep the plain
    formula (:math:`\hat V = 0` under a saturated normaliser, then the floor).

    Returns:
      ``(ia, ic, sat_row, sat_col)``: :math:`a^{-1/2}` (..., R) and :math:`c^{-1/2}` (..., C)
      with zeros where saturated, and the two saturation masks.
    """
    if normalization == "mean":
        denom = jnp.mean(v_row, axis=-1, keepdims=True)
    else:
        denom = jnp.sum(v_row, axis=-1, keepdims=True)
    a = v_row / jnp.maximum(denom, eps)
    sat_row, sat_col = jnp.isposinf(v_row), jnp.isposinf(v_col)
    zero = jnp.zeros([], a.dtype)
    ia = jnp.where(sat_row, zero, 1 / jnp.sqrt(a))
    ic = jnp.where(sat_col, zero, 1 / jnp.sqrt(v_col))
    return ia, ic, sat_row, sat_col


def _direction(g, ia, ic, sat_row, sat_col, cap):
    r""":math:`u = g / \max(\sqrt{\hat V}, \sqrt{\epsilon_1}) = g\,\min(a_i^{-1/2}c_j^{-1/2},
    \epsilon_1^{-1/2})`, and 0 on saturated rows and columns (NaN where `g` is not finite)."""
    w = jnp.minimum(ia[..., :, None] * ic[..., None, :], cap)
    return g * jnp.where(sat_row[..., :, None] | sat_col[..., None, :], 0, w)


def _momentum_zeros(params: optax.Params, mu_dtype: Any = None) -> optax.Params:
    """The first moment: float32 (float64 for float64 parameters) unless `mu_dtype` (a
    floating dtype or "q8", see `_lowbit`) says otherwise."""
    if mu_dtype is not None:
        return _lowbit.init_tree(params, mu_dtype, signed=True)
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=common.compute_dtype(p.dtype)), params)


def _is_factored(shape: tuple[int, ...], factored: str, min_dim: int) -> bool:
    if factored == "none" or len(shape) < 2:
        return False
    if factored == "rank2" and len(shape) != 2:
        return False
    return min(shape[-2], shape[-1]) >= min_dim


def scale_by_adafactor(
    beta2_decay: float = -0.8,
    eps: float = 1e-30,
    clipping_threshold: float = 1.0,
    *,
    factored: str = "rank2",
    min_dim_size_to_factor: int | None = None,
    factored_normalization: str = "sum",
    clipping_rule: str = "crate",
    momentum: float | None = None,
    mu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""Adafactor's clipped, second-moment-normalised direction (no step size, no decay).

    With :math:`t` the 1-based step, :math:`\hat\beta_{2,t} = 1 - t^{\text{beta2\_decay}}`
    (0 at the first step) and :math:`\hat g^2 = g^2 + \epsilon_1`:

    .. math::
        r_t = \hat\beta_{2,t} r_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_j \hat g^2,\quad
        c_t = \hat\beta_{2,t} c_{t-1} + (1-\hat\beta_{2,t})\,\mathrm{mean}_i \hat g^2,\quad
        \hat V = \frac{r_t c_t^\top}{\max(\textstyle\sum_k r_{t,k}, \epsilon_1)}

    for factored leaves (the full EMA :math:`v_t` of :math:`\hat g^2` otherwise), then
    :math:`u = g / \max(\sqrt{\hat V}, \sqrt{\epsilon_1})` and update clipping
    :math:`u \leftarrow u / \max(1, \mathrm{RMS}(u)\cdot d)` with :math:`d` the threshold.
    These are the crate's rules; the keyword arguments switch to the reference's.

    Args:
      beta2_decay: exponent of the second-moment decay schedule (crate and HF sign: -0.8;
        optax's ``decay_rate=0.8``), in (-inf, 0].
      eps: :math:`\epsilon_1`, added to :math:`g^2`.
      clipping_threshold: :math:`d`, the update-clipping threshold (> 0).
      factored: ``"rank2"`` (crate: only rank-2 leaves), ``"last_two"`` (reference, HF and
        t2t: the last two axes of every leaf of rank >= 2) or ``"none"``.
      min_dim_size_to_factor: factor only when both factored axes are at least this long
        (None: 1, the crate has no minimum; optax uses 128). It fixes the state's shapes: under
        `optax.inject_hyperparams` with a jitted `init`, pass it in ``static_args``.
      factored_normalization: ``"sum"`` (crate: divide :math:`r c^\top` by the sum of the row
        means) or ``"mean"`` (paper: by their mean, exact for rank-1 :math:`\hat g^2`).
      clipping_rule: ``"crate"`` (:math:`\max(1, \mathrm{RMS}\cdot d)`) or ``"paper"``
        (:math:`\max(1, \mathrm{RMS}/d)`); identical for :math:`d = 1`.
      momentum: :math:`\beta_1` of an EMA of the clipped update (None: no first moment, the
        crate's behaviour), in [0, 1).
      mu_dtype: storage of the momentum: None (float32, the compute dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      stochastic_rounding: round the float32 momentum into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformation`.
    """
    common.check_range("beta2_decay", beta2_decay, None, 0.0)
    common.check_non_negative("eps", eps)
    common.check_range("clipping_threshold", clipping_threshold, 0.0, low_open=True)
    common.check_choice("factored", factored, _FACTORED)
    common.check_choice("factored_normalization", factored_normalization, _NORMALIZATIONS)
    common.check_choice("clipping_rule", clipping_rule, _CLIPPING_RULES)
    if momentum is not None:
        common.check_beta("momentum", momentum)
    common.check_range("min_dim_size_to_factor", min_dim_size_to_factor, 1)
    _lowbit.check_storage("mu_dtype", mu_dtype)

    def init_fn(params):
        common.reject_complex(params, "adafactor")
        min_dim = _static_int("min_dim_size_to_factor", min_dim_size_to_factor, 1)

        def leaf(p):
            dt = common.compute_dtype(p.dtype)
            # distinct placeholder buffers: one shared array would be donated twice by a
            # jitted step that donates the state; (1,) rather than (0,): orbax cannot save
            # zero-size arrays
            if _is_factored(p.shape, factored, min_dim):
                row, col = jnp.zeros(p.shape[:-1], dt), jnp.zeros(p.shape[:-2] + p.shape[-1:], dt)
                return row, col, _placeholder(dt)
            # zeros_like keeps the parameter's sharding for the full second moment
            return _placeholder(dt), _placeholder(dt), jnp.zeros_like(p, dtype=dt)

        v_row, v_col, v = common.tree_map_multi(leaf, 3, params)
        mu = None if momentum is None else _momentum_zeros(params, mu_dtype)
        return AdafactorState(jnp.zeros([], jnp.int32), v_row, v_col, v, mu)

    def update_fn(updates, state, params=None):
        del params
        state = common.check_state(
            "adafactor",
            state,
            AdafactorState,
            updates,
            ("v_row", "v_col", "v", "mu"),
            leaf_check=_held_shape,
        )
        count = optax.safe_increment(state.count)

        def leaf(g, v_row, v_col, v, m=None, i=0):
            ct = common.compute_dtype(g.dtype)
            beta2 = 1 - count.astype(ct) ** jnp.asarray(beta2_decay, ct)
            e1 = jnp.asarray(eps, ct)
            g32 = g.astype(ct)
            if v.shape != g.shape:  # factored (see AdafactorState)
                # e1 added to the means, not to each square (the same up to rounding)
                row, col = _row_col_means_of_squares(g32)
                v_row = beta2 * v_row + (1 - beta2) * (row + e1)
                v_col = beta2 * v_col + (1 - beta2) * (col + e1)
                factors = _inverse_root_factors(v_row, v_col, factored_normalization, e1)
                u = _direction(g32, *factors, 1 / jnp.sqrt(e1))
            else:
                v = beta2 * v + (1 - beta2) * (g32 * g32 + e1)
                u = g32 / jnp.maximum(jnp.sqrt(v), jnp.sqrt(e1))
            rms = jnp.sqrt(jnp.mean(u * u))
            d = jnp.asarray(clipping_threshold, ct)
            u = u / jnp.maximum(1.0, rms * d if clipping_rule == "crate" else rms / d)
            if m is not None:
                b1 = jnp.asarray(momentum, ct)
                u = b1 * _lowbit.read(m, ct) + (1 - b1) * u
                m = _lowbit.write(
                    u,
                    m,
                    stochastic=stochastic_rounding,
                    step=count,
                    leaf=i,
                    salt=_lowbit.SALT_MU,
                )
            return u.astype(g.dtype), v_row, v_col, v, m

        if state.mu is None:
            out = common.tree_map_multi(
                lambda *a: leaf(*a)[:4], 4, updates, state.v_row, state.v_col, state.v
            )
            mu = None
        else:
            index = _lowbit.leaf_indices(updates)
            *out, mu = common.tree_map_multi(
                leaf, 5, updates, state.v_row, state.v_col, state.v, state.mu, index
            )
        u, v_row, v_col, v = out
        v_row = optax.tree.cast_like(v_row, state.v_row)
        v_col = optax.tree.cast_like(v_col, state.v_col)
        v = optax.tree.cast_like(v, state.v)
        return u, AdafactorState(count, v_row, v_col, v, mu)

    return optax.GradientTransformation(init_fn, update_fn)


def _held_shape(shape, v_row, v_col, v, m=None) -> str | None:
    """What the state holds at a gradient leaf of `shape`, when it disagrees with it (see
    `AdafactorState`: the full `v`, or the factors `v_row`/`v_col`)."""
    if m is not None and tuple(m.shape) != shape:
        return f"the state's 'mu' of shape {tuple(m.shape)}"
    if tuple(v.shape) == shape:
        return None
    if len(shape) >= 2 and v_row.shape == shape[:-1] and v_col.shape == shape[:-2] + shape[-1:]:
        return None
    if tuple(v.shape) != (1,):
        return f"the state's 'v' of shape {tuple(v.shape)}"
    implied = tuple(v_row.shape) + tuple(v_col.shape[-1:])
    return (
        f"the state's factored statistics of a {implied} leaf ('v_row' {tuple(v_row.shape)}, "
        f"'v_col' {tuple(v_col.shape)})"
    )


class ScaleByStepSizeState(NamedTuple):
    """State of `scale_by_adafactor_step_size`.

    The counter is ``step_count``, not ``count``: `AdafactorState` has the ``count`` of the
    chain, so ``optax.tree.get(state, "count")`` finds exactly one.
    """

    step_count: jax.Array
    schedule: optax.OptState  # state of `optax.scale_by_learning_rate`, or EmptyState
    mu: optax.Updates | None = None  # EMA of the scaled update (momentum after the step size)


def scale_by_adafactor_step_size(
    learning_rate: common.ScalarOrSchedule | None = None,
    *,
    eps_scale: float = 1e-3,
    max_relative_step: float = 1e-2,
    multiply_by_parameter_scale: bool | None = None,
    momentum: float | None = None,
    weight_decay: Any = 0.0,
    mask: common.MaskOrFn = None,
    mu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""Multiply updates by :math:`-\alpha_t`, Adafactor's step size.

    With `momentum`, the result is averaged *after* the step size and parameter scale, as in
    tensor2tensor, HF and pytorch-optimizer: :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1)
    (-\alpha_t u_t)`, and the decay :math:`-\alpha_t\lambda\theta` is added outside the
    average.

    With `learning_rate` None, the relative step
    :math:`\alpha_t = \min(\text{max\_relative\_step}, 1/\sqrt t)\cdot
    \max(\epsilon_2, \mathrm{RMS}(\theta))`; otherwise the given rate (or schedule), times
    :math:`\max(\epsilon_2, \mathrm{RMS}(\theta))` when `multiply_by_parameter_scale`.
    :math:`\mathrm{RMS}(\theta)` is taken per leaf, before the update.

    Args:
      learning_rate: None (relative step) or a float or schedule.
      eps_scale: :math:`\epsilon_2`, the floor of the parameter scale.
      max_relative_step: the cap of the relative step.
      multiply_by_parameter_scale: scale by the parameter RMS; None means "only with the
        relative step" (the crate; HF's default mode is relative step with parameter scale).
      momentum: :math:`\beta_1` of the average of the scaled update (None: none).
      weight_decay: :math:`\lambda`, decoupled, times :math:`\alpha_t`, outside the average.
      mask: pytree (or callable) of booleans selecting the leaves decayed.
      mu_dtype: storage of the momentum: None (float32), a floating dtype or ``"q8"``.
      stochastic_rounding: round the float32 momentum into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformation`; `update` needs `params` when the parameter scale is
      used.
    """
    common.check_non_negative("eps_scale", eps_scale)
    common.check_non_negative("max_relative_step", max_relative_step)
    if learning_rate is not None:
        common.check_learning_rate(learning_rate)
    param_scale = (
        learning_rate is None
        if multiply_by_parameter_scale is None
        else bool(multiply_by_parameter_scale)
    )
    if momentum is not None:
        common.check_beta("momentum", momentum)
    _lowbit.check_storage("mu_dtype", mu_dtype)
    rate = None if learning_rate is None else optax.scale_by_learning_rate(learning_rate)
    decay = common.add_decayed_weights(weight_decay, mask)

    def init_fn(params):
        inner = rate.init(params) if rate is not None else common.EmptyState()
        mu = None if momentum is None else _momentum_zeros(params, mu_dtype)
        return ScaleByStepSizeState(jnp.zeros([], jnp.int32), inner, mu)

    def relative(u, count):
        ct = common.compute_dtype(u.dtype)
        step = jnp.minimum(jnp.asarray(max_relative_step, ct), jax.lax.rsqrt(count.astype(ct)))
        return (-step * u).astype(u.dtype)

    def update_fn(updates, state, params=None):
        state = common.check_state(
            "adafactor step size", state, ScaleByStepSizeState, updates, ("mu",)
        )
        count = optax.safe_increment(state.step_count)
        updates, inner = scaled(updates, state, count, params)
        if momentum is None:
            return updates, ScaleByStepSizeState(count, inner, state.mu)

        def average(u, m, i):
            ct = common.compute_dtype(u.dtype)
            b1 = jnp.asarray(momentum, ct)
            new = b1 * _lowbit.read(m, ct) + (1 - b1) * u.astype(ct)
            stored = _lowbit.write(
                new,
                m,
                stochastic=stochastic_rounding,
                step=count,
                leaf=i,
                salt=_lowbit.SALT_MU,
            )
            return new, stored

        index = _lowbit.leaf_indices(updates)
        mu, mu_stored = common.tree_map_multi(average, 2, updates, state.mu, index)
        updates = common.tree_map_none(lambda m, u: m.astype(u.dtype), mu, updates)
        zeros = common.tree_map_none(jnp.zeros_like, updates)
        decayed, _ = decay.update(zeros, decay.init(params), params)
        if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
            decayed, _ = scaled(decayed, state, count, params)
            updates = common.tree_map_none(lambda u, d: u + d, updates, decayed)
        return updates, ScaleByStepSizeState(count, inner, mu_stored)

    def scaled(updates, state, count, params):
        inner = state.schedule
        if rate is not None:
            updates, inner = rate.update(updates, inner, params)
        else:
            updates = common.tree_map_none(lambda u: relative(u, count), updates)
        if param_scale:
            if params is None:
                raise ValueError("Adafactor's parameter scale needs params: update(g, s, params)")

            def scale(u, p):
                ct = common.compute_dtype(p.dtype)
                p32 = p.astype(ct)
                rms = jnp.sqrt(jnp.mean(p32 * p32)) if p.size else jnp.zeros([], ct)
                return (u.astype(ct) * jnp.maximum(jnp.asarray(eps_scale, ct), rms)).astype(u.dtype)

            updates = common.tree_map_none(scale, updates, params)
        return updates, inner

    return optax.GradientTransformation(init_fn, update_fn)


def adafactor(
    learning_rate: common.ScalarOrSchedule | None = None,
    beta2_decay: float = -0.8,
    eps: float = 1e-30,
    eps_scale: float = 1e-3,
    clipping_threshold: float = 1.0,
    weight_decay: float = 0.0,
    *,
    factored: str | None = None,
    min_dim_size_to_factor: int | None = None,
    factored_normalization: str | None = None,
    clipping_rule: str | None = None,
    momentum: float | None = None,
    momentum_of: str | None = None,
    multiply_by_parameter_scale: bool | None = None,
    behaviour: str = "crate",
    mask: common.MaskOrFn = None,
    mu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adafactor, as the crate's `Adafactor`, with switches to Shazeer & Stern's reference.

    .. math::
        \theta \leftarrow \theta - \alpha_t\,(u_t + \lambda\theta)

    with :math:`u_t` the clipped direction of `scale_by_adafactor` and :math:`\alpha_t` the
    step of `scale_by_adafactor_step_size`: the relative step
    :math:`\min(10^{-2}, 1/\sqrt t)\max(\epsilon_2, \mathrm{RMS}(\theta))` when
    `learning_rate` is None (the crate's default), else the given rate. The decay is
    multiplied by :math:`\alpha_t` (also the relative step), unlike optax's adafactor, whose
    decay is not multiplied by the rate.

    Defaults are the crate's: factored second moment for rank-2 leaves only, the full second
    moment for every other rank, no first moment, clipping :math:`\max(1, \mathrm{RMS}\cdot d)`,
    :math:`\hat V` normalised by the *sum* of the row means. Crate -> reference:
    ``factored="last_two"`` (factor the last two axes of n-D leaves),
    ``min_dim_size_to_factor``, ``momentum``, ``clipping_rule="paper"``,
    ``factored_normalization="mean"``, ``multiply_by_parameter_scale=True`` (HF's
    ``scale_parameter`` with a manual rate), ``momentum_of="update"``.
    ``behaviour="reference"`` sets all of them at once (tensor2tensor's rule as HF,
    torch.optim.Adafactor and pytorch-optimizer's `AdaFactor` implement it); arguments given
    explicitly take precedence. With the defaults every hyperparameter is traceable, so
    ``optax.inject_hyperparams(adafactor)`` needs no static arguments, also under
    ``jax.jit(tx.init)`` (optax's adafactor does, optax issue 412); an explicit
    ``min_dim_size_to_factor`` shapes the state and must then be named in ``static_args``.

    Args:
      learning_rate: None (relative step size) or a float or optax schedule.
      beta2_decay: exponent of :math:`\hat\beta_{2,t} = 1 - t^{\text{beta2\_decay}}` (crate
        field `beta2_decay`).
      eps: :math:`\epsilon_1` added to :math:`g^2` (crate field `eps1`).
      eps_scale: :math:`\epsilon_2`, floor of the parameter RMS (crate field `eps2`).
      clipping_threshold: :math:`d` (crate field `clip_threshold`).
      weight_decay: :math:`\lambda`, decoupled, multiplied by :math:`\alpha_t`.
      factored: ``"rank2"``, ``"last_two"`` or ``"none"`` (see `scale_by_adafactor`).
      min_dim_size_to_factor: minimum length of both factored axes (None: 1). Under
        `optax.inject_hyperparams` with a jitted `init` name it in ``static_args``.
      factored_normalization: ``"sum"`` (crate) or ``"mean"`` (paper).
      clipping_rule: ``"crate"`` or ``"paper"``.
      momentum: :math:`\beta_1` of an EMA of the update (None: none, the crate's and the
        paper's default).
      momentum_of: ``"direction"`` (crate: average the clipped direction :math:`u_t`, before
        the step size) or ``"update"`` (reference: average :math:`\alpha_t u_t`, after the
        relative step and parameter scale, decay outside the average).
      multiply_by_parameter_scale: True or False; when not given, the crate's rule (only with
        the relative step) or, with ``behaviour="reference"``, True.
      behaviour: ``"crate"`` or ``"reference"`` (factored ``"last_two"``, normalization
        ``"mean"``, clipping ``"paper"``, momentum of the update, parameter scale always).
      mask: pytree (or callable) of booleans selecting the leaves decayed.
      mu_dtype: storage of the momentum (with `momentum`): None (float32), a floating dtype
       , ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      stochastic_rounding: round the float32 momentum into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax, rlx_optax
      >>> # manual rates: 2e-3 to 5e-3, 1.5e-2 with behaviour="reference"
      >>> # (docs/guides/choosing.md)
      >>> tx = rlx_optax.adafactor()  # relative step size
      >>> params = {"w": jnp.full((2, 3), 0.5), "b": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones((2, 3)), "b": jnp.array([1.0, -1.0, 1.0])}
      >>> updates, state = tx.update(grads, state, params)
      >>> # first step: alpha = min(1e-2, 1) * max(1e-3, RMS(theta)); u = sign(g) for b,
      >>> # and for w the factored u (RMS sqrt(2)) is clipped to RMS 1
      >>> [round(float(x), 6) for x in updates["b"]]
      [-1e-05, 1e-05, -1e-05]
      >>> round(float(updates["w"][0, 0]), 6)
      -0.005

    References:
      Shazeer & Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory Cost*,
      https://arxiv.org/abs/1804.04235
    """
    if learning_rate is not None:
        common.check_learning_rate(learning_rate)
    opts = common.resolve_preset(
        behaviour,
        PRESETS,
        factored=factored,
        factored_normalization=factored_normalization,
        clipping_rule=clipping_rule,
        momentum_of=momentum_of,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
    )
    common.check_choice("momentum_of", opts["momentum_of"], _MOMENTUM_OF)
    param_scale = opts["multiply_by_parameter_scale"]
    after = momentum is not None and opts["momentum_of"] == "update"
    direction = scale_by_adafactor(
        beta2_decay,
        eps,
        clipping_threshold,
        factored=opts["factored"],
        min_dim_size_to_factor=min_dim_size_to_factor,
        factored_normalization=opts["factored_normalization"],
        clipping_rule=opts["clipping_rule"],
        momentum=None if after else momentum,
        mu_dtype=mu_dtype,
        stochastic_rounding=stochastic_rounding,
    )
    step_size = scale_by_adafactor_step_size(
        learning_rate,
        eps_scale=eps_scale,
        multiply_by_parameter_scale=None if param_scale == "relative" else param_scale,
        momentum=momentum if after else None,
        weight_decay=weight_decay if after else 0.0,
        mask=mask if after else None,
        mu_dtype=mu_dtype,
        stochastic_rounding=stochastic_rounding,
    )
    if after:
        common.check_non_negative("weight_decay", weight_decay)
        return common.chain("adafactor", direction, step_size)
    decay = common.add_decayed_weights(weight_decay, mask)
    return common.chain("adafactor", direction, decay, step_size)
