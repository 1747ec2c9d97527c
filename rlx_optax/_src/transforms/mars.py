"""MARS: a variance-reduced gradient (a scaled correction by the previous gradient) fed to AdamW.

The crate's `Mars` is MARS-AdamW, approximate variant: the control variate is the previous
step's gradient, starting at zero. Arguments switch to the reference's exact variant, its Lion
and Shampoo-style (Newton-Schulz) updates, and its AdamW routing of non-matrix leaves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common
from rlx_optax._src.linalg._precision import check_precision
from rlx_optax._src.linalg.newton_schulz import DEFAULT_NS_COEFFS, newton_schulz
from rlx_optax._src.transforms import _batching, _lowbit, _moments

_VARIANTS = ("adamw", "lion", "shampoo")
_NON_MATRIX = ("mars", "adamw")
_MATRIX_RULES = ("rank2", "min_rank2")
_EPS_PLACEMENTS = ("corrected", "uncorrected")
#: The switches each `behaviour` sets (explicit arguments take precedence).
PRESETS = {
    "crate": {"non_matrix": "mars", "matrix_rule": "rank2", "eps_placement": "corrected"},
    "reference": {"non_matrix": "adamw", "matrix_rule": "rank2", "eps_placement": "corrected"},
}
# The stream of stochastic rounding for the stored previous gradient: distinct from the
# moments' streams (`_lowbit.SALT_MU`, `SALT_NU`) and the parameters' (`SALT_PARAMS`).
_SALT_PREV_GRAD = 4


class MarsState(NamedTuple):
    """State of `scale_by_mars`.

    ``nu`` holds `None` for leaves whose update needs no second moment (the Lion variant, the
    matrices of the Shampoo variant); ``prev_grad`` holds `None` for leaves that take no
    correction and everywhere in the exact variant (the previous gradient is an argument).
    Each stored leaf is an array of its storage dtype or, under ``"q8"``, a
    `rlx_optax.QuantizedArray`.
    """

    count: jax.Array  # int32, number of `update` calls so far
    mu: optax.Updates
    nu: optax.Updates
    prev_grad: optax.Updates


def _is_skipped(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _like_updates(updates: Any, extra: Any, name: str) -> Any:
    """`extra` re-shaped to the structure of `updates`, leaves skipped where `updates` skips.

    `optax.masked` and `optax.partition` forward extra arguments unmasked, so `extra` may hold
    arrays where `updates` holds `optax.MaskedNode`.
    """
    leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_skipped)
    try:
        others = treedef.flatten_up_to(extra)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must have the structure of the gradients: {e}") from e
    return treedef.unflatten(
        [leaf if _is_skipped(leaf) else other for leaf, other in zip(leaves, others, strict=True)]
    )


def _corrected_gradient(g, prev, *, b1, gamma, clip_c, ct):
    r""":math:`c = g + \gamma\beta_1/(1-\beta_1)(g - g_{prev})`, clipped to unit L2 norm."""
    g = g.astype(ct)
    beta1 = jnp.asarray(b1, ct)
    k = jnp.asarray(gamma, ct) * beta1 / (1 - beta1)
    c = g + k * (g - prev.astype(ct))
    if clip_c:
        norm_sq = jnp.sum(c * c)
        c = jnp.where(norm_sq > 1, c * jax.lax.rsqrt(jnp.where(norm_sq > 1, norm_sq, 1.0)), c)
    return c


def _stored_view(stored):
    """An array of the leaf's shape that the written state `stored` consists of (4-bit codes
    as int8: the 4-bit types have no arithmetic of their own)."""
    if not isinstance(stored, _lowbit.QuantizedArray):
        return stored
    return stored.codes.astype(jnp.int8) if stored.bits == 4 else stored.codes


def _stored_gradient(g, after):
    r"""`g` itself, bit for bit, as a new array computed after `after` (the new moments).

    The approximate variant stores the gradient as the next control variate. Returning the
    caller's array itself would let the new state alias the gradient buffer (a jitted step
    that donates the state, with gradients passed in as an argument, may then be handed one
    buffer twice). And a plain copy of `g` into the donated ``prev_grad`` buffer carries no
    ordering against the fusions that still read the old ``prev_grad`` (through :math:`c`),
    so XLA protects the old value with a parameter-sized copy and writes the new one with a
    second copy, both into fresh buffers. Selecting `g` under a condition on the new moments
    (``after > inf`` is false for every value, Inf and NaN included, and XLA does not fold it)
    makes the store depend on every reader of the old ``prev_grad``: it is written in place,
    with no copies.
    """
    return jnp.where(after > jnp.inf, jnp.zeros_like(g), g)


def scale_by_mars(
    b1: float = 0.95,
    b2: float = 0.99,
    eps: float = 1e-8,
    gamma: float = 0.025,
    clip_c: bool = True,
    *,
    variant: str = "adamw",
    exact: bool = False,
    non_matrix: str | None = None,
    matrix_rule: str | None = None,
    eps_placement: str | None = None,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.95,
    ns_steps: int = 5,
    ns_coeffs: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_NS_COEFFS,
    mu_dtype: Any = None,
    precision: Any = None,
    behaviour: str = "crate",
    nu_dtype: Any = None,
    prev_grad_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""MARS's variance-reduced direction (no learning rate, no decay).

    .. math::
        c_t = g_t + \gamma\frac{\beta_1}{1-\beta_1}(g_t - g_{t-1}),\qquad
        c_t \leftarrow c_t / \lVert c_t\rVert_2 \ \text{ if }\ \lVert c_t\rVert_2 > 1,

        m_t = \beta_1 m_{t-1} + (1-\beta_1) c_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) c_t^2,\qquad
        u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    The norm is per leaf (per tensor, as in the crate and the reference). In the approximate
    variant (the crate's) :math:`g_{t-1}` is the previous call's gradient, zero at the first
    step, so the first step uses :math:`c_1 = (1 + \gamma\beta_1/(1-\beta_1))\,g_1`. With
    ``gamma=0`` and ``clip_c=False`` this is exactly Adam.

    Variants (``variant=``): ``"adamw"`` (above); ``"lion"``, :math:`u_t =
    \operatorname{sign}(m_t)`; ``"shampoo"``, for rank-2 leaves
    :math:`u_t = \operatorname{NS}(m_t/(1-\beta_1))\sqrt{\max(1, \text{rows}/\text{cols})}`
    with the project's `newton_schulz` (rows = first axis), other leaves the ``"adamw"``
    direction.

    Args:
      b1: momentum decay, in [0, 1); also sets the correction scale.
      b2: second-moment decay, in [0, 1).
      eps: added to the denominator outside the square root.
      gamma: scale of the gradient correction (0 turns MARS off).
      clip_c: clip the corrected gradient of each leaf to unit L2 norm.
      variant: ``"adamw"`` (the crate), ``"lion"`` or ``"shampoo"`` (the reference's
        ``mars_type``).
      exact: MARS-exact: the control variate is the gradient at the *previous parameters on
        the current batch*, passed as ``update(..., previous_grads=...)`` (a pytree like the
        gradients; at the first step pass the gradients themselves). Nothing is stored.
      non_matrix: ``"mars"`` (the crate: every leaf takes the MARS update) or ``"adamw"``
        (the reference's default ``optimize_1d=False``: leaves that are not rank 2 take plain
        AdamW on the raw gradient with betas `adamw_b1`, `adamw_b2`; the reference also gives
        them their own learning rate and decay, which `optax.partition` expresses).
      matrix_rule: which leaves count as matrices with ``non_matrix="adamw"``: ``"rank2"``
        (the authors' code: rank == 2, so conv kernels take AdamW) or ``"min_rank2"``
        (pytorch-optimizer: rank >= 2 take MARS; the Shampoo variant still orthogonalises
        only rank-2 leaves here, where pytorch-optimizer flattens the others).
      eps_placement: ``"corrected"`` (crate and the authors: :math:`\sqrt{\hat v_t}+\epsilon`)
        or ``"uncorrected"`` (pytorch-optimizer: :math:`(\sqrt{v_t}+\epsilon) /
        \sqrt{1-\beta_2^t}`).
      adamw_b1: first-moment decay of the non-matrix AdamW path (reference 0.9).
      adamw_b2: second-moment decay of the non-matrix AdamW path (reference 0.95).
      ns_steps: Newton-Schulz iterations of the Shampoo variant.
      ns_coeffs: Newton-Schulz coefficients of the Shampoo variant (see `newton_schulz`).
      mu_dtype: storage of the first moment (every path): None (the parameter dtype), a
        floating dtype such as ``jnp.bfloat16``, ``"q8"`` or ``"q4"`` (8- or 4-bit block-wise,
        `rlx_optax.QuantizedArray`; leaves under 4096 elements stay float32). The moments
        are updated in the compute dtype (float32 or wider) whatever their storage, and the
        step's direction is taken from them before they are stored.
      precision: precision of the Shampoo variant's Newton-Schulz products (default
        ``HIGHEST`` for float32 on every backend; see `docs/numerics.md`).
      behaviour: ``"crate"`` or ``"reference"`` (the authors' MARS-AdamW: non-matrix leaves
        on AdamW); arguments given explicitly take precedence.
      nu_dtype: storage of the second moment, where one is kept (the AdamW variant, the
        Shampoo variant's non-matrix leaves, the non-matrix AdamW path): the choices of
        `mu_dtype` (``"q8"`` uses the unsigned code without zero).
      prev_grad_dtype: storage of the previous gradient (the approximate variant's control
        variate; nothing is stored with ``exact=True``, where this is ignored): the choices
        of `mu_dtype`. Its storage error enters the corrected gradient scaled by
        :math:`\gamma\beta_1/(1-\beta_1)` (0.475 with the defaults) and only for one step;
        ``"q8"`` keeps 20 steps within 5% of the float32 run's displacement
        (`tests/test_lowbit_mars.py`).
      stochastic_rounding: round float32 results into bfloat16 storage (moments and the
        previous gradient) stochastically: unbiased, the bits derived from the step, the
        leaf and the stored quantity (`rlx_optax.stochastic_round`).

    Returns:
      An `optax.GradientTransformationExtraArgs`; `update` accepts ``previous_grads=``.
    """
    opts = common.resolve_preset(
        behaviour,
        PRESETS,
        non_matrix=non_matrix,
        matrix_rule=matrix_rule,
        eps_placement=eps_placement,
    )
    non_matrix, matrix_rule = opts["non_matrix"], opts["matrix_rule"]
    common.check_choice("matrix_rule", matrix_rule, _MATRIX_RULES)
    common.check_choice("eps_placement", opts["eps_placement"], _EPS_PLACEMENTS)
    raw_eps = opts["eps_placement"] == "uncorrected"
    common.check_beta("b1", b1)
    common.check_beta("b2", b2)
    check_precision("precision", precision)
    common.check_non_negative("eps", eps)
    common.check_non_negative("gamma", gamma)
    common.check_choice("variant", variant, _VARIANTS)
    common.check_choice("non_matrix", non_matrix, _NON_MATRIX)
    common.check_beta("adamw_b1", adamw_b1)
    common.check_beta("adamw_b2", adamw_b2)
    for arg, value in (
        ("mu_dtype", mu_dtype),
        ("nu_dtype", nu_dtype),
        ("prev_grad_dtype", prev_grad_dtype),
    ):
        _lowbit.check_storage(arg, value)
    clip_c, exact = bool(clip_c), bool(exact)

    def takes_mars(p) -> bool:
        if matrix_rule == "min_rank2" and p.ndim > 2:
            return True
        return non_matrix == "mars" or p.ndim == 2

    def needs_nu(p) -> bool:
        if not takes_mars(p):
            return True
        return variant == "adamw" or (variant == "shampoo" and p.ndim != 2)

    def init_fn(params):
        common.reject_complex(params, "mars")

        def leaf_or_none(pred, storage, signed):
            return jax.tree.map(
                lambda p: _lowbit.init_leaf(p, storage, signed) if pred(p) else None, params
            )

        return MarsState(
            count=jnp.zeros([], jnp.int32),
            mu=_lowbit.init_tree(params, mu_dtype, signed=True),
            nu=leaf_or_none(needs_nu, nu_dtype, False),
            prev_grad=leaf_or_none(lambda p: not exact and takes_mars(p), prev_grad_dtype, True),
        )

    def update_fn(updates, state, params=None, *, previous_grads=None, **_):
        del params
        state = common.check_state("mars", state, MarsState, updates, ("mu", "nu", "prev_grad"))
        if exact:
            if previous_grads is None:
                raise ValueError(
                    "scale_by_mars(exact=True) needs update(..., previous_grads=...): the "
                    "gradient at the previous parameters on the current batch"
                )
            control = _like_updates(updates, previous_grads, "previous_grads")
        else:
            control = state.prev_grad
        count = optax.safe_increment(state.count)
        bc1 = common.bias_correction(b1, count)
        bc2 = common.bias_correction(b2, count)
        bc1_1d = common.bias_correction(adamw_b1, count)
        bc2_1d = common.bias_correction(adamw_b2, count)

        def adam_direction(x, m_stored, v_stored, beta1, beta2, c1, c2, i):
            # the direction from the new moments in the compute dtype, then the moments stored
            x, m, v, m_s, v_s = _moments.read_write_moments(
                x, m_stored, v_stored, beta1, beta2, count, i, stochastic_rounding
            )
            c1, c2 = c1.astype(x.dtype), c2.astype(x.dtype)
            e = jnp.asarray(eps, x.dtype)
            if raw_eps:
                return (m / c1) * jnp.sqrt(c2) / (jnp.sqrt(v) + e), m_s, v_s
            return (m / c1) / (jnp.sqrt(v / c2) + e), m_s, v_s

        def orthogonalised(g):  # whether g's update is Newton-Schulz's (MARS-Shampoo matrices)
            return variant == "shampoo" and takes_mars(g) and g.ndim == 2 and g.size > 0

        def leaf(g, m, v, prev, i):
            # m, v, prev as stored (`_lowbit`: an array of the storage dtype or a
            # QuantizedArray); computed in `ct`, returned as stored
            ct = common.compute_dtype(g.dtype)
            if not takes_mars(g):  # the reference's AdamW for non-matrix leaves
                u, m, v = adam_direction(g, m, v, adamw_b1, adamw_b2, bc1_1d, bc2_1d, i)
                return u.astype(g.dtype), m, v, prev
            control = _lowbit.read(prev, ct)
            c = _corrected_gradient(g, control, b1=b1, gamma=gamma, clip_c=clip_c, ct=ct)
            if variant == "adamw" or (variant == "shampoo" and g.ndim != 2):
                u, m, v = adam_direction(c, m, v, b1, b2, bc1, bc2, i)
            else:
                beta1 = jnp.asarray(b1, ct)
                m_new = beta1 * _lowbit.read(m, ct) + (1 - beta1) * c
                if variant == "lion":
                    u = jnp.sign(m_new)
                elif g.size == 0:  # an empty matrix: nothing to orthogonalise, a zero update
                    u = jnp.zeros_like(m_new)
                else:  # orthogonalised below, once per group of same-shaped matrices
                    u = m_new / (1 - beta1)
                m = _lowbit.write(
                    m_new,
                    m,
                    stochastic=stochastic_rounding,
                    step=count,
                    leaf=i,
                    salt=_lowbit.SALT_MU,
                )
            new_prev = None
            if not exact:
                # on the moments as stored (XLA writes those anyway): the store reads them once
                # more, instead of the two parameter-sized copies it saves
                after = _stored_view(m)
                if v is not None:
                    after = after + _stored_view(v)
                new_prev = _lowbit.write(
                    _stored_gradient(g, after),
                    prev,
                    stochastic=stochastic_rounding,
                    step=count,
                    leaf=i,
                    salt=_SALT_PREV_GRAD,
                )
            # a Shampoo matrix's direction is orthogonalised below, in the compute dtype
            return u if orthogonalised(g) else u.astype(g.dtype), m, v, new_prev

        index = _lowbit.leaf_indices(updates)
        u, mu, nu, prev = common.tree_map_multi(
            leaf, 4, updates, state.mu, state.nu, control, index
        )
        if variant == "shampoo":
            # Newton-Schulz on whole matrices, once per group of same-shaped leaves on one
            # device, on owner devices on a mesh (`grouped_map`); the rest stays element-wise
            # in each parameter's layout
            def orthogonalise(x):
                rows, cols = x.shape
                o = newton_schulz(x, ns_steps, ns_coeffs, precision=precision)
                return (o * max(1.0, rows / cols) ** 0.5,)

            views = common.tree_map_none(lambda g, x: x if orthogonalised(g) else None, updates, u)
            (o,) = _batching.grouped_map(orthogonalise, 1, views)
            (u,) = common.tree_map_multi(
                lambda g, x, o: (x if o is None else o.astype(g.dtype),), 1, updates, u, o
            )
        return u, MarsState(
            count=count,
            mu=mu,
            nu=nu,
            prev_grad=state.prev_grad if exact else prev,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mars(
    learning_rate: common.ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    gamma: float = 0.025,
    clip_c: bool = True,
    *,
    variant: str = "adamw",
    exact: bool = False,
    non_matrix: str | None = None,
    matrix_rule: str | None = None,
    eps_placement: str | None = None,
    adamw_b1: float = 0.9,
    adamw_b2: float = 0.95,
    ns_steps: int = 5,
    ns_coeffs: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_NS_COEFFS,
    mu_dtype: Any = None,
    behaviour: str = "crate",
    mask: common.MaskOrFn = None,
    precision: Any = None,
    nu_dtype: Any = None,
    prev_grad_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""MARS-AdamW as the crate's `Mars`: `scale_by_mars` -> decoupled decay -> rate.

    .. math::
        \theta \leftarrow \theta - \eta\Big(\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
        + \lambda\theta\Big)

    with the moments taken of the clipped, corrected gradient :math:`c_t` (see
    `scale_by_mars`). Defaults are the crate's (:math:`\beta_1` 0.95, :math:`\beta_2` 0.99,
    :math:`\epsilon` 1e-8, :math:`\lambda` 0, :math:`\gamma` 0.025, `clip_c` on).

    Crate versus reference (arguments that switch):

    - control variate: crate MARS-approx (previous step's gradient, zero at the start);
      MARS-exact (gradient at the previous parameters on the current batch):
      ``exact=True`` and ``update(..., previous_grads=...)``;
    - update rule: crate AdamW; the reference's ``mars_type``: ``variant="lion"`` or
      ``variant="shampoo"`` (Newton-Schulz on rank-2 leaves);
    - leaves that are not rank 2: crate MARS everywhere; reference plain AdamW with betas
      (0.9, 0.95): ``non_matrix="adamw"`` (``behaviour="reference"``). The authors' code
      tests rank == 2; pytorch-optimizer's `MARS` sends every rank >= 2 leaf to MARS
      (``matrix_rule="min_rank2"``) and adds eps before the bias correction
      (``eps_placement="uncorrected"``).

    Args:
      learning_rate: a float or an optax schedule.
      b1: first-moment decay.
      b2: second-moment decay.
      eps: denominator term outside the square root.
      weight_decay: decoupled decay coefficient (multiplied by the learning rate).
      gamma: scale of the gradient correction.
      clip_c: clip the corrected gradient of each leaf to unit norm.
      variant: ``"adamw"``, ``"lion"`` or ``"shampoo"``.
      exact: MARS-exact (needs ``previous_grads=`` in `update`).
      non_matrix: ``"mars"`` or ``"adamw"`` for leaves that are not rank 2.
      matrix_rule: ``"rank2"`` or ``"min_rank2"`` (see `scale_by_mars`).
      eps_placement: ``"corrected"`` or ``"uncorrected"`` (see `scale_by_mars`).
      adamw_b1: first-moment decay of the non-matrix AdamW path.
      adamw_b2: second-moment decay of the non-matrix AdamW path.
      ns_steps: Newton-Schulz iterations of the Shampoo variant.
      ns_coeffs: Newton-Schulz coefficients of the Shampoo variant.
      mu_dtype: storage of the first moment: None (the parameter dtype), a floating dtype,
        ``"q8"`` or ``"q4"`` (see `scale_by_mars`).
      behaviour: ``"crate"`` or ``"reference"`` (``non_matrix="adamw"``).
      mask: pytree (or callable returning one) of booleans selecting the leaves decayed.
      precision: precision of the Shampoo variant's Newton-Schulz products (default
        ``HIGHEST`` for float32).
      nu_dtype: storage of the second moment where one is kept (as `mu_dtype`).
      prev_grad_dtype: storage of the previous gradient of the approximate variant (as
        `mu_dtype`). With ``mu_dtype="q8"``, ``nu_dtype="q8"`` and
        ``prev_grad_dtype="q8"`` the state takes about 3 bytes per parameter instead of 12.
      stochastic_rounding: round float32 results into bfloat16 storage stochastically.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rlx_optax
      >>> # for a network start at 5e-3, variant="shampoo" at 1.5e-2 (docs/guides/choosing.md)
      >>> tx = rlx_optax.mars(5e-3)
      >>> params = {"w": jnp.ones((2, 2))}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.full((2, 2), 0.1)}
      >>> updates, state = tx.update(grads, state, params)
      >>> round(float(optax.apply_updates(params, updates)["w"][0, 0]), 4)
      0.995

    References:
      Yuan, Liu, Wu, Zhou & Gu, *MARS: Unleashing the Power of Variance Reduction for
      Training Large Models*, https://arxiv.org/abs/2411.10438
    """
    return common.alias(
        scale_by_mars(
            b1,
            b2,
            eps,
            gamma,
            clip_c,
            variant=variant,
            exact=exact,
            non_matrix=non_matrix,
            matrix_rule=matrix_rule,
            eps_placement=eps_placement,
            adamw_b1=adamw_b1,
            adamw_b2=adamw_b2,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
            mu_dtype=mu_dtype,
            precision=precision,
            behaviour=behaviour,
            nu_dtype=nu_dtype,
            prev_grad_dtype=prev_grad_dtype,
            stochastic_rounding=stochastic_rounding,
        ),
        learning_rate,
        weight_decay,
        mask,
        name="mars",
    )
