"""Riemannian SGD on the Stiefel manifold of row-orthonormal matrices (the crate's `Stiefel`).

The per-leaf math lives in three module-level functions (`_tangent`, `_accumulate`,
`_retracted`) that both the building blocks (`scale_by_stiefel`, `retract_stiefel`) and the
alias `stiefel` call. The alias runs them as one per-leaf step: on a mesh every Stiefel matrix
then makes one trip to its owner device and back (the gradient, the parameter and the momentum
there; the update and the new momentum back), where the two building blocks chained by hand
make two (the projection, then the retraction of :math:`W + U`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common, linalg
from rlx_optax._src.linalg import gram_schmidt_rows, stiefel_tangent_projection
from rlx_optax._src.transforms import _batching, _owner, _resident


class StiefelState(NamedTuple):
    """State of `scale_by_stiefel`; `mu` is None when momentum is the Python number 0."""

    count: jax.Array
    mu: optax.Updates | None


def is_stiefel_leaf(shape: tuple[int, ...]) -> bool:
    """The crate's rule: a rank-2 leaf with rows <= columns lives on the Stiefel manifold."""
    return len(shape) == 2 and shape[0] <= shape[1]


def _stiefel_leaves(tree: Any) -> Any:
    """`tree` with None in place of every leaf that is not a Stiefel matrix."""
    return common.tree_map_none(lambda x: x if is_stiefel_leaf(x.shape) else None, tree)


_EPS = 1e-12  # floor of the row norms in the retraction


def _tangent(g: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
    r""":math:`G_r = G - \mathrm{sym}(WG^\top)W` in the compute dtype (whole matrices)."""
    ct = common.compute_dtype(g.dtype)
    return stiefel_tangent_projection(w.astype(ct), g.astype(ct), precision=precision)


def _accumulate(d: jax.Array, v: jax.Array, momentum: float) -> jax.Array:
    r""":math:`v_t = \mu v_{t-1} + d` in the dtype of the direction `d`."""
    return jnp.asarray(momentum, d.dtype) * v.astype(d.dtype) + d


def _moved(u: jax.Array, w: jax.Array) -> jax.Array:
    """:math:`W + U` in the compute dtype."""
    ct = common.compute_dtype(w.dtype)
    return w.astype(ct) + u.astype(ct)


def _retracted(u: jax.Array, w: jax.Array, eps: float, precision: Any) -> jax.Array:
    r""":math:`\mathrm{GS}(W + U) - W` in the dtype of `u` (whole matrices)."""
    r = gram_schmidt_rows(_moved(u, w), eps=eps, precision=precision)
    return (r - w.astype(r.dtype)).astype(u.dtype)


def scale_by_stiefel(
    momentum: float = 0.0, mu_dtype: Any = None, *, precision: Any = None
) -> optax.GradientTransformation:
    r"""The Riemannian gradient (with momentum) on row-orthonormal matrices, SGD elsewhere.

    For a Stiefel leaf (rank 2, rows <= columns) at :math:`W`, the gradient is projected onto
    the tangent space, :math:`G_r = G - \mathrm{sym}(WG^\top)W`
    (`stiefel_tangent_projection`), then :math:`v_t = \mu v_{t-1} + G_r` and the direction is
    :math:`v_t` (or :math:`G_r` without momentum). Other leaves use :math:`g` (or
    :math:`\mu v + g`). As in the crate, the momentum is not transported between tangent
    spaces. Follow it by a learning rate and `retract_stiefel`.

    Args:
      momentum: :math:`\mu` in [0, 1); 0 keeps no buffer.
      mu_dtype: dtype of the momentum buffer (default: the parameter dtype).
      precision: precision of the projection's products (default ``HIGHEST``: float32-exact
        on every backend; see `docs/numerics.md`).

    Returns:
      An `optax.GradientTransformation`; `update` needs `params`.
    """
    common.check_beta("momentum", momentum)
    linalg.check_precision("precision", precision)
    use_trace = not common._is_zero(momentum)

    def init_fn(params):
        common.reject_complex(params, "stiefel")
        mu = common.zeros_like_tree(params, mu_dtype) if use_trace else None
        return StiefelState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("stiefel needs params: call update(grads, state, params)")
        state = common.check_state("stiefel", state, StiefelState, updates, ("mu",), params=params)
        count = optax.safe_increment(state.count)

        def project(g, w):
            return (_tangent(g, w, precision),)

        # the projections need whole matrices: one per group of same-shaped leaves on one
        # device, each on its owner device on a mesh (`grouped_map`)
        (projected,) = _batching.grouped_map(project, 1, _stiefel_leaves(updates), params)

        def direction(g, p):
            return g.astype(common.compute_dtype(g.dtype)) if p is None else p

        if not use_trace:
            (u,) = common.tree_map_multi(
                lambda g, p: (direction(g, p).astype(g.dtype),), 1, updates, projected
            )
            return u, StiefelState(count=count, mu=None)

        def leaf(g, p, v):
            v = _accumulate(direction(g, p), v, momentum)
            return v.astype(g.dtype), v

        u, mu = common.tree_map_multi(leaf, 2, updates, projected, state.mu)
        return u, StiefelState(count=count, mu=optax.tree.cast_like(mu, state.mu))

    return optax.GradientTransformation(init_fn, update_fn)


def retract_stiefel(eps: float = _EPS, *, precision: Any = None) -> optax.GradientTransformation:
    r"""Turn an additive step into a retracted one on Stiefel leaves.

    For a Stiefel leaf, an incoming update :math:`\Delta` becomes
    :math:`\mathrm{GS}(W + \Delta) - W`, so that `optax.apply_updates` lands on the row-wise
    Gram-Schmidt orthonormalisation of :math:`W + \Delta` (`gram_schmidt_rows`). Other leaves
    pass through.

    Args:
      eps: floor of the row norms.
      precision: precision of the Gram-Schmidt projections (default ``HIGHEST``).

    Returns:
      An `optax.GradientTransformation`; `update` needs `params`.
    """
    linalg.check_precision("precision", precision)

    def init_fn(params):
        del params
        return common.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("retract_stiefel needs params: call update(grads, state, params)")

        def retract(x):
            return (gram_schmidt_rows(x, eps=eps, precision=precision),)

        # Gram-Schmidt needs whole matrices: only W + U goes to an owner device on a mesh
        # (`grouped_map`), the difference with W is taken in the parameter's own layout
        targets = common.tree_map_none(
            lambda u, w: _moved(u, w) if is_stiefel_leaf(u.shape) else None, updates, params
        )
        (retracted,) = _batching.grouped_map(retract, 1, targets)

        def step(u, w, r):
            if r is None:
                return (u,)
            return ((r - w.astype(r.dtype)).astype(u.dtype),)

        (u,) = common.tree_map_multi(step, 1, updates, params, retracted)
        return u, state

    return optax.GradientTransformation(init_fn, update_fn)


def stiefel(
    learning_rate: common.ScalarOrSchedule,
    momentum: float = 0.0,
    *,
    mu_dtype: Any = None,
    precision: Any = None,
    state_placement: str = "parameter",
) -> optax.GradientTransformationExtraArgs:
    r"""Riemannian SGD with a Gram-Schmidt retraction, as the crate's `Stiefel`.

    On a rank-2 leaf with rows <= columns (rows orthonormal),

    .. math::
        G_r = G - \mathrm{sym}(WG^\top)\,W,\quad v_t = \mu v_{t-1} + G_r,\quad
        W \leftarrow \mathrm{GS}(W - \eta\, v_t),

    with GS the row-wise Gram-Schmidt orthonormalisation, so :math:`W W^\top = I` after
    every step (whatever the start). Every other leaf (any other rank, and tall matrices with
    rows > columns, which the crate does not transpose) takes SGD with the same momentum,
    :math:`\theta \leftarrow \theta - \eta(\mu v + g)`. No weight decay, as in the crate. The
    reference and the crate agree (the crate is the reference here); Flax kernels
    ``(in, out)`` with in <= out have orthonormal rows, i.e. orthonormal input directions.

    Args:
      learning_rate: a float or an optax schedule.
      momentum: :math:`\mu` in [0, 1); 0 keeps no buffer.
      mu_dtype: dtype of the momentum buffer.
      precision: precision of every matrix product (projection and retraction). Default
        ``HIGHEST`` for float32, the crate's float32 arithmetic on every backend (the backend
        default would be TF32 on NVIDIA GPUs); see `docs/numerics.md`.
      state_placement: ``"parameter"`` (default: the momentum is kept per parameter, laid out
        by `rlx_optax.state_shardings`) or ``"owner"``: on a mesh of several devices the
        momentum of each Stiefel matrix stays on the device that owner compute gives the
        matrix (`OwnerPlacedState` in place of the `StiefelState`), so that a step moves only
        the gradient and the parameter there and the update back (three matrices instead of
        five). The state's layout then depends on the mesh it was made on (``init`` reads it
        from the parameters). On one device, or without momentum, the two are the same.

    Returns:
      An `optax.GradientTransformationExtraArgs`; `update` needs `params`.

    Example:
      >>> import jax.numpy as jnp, optax, rlx_optax
      >>> # to train a network from scratch start at 0.3 to 1 (docs/guides/choosing.md)
      >>> tx = rlx_optax.stiefel(0.1)
      >>> w = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
      >>> state = tx.init(w)
      >>> g = {"w": jnp.array([[0.0, 0.0, -1.0], [0.0, 0.0, 0.0]])}
      >>> updates, state = tx.update(g, state, w)
      >>> w = optax.apply_updates(w, updates)
      >>> [round(float(v), 4) for v in w["w"][0]]  # rotated toward e3, still unit norm
      [0.995, 0.0, 0.0995]
      >>> round(float(jnp.abs(w["w"] @ w["w"].T - jnp.eye(2)).max()), 6)
      0.0

    References:
      Edelman, Arias & Smith, *The Geometry of Algorithms with Orthogonality Constraints*,
      https://arxiv.org/abs/physics/9806030 ;
      Li, Fuxin & Todorovic, *Efficient Riemannian Optimization on the Stiefel Manifold via
      the Cayley Transform*, https://arxiv.org/abs/2002.01113
    """
    common.check_learning_rate(learning_rate)
    _resident.check_placement("state_placement", state_placement)
    scale = optax.scale_by_learning_rate(learning_rate)
    chained = common.chain(
        "stiefel",
        scale_by_stiefel(momentum, mu_dtype, precision=precision),
        scale,
        retract_stiefel(precision=precision),
    )

    def init_fn(params):
        state = chained.init(params)
        if state_placement == "parameter" or state[0].mu is None:
            return state
        direction_state = _place_momentum(state[0], params)
        return type(state)((direction_state, *state[1:]))

    # the chain's state and numbers, computed as one per-leaf step (`_step`) so that on a mesh
    # every Stiefel matrix makes one trip to its owner device instead of two
    def update_fn(updates, state, params=None, **extra):
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            return chained.update(updates, state, params, **extra)  # the chain's error
        if params is None:
            raise ValueError("stiefel needs params: call update(grads, state, params)")
        direction_state, scale_state, retract_state = state
        owned = None
        if isinstance(direction_state, _resident.OwnerPlacedState):
            direction_state, owned = direction_state.inner, direction_state.owned
            _resident.check_mesh(owned, _owner.mesh_of(jax.tree.leaves(updates)), "stiefel")
        direction_state = common.check_state(
            "stiefel", direction_state, StiefelState, updates, ("mu",), params=params
        )
        # the step size as `scale_by_learning_rate` applies it: its update of a one in each
        # leaf's dtype (and its next state)
        ones = jax.tree.map(lambda g: jnp.ones((), g.dtype), updates)
        steps, scale_state = scale.update(ones, scale_state)
        u, mu, owned = _step(updates, direction_state.mu, params, steps, momentum, precision, owned)
        direction_state = StiefelState(
            count=optax.safe_increment(direction_state.count),
            mu=None if mu is None else optax.tree.cast_like(mu, direction_state.mu),
        )
        if owned is not None:
            direction_state = _resident.OwnerPlacedState(direction_state, owned)
        return u, type(state)((direction_state, scale_state, retract_state))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _place_momentum(state: StiefelState, params: Any) -> Any:
    """`state` with the Stiefel matrices' momentum on their owner devices (`_resident`), or
    as it is off a mesh of several devices."""
    stiefel_params = jax.tree.leaves(_stiefel_leaves(params))
    stiefel_mu = [
        v
        for p, v in zip(
            jax.tree.leaves(params, is_leaf=common.is_empty),
            jax.tree.leaves(state.mu, is_leaf=common.is_empty),
            strict=True,
        )
        if not common.is_empty(p) and is_stiefel_leaf(p.shape)
    ]
    # the arguments of `_step`'s per-matrix function, (g, v, w): the momentum at 1
    calls = [(p, v, p) for p, v in zip(stiefel_params, stiefel_mu, strict=True)]
    owned = _resident.place(stiefel_params, calls, (1,))
    if owned is None:
        return state
    owned_set = _resident.owned_leaves(owned)
    count = iter(range(len(stiefel_params)))

    def keep(p, v):
        if not is_stiefel_leaf(p.shape):
            return v
        return None if next(count) in owned_set else v

    mu = common.tree_map_none(keep, params, state.mu)
    return _resident.OwnerPlacedState(state._replace(mu=mu), owned)


def _step(
    updates: Any,
    mu: Any,
    params: Any,
    steps: Any,
    momentum: Any,
    precision: Any,
    owned: Any = None,
) -> tuple[Any, Any, Any]:
    r"""`stiefel`'s update, new momentum (None without one) and new owner-resident momentum
    (`owned`, the `_resident.OwnedBuffers` of ``state_placement="owner"``, or None).

    A Stiefel leaf runs :math:`G_r`, :math:`v_t`, :math:`\eta`-scaling and the retraction as
    one per-leaf function, with the same operations in the same order as the chain
    `scale_by_stiefel` -> `scale_by_learning_rate` -> `retract_stiefel`. On a mesh it runs on
    the leaf's owner device (`grouped_map`): :math:`G`, :math:`W` and :math:`v_{t-1}` go there,
    :math:`U` and :math:`v_t` come back, one exchange each way for all leaves. `steps` holds
    :math:`-\eta` per leaf in the update's dtype; every other leaf takes SGD (with momentum).
    With `owned`, the momentum of the matrices it holds stays on their owners (None in `mu`
    and in the new momentum there) and only :math:`G`, :math:`W` and :math:`U` travel.
    """
    # the momentum as each leaf's arithmetic uses it: an argument, not a closed-over value
    # (it may be traced, e.g. under `optax.inject_hyperparams`)
    mus = jax.tree.map(lambda g: jnp.asarray(momentum, common.compute_dtype(g.dtype)), updates)
    use_trace = mu is not None

    def matrix(g, *args):
        v, w, step, m = args if use_trace else (None, *args)
        d = _tangent(g, w, precision)
        if use_trace:
            d = _accumulate(d, v, m)
        u = _retracted(step * d.astype(g.dtype), w, _EPS, precision)
        return (u, d.astype(v.dtype)) if use_trace else (u,)

    def other(g, v, step, m):
        d = g.astype(common.compute_dtype(g.dtype))
        if v is not None:
            d = _accumulate(d, v, m)
        return step * d.astype(g.dtype), (None if v is None else d)

    if use_trace:
        u_matrix, mu_matrix, *placed = _batching.grouped_map(
            matrix, 2, _stiefel_leaves(updates), mu, params, steps, mus, resident=owned
        )

        def leaf(g, um, vm, v, step, m):
            return (um, vm) if um is not None else other(g, v, step, m)

        u, new_mu = common.tree_map_multi(leaf, 2, updates, u_matrix, mu_matrix, mu, steps, mus)
        return u, new_mu, (placed[0] if placed else None)

    (u_matrix,) = _batching.grouped_map(matrix, 1, _stiefel_leaves(updates), params, steps, mus)

    def leaf_plain(g, um, step, m):
        return ((um if um is not None else other(g, None, step, m)[0]),)

    (u,) = common.tree_map_multi(leaf_plain, 1, updates, u_matrix, steps, mus)
    return u, None, None
