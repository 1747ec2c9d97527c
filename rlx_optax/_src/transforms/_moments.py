"""The Adam family's shared machinery: two moving moments, bias corrections, one fused pass.

Adam, NAdamW, RAdam and QHAdam differ only in how the direction is formed from the updated
moments; each supplies that per-leaf rule to `scale_by_moments`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common


class MomentContext(NamedTuple):
    """Per-update scalars handed to a direction rule."""

    count: jax.Array  # 1-based step of this update
    bc1: jax.Array  # 1 - b1**count, in the leaf's compute dtype
    bc2: jax.Array  # 1 - b2**count, in the leaf's compute dtype
    extra: Any  # whatever `prepare(count)` returned


def update_moments(g: jax.Array, m: jax.Array, v: jax.Array, b1: Any, b2: Any):
    """`(g, m', v')` in the compute dtype: the EMAs of g and g^2.

    The betas are taken at the compute dtype's precision (as the crate widens its float32
    fields), so `1 - b1` and the bias correction `1 - b1**t` agree to the last bit at t = 1.
    """
    ct = common.compute_dtype(g.dtype)
    b1, b2 = jnp.asarray(b1, ct), jnp.asarray(b2, ct)
    g = g.astype(ct)
    a = jnp.abs(g) if jnp.iscomplexobj(g) else g  # |g|^2 for complex g, as optax
    return g, b1 * m.astype(ct) + (1 - b1) * g, b2 * v.astype(ct) + (1 - b2) * a * a


def init_moments(state_cls: type, params: optax.Params, mu_dtype: Any) -> Any:
    return state_cls(
        count=jnp.zeros([], jnp.int32),
        mu=common.zeros_like_tree(params, mu_dtype),
        nu=common.zeros_like_tree(params),
    )


def scale_by_moments(
    state_cls: type,
    b1: Any,
    b2: Any,
    mu_dtype: Any,
    direction: Callable[[jax.Array, jax.Array, jax.Array, MomentContext], jax.Array],
    prepare: Callable[[jax.Array], Any] | None = None,
) -> optax.GradientTransformation:
    """A transform with state `state_cls(count, mu, nu)` and update `direction(g, m', v', ctx)`.

    `direction` receives the gradient and the updated moments in the compute dtype; its result
    is cast to the gradient dtype. `prepare(count)` computes per-update scalars once.
    """
    common.check_beta("b1", b1)
    common.check_beta("b2", b2)
    name = state_cls.__name__.removesuffix("State").lower()

    def init_fn(params):
        common.check_params(params, name)
        return init_moments(state_cls, params, mu_dtype)

    def update_fn(updates, state, params=None):
        del params
        state = common.check_state(name, state, state_cls, updates, ("mu", "nu"))
        count = optax.safe_increment(state.count)
        ctx = MomentContext(
            count=count,
            bc1=common.bias_correction(b1, count),
            bc2=common.bias_correction(b2, count),
            extra=prepare(count) if prepare is not None else None,
        )

        def leaf(g, m, v):
            g32, m, v = update_moments(g, m, v, b1, b2)
            # the scalars at the leaf's precision: float64 for float64 parameters
            local = common.cast_scalars(ctx._replace(count=None), g32.dtype)._replace(count=count)
            return direction(g32, m, v, local).astype(g.dtype), m, v

        u, mu, nu = common.tree_map_multi(leaf, 3, updates, state.mu, state.nu)
        return u, state_cls(
            count=count,
            mu=optax.tree.cast_like(mu, state.mu),
            nu=optax.tree.cast_like(nu, state.nu),
        )

    return optax.GradientTransformation(init_fn, update_fn)
