"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors."""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common, linalg
from rlx_optax._src.transforms import _batching, _lowbit, _owner, _per_axis, _resident

#: The switches each `behaviour` sets (explicit arguments take precedence). The reference is
#: the authors' soap.py as pytorch-optimizer's `SOAP` implements it.
PRESETS = {
    "crate": {
        "skip_first_step": False,
        "reproject_moments": False,
        "refresh": "eigh",
        "max_precond_dim": None,
        "precondition_nd": False,
        "eps_placement": "corrected",
        "decay_after_update": False,
    },
    "reference": {
        "skip_first_step": True,
        "reproject_moments": True,
        "refresh": "qr",
        "max_precond_dim": 10000,
        "precondition_nd": True,
        "eps_placement": "uncorrected",
        "decay_after_update": True,
    },
}


def _resolve(behaviour: str, **given: Any) -> dict:
    """The preset's switches; `refresh="qr"` implies re-projected moments unless told not to."""
    qr_alone = given.get("refresh") == "qr" and given.get("reproject_moments") is None
    opts = common.resolve_preset(behaviour, PRESETS, **given)
    if qr_alone:
        opts["reproject_moments"] = True
    elif opts["refresh"] == "qr" and not opts["reproject_moments"]:
        warnings.warn(
            "soap: refresh='qr' without reproject_moments leaves the first moment in the old "
            "basis after each refresh (the reference pairs them; apart, a digits MLP "
            "diverged)",
            UserWarning,
            stacklevel=3,
        )
    return opts


class SoapState(NamedTuple):
    """State of `scale_by_soap`.

    `stats` and `bases` are tuples with one pytree per axis: the k-th tree holds, at each
    parameter's place, the (d, d) matrix of axis k of the leaf's working shape (float32, float64
    for float64 parameters), or None where that axis is passed through or the leaf has fewer
    axes. For a matrix ``w``: ``stats[0]["w"]`` is L, ``stats[1]["w"]`` is R, ``bases[0]["w"]``
    is Q_L. (One tree per axis, not a tuple per leaf, so that every parameter-shaped place of
    the state holds an array, as `flax.nnx.Optimizer` and orbax restore it.)
    """

    count: jax.Array  # int32, number of `update` calls so far
    mu: optax.Updates  # first moment, rotated, in the working shape (merged axes)
    nu: optax.Updates  # second moment, rotated, in the working shape
    stats: Any  # EMA of the per-axis Gram matrices (L = E[G G^T], R = E[G^T G] for a matrix)
    bases: Any  # eigenbases of `stats` (Q_L, Q_R for a matrix)


#: The state arguments of SOAP's per-leaf function ``(g, mu, nu, stats, bases)``.
_RESIDENT = (1, 2, 3, 4)


def _check_count(name: str, value: Any) -> None:
    """A positive integer; arrays pass (`optax.inject_hyperparams` turns defaults into arrays)."""
    if value is not None and not isinstance(value, jax.Array):
        common.check_positive_int(name, value)


def _merged_shape(shape: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """Merge runs of consecutive axes while their product stays <= `limit`."""
    out: list[int] = []
    run = 1
    for d in shape:
        if run * d <= limit:
            run *= d
        else:
            if run > 1:
                out.append(run)
            run = d
    if run > 1 or not out:
        out.append(run)
    return tuple(out)


def _plan(
    shape: tuple[int, ...],
    *,
    max_precond_dim: int | None,
    merge_dims: bool,
    precondition_1d: bool,
    precondition_nd: bool,
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The working shape of a leaf and which of its axes get a rotation (Python-static)."""
    ndim = len(shape)
    # int(): under `optax.inject_hyperparams` the limit arrives as a (concrete) array at init
    limit = math.inf if max_precond_dim is None else int(max_precond_dim)
    if ndim >= 3 and precondition_nd and merge_dims:
        shape = _merged_shape(shape, limit)
    active = ndim == 2 or (ndim == 1 and precondition_1d) or (ndim >= 3 and precondition_nd)
    active = active and 0 not in shape  # an empty leaf has nothing to rotate
    return shape, tuple(active and d <= limit for d in shape)


def _rotate(x: jax.Array, bases: tuple, *, back: bool, precision: Any) -> jax.Array:
    """`Q_L^T x Q_R` (into the eigenbasis) or `Q_L x Q_R^T` (`back=True`)."""
    mats = [None if q is None else q.astype(x.dtype) for q in bases]
    return linalg.apply_along_axes(x, mats, transpose=not back, precision=precision)


#: Where a statistic whose exact value exceeds the float32 range is held (about 1.3e36).
_STAT_CEILING = 2.0**120


def _ema_gram(
    s: jax.Array, g: jax.Array, k: jax.Array, axis: int, beta: float, precision: Any
) -> jax.Array:
    r"""`beta s + (1 - beta) gram(g)` computed on `g / k` (k a power of two >= max|g| or 1).

    The scaled sum equals the plain one bit for bit (powers of two scale exactly), but its
    products cannot overflow: a gradient above about 1e19 would otherwise give a Gram matrix
    of +-inf and NaN (inf - inf). Where the exact result exceeds float32, it is held at
    `_STAT_CEILING` in max-abs (the direction of the statistic, all its eigenbasis depends on,
    is kept; exact arithmetic would be dominated by the huge gradient alike).
    """
    b = jnp.asarray(beta, s.dtype)
    inner = b * (s / k / k) + (1 - b) * linalg.axis_gram(g / k, axis, precision=precision)
    full = inner * k * k
    peak = jnp.max(jnp.abs(inner))
    held = inner * (_STAT_CEILING / jnp.where(peak > 0, peak, 1.0))
    return jnp.where(jnp.isfinite(jnp.max(jnp.abs(full))) | ~jnp.isfinite(peak), full, held)


def _refresh(
    stats: tuple, bases: tuple, mu: jax.Array, nu: jax.Array, first: jax.Array, cfg: dict
) -> tuple[tuple, jax.Array, jax.Array]:
    """New eigenbases of `stats`, and the moments carried into them (per the options)."""
    ct = common.compute_dtype(mu.dtype)
    precision = cfg["precision"]
    mu_orig = None
    if cfg["reproject_moments"]:
        mu_orig = _rotate(mu.astype(ct), bases, back=True, precision=precision)

    def full(_):
        new = tuple(
            None if s is None else linalg.symmetric_eigenbasis(s, precision=precision)
            for s in stats
        )
        return new, nu

    def power_step(_):
        new, v = [], nu
        for axis, (s, q) in enumerate(zip(stats, bases, strict=True)):
            if s is None:
                new.append(None)
                continue
            q, order = linalg.qr_refresh(s, q, precision=precision)
            new.append(q)
            v = linalg.permute_axis(v, order, axis)  # v follows its re-sorted columns
        return tuple(new), v

    if cfg["refresh"] == "eigh":
        new_bases, nu = full(None)
    else:  # the first basis is always a full eigendecomposition, as in the reference
        new_bases, nu = jax.lax.cond(first, full, power_step, None)
    if mu_orig is not None:
        mu = _rotate(mu_orig, new_bases, back=False, precision=precision).astype(mu.dtype)
    return new_bases, mu, nu


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float = 0.95,
    eps: float = 1e-8,
    precond_freq: int = 10,
    *,
    mu_dtype: Any = None,
    skip_first_step: bool | None = None,
    reproject_moments: bool | None = None,
    refresh: str | None = None,
    max_precond_dim: int | None = None,
    merge_dims: bool = False,
    precondition_nd: bool | None = None,
    precondition_1d: bool = False,
    precision: Any = None,
    eps_placement: str | None = None,
    behaviour: str = "crate",
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
    precond_dtype: Any = None,
    state_placement: str = "parameter",
) -> optax.GradientTransformation:
    r"""Adam run in the eigenbasis of Shampoo's statistics (SOAP), without learning rate or decay.

    For a matrix gradient :math:`G` (m, n), with :math:`t` the 1-based step, by default (the
    crate's order):

    .. math::
        L &\leftarrow \beta_s L + (1-\beta_s) G G^\top,\quad
        R \leftarrow \beta_s R + (1-\beta_s) G^\top G \\
        Q_L, Q_R &\leftarrow \operatorname{eigvecs}(L), \operatorname{eigvecs}(R)
            \quad\text{at the first call and when } (t-1) \bmod f = 0 \\
        G' &= Q_L^\top G Q_R,\quad m \leftarrow \beta_1 m + (1-\beta_1) G',\quad
            v \leftarrow \beta_2 v + (1-\beta_2) G'^2 \\
        u &= Q_L \frac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon} Q_R^\top

    Leaves that are not matrices (by default every rank but 2) take the same Adam step in
    their own coordinates. The eigenbases come from ``eigh`` in float32 sorted by decreasing
    eigenvalue (the crate runs unsorted Jacobi sweeps; with moments not re-projected the order
    only matters after a refresh). Periodic work runs under `jax.lax.cond`. Same-shaped
    matrices run as one batched computation on accelerators (leaf by leaf on a CPU).

    State size per parameter: a matrix (m, n) keeps 2 moments plus :math:`2(m^2+n^2)/(mn)`
    floats of statistics and bases (float32; float64 for float64 parameters): 6 for a square
    matrix; other leaves keep 2. Axes longer than `max_precond_dim` keep nothing.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      shampoo_beta: decay :math:`\beta_s` of the statistics L, R, in [0, 1).
      eps: added to the denominator outside the square root.
      precond_freq: recompute the bases every `precond_freq` calls (and at the first).
      mu_dtype: storage of the first moment (default: the parameter dtype): a floating dtype,
        ``"q8"`` or ``"q4"`` (8- or 4-bit block-wise codes, `rlx_optax.QuantizedArray`; 4-bit
        fails the convergence bound on the char LM). The rotated moments
        are updated in float32 inside the batched (or owner) computation and stored per leaf
        afterwards.
      skip_first_step: the reference's order (``True``): the first call only accumulates the
        statistics and computes the bases, returning a zero update; afterwards the gradient is
        rotated with the bases of earlier gradients, the statistics are updated after the
        step, the bases refreshed when the step count is a multiple of `precond_freq`, and the
        bias corrections count steps from the second call. Default: the crate's order.
      reproject_moments: on refresh, rotate the first moment from the old basis into the new
        one (reference); default keeps it as stored (crate).
      refresh: ``"eigh"`` (crate: a full eigendecomposition at each refresh) or ``"qr"``
        (reference: one power-iteration step ``Q <- qr(L Q)`` after sorting the columns by
        their estimated eigenvalues, with the second moment permuted alike). The first basis is
        always a full eigendecomposition.
      max_precond_dim: axes longer than this are not rotated (reference default 10000). With
        None (the crate: every axis rotated) a leaf with an axis longer than 10000 is refused
        at `init`, naming the leaf (its statistics alone would be d^2 floats).
      merge_dims: merge consecutive axes of rank >= 3 leaves while their product stays within
        `max_precond_dim` before preconditioning them (needs `precondition_nd`).
      precondition_nd: rotate every axis of rank >= 3 leaves (reference); default sends them to
        the plain Adam path (crate).
      precondition_1d: rotate vectors too (off in both the crate and the reference).
      precision: precision of the Gram products and rotations. Default ``HIGHEST`` in both
        modes (the crate's float32 arithmetic; the reference runs float32 torch, whose matmuls
        are full float32 by default) on every backend; see `docs/numerics.md`.
      eps_placement: ``"corrected"`` (crate: :math:`\sqrt{\hat v_t}+\epsilon`) or
        ``"uncorrected"`` (reference: :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)\cdot
        m_t/(\sqrt{v_t}+\epsilon)`).
      behaviour: ``"crate"`` or ``"reference"``: the switches above at once (reference:
        first step skipped, moments re-projected, QR refresh, ``max_precond_dim=10000``, n-D
        leaves rotated, uncorrected eps). Arguments given explicitly take precedence;
        ``refresh="qr"`` alone implies ``reproject_moments=True`` (and warns when it is set
        False).
      nu_dtype: storage of the second moment (default: the parameter dtype): a floating
        dtype, ``"q8"`` or ``"q4"`` (the unsigned 8- or 4-bit code).
      stochastic_rounding: round the float32 moments into bfloat16 `mu_dtype` / `nu_dtype`
        stochastically (unbiased; the bits derive from the step and the leaf). Without it a
        bfloat16 second moment rounds to nearest and stalls (docs/guides/state_precision.md).
        The statistics and bases stay float32 unless `precond_dtype` says otherwise.
      precond_dtype: storage of the statistics and eigenbases (default float32): a floating
        dtype such as ``jnp.bfloat16`` halves them; they are computed in float32 and rounded
        to nearest when stored.
      state_placement: ``"parameter"`` (default: every state array is kept per parameter,
        laid out by `rlx_optax.state_shardings`) or ``"owner"``: on a mesh of several devices
        the statistics, bases and moments of each leaf that owner compute sends to one device
        stay on that device (`OwnerPlacedState`), so that a step moves only the gradient there
        and the update back. The state's layout then depends on the mesh it was made on
        (``init`` reads it from the parameters); see docs/scaling.md. On one device the two
        are the same.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Vyas et al., *SOAP: Improving and Stabilizing Shampoo using Adam*,
      https://arxiv.org/abs/2409.11321
    """
    opts = _resolve(
        behaviour,
        skip_first_step=skip_first_step,
        reproject_moments=reproject_moments,
        refresh=refresh,
        max_precond_dim=max_precond_dim,
        precondition_nd=precondition_nd,
        eps_placement=eps_placement,
    )
    skip_first_step, reproject_moments = opts["skip_first_step"], opts["reproject_moments"]
    refresh, max_precond_dim = opts["refresh"], opts["max_precond_dim"]
    precondition_nd = opts["precondition_nd"]
    common.check_choice("eps_placement", opts["eps_placement"], ("corrected", "uncorrected"))
    raw_eps = opts["eps_placement"] == "uncorrected"
    common.check_beta("b1", b1)
    for name, value in (("mu_dtype", mu_dtype), ("nu_dtype", nu_dtype)):
        _lowbit.check_storage(name, value)
    quantized = any(_lowbit.is_quantized_storage(v) for v in (mu_dtype, nu_dtype))
    # 8-bit moments, or bfloat16 ones rounded stochastically: the batched computation sees
    # float32 moments, stored per leaf afterwards (the leaf's index seeds the rounding bits)
    widen = quantized or (stochastic_rounding and (mu_dtype is not None or nu_dtype is not None))
    precond_dtype = _lowbit.check_precond_dtype("precond_dtype", precond_dtype)
    _resident.check_placement("state_placement", state_placement)
    common.check_beta("b2", b2)
    common.check_beta("shampoo_beta", shampoo_beta)
    common.check_non_negative("eps", eps)
    _check_count("precond_freq", precond_freq)
    common.check_choice("refresh", refresh, ("eigh", "qr"))
    _check_count("max_precond_dim", max_precond_dim)
    if merge_dims and (max_precond_dim is None or not precondition_nd):
        raise ValueError("merge_dims needs precondition_nd=True and an integer max_precond_dim")
    linalg.check_precision("precision", precision)
    precision = linalg.resolve_precision(precision, jnp.float32)
    cfg = {"reproject_moments": reproject_moments, "refresh": refresh, "precision": precision}
    plan_kw = {
        "max_precond_dim": max_precond_dim,
        "merge_dims": merge_dims,
        "precondition_1d": precondition_1d,
        "precondition_nd": precondition_nd,
    }
    beta1, beta2, beta_s = b1, b2, shampoo_beta

    # The plan (working shape, rotated axes) is fixed at init: `update` reads it back from the
    # state (moments in the working shape, None for an axis passed through).
    def _rotated_dims(shape):
        working, active = _plan(shape, **plan_kw)
        return [d for d, a in zip(working, active, strict=True) if a]

    def init_leaf(p):
        shape, active = _plan(p.shape, **plan_kw)
        # float32 for float32/bf16, float64 for float64, unless stored otherwise
        st = precond_dtype or common.compute_dtype(p.dtype)
        eyes = tuple(
            jnp.eye(d, dtype=st) if a else None for d, a in zip(shape, active, strict=True)
        )
        zeros = tuple(None if e is None else jnp.zeros_like(e) for e in eyes)
        # the moments mirror the parameter (same layout on a mesh), or have the working shape
        # of merged axes
        like = p if shape == p.shape else jnp.zeros(shape, p.dtype)
        mu = _lowbit.init_leaf(like, mu_dtype, signed=True)
        return mu, _lowbit.init_leaf(like, nu_dtype, signed=False), zeros, eyes

    def init_fn(params):
        common.reject_complex(params, "soap")
        if max_precond_dim is None:
            common.refuse_huge_factors(
                params, "soap", _rotated_dims, "max_precond_dim", (10000, "not rotated")
            )
        leaves, treedef = jax.tree.flatten(params, is_leaf=common.is_empty)
        present = [p for p in leaves if not common.is_empty(p)]
        per_leaf = [init_leaf(p) for p in present]
        owned = None
        if state_placement == "owner":  # (g, mu, nu, stats, bases): the state at 1..4
            calls = [(p, *s) for p, s in zip(present, per_leaf, strict=True)]
            owned = _resident.place(present, calls, _RESIDENT, _owner.preconditioned_cost)
        skip = _resident.owned_leaves(owned)
        mu, nu, stats, bases = (
            _resident.spread(leaves, treedef, [s[k] for s in per_leaf], skip) for k in range(4)
        )
        state = SoapState(
            jnp.zeros([], jnp.int32),
            mu,
            nu,
            _per_axis.by_axis(stats, params),
            _per_axis.by_axis(bases, params),
        )
        return state if owned is None else _resident.OwnerPlacedState(state, owned)

    def update_fn(updates, state, params=None):
        del params
        owned = None
        if isinstance(state, _resident.OwnerPlacedState):
            state, owned = state.inner, state.owned
            _resident.check_mesh(owned, _owner.mesh_of(jax.tree.leaves(updates)), "soap")
        state = common.check_state(
            "soap",
            state,
            SoapState,
            updates,
            ("mu", "nu"),
            leaf_check=_resident.unless_owned(common.working_shape_disagrees),
        )
        first = state.count == 0
        count = optax.safe_increment(state.count)
        do_refresh = state.count % precond_freq == 0
        t = jnp.maximum(state.count, 1) if skip_first_step else count
        bc1 = common.bias_correction(beta1, t)
        bc2 = common.bias_correction(beta2, t)

        def leaf(g, mw, vw, stats, bases):
            active = tuple(s is not None for s in stats)
            ct = common.compute_dtype(g.dtype)
            b1, b2 = jnp.asarray(beta1, ct), jnp.asarray(beta2, ct)
            c1, c2 = bc1.astype(ct), bc2.astype(ct)
            gw = g.astype(ct).reshape(mw.shape)

            def accumulate(stats):
                # statistics and bases are a preconditioner: no gradient flows into them (a
                # meta-gradient through eigh of a rank-deficient statistic is NaN)
                g32 = jax.lax.stop_gradient(gw).astype(common.compute_dtype(gw.dtype))
                k = linalg.power_of_two_scale(g32, at_least_one=True)
                return tuple(
                    None if s is None else _ema_gram(s, g32, k, axis, beta_s, precision)
                    for axis, s in enumerate(stats)
                )

            def maybe_refresh(stats, bases, mw, vw):
                if not any(active):
                    return bases, mw, vw
                return jax.lax.cond(
                    do_refresh,
                    lambda ops: _refresh(*ops, first, cfg),
                    lambda ops: (ops[1], ops[2], ops[3]),
                    (stats, bases, mw, vw),
                )

            if not skip_first_step:
                stats = accumulate(stats)
                bases, mw, vw = maybe_refresh(stats, bases, mw, vw)
            g_rot = _rotate(gw, bases, back=False, precision=precision)
            m_new = b1 * mw.astype(ct) + (1 - b1) * g_rot
            v_new = b2 * vw.astype(ct) + (1 - b2) * g_rot * g_rot
            if raw_eps:
                u = (m_new / c1) * jnp.sqrt(c2) / (jnp.sqrt(v_new) + eps)
            else:
                u = (m_new / c1) / (jnp.sqrt(v_new / c2) + eps)
            u = _rotate(u, bases, back=True, precision=precision)
            m_new, v_new = m_new.astype(mw.dtype), v_new.astype(vw.dtype)
            if skip_first_step:
                u = jnp.where(first, jnp.zeros_like(u), u)
                m_new, v_new = jnp.where(first, mw, m_new), jnp.where(first, vw, v_new)
                stats = accumulate(stats)
                bases, m_new, v_new = maybe_refresh(stats, bases, m_new, v_new)
            return u.reshape(g.shape).astype(g.dtype), m_new, v_new, stats, bases

        # Same-shaped leaves run as one batched computation (`grouped_map`).
        # one tuple per leaf (an entry per axis of its working shape, `state.mu`'s rank)
        # (an 8-bit moment is one leaf here, of its working shape)
        working = jax.tree.map(
            lambda x: x if common.is_empty(x) else jax.ShapeDtypeStruct(x.shape, jnp.float32),
            state.mu,
            is_leaf=lambda x: common.is_empty(x) or isinstance(x, _lowbit.QuantizedArray),
        )
        per_leaf_stats = _per_axis.by_leaf(state.stats, working)
        per_leaf_bases = _per_axis.by_leaf(state.bases, working)
        mu_in, nu_in = state.mu, state.nu
        if widen and owned is None:
            mu_in, nu_in = (
                common.tree_map_multi(
                    lambda g, x: (_lowbit.read(x, common.compute_dtype(g.dtype)),), 1, updates, t
                )[0]
                for t in (state.mu, state.nu)
            )

        def store_moments(m, v, m_stored, v_stored, i):  # into their storage (8-bit, bf16)
            sr = dict(stochastic=stochastic_rounding, step=count, leaf=i)
            return (
                _lowbit.write(m, m_stored, salt=_lowbit.SALT_MU, **sr),
                _lowbit.write(v, v_stored, salt=_lowbit.SALT_NU, **sr),
            )

        def stored_leaf(g, mw, vw, stats, bases):  # preconditioner in `precond_dtype`
            ct = common.compute_dtype(g.dtype)
            out = leaf(g, mw, vw, _lowbit.widened(stats, ct), _lowbit.widened(bases, ct))
            return (*out[:3], *(_lowbit.widened(t, precond_dtype) for t in out[3:]))

        if owned is not None:
            # the moments are read and stored inside the owner's computation (they live there)
            index = jax.tree.map(lambda i: jnp.asarray(i, jnp.int32), _lowbit.leaf_indices(updates))
            inner_leaf = leaf if precond_dtype is None else stored_leaf

            def resident_leaf(g, ms, vs, stats, bases, i):
                ct = common.compute_dtype(g.dtype)
                mw, vw = (_lowbit.read(ms, ct), _lowbit.read(vs, ct)) if widen else (ms, vs)
                u, m, v, stats, bases = inner_leaf(g, mw, vw, stats, bases)
                if widen:
                    m, v = store_moments(m, v, ms, vs, i)
                return u, m, v, stats, bases

            u, mu, nu, stats, bases, owned = _batching.grouped_map(
                resident_leaf,
                5,
                updates,
                state.mu,
                state.nu,
                per_leaf_stats,
                per_leaf_bases,
                index,
                cost=_owner.preconditioned_cost,
                resident=owned,
            )
            new = SoapState(
                count=count,
                mu=mu,
                nu=nu,
                stats=_per_axis.by_axis(stats, updates),
                bases=_per_axis.by_axis(bases, updates),
            )
            return u, _resident.OwnerPlacedState(new, owned)

        u, mu, nu, stats, bases = _batching.grouped_map(
            leaf if precond_dtype is None else stored_leaf,
            5,
            updates,
            mu_in,
            nu_in,
            per_leaf_stats,
            per_leaf_bases,
            cost=_owner.preconditioned_cost,
        )
        if widen:
            index = _lowbit.leaf_indices(updates)

            mu, nu = common.tree_map_multi(
                lambda g, *rest: store_moments(*rest), 2, updates, mu, nu, state.mu, state.nu, index
            )
        return u, SoapState(
            count=count,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
            stats=_per_axis.by_axis(stats, updates),
            bases=_per_axis.by_axis(bases, updates),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _zero_first_update(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, except that its first update is zero (its state still advances)."""

    def init_fn(params):
        return (jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        count, inner_state = state
        new, inner_state = inner.update(updates, inner_state, params, **extra)
        new = common.tree_map_none(lambda u: jnp.where(count == 0, jnp.zeros_like(u), u), new)
        return new, (optax.safe_increment(count), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DecayAfterUpdateState(NamedTuple):
    """State of `add_decayed_weights_after_update`."""

    count: jax.Array
    inner: optax.OptState


def add_decayed_weights_after_update(
    learning_rate: common.ScalarOrSchedule, weight_decay: Any, mask: common.MaskOrFn = None
) -> optax.GradientTransformation:
    r"""Decoupled decay of the already-updated parameter, after the learning rate.

    With :math:`u` the scaled update, the result is :math:`u - \eta\lambda(\theta + u)`, so
    :math:`\theta \leftarrow (\theta + u)(1 - \eta\lambda)`: the reference SOAP's order
    (step, then ``p.mul_(1 - lr * wd)``).
    """
    common.check_learning_rate(learning_rate)
    inner = common.add_decayed_weights(weight_decay, mask)

    def init_fn(params):
        return DecayAfterUpdateState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        count = optax.safe_increment(state.count)
        if isinstance(weight_decay, (int, float)) and weight_decay == 0:
            return updates, DecayAfterUpdateState(count, state.inner)
        if params is None:
            raise ValueError("weight_decay != 0 needs params: call update(grads, state, params)")
        rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
        moved = common.tree_map_none(lambda u, p: p + u.astype(p.dtype), updates, params)
        zeros = common.tree_map_none(jnp.zeros_like, updates)
        decay, inner_state = inner.update(zeros, state.inner, moved)
        new = common.tree_map_none(
            lambda u, d: (u - jnp.asarray(rate, u.dtype) * d).astype(u.dtype), updates, decay
        )
        return new, DecayAfterUpdateState(count, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def soap(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precond_freq: int = 10,
    *,
    jacobi_sweeps: int = 30,
    mu_dtype: Any = None,
    mask: common.MaskOrFn = None,
    skip_first_step: bool | None = None,
    reproject_moments: bool | None = None,
    refresh: str | None = None,
    max_precond_dim: int | None = None,
    merge_dims: bool = False,
    precondition_nd: bool | None = None,
    precondition_1d: bool = False,
    precision: Any = None,
    eps_placement: str | None = None,
    decay_after_update: bool | None = None,
    behaviour: str = "crate",
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
    precond_dtype: Any = None,
    state_placement: str = "parameter",
) -> optax.GradientTransformationExtraArgs:
    r"""SOAP with decoupled weight decay, as the crate's `Soap`.

    .. math::
        \theta \leftarrow \theta - \eta\,\big(u_t + \lambda\theta\big)

    with :math:`u_t` from `scale_by_soap` (Adam in the eigenbasis of
    :math:`L = E[GG^\top]`, :math:`R = E[G^\top G]`); non-matrix leaves take AdamW with the
    same betas, eps and decay. Defaults are the crate's; ``behaviour="reference"`` switches to
    the authors' soap.py as pytorch-optimizer's `SOAP` implements it: ``skip_first_step=True,
    reproject_moments=True, refresh="qr", max_precond_dim=10000, precondition_nd=True``, eps
    added to :math:`\sqrt{v}` before the bias correction (``eps_placement="uncorrected"``) and
    the decay applied to the already-updated parameter (``decay_after_update=True``). The
    reference's own defaults are ``shampoo_beta=b2`` (it passes -1) and
    ``learning_rate=3e-3``. Arguments given explicitly take precedence.

    State size per parameter: see `scale_by_soap` (6 floats per parameter of a square matrix,
    2 for other leaves).

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay (the crate's `beta1`).
      b2: second-moment decay (the crate's `beta2`).
      shampoo_beta: decay of the statistics L, R.
      eps: denominator term outside the square root.
      weight_decay: decoupled decay coefficient (multiplied by the learning rate).
      precond_freq: bases recomputed every `precond_freq` calls (and at the first).
      jacobi_sweeps: the crate's Jacobi sweep cap; accepted for parity of the field list and
        ignored (``eigh`` converges fully).
      mu_dtype: dtype of the first moment.
      mask: pytree (or callable returning one) of booleans selecting the leaves decayed.
      skip_first_step: reference order, zero first update (decay included); see
        `scale_by_soap`.
      reproject_moments: rotate the first moment into a refreshed basis (reference).
      refresh: ``"eigh"`` (crate) or ``"qr"`` (reference power-iteration refresh).
      max_precond_dim: axes longer than this are not rotated (reference: 10000).
      merge_dims: merge consecutive axes of n-D leaves up to `max_precond_dim`.
      precondition_nd: rotate every axis of rank >= 3 leaves (reference).
      precondition_1d: rotate vectors too.
      precision: precision of the matrix products (default ``HIGHEST``; see
        `scale_by_soap`).
      eps_placement: ``"corrected"`` (crate) or ``"uncorrected"`` (reference).
      decay_after_update: decay the updated parameter, :math:`\theta \leftarrow (\theta -
        \eta u)(1-\eta\lambda)` (reference), instead of :math:`\theta - \eta(u +
        \lambda\theta)` (crate).
      behaviour: ``"crate"`` or ``"reference"`` (see above and `scale_by_soap`).
      nu_dtype: storage of the second moment (a floating dtype, ``"q8"`` or ``"q4"``; see
        `scale_by_soap`).
      stochastic_rounding: round float32 moments into bfloat16 storage stochastically.
      precond_dtype: storage of the statistics and eigenbases (see `scale_by_soap`).
      state_placement: ``"parameter"`` or ``"owner"`` (on a mesh, each matrix's state stays
        on the device that computes it; see `scale_by_soap`).

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rlx_optax
      >>> tx = rlx_optax.soap(1e-2, weight_decay=0.0)
      >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum((p["w"] @ jnp.ones(2) - 2.0) ** 2) + jnp.sum(p["b"]))(
      ...     params)
      >>> updates, state = tx.update(grads, state, params)
      >>> [round(float(x), 4) for x in optax.apply_updates(params, updates)["b"]]
      [-0.01, -0.01]

    References:
      Vyas et al., *SOAP: Improving and Stabilizing Shampoo using Adam*,
      https://arxiv.org/abs/2409.11321
    """
    _check_count("jacobi_sweeps", jacobi_sweeps)
    opts = _resolve(
        behaviour,
        skip_first_step=skip_first_step,
        reproject_moments=reproject_moments,
        refresh=refresh,
        max_precond_dim=max_precond_dim,
        precondition_nd=precondition_nd,
        eps_placement=eps_placement,
        decay_after_update=decay_after_update,
    )
    skip_first_step = opts["skip_first_step"]
    scale = scale_by_soap(
        b1,
        b2,
        shampoo_beta,
        eps,
        precond_freq,
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic_rounding,
        precond_dtype=precond_dtype,
        state_placement=state_placement,
        skip_first_step=skip_first_step,
        reproject_moments=opts["reproject_moments"],
        refresh=opts["refresh"],
        max_precond_dim=opts["max_precond_dim"],
        merge_dims=merge_dims,
        precondition_nd=opts["precondition_nd"],
        precondition_1d=precondition_1d,
        precision=precision,
        eps_placement=opts["eps_placement"],
    )
    if opts["decay_after_update"]:
        tx = optax.chain(
            scale,
            optax.scale_by_learning_rate(learning_rate),
            add_decayed_weights_after_update(learning_rate, weight_decay, mask),
        )
    else:
        tx = common.alias(scale, learning_rate, weight_decay, mask)
    return _zero_first_update(tx) if skip_first_step else tx
