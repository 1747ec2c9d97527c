"""Kron-PSGD: SGD preconditioned by a Kronecker product of triangular factors."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common, linalg
from rlx_optax._src.transforms import _batching, _lowbit, _owner, _per_axis, _resident
from rlx_optax._src.transforms import sgd as _sgd


class KronPsgdState(NamedTuple):
    """State of `scale_by_kron_psgd`.

    `factors` is a tuple with one pytree per axis: the k-th tree holds, at each parameter's
    place, the factor of the leaf's axis k (an upper-triangular float32 (d, d) matrix or a
    float32 (d,) diagonal), or None where the leaf is passed through or has fewer axes. For a
    matrix ``w``: ``factors[0]["w"]`` is the left factor, ``factors[1]["w"]`` the right one.
    (One tree per axis, not a tuple per leaf, so that every parameter-shaped place of the
    state holds an array, as `flax.nnx.Optimizer` and orbax restore it.)
    """

    count: jax.Array  # int32, number of `update` calls so far
    key: jax.Array | None  # PRNG key of the random probes (None with the gradient probe)
    update_counter: jax.Array  # int32, calls since the factors were last updated
    factors: Any


def _plan(
    shape: tuple[int, ...], *, precondition_nd: bool, max_size_triangular: int | None
) -> tuple[str, ...] | None:
    """Per axis "tri" or "diag", or None for a leaf passed through (Python-static)."""
    if 0 in shape:  # an empty leaf: nothing to precondition
        return None
    if len(shape) == 2 or (precondition_nd and len(shape) >= 1):
        limit = math.inf if max_size_triangular is None else int(max_size_triangular)
        return tuple("tri" if len(shape) >= 2 and 1 < d <= limit else "diag" for d in shape)
    return None


def _solve_along(x: jax.Array, q: jax.Array, axis: int) -> jax.Array:
    """`x` times `q^{-T}` along `axis` (a triangular solve), or divided by a diagonal."""
    if q.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = q.shape[0]
        return x / q.reshape(shape)
    if x.ndim == 2 and axis == 0:
        return linalg.solve_upper_triangular(q, x, left=True, transpose=True)
    moved = jnp.moveaxis(x, axis, -1)
    flat = moved.reshape(-1, q.shape[0])
    out = linalg.solve_upper_triangular(q, flat, left=False)  # rows times q^{-1}
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis)


def _axis_terms(a: jax.Array, axis: int, diagonal: bool, precision: Any) -> jax.Array:
    if diagonal:
        others = tuple(i for i in range(a.ndim) if i != axis)
        return jnp.sum(a * a, axis=others)
    return linalg.axis_gram(a, axis, precision=precision)


def _difference_terms(a: jax.Array, b: jax.Array, axis: int, diagonal: bool, precision: Any):
    """`a a^T - b b^T` along `axis`, exactly zero when ``a == b`` (the crate's gradient probe).

    Formed as the symmetrised ``(a - b)(a + b)^T``: two Gram products rounded separately
    would leave a difference of pure rounding noise where the crate's is exactly zero, and the
    Frobenius normalisation would turn that noise into a full-size factor step.
    """
    d, s = a - b, a + b
    if diagonal:
        others = tuple(i for i in range(a.ndim) if i != axis)
        return jnp.sum(d * s, axis=others)
    return linalg.axis_cross_gram(d, s, axis, precision=precision)


def _update_factors(
    factors: tuple,
    g: jax.Array,
    v: jax.Array,
    precond_lr: float,
    eps: float,
    crate: bool,
    precision: Any,
) -> tuple:
    """One Lie-group step of every factor from the probe pair (g, v).

    The step is homogeneous of degree 0 in the pair: with a power of two `k` above max|a|,
    max|b| (1 when both are below 1), ``M / k^2`` with its normaliser divided by ``k^2`` gives
    the same step bit for bit, and its Gram products cannot overflow (a gradient above about
    1e19 would otherwise give +-inf and NaN).
    """
    a = linalg.apply_along_axes(g, list(factors), precision=precision, upper_triangular=True)
    b = v
    for axis, q in enumerate(factors):
        b = _solve_along(b, q.astype(b.dtype), axis)
    k = jnp.maximum(
        linalg.power_of_two_scale(a, at_least_one=True),
        linalg.power_of_two_scale(b, at_least_one=True),
    )
    a, b = a / k, b / k
    new = []
    for axis, q in enumerate(factors):
        diagonal = q.ndim == 1
        k32 = k.astype(jnp.float32)
        # the floors divided by k^2 too (`tiny` keeps them above 0 where k^2 would underflow
        # them; then M is 0 or the floor is far below rounding: the step is unchanged)
        tiny = jnp.finfo(jnp.float32).tiny
        if crate:  # normalised by the Frobenius norm of the whole difference
            m = _difference_terms(a, b, axis, diagonal, precision).astype(jnp.float32)  # M/k^2
            norm = jnp.sqrt(jnp.sum(m * m)) + eps / k32 / k32
            side = "right"
        else:  # Li's normalisation: a lower bound of the spectral norm of t1 + t2
            t1 = _axis_terms(a, axis, diagonal, precision)
            t2 = _axis_terms(b, axis, diagonal, precision)
            m = (t1 - t2).astype(jnp.float32)  # M / k^2, as psgd-jax forms it
            s = (t1 + t2).astype(jnp.float32)
            if diagonal:
                bound = jnp.max(jnp.abs(s))
            else:
                bound = linalg.spectral_norm_lower_bound(s, precision=precision)
            norm = bound + tiny / k32 / k32
            side = "left"
        step = precond_lr / jnp.maximum(norm, tiny)
        new.append(linalg.lie_group_factor_step(q, m, step, side=side, precision=precision))
    return tuple(new)


def _precondition(factors: tuple, g: jax.Array, crate: bool, precision: Any) -> jax.Array:
    r"""`P_0 g P_1 ...` with :math:`P = Q^\top Q` (the crate's right factor: :math:`Q Q^\top`)."""
    mats = [q.astype(g.dtype) for q in factors]
    kw = {"precision": precision, "upper_triangular": True}
    if crate:  # axis 0: Q^T Q ; axis 1: Q Q^T
        left = [mats[0], None]
        right = [None, mats[1]]
        x = linalg.apply_along_axes(g, left, **kw)
        x = linalg.apply_along_axes(x, left, transpose=True, **kw)
        x = linalg.apply_along_axes(x, right, transpose=True, **kw)
        return linalg.apply_along_axes(x, right, **kw)
    x = linalg.apply_along_axes(g, mats, **kw)
    return linalg.apply_along_axes(x, mats, transpose=True, **kw)


def scale_by_kron_psgd(
    precond_lr: float = 0.1,
    eps: float = 1e-8,
    clip: float = 1.0,
    *,
    probe: str = "gradient",
    key: jax.Array | None = None,
    update_probability: float | optax.Schedule = 1.0,
    max_size_triangular: int | None = None,
    precondition_nd: bool = False,
    factor_update: str = "crate",
    clip_mode: str = "max_abs",
    precision: Any = None,
    precond_dtype: Any = None,
    state_placement: str = "parameter",
) -> optax.GradientTransformation:
    r"""Precondition with a Kronecker product of factors learned by PSGD (no momentum, no lr).

    For a matrix gradient :math:`G` with factors :math:`Q_L, Q_R` (upper triangular, from I),
    by default (the crate's rule, the gradient as its own probe):

    .. math::
        A &= Q_L G Q_R^\top,\qquad B = Q_L^{-\top} G Q_R^{-1} \\
        M_L &= A A^\top - B B^\top,\quad
            Q_L \leftarrow Q_L - \frac{\mu_p}{\|M_L\|_F + \epsilon} Q_L\,\mathrm{triu}(M_L) \\
        M_R &= A^\top A - B^\top B,\quad
            Q_R \leftarrow Q_R - \frac{\mu_p}{\|M_R\|_F + \epsilon} Q_R\,\mathrm{triu}(M_R) \\
        p &= Q_L^\top Q_L\, G\, Q_R Q_R^\top,\qquad
            u = p \cdot \min(1, c / \max_{ij}|p_{ij}|)

    (:math:`A, B` use the factors before the step, :math:`p` those after.) Leaves that are
    not matrices pass through unchanged. The factors are float32 whatever the parameter dtype;
    a zero gradient leaves them unchanged (:math:`M = 0`) and gives a zero update.

    With ``probe="random", factor_update="reference", clip_mode="rms", clip=1.1,
    precondition_nd=True`` this is the Kron of psgd_torch / kron_torch / psgd-jax: the probe is
    :math:`V \sim N(0, I)` with :math:`A` computed from
    :math:`G + \sqrt{\epsilon_{32}}\,\mathrm{mean}|G|\, V` and :math:`B` from :math:`V`; the
    step is left-multiplied, :math:`Q \leftarrow Q - \mu_p\,\mathrm{triu}(M) Q /
    \|A A^\top + B B^\top\|_2^{\text{lower}}` (a diagonal factor divides by the max-abs
    entry); the preconditioner is :math:`Q^\top Q` on every axis; one factor per axis of any
    rank, diagonal for vectors and axes longer than `max_size_triangular`. (psgd-jax's random
    rebalancing of factor norms is omitted: it does not change :math:`P`.)

    Products with the triangular factors skip their zero blocks (about half the FLOPs of a
    dense product for the applications, a third for the factor step; the same results up to the
    order of float32 sums), and same-shaped matrices run as one batched computation on
    accelerators.

    State size per parameter: :math:`(m^2+n^2)/(mn)` float32 for an (m, n) matrix (2 for a
    square one); 0 for leaves passed through.

    Args:
      precond_lr: step size :math:`\mu_p` of the factors, >= 0 (below 1 keeps them invertible).
      eps: floor of the crate's Frobenius normaliser.
      clip: bound of the clip (max-abs entry, or RMS with ``clip_mode="rms"``).
      probe: ``"gradient"`` (crate) or ``"random"`` (reference; needs `key`).
      key: a PRNG key for the random probes, split at every call and kept in the state.
      update_probability: probability (or schedule of the step count) of updating the factors,
        applied as psgd-jax does with a deterministic counter (update when
        ``calls since last >= 1/p``). Crate: 1.
      max_size_triangular: axes longer than this get a diagonal factor (reference: 8192).
        With None (the crate: every matrix axis triangular) a leaf with an axis longer than
        10000 is refused at `init`, naming the leaf (its factor alone would be d^2 floats).
      precondition_nd: give every leaf of rank >= 1 one factor per axis (reference); default
        preconditions matrices only (crate).
      factor_update: ``"crate"`` (right-multiplied step normalised by the Frobenius norm,
        right preconditioner :math:`Q_R Q_R^\top`) or ``"reference"`` (Li's PSGD).
      clip_mode: ``"max_abs"`` (crate) or ``"rms"`` (reference).
      precision: precision of every matrix product. Default: ``HIGHEST`` with
        ``factor_update="crate"`` (the crate's float32 arithmetic on every backend); with
        ``"reference"``, psgd-jax's choices: ``"tensorfloat32"`` (`Precision.HIGH`) for the
        factor step and the backend's ``DEFAULT`` pass for preconditioning the gradient, both
        given explicitly. See `docs/numerics.md`. (On CPU every choice is float32.)
      precond_dtype: storage of the factors (default float32): a floating dtype such as
        ``jnp.bfloat16`` halves them; they are computed in float32 and rounded to nearest
        when stored.
      state_placement: ``"parameter"`` (default: the factors are kept per parameter, laid
        out by `rlx_optax.state_shardings`) or ``"owner"``: on a mesh of several devices each
        leaf's factors stay on the device that owner compute gives the leaf
        (`OwnerPlacedState`), so that a step moves only the gradient there and the update
        back. The state's layout then depends on the mesh it was made on (``init`` reads it
        from the parameters); see docs/scaling.md. On one device the two are the same.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Li, *Preconditioned Stochastic Gradient Descent*, https://arxiv.org/abs/1512.04202
    """
    common.check_non_negative("precond_lr", precond_lr)
    common.check_non_negative("eps", eps)
    common.check_range("clip", clip, 0.0, low_open=True)
    common.check_choice("probe", probe, ("gradient", "random"))
    common.check_choice("factor_update", factor_update, ("crate", "reference"))
    common.check_choice("clip_mode", clip_mode, ("max_abs", "rms"))
    if not callable(update_probability):
        common.check_range("update_probability", update_probability, 0.0, 1.0, low_open=True)
    if max_size_triangular is not None and not isinstance(max_size_triangular, jax.Array):
        common.check_positive_int("max_size_triangular", max_size_triangular)
    if probe == "random" and key is None:
        raise ValueError("probe='random' needs a PRNG key: pass key=jax.random.key(0)")
    if factor_update == "crate" and precondition_nd:
        raise ValueError("precondition_nd needs factor_update='reference' (the crate is 2-D)")
    linalg.check_precision("precision", precision)
    _resident.check_placement("state_placement", state_placement)
    if factor_update == "crate" and probe == "gradient":
        common.warn_once("kron_psgd/static-preconditioner", common.KRON_CRATE_WARNING)
    crate = factor_update == "crate"
    if precision is not None:
        factor_precision = apply_precision = linalg.resolve_precision(precision, jnp.float32)
    elif crate:
        factor_precision = apply_precision = jax.lax.Precision.HIGHEST
    else:  # psgd-jax: precond_update_precision="tensorfloat32", precond_grads_precision=None
        factor_precision, apply_precision = jax.lax.Precision.HIGH, jax.lax.Precision.DEFAULT
    plan_kw = {"precondition_nd": precondition_nd, "max_size_triangular": max_size_triangular}

    def _triangular_dims(shape):
        kinds = _plan(shape, **plan_kw)
        return [] if kinds is None else [d for d, k in zip(shape, kinds, strict=True) if k == "tri"]

    precond_dtype = _lowbit.check_precond_dtype("precond_dtype", precond_dtype)
    stored = precond_dtype or jnp.float32

    def init_leaf(p):
        kinds = _plan(p.shape, **plan_kw)
        if kinds is None:
            return None
        return tuple(
            jnp.eye(d, dtype=stored) if k == "tri" else jnp.ones((d,), stored)
            for d, k in zip(p.shape, kinds, strict=True)
        )

    def init_fn(params):
        common.reject_complex(params, "kron_psgd")
        if max_size_triangular is None:
            common.refuse_huge_factors(
                params,
                "kron_psgd",
                _triangular_dims,
                "max_size_triangular",
                (8192, "diagonal"),
            )
        leaves, treedef = jax.tree.flatten(params, is_leaf=common.is_empty)
        present = [p for p in leaves if not common.is_empty(p)]
        per_leaf = [init_leaf(p) for p in present]
        owned = None
        if state_placement == "owner":  # (g, factors, probe key): the factors at 1
            calls = [(p, f, None) for p, f in zip(present, per_leaf, strict=True)]
            owned = _resident.place(present, calls, (1,), _owner.preconditioned_cost)
        factors = _resident.spread(leaves, treedef, per_leaf, _resident.owned_leaves(owned))
        state = KronPsgdState(
            count=jnp.zeros([], jnp.int32),
            # a copy: a donated step deletes the state's buffers, and the factory's key must
            # survive it for the next `init` (a resumed run, a second model)
            key=jnp.copy(key) if probe == "random" else None,
            update_counter=jnp.zeros([], jnp.int32),
            factors=_per_axis.by_axis(factors, params),
        )
        return state if owned is None else _resident.OwnerPlacedState(state, owned)

    def update_fn(updates, state, params=None):
        del params
        owned = None
        if isinstance(state, _resident.OwnerPlacedState):
            state, owned = state.inner, state.owned
            _resident.check_mesh(owned, _owner.mesh_of(jax.tree.leaves(updates)), "kron_psgd")
        state = common.check_state(
            "kron_psgd",
            state,
            KronPsgdState,
            updates,
            per_axis=("factors",),
            leaf_check=common.factors_disagree,
        )
        count = optax.safe_increment(state.count)
        prob = update_probability(count) if callable(update_probability) else update_probability
        counter = optax.safe_increment(state.update_counter)
        do_update = counter.astype(jnp.float32) >= 1.0 / jnp.asarray(prob, jnp.float32)
        counter = jnp.where(do_update, 0, counter)
        new_key, leaf_keys = state.key, None
        n_leaves = len(jax.tree.leaves(updates))
        if probe == "random":
            new_key, sub = jax.random.split(state.key)
            leaf_keys = list(jax.random.split(sub, max(n_leaves, 1)))

        def leaf(g, factors, probe_key):
            if factors is None or all(q is None for q in factors):
                return g, None
            ct = common.compute_dtype(g.dtype)
            g32 = g.astype(ct)
            if probe == "random":
                v = jax.random.normal(probe_key, g.shape, ct)
                damp = jnp.sqrt(jnp.finfo(jnp.float32).eps).astype(ct)
                k = linalg.power_of_two_scale(g32, at_least_one=True)  # exact; no overflow
                g_probe = g32 + damp * (jnp.mean(jnp.abs(g32) / k) * k) * v
            else:
                g_probe, v = g32, g32
            # the factors are a preconditioner: no gradient flows through their update (a meta-
            # gradient would otherwise meet d|M|/dM at M = 0, the crate's exact zero, as NaN)
            g_probe, v = jax.lax.stop_gradient(g_probe), jax.lax.stop_gradient(v)
            factors = jax.lax.cond(
                do_update,
                lambda fs: _update_factors(
                    fs, g_probe, v, precond_lr, eps, crate, factor_precision
                ),
                lambda fs: fs,
                factors,
            )
            p = _precondition(factors, g32, crate, apply_precision)
            if clip_mode == "max_abs":
                mx = jnp.max(jnp.abs(p))
                p = p * jnp.where(mx > clip, clip / jnp.where(mx > 0, mx, 1.0), 1.0)
            else:
                k = linalg.power_of_two_scale(p, at_least_one=True)  # exact; no overflow
                rms = jnp.sqrt(jnp.mean((p / k) * (p / k))) * k
                p = p / jnp.maximum(1.0, rms / clip)
            return p.astype(g.dtype), factors

        # the i-th preconditioned leaf (in flattening order) probes with the i-th key
        flat_u, treedef = jax.tree.flatten(updates, is_leaf=common.is_empty)
        per_leaf_factors = _per_axis.by_leaf(state.factors, updates)
        flat_f = treedef.flatten_up_to(per_leaf_factors)
        probe_keys, used, n = [], 0, -1
        owned_leaves = _resident.owned_leaves(owned)  # their factors are in `owned`
        for g, f in zip(flat_u, flat_f, strict=True):
            n += not common.is_empty(g)
            take = (
                leaf_keys is not None
                and not common.is_empty(g)
                and (n in owned_leaves or any(q is not None for q in f))
            )
            probe_keys.append(leaf_keys[used] if take else None)
            used += take

        # Same-shaped leaves run as one batched computation (`grouped_map`).
        def stored_leaf(g, factors, probe_key):  # the factors in `precond_dtype`
            u, new = leaf(g, _lowbit.widened(factors, jnp.float32), probe_key)
            return u, _lowbit.widened(new, precond_dtype)

        u, factors, *placed = _batching.grouped_map(
            leaf if precond_dtype is None else stored_leaf,
            2,
            updates,
            per_leaf_factors,
            treedef.unflatten(probe_keys),
            cost=_owner.preconditioned_cost,
            resident=owned,
        )
        new = KronPsgdState(count, new_key, counter, _per_axis.by_axis(factors, updates))
        return u, new if owned is None else _resident.OwnerPlacedState(new, placed[0])

    return optax.GradientTransformation(init_fn, update_fn)


def precond_update_prob_schedule(
    max_prob: float = 1.0, min_prob: float = 0.03, decay: float = 0.001, flat_start: int = 500
) -> optax.Schedule:
    r"""psgd-jax's (and kron_torch's, pytorch-optimizer's) factor-update probability.

    :math:`p = \mathrm{clip}(p_{max} e^{-\text{decay}(n - \text{flat\_start})}, p_{min},
    p_{max})` with :math:`n` the number of steps already taken (the 1-based `count` minus 1):
    1 for the first 500 steps, 0.61 at 1000, the floor 0.03 from about 4000.
    """

    def schedule(count):
        n = jnp.asarray(count, jnp.float32) - 1.0
        return jnp.clip(max_prob * jnp.exp(-decay * (n - flat_start)), min_prob, max_prob)

    return schedule


def _matrices_and_up(params: optax.Params) -> optax.Params:
    """The reference's decay mask: leaves of rank >= 2."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


#: The switches each `behaviour` of `kron_psgd` sets (explicit arguments take precedence):
#: the reference is kron_torch / psgd-jax's Kron as pytorch-optimizer's `Kron` implements it.
PRESETS = {
    "crate": {
        "clip": 1.0,
        "momentum_before": False,
        "probe": "gradient",
        "update_probability": 1.0,
        "max_size_triangular": None,
        "precondition_nd": False,
        "factor_update": "crate",
        "clip_mode": "max_abs",
        "mask": None,
    },
    "reference": {
        "clip": 1.1,
        "momentum_before": True,
        "probe": "random",
        "update_probability": precond_update_prob_schedule(),
        "max_size_triangular": 8192,
        "precondition_nd": True,
        "factor_update": "reference",
        "clip_mode": "rms",
        "mask": _matrices_and_up,
    },
}


def kron_psgd(
    learning_rate: common.ScalarOrSchedule,
    precond_lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    clip: float | None = None,
    *,
    mask: common.MaskOrFn = None,
    mu_dtype: Any = None,
    momentum_before: bool | None = None,
    probe: str | None = None,
    key: jax.Array | None = None,
    update_probability: float | optax.Schedule | None = None,
    max_size_triangular: int | None = None,
    precondition_nd: bool | None = None,
    factor_update: str | None = None,
    clip_mode: str | None = None,
    precision: Any = None,
    behaviour: str = "crate",
    stochastic_rounding: bool = False,
    precond_dtype: Any = None,
    state_placement: str = "parameter",
) -> optax.GradientTransformationExtraArgs:
    r"""Kron-PSGD as the crate's `KronPsgd`: precondition, clip, L2 decay, then momentum.

    .. math::
        \hat g = u_t + \lambda\theta,\qquad v \leftarrow \mu v + \hat g,\qquad
        \theta \leftarrow \theta - \eta\, v

    with :math:`u_t` from `scale_by_kron_psgd` (the clipped preconditioned gradient; the
    gradient itself for leaves that are not matrices, which therefore take SGD with momentum
    and L2 decay). The decay enters after the preconditioner and before the momentum, so this
    is the chain ``scale_by_kron_psgd -> add_decayed_weights -> optax.trace(momentum) ->
    scale_by_learning_rate``.

    The Kron most practitioners use (psgd-jax / kron_torch, pytorch-optimizer's `Kron`) is
    ``behaviour="reference"``: ``momentum_before=True, probe="random", factor_update=
    "reference", clip_mode="rms", clip=1.1, precondition_nd=True, max_size_triangular=8192,
    update_probability=precond_update_prob_schedule()``, decay on leaves of rank >= 2 only,
    and ``key=jax.random.PRNGKey(0)`` unless a key is given (arguments given explicitly take
    precedence); `momentum_before` makes the chain
    ``optax.ema(momentum, debias=True) -> scale_by_kron_psgd -> add_decayed_weights ->
    scale_by_learning_rate`` (momentum fed into the preconditioner, decay not preconditioned).

    State size per parameter: one momentum buffer (the parameter dtype or `mu_dtype`) plus
    :math:`(m^2+n^2)/(mn)` float32 for an (m, n) matrix: 3 for a square matrix, 1 for other
    leaves.

    Args:
      learning_rate: a float or an optax schedule.
      precond_lr: step size of the factors.
      momentum: :math:`\mu` in [0, 1).
      weight_decay: L2 coefficient :math:`\lambda`, added after preconditioning.
      eps: floor of the factor-step normaliser.
      clip: max-abs (or RMS) bound of the preconditioned gradient (crate 1, reference 1.1).
      mask: pytree (or callable returning one) of booleans selecting the leaves decayed
        (crate: all; reference: rank >= 2).
      mu_dtype: storage of the momentum buffer: None (the parameter dtype), a floating dtype
        such as ``jnp.bfloat16``, ``"q8"`` or ``"q4"`` (8- or 4-bit block-wise,
        `rlx_optax.QuantizedArray`);
        the factors stay float32.
      momentum_before: debiased EMA momentum before preconditioning (reference).
      probe: ``"gradient"`` (crate) or ``"random"`` (reference, needs `key`).
      key: PRNG key of the random probes.
      update_probability: probability or schedule of updating the factors (crate: 1).
      max_size_triangular: axes longer than this get diagonal factors.
      precondition_nd: one factor per axis for leaves of every rank >= 1 (reference).
      factor_update: ``"crate"`` or ``"reference"`` factor step; see `scale_by_kron_psgd`.
      clip_mode: ``"max_abs"`` (crate) or ``"rms"`` (reference).
      precision: precision of the matrix products (default: ``HIGHEST`` in crate mode,
        psgd-jax's choices with ``factor_update="reference"``); see `scale_by_kron_psgd`.
      behaviour: ``"crate"`` or ``"reference"`` (see above).
      stochastic_rounding: round the float32 momentum into a bfloat16 `mu_dtype`
        stochastically (unbiased; the bits derive from the step and the leaf).
      precond_dtype: storage of the factors (see `scale_by_kron_psgd`).
      state_placement: ``"parameter"`` or ``"owner"`` (on a mesh, each leaf's factors stay
        on the device that computes it; see `scale_by_kron_psgd`).

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rlx_optax
      >>> tx = rlx_optax.kron_psgd(0.1)
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.zeros((2, 2)), "b": jnp.array([1.0, -1.0])}
      >>> updates, state = tx.update(grads, state, params)
      >>> [round(float(x), 4) for x in optax.apply_updates(params, updates)["b"]]
      [0.9, 1.1]

    References:
      Li, *Preconditioned Stochastic Gradient Descent*, https://arxiv.org/abs/1512.04202
    """
    common.check_learning_rate(learning_rate)
    common.check_beta("momentum", momentum)
    _lowbit.check_storage("mu_dtype", mu_dtype)
    opts = common.resolve_preset(
        behaviour,
        PRESETS,
        clip=clip,
        momentum_before=momentum_before,
        probe=probe,
        update_probability=update_probability,
        max_size_triangular=max_size_triangular,
        precondition_nd=precondition_nd,
        factor_update=factor_update,
        clip_mode=clip_mode,
        mask=mask,
    )
    if key is None and behaviour == "reference" and opts["probe"] == "random":
        key = jax.random.PRNGKey(0)
    precond = scale_by_kron_psgd(
        precond_lr,
        eps,
        opts["clip"],
        probe=opts["probe"],
        key=key,
        update_probability=opts["update_probability"],
        max_size_triangular=opts["max_size_triangular"],
        precondition_nd=opts["precondition_nd"],
        factor_update=opts["factor_update"],
        clip_mode=opts["clip_mode"],
        precision=precision,
        precond_dtype=precond_dtype,
        state_placement=state_placement,
    )
    decay = common.add_decayed_weights(weight_decay, opts["mask"])
    lr = optax.scale_by_learning_rate(learning_rate)
    # optax's own momentum (and state) unless the storage needs `_lowbit`
    lowbit = stochastic_rounding or _lowbit.is_quantized_storage(mu_dtype)
    if opts["momentum_before"]:
        if lowbit:
            ema = _debiased_ema(momentum, mu_dtype, stochastic_rounding)
        else:
            ema = optax.ema(momentum, debias=True, accumulator_dtype=mu_dtype)
        return common.chain("kron_psgd", ema, precond, decay, lr)
    if lowbit:
        trace = _sgd.scale_by_sgd(
            momentum, False, mu_dtype, stochastic_rounding=stochastic_rounding
        )
    else:
        trace = optax.trace(momentum, accumulator_dtype=mu_dtype)
    return common.chain("kron_psgd", precond, decay, trace, lr)


def _debiased_ema(
    decay: float, mu_dtype: Any, stochastic_rounding: bool
) -> optax.GradientTransformation:
    """`optax.ema(decay, debias=True)` (same state, `optax.EmaState`) with the EMA stored
    through `_lowbit` (bfloat16 with stochastic rounding, or ``"q8"``), updated in float32."""

    def init_fn(params):
        return optax.EmaState(
            count=jnp.zeros([], jnp.int32), ema=_lowbit.init_tree(params, mu_dtype, signed=True)
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def leaf(g, stored, i):
            ct = common.compute_dtype(g.dtype)
            d = jnp.asarray(decay, ct)
            e = (1 - d) * g.astype(ct) + d * _lowbit.read(stored, ct)
            sr = dict(stochastic=stochastic_rounding, step=count, leaf=i, salt=_lowbit.SALT_MU)
            debiased = e / (1 - d**count).astype(ct)
            return debiased.astype(g.dtype), _lowbit.write(e, stored, **sr)

        index = _lowbit.leaf_indices(updates)
        u, ema = common.tree_map_multi(leaf, 2, updates, state.ema, index)
        return u, optax.EmaState(count=count, ema=ema)

    return optax.GradientTransformation(init_fn, update_fn)
