"""Sophia-H: momentum divided by a clipped, EMA-smoothed Hessian-diagonal estimate.

The estimate is an input: pass it to `update` as ``hessian_diag=`` (from `hutchinson_diag`,
`gauss_newton_bartlett_diag` or any other source), or let `update` run an estimator every
`update_interval` steps from an ``obj_fn=`` and ``key=`` extra argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _lowbit

HessianEstimator = Callable[[Callable[[Any], jax.Array], Any, jax.Array], Any]


class SophiaState(NamedTuple):
    """State of `scale_by_sophia`."""

    count: jax.Array  # int32, number of `update` calls so far
    mu: optax.Updates  # momentum (no bias correction unless asked)
    h: optax.Updates  # EMA of the Hessian-diagonal estimates; zeros until one arrives
    win_rate: jax.Array  # float32, fraction of unclipped coordinates at the last step (or NaN)


def _is_skipped(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _fold_hessian(h: Any, hessian_diag: Any, b2: Any) -> Any:
    """``h <- b2 h + (1 - b2) hessian_diag`` leaf by leaf, in float32 or wider.

    `hessian_diag` may hold arrays where `h` holds `None` or `optax.MaskedNode` (optax.masked and
    optax.partition forward extra arguments unmasked): those leaves are skipped.
    """
    leaves, treedef = jax.tree.flatten(h, is_leaf=_is_skipped)
    try:
        estimates = treedef.flatten_up_to(hessian_diag)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "hessian_diag must be a pytree with the structure of the parameters: " + str(e)
        ) from e
    out = []
    for leaf, est in zip(leaves, estimates, strict=True):
        if _is_skipped(leaf) or _is_skipped(est):
            out.append(leaf)
            continue
        if jnp.shape(est) != leaf.shape:
            raise ValueError(
                f"hessian_diag leaf of shape {jnp.shape(est)} for a parameter of shape {leaf.shape}"
            )
        ct = common.compute_dtype(leaf.dtype)
        beta2 = jnp.asarray(b2, ct)
        new = beta2 * leaf.astype(ct) + (1 - beta2) * jnp.asarray(est).astype(ct)
        out.append(new.astype(leaf.dtype))
    return treedef.unflatten(out)


def sophia_update_hessian(state: Any, hessian_diag: Any, b2: float = 0.99) -> Any:
    r"""Fold one Hessian-diagonal estimate into Sophia's state now: :math:`h \leftarrow
    \beta_2 h + (1-\beta_2)\hat h`.

    This is the crate's `update_hessian(name, h)` for the pure transform: `update(...,
    hessian_diag=...)` does the same fold and then the step; this function folds without
    stepping, for code that receives the estimate at another time than the gradient.

    Args:
      state: a `SophiaState`, or any optax state that contains one (the state of `sophia(...)`,
        of `optax.inject_hyperparams(sophia)(...)`, of a chain or of `optax.masked`); every
        `SophiaState` inside is updated.
      hessian_diag: pytree like the parameters (extra leaves under masks are ignored).
      b2: the EMA decay, the `b2` the transform was built with.

    Returns:
      The state with the same structure and dtypes, the estimate folded into ``h``.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> tx = rlx_optax.sophia(0.1, b2=0.5)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> state = rlx_optax.sophia_update_hessian(state, {"w": jnp.full(2, 3.0)}, b2=0.5)
      >>> state[0].h["w"]
      Array([1.5, 1.5], dtype=float32)
    """
    common.check_beta("b2", b2)

    def fold(s):
        if isinstance(s, SophiaState):
            return s._replace(h=_fold_hessian(s.h, hessian_diag, b2))
        return s

    return jax.tree.map(fold, state, is_leaf=lambda s: isinstance(s, SophiaState))


def _sophia_direction(g, m, h, *, b1, gamma, rho, eps, bc1):
    """One leaf: the new momentum, the clipped ratio and the count of unclipped entries."""
    ct = common.compute_dtype(g.dtype)
    beta1 = jnp.asarray(b1, ct)
    m = beta1 * m.astype(ct) + (1 - beta1) * g.astype(ct)
    eps_c = jnp.asarray(eps, ct)
    gamma_c = jnp.maximum(jnp.asarray(gamma, ct), eps_c)
    rho_c = jnp.asarray(rho, ct)
    m_hat = m if bc1 is None else m / bc1.astype(ct)
    ratio = m_hat / jnp.maximum(gamma_c * h.astype(ct), eps_c)
    u = jnp.clip(ratio, -rho_c, rho_c)
    # The clip would turn an Inf gradient entry, and the Inf moment it leaves, into a finite
    # +-rho step. A NaN/Inf gradient entry makes m non-finite (Inf or NaN), so pass a
    # non-finite m through instead: the step shows it (docs/robustness.md) and
    # optax.apply_if_finite can skip it. Testing m rather than g keeps this a select in the
    # pass that already reads m (testing g made that pass read the gradient again).
    u = jnp.where(jnp.isfinite(m), u, m)
    return u.astype(g.dtype), m, ratio


def scale_by_sophia(
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.01,
    rho: float = 0.04,
    eps: float = 1e-12,
    *,
    bias_correction: bool = False,
    hessian_estimator: HessianEstimator | None = None,
    update_interval: int = 10,
    track_win_rate: bool = False,
    mu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia's clipped, curvature-scaled momentum (no learning rate, no decay).

    .. math::
        h_t = \beta_2 h_{t-1} + (1-\beta_2)\hat h_t \quad\text{(only when an estimate arrives)}

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        u_t = \operatorname{clip}\big(m_t / \max(\gamma' h_t, \epsilon), -\rho, \rho\big),
        \quad \gamma' = \max(\gamma, \epsilon)

    An estimate passed as ``update(..., hessian_diag=h_hat)`` is folded into ``h`` *before* the
    step that uses it (the crate's `update_hessian` followed by `step`, and the order of the
    paper's Algorithm 3). Until one arrives ``h = 0``, the denominator is ``eps``, and the
    step is :math:`\rho\,\operatorname{sign}(m)`; coordinates with negative curvature get the
    same sign step.

    With `hessian_estimator` set, ``update(grads, state, params, obj_fn=loss, key=key)`` runs
    ``hessian_estimator(obj_fn, params, fold_in(key, count))`` under `lax.cond` at steps 1,
    1 + k, 1 + 2k, ... (k = `update_interval`) and folds the result before the step, as in the
    paper. The estimator needs the full parameters, so under `optax.masked`/`optax.partition`
    compute the estimate outside and pass `hessian_diag` instead (that form works there: the
    leaves of masked-out parameters are ignored).

    Args:
      b1: momentum decay, in [0, 1).
      b2: decay of the Hessian EMA, in [0, 1).
      gamma: curvature scale in the denominator (the crate's and the paper's :math:`\gamma`).
      rho: clip bound of the ratio. The crate clips at 0.04; the paper's Algorithm 3 clips at 1
        (``rho=1.0``, with its own learning-rate scale).
      eps: floor of the denominator (the crate's 1e-12, as in the paper).
      bias_correction: divide ``m`` by :math:`1-\beta_1^t` (levanter, optax.contrib); the crate
        and the paper do not.
      hessian_estimator: ``fn(obj_fn, params, key) -> hessian_diag``, e.g. `hutchinson_diag` or
        ``functools.partial(hutchinson_diag, distribution="gaussian")``; `None` (the crate)
        means estimates only come through `hessian_diag`.
      update_interval: run `hessian_estimator` every this many steps (the paper's k = 10).
        Under `optax.inject_hyperparams` name ``static_args=("hessian_estimator",)``: optax
        would otherwise take the estimator for a schedule.
      track_win_rate: record in ``state.win_rate`` the fraction of coordinates whose ratio is
        strictly inside the clip bound (the paper suggests 0.1-0.5 as healthy). Off, it is NaN
        and costs nothing.
      mu_dtype: storage of the momentum: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
        The Hessian EMA `h` follows the parameter dtype (it may be negative).
      stochastic_rounding: round the float32 momentum into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformationExtraArgs`; `update` accepts the keyword arguments
      `hessian_diag`, `obj_fn` and `key`.
    """
    common.check_beta("b1", b1)
    common.check_beta("b2", b2)
    common.check_non_negative("gamma", gamma)
    common.check_range("rho", rho, 0.0, low_open=True)
    common.check_non_negative("eps", eps)
    if not isinstance(update_interval, jax.Array):  # optax.inject_hyperparams passes an array
        common.check_positive_int("update_interval", update_interval)
    _lowbit.check_storage("mu_dtype", mu_dtype)

    given_hessian: list[bool] = []  # an estimate was passed to this transform (trace time)

    def init_fn(params):
        common.reject_complex(params, "sophia")
        return SophiaState(
            count=jnp.zeros([], jnp.int32),
            mu=_lowbit.init_tree(params, mu_dtype, signed=True),
            h=common.zeros_like_tree(params),
            win_rate=jnp.full([], jnp.nan, jnp.float32),
        )

    def update_fn(updates, state, params=None, *, hessian_diag=None, obj_fn=None, key=None, **kw):
        _check_keywords(kw)
        state = common.check_state("sophia", state, SophiaState, updates, ("mu", "h"))
        if hessian_diag is not None:
            given_hessian[:] = [True]
        elif hessian_estimator is None and not given_hessian:
            common.warn_once("sophia/no-hessian", common.SOPHIA_NO_HESSIAN_WARNING)
        h = state.h
        if hessian_diag is not None:
            h = _fold_hessian(h, hessian_diag, b2)
        if hessian_estimator is not None:
            h = _estimate(h, state.count, params, obj_fn, key)
        count = optax.safe_increment(state.count)
        bc1 = common.bias_correction(b1, count) if bias_correction else None

        def leaf(g, m, hh, i):
            m32 = _lowbit.read(m, common.compute_dtype(g.dtype))
            u, m_new, ratio = _sophia_direction(
                g, m32, hh, b1=b1, gamma=gamma, rho=rho, eps=eps, bc1=bc1
            )
            bound = None
            if isinstance(m, _lowbit.QuantizedArray):
                b = jnp.asarray(b1, jnp.float32)
                bound = _lowbit.ema_bound(m, b, 1 - b, g)
            m_s = _lowbit.write(
                m_new,
                m,
                bound=bound,
                stochastic=stochastic_rounding,
                step=count,
                leaf=i,
                salt=_lowbit.SALT_MU,
            )
            return u, m_s, ratio

        index = _lowbit.leaf_indices(updates)
        u, mu, ratio = common.tree_map_multi(leaf, 3, updates, state.mu, h, index)
        win_rate = state.win_rate
        if track_win_rate:
            win_rate = _win_rate(ratio, rho)
        return u, SophiaState(
            count=count,
            mu=mu,
            h=optax.tree.cast_like(h, state.h),
            win_rate=win_rate,
        )

    def _estimate(h, count, params, obj_fn, key):
        if obj_fn is None or key is None or params is None:
            raise ValueError(
                "scale_by_sophia(hessian_estimator=...) needs update(grads, state, params, "
                "obj_fn=loss_of_params, key=prng_key)"
            )
        if any(
            isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(params, is_leaf=_is_skipped)
        ):
            raise ValueError(
                "hessian_estimator cannot run on masked parameters (optax.masked/partition): "
                "estimate outside and pass update(..., hessian_diag=...)"
            )

        def refresh(h):
            estimate = hessian_estimator(obj_fn, params, jax.random.fold_in(key, count))
            return _fold_hessian(h, estimate, b2)

        return jax.lax.cond(count % update_interval == 0, refresh, lambda h: h, h)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_keywords(extra: dict[str, Any]) -> None:
    """Refuse a misspelled Hessian keyword (``hessian=``, ``hess_diag=``, ...).

    `update` must accept keywords meant for other members of an `optax.chain` (a chain passes
    every extra argument to every member), so unknown keywords in general pass; a keyword that
    names a Hessian but is not ``hessian_diag`` can only be a mistake that would otherwise run
    the step without the estimate. It is a TypeError, as Python raises for an unexpected
    keyword argument.
    """
    for name in extra:
        if "hess" in name.lower():
            raise TypeError(
                f"sophia's update() got an unexpected keyword argument {name!r}: it accepts "
                "hessian_diag=..., obj_fn=... and key=... (the Hessian-diagonal estimate is "
                "hessian_diag=; other keywords are ignored, as optax.chain hands every extra "
                "argument to every member)"
            )


def _win_rate(ratio: Any, rho: Any) -> jax.Array:
    inside = jnp.zeros([], jnp.float32)
    total = 0
    for r in jax.tree.leaves(ratio):
        inside = inside + jnp.sum(jnp.abs(r) < jnp.asarray(rho, r.dtype)).astype(jnp.float32)
        total += r.size
    return inside / max(total, 1)


def sophia(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.01,
    rho: float = 0.04,
    eps: float = 1e-12,
    weight_decay: float = 0.1,
    *,
    bias_correction: bool = False,
    hessian_estimator: HessianEstimator | None = None,
    update_interval: int = 10,
    track_win_rate: bool = False,
    mu_dtype: Any = None,
    stochastic_rounding: bool = False,
    mask: common.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia-H with the crate's semantics: `scale_by_sophia` -> decoupled decay -> rate.

    .. math::
        \theta \leftarrow \theta - \eta\Big(\operatorname{clip}\big(m_t/\max(\gamma h_t,
        \epsilon), \pm\rho\big) + \lambda\theta\Big)

    Defaults are the crate's (:math:`\beta_1` 0.965, :math:`\beta_2` 0.99, :math:`\gamma` 0.01,
    :math:`\rho` 0.04, :math:`\epsilon` 1e-12, :math:`\lambda` 0.1).

    **Without a Hessian estimate Sophia is sign descent.** Until the first estimate arrives
    (through ``hessian_diag=`` or `hessian_estimator`), ``h = 0``, the denominator is `eps`
    and every step is :math:`\eta(\rho\operatorname{sign}(m) + \lambda\theta)`, as in the
    crate when `update_hessian` is never called (a one-time UserWarning says so at the first
    such update). Pass an estimate at least at the first step
    (``rlx_optax.hutchinson_diag``, ``gauss_newton_bartlett_diag``, or
    ``constant_hessian_diag`` for the crate's ``hessian_init``); in a Flax loop,
    ``rlx_optax.Trainer(..., update_kwargs=...)`` passes it. A misspelled keyword naming a
    Hessian (``hessian=``) raises a TypeError; other unknown keywords are ignored, because
    `optax.chain` hands every extra argument to every member.

    The Hessian diagonal comes
    in through ``update(..., hessian_diag=...)`` (see `scale_by_sophia`), so the optimizer works
    as it is inside `optax.chain`, `optax.masked`, `optax.partition` and
    `flax.nnx.Optimizer.update(model, grads, hessian_diag=...)`, where only a pytree is passed.

    Crate versus reference (arguments that switch):

    - clip bound: crate ``rho=0.04``; paper's Algorithm 3 ``rho=1.0`` (same :math:`\gamma`
      denominator: 0.01 for Sophia-H, 0.05 for Sophia-G);
    - bias-corrected momentum (levanter, optax.contrib): ``bias_correction=True``;
    - built-in Hutchinson every k steps (paper, optax.contrib): ``hessian_estimator=
      hutchinson_diag, update_interval=10`` and ``update(..., obj_fn=, key=)``;
    - Gaussian probes (paper, levanter) versus Rademacher (optax.contrib): the estimator's
      ``distribution``.

    Args:
      learning_rate: a float or an optax schedule.
      b1: momentum decay.
      b2: Hessian EMA decay.
      gamma: curvature scale of the denominator.
      rho: clip bound of the ratio.
      eps: denominator floor.
      weight_decay: decoupled decay coefficient (multiplied by the learning rate).
      bias_correction: bias-correct the momentum.
      hessian_estimator: estimator run inside `update` (see `scale_by_sophia`).
      update_interval: steps between estimator runs.
      track_win_rate: record the unclipped fraction in the state.
      mu_dtype: storage of the momentum: None (the parameter dtype), a floating dtype or
        ``"q8"`` (docs/guides/state_precision.md).
      stochastic_rounding: round the float32 momentum into bfloat16 storage stochastically.
      mask: pytree (or callable returning one) of booleans selecting the leaves decayed.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rlx_optax
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * p["x"] ** 2)
      >>> # a toy problem; for a network with Hutchinson estimates start at 1e-2
      >>> # (docs/guides/choosing.md)
      >>> tx = rlx_optax.sophia(1.0, b2=0.9, gamma=1.0, rho=1.0, weight_decay=0.0)
      >>> params = {"x": jnp.array([1.0, 1.0])}
      >>> state = tx.init(params)
      >>> for step in range(100):
      ...     h = rlx_optax.hutchinson_diag(loss, params, jax.random.key(step))
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = tx.update(grads, state, params, hessian_diag=h)
      ...     params = optax.apply_updates(params, updates)
      >>> [round(float(v), 3) for v in params["x"]]  # curvature 1 and 4 move alike
      [-0.014, -0.014]

    References:
      Liu, Li, Hall, Liang & Ma, *Sophia: A Scalable Stochastic Second-order Optimizer for
      Language Model Pre-training*, https://arxiv.org/abs/2305.14342
    """
    return common.alias(
        scale_by_sophia(
            b1,
            b2,
            gamma,
            rho,
            eps,
            bias_correction=bias_correction,
            hessian_estimator=hessian_estimator,
            update_interval=update_interval,
            track_win_rate=track_win_rate,
            mu_dtype=mu_dtype,
            stochastic_rounding=stochastic_rounding,
        ),
        learning_rate,
        weight_decay,
        mask,
        name="sophia",
    )
