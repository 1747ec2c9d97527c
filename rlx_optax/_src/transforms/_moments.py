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
from rlx_optax._src.transforms import _lowbit


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


def init_moments(state_cls: type, params: optax.Params, mu_dtype: Any, nu_dtype: Any = None) -> Any:
    return state_cls(
        count=jnp.zeros([], jnp.int32),
        mu=_lowbit.init_tree(params, mu_dtype, signed=True),
        nu=_lowbit.init_tree(params, nu_dtype, signed=False),
    )


def check_dtypes(mu_dtype: Any, nu_dtype: Any = None) -> None:
    _lowbit.check_storage("mu_dtype", mu_dtype)
    _lowbit.check_storage("nu_dtype", nu_dtype)


def read_write_moments(
    g: jax.Array,
    m: Any,
    v: Any,
    b1: Any,
    b2: Any,
    step: jax.Array,
    leaf: int,
    stochastic_rounding: bool,
):
    """`update_moments` on stored moments (any storage of `_lowbit`): returns
    `(g, m', v')` in the compute dtype and the new stored moments `(m_s, v_s)`."""
    ct = common.compute_dtype(g.dtype)
    g32, m_new, v_new = update_moments(g, _lowbit.read(m, ct), _lowbit.read(v, ct), b1, b2)
    sr = dict(stochastic=stochastic_rounding, step=step, leaf=leaf)
    bound_m = None
    if isinstance(m, _lowbit.QuantizedArray):
        # the first moment's scale is a bound known before the new moment is (no pass over
        # it precedes its encoding); the second moment keeps its exact block maximum: with
        # b2 near 1 a loose scale would carry every code near the top along with it
        bound_m = _lowbit.ema_bound(m, b1, 1 - jnp.asarray(b1, ct), g32)
    m_s = _lowbit.write(m_new, m, salt=_lowbit.SALT_MU, bound=bound_m, **sr)
    v_s = _lowbit.write(v_new, v, salt=_lowbit.SALT_NU, **sr)
    return g32, m_new, v_new, m_s, v_s


def scale_by_moments(
    state_cls: type,
    b1: Any,
    b2: Any,
    mu_dtype: Any,
    direction: Callable[[jax.Array, jax.Array, jax.Array, MomentContext], jax.Array],
    prepare: Callable[[jax.Array], Any] | None = None,
    nu_dtype: Any = None,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformation:
    """A transform with state `state_cls(count, mu, nu)` and update `direction(g, m', v', ctx)`.

    `direction` receives the gradient and the updated moments in the compute dtype; its result
    is cast to the gradient dtype. `prepare(count)` computes per-update scalars once.
    `mu_dtype` / `nu_dtype` choose the moments' storage (`_lowbit`: None, a float dtype, or
    "q8"); `stochastic_rounding` rounds float32 results into bfloat16 moments stochastically.
    """
    common.check_beta("b1", b1)
    check_dtypes(mu_dtype, nu_dtype)
    common.check_beta("b2", b2)
    name = state_cls.__name__.removesuffix("State").lower()

    def init_fn(params):
        common.check_params(params, name)
        return init_moments(state_cls, params, mu_dtype, nu_dtype)

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

        def leaf(g, m, v, i):
            g32, m, v, m_s, v_s = read_write_moments(g, m, v, b1, b2, count, i, stochastic_rounding)
            # the scalars at the leaf's precision: float64 for float64 parameters
            local = common.cast_scalars(ctx._replace(count=None), g32.dtype)._replace(count=count)
            return direction(g32, m, v, local).astype(g.dtype), m_s, v_s

        index = _lowbit.leaf_indices(updates)
        u, mu, nu = common.tree_map_multi(leaf, 3, updates, state.mu, state.nu, index)
        return u, state_cls(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)
