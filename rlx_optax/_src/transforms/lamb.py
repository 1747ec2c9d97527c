"""LAMB: Adam direction plus decay, rescaled per leaf by a trust ratio."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.transforms import _batching, _moments


class LambState(NamedTuple):
    """State of `scale_by_lamb`."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


#: Terms with fewer entries than this are summed together with their neighbours of the same
#: shape (see `_sums_of_squares`).
_SMALL_TERM = 4096

Term = tuple[Callable[..., jax.Array], tuple[jax.Array, ...]]


def _values(fn: Callable[..., jax.Array], args: tuple[jax.Array, ...]) -> jax.Array:
    x = fn(*args)
    return x.astype(common.compute_dtype(x.dtype))


def _runs(terms: list[Term]) -> list[list[int]]:
    """`terms` cut into runs of neighbours summed together: a small term joins the run before
    it when that run holds small terms of the same function, shape, dtype and sharding."""
    runs: list[list[int]] = []
    last = None
    for i, (fn, args) in enumerate(terms):
        out = jax.eval_shape(lambda a, fn=fn: _values(fn, a), args)
        # (under explicit sharding only arrays sharded alike can be stacked)
        key = (fn, out.shape, out.dtype, out.sharding) if out.size < _SMALL_TERM else None
        if key is not None and key == last:
            runs[-1].append(i)
        else:
            runs.append([i])
        last = key
    return runs


def _sums_of_squares(terms: list[Term], masked_pass: bool | None = None) -> list[jax.Array]:
    """The sums of squares over the finite entries of each ``fn(*args)`` of `terms` (the
    squares of the crate's `l2_norm`): one vector per run of `_runs`, in the order of `terms`.

    Every ``fn(*args)`` must have the same compute dtype (float32 or wider), the sums'.

    Speed, not semantics, shapes this function:

    - on CPU the plain sum of squares fuses into one read of `args` (XLA folds the element-wise
      `fn` into the reduction), whereas a masked sum, or a `fn(*args)` held for a second use,
      is a parameter-sized temporary written and read again. There the masked sums run only
      when the plain ones are not all finite (a non-finite entry, or an overflow, where both
      agree; also when their total overflows, which changes nothing), and they recompute `fn`
      rather than keeping it; one test and one conditional serve all `terms`. On other
      backends a conditional waits for its predicate on the host while a masked sum fuses
      into one pass, so the masked sums run always. `masked_pass` forces one form (None: by
      platform); both give the same values.
    - the CPU backend splits a small one-dimensional reduction into three kernels, so
      neighbouring small terms of one shape (a model's norm scales) are stacked and summed by
      rows: three kernels for all of them.
    """
    runs = _runs(terms)

    def sums(square):
        pieces = []
        for run in runs:
            if len(run) == 1:
                pieces.append(jnp.sum(square(_values(*terms[run[0]])))[None])
            else:
                x = jnp.stack([_values(*terms[i]) for i in run])
                pieces.append(jnp.sum(square(x).reshape(len(run), -1), axis=1))
        return pieces

    def plain():
        return sums(lambda x: x * x)

    def masked():
        return sums(lambda x: jnp.where(jnp.isfinite(x), x * x, 0.0))

    def guarded():
        totals = plain()
        # Sums of squares are >= 0: their total is finite exactly when all of them are (or
        # it overflows, and the masked pass gives the same values).
        finite = jnp.isfinite(sum(jnp.sum(t) for t in totals))
        return jax.lax.cond(finite, lambda: totals, masked)

    if masked_pass is None:
        return jax.lax.platform_dependent(cpu=guarded, default=masked)
    return masked() if masked_pass else guarded()


def _trust_ratios(w_terms: list[Term], r_terms: list[Term]) -> jax.Array:
    """``|w_i| / |r_i|`` for every pair of terms (1 where either norm is 0), as one vector.

    The scalar work of all pairs (finiteness test, square roots, quotients) runs on vectors:
    a few kernels for all of them.
    """
    n = len(w_terms)
    pieces = _sums_of_squares(w_terms + r_terms)
    if n == 1:  # two scalars: no concatenation
        w_sq, r_sq = pieces
    else:
        squares = jnp.concatenate(pieces)
        w_sq, r_sq = squares[:n], squares[n:]
    # Both norms are positive exactly where both sums are. The inner `where`s keep the square
    # roots' derivatives finite (meta-gradients through a leaf that is zero); the outer one
    # around the divisor keeps XLA from rewriting `w / sqrt(r)` as `w * rsqrt(r)`, which
    # rounds differently.
    ok = (w_sq > 0) & (r_sq > 0)
    w_norm = jnp.sqrt(jnp.where(ok, w_sq, 1.0))
    r_norm = jnp.where(ok, jnp.sqrt(jnp.where(ok, r_sq, 1.0)), 1.0)
    return jnp.where(ok, w_norm / r_norm, 1.0)


def scale_by_lamb(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    bias_correction: bool = True,
    trust_ratio_mask: common.MaskOrFn = None,
    weight_decay_mask: common.MaskOrFn = None,
    mu_dtype: Any = None,
    *,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    r"""LAMB's layer-wise adapted direction.

    .. math::
        r_t = \frac{\hat m_t}{\sqrt{\hat v_t}+\epsilon} + \lambda\theta,\qquad
        u_t = \frac{\lVert\theta\rVert}{\lVert r_t\rVert}\, r_t

    per leaf, with ratio 1 when either norm is 0 and no clamp. Norms skip non-finite entries
    as the crate does. Leaves where `trust_ratio_mask` is False get ratio 1 (biases and norm
    scales are commonly excluded); leaves where `weight_decay_mask` is False get no decay.
    ``bias_correction=False`` drops the Adam corrections (the paper's v3 form).

    Args:
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term (crate and TF-Addons: 1e-6).
      weight_decay: decay added inside the trust ratio.
      bias_correction: bias-correct the moments.
      trust_ratio_mask: pytree (or callable) of booleans: leaves that get the trust ratio.
      weight_decay_mask: pytree (or callable) of booleans: leaves that get weight decay.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformation` (it needs `params`).
    """
    common.check_beta("b1", b1)
    common.check_beta("b2", b2)
    common.check_non_negative("eps", eps)
    common.check_non_negative("weight_decay", weight_decay)
    _moments.check_dtypes(mu_dtype, nu_dtype)

    def resolve(mask, params):
        if mask is None:
            return _tree_full(params, True)
        return mask(params) if callable(mask) else mask

    def init_fn(params):
        common.reject_complex(params, "lamb")
        return _moments.init_moments(LambState, params, mu_dtype, nu_dtype)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("lamb needs params: call update(grads, state, params)")
        state = common.check_state("lamb", state, LambState, updates, ("mu", "nu"))
        count = optax.safe_increment(state.count)
        if bias_correction:
            bc1 = common.bias_correction(b1, count)
            bc2 = common.bias_correction(b2, count)
        else:
            bc1 = bc2 = jnp.ones([], jnp.float32)
        trust_on = resolve(trust_ratio_mask, params)
        decay_on = resolve(weight_decay_mask, params)

        # Pass 1 per leaf: the moments, and the terms of the trust ratios.
        leaves, treedef = jax.tree.flatten(updates, is_leaf=common.is_empty)
        rest = [treedef.flatten_up_to(t) for t in (state.mu, state.nu, params, trust_on, decay_on)]
        moments: list[Any] = [None] * len(leaves)
        stored, stored_nu = list(leaves), list(leaves)  # the moments as stored (empties kept)
        # The trust ratios of the leaves of one dtype are computed together on accelerators
        # (one vector computation per step, small leaves' norms summed as one stack); on the
        # CPU leaf by leaf, where each leaf's update then follows its own norms while its
        # moments are still in cache (all leaves together measured 1.1-1.2x slower there).
        batched = _batching.batching_enabled()
        trusted: dict[Any, list[int]] = {}  # leaf indices by group
        for i, g in enumerate(leaves):
            if common.is_empty(g):
                continue
            m, v, p, use_trust, use_decay = (r[i] for r in rest)
            g32, m, v, stored[i], stored_nu[i] = _moments.read_write_moments(
                g, m, v, b1, b2, count, i, stochastic_rounding
            )
            ct = g32.dtype
            scalars = (bc1, bc2, jnp.asarray(eps, ct), jnp.asarray(weight_decay, ct))
            moments[i] = (m, v, p.astype(ct), scalars, _DIRECTIONS[bool(use_decay)])
            if use_trust:
                trusted.setdefault(ct if batched else i, []).append(i)
        ratios = {}
        for group in trusted.values():
            # large leaves first, then small ones by shape, so that small leaves of one shape
            # are neighbours (their sums are taken together)
            group.sort(key=lambda i: (leaves[i].size < _SMALL_TERM, leaves[i].shape))
            w_terms, r_terms = [], []
            for i in group:
                m, v, p32, scalars, direction = moments[i]
                w_terms.append((_identity, (p32,)))
                # The barrier keeps the norm's copy of `direction` (and of its broadcast
                # scalars) apart from the update's, so each fuses into its own pass over
                # memory instead of sharing a materialised `r`.
                r_terms.append((direction, jax.lax.optimization_barrier((m, v, p32, scalars))))
            vector = _trust_ratios(w_terms, r_terms)
            ratios |= {i: vector[k] for k, i in enumerate(group)}

        # Pass 2 per leaf: the update, scaled by the leaf's ratio.
        u_leaves = list(leaves)  # empties kept
        for i, g in enumerate(leaves):
            if common.is_empty(g):
                continue
            m, v, p32, scalars, direction = moments[i]
            r = direction(m, v, p32, scalars)
            if i in ratios:
                r = r * ratios[i].astype(r.dtype)
            u_leaves[i] = r.astype(g.dtype)
        u, mu, nu = (treedef.unflatten(x) for x in (u_leaves, stored, stored_nu))
        return u, LambState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _direction(m, v, p32, scalars, *, use_decay):
    """LAMB's direction before the trust ratio: the Adam ratio plus the decay."""
    bc1, bc2, eps, weight_decay = scalars
    r = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
    return r + weight_decay * p32 if use_decay else r


_DIRECTIONS = {d: functools.partial(_direction, use_decay=d) for d in (False, True)}


def _identity(x):
    return x


def _tree_full(tree: Any, value: Any) -> Any:
    return common.tree_map_none(lambda _: value, tree)


def lamb(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.01,
    *,
    bias_correction: bool = True,
    mask: common.MaskOrFn = None,
    trust_ratio_mask: common.MaskOrFn = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""LAMB, as the crate's `Lamb` and TF-Addons' reference.

    :math:`\theta \leftarrow \theta - \eta\phi_t(\hat m/(\sqrt{\hat v}+\epsilon)+\lambda\theta)`
    with the per-leaf trust ratio :math:`\phi_t = \lVert\theta\rVert/\lVert\cdot\rVert` (each
    pytree leaf is a "layer"). `mask` selects the leaves that are decayed; `trust_ratio_mask`
    the leaves that are layer-adapted (default: all, as the crate and `optax.lamb`).

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term.
      weight_decay: decay inside the trust ratio.
      bias_correction: bias-correct the moments (False: the paper's v3).
      mask: pytree (or callable) of booleans selecting the leaves decayed.
      trust_ratio_mask: pytree (or callable) of booleans selecting the leaves adapted.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype
        (``jnp.bfloat16``), ``"q8"`` or ``"q4"`` (block-wise; docs/guides/state_precision.md).
      nu_dtype: storage of the second moment (the same choices).
      stochastic_rounding: round the float32 moments into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, rlx_optax
      >>> # a toy rate; networks train from scratch at 3e-3 to 1e-2 (docs/guides/choosing.md)
      >>> tx = rlx_optax.lamb(0.1, weight_decay=0.0)
      >>> params = jnp.array([3.0, 4.0])
      >>> state = tx.init(params)
      >>> tx.update(jnp.array([1.0, 1.0]), state, params)[0].round(4)  # |u| = lr * |params|
      Array([-0.3536, -0.3536], dtype=float32)

    References:
      You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76 minutes*,
      https://arxiv.org/abs/1904.00962
    """
    common.check_learning_rate(learning_rate)
    return common.chain(
        "lamb",
        scale_by_lamb(
            b1,
            b2,
            eps,
            weight_decay,
            bias_correction,
            trust_ratio_mask,
            mask,
            mu_dtype,
            nu_dtype=nu_dtype,
            stochastic_rounding=stochastic_rounding,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
