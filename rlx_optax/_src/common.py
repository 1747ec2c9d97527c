"""Small pieces every transform shares: argument checks, decay, the alias chain.

Nothing here knows about a particular algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = float | jax.Array | optax.Schedule
MaskOrFn = Any | Callable[[optax.Params], Any] | None


# --------------------------------------------------------------------------- validation


def _concrete_float(value: Any) -> float | None:
    """The value as a Python float, or None when it is traced or a schedule.

    Under `optax.inject_hyperparams` hyperparameters arrive as (possibly traced) arrays;
    they were validated when the user first passed them, so traced values are skipped.
    """
    if callable(value) or isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise a ValueError naming `name` when a concrete `value` lies outside the range."""
    v = _concrete_float(value)
    if v is None:
        return
    bad = v != v  # NaN is never in range
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_learning_rate(learning_rate: Any, name: str = "learning_rate") -> None:
    """A learning rate is a non-negative number or a callable schedule."""
    check_range(name, learning_rate, 0.0)


def check_beta(name: str, value: Any) -> None:
    """Decay rates of moving averages live in [0, 1)."""
    check_range(name, value, 0.0, 1.0, high_open=True)


def check_non_negative(name: str, value: Any) -> None:
    check_range(name, value, 0.0)


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------- arithmetic


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype the math runs in: float32 at least, wider when the input is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def reject_complex(params: Any, algorithm: str) -> None:
    """Raise a ValueError naming the first complex leaf of `params`.

    The element-wise Adam family, SGD and Lion accept complex parameters as optax does (second
    moments of :math:`|g|^2`); the algorithms that call this have no complex form here
    (matrix preconditioners, factored or Hessian moments, trust ratios), and would otherwise
    drop the imaginary part silently.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(
                f"{algorithm} does not support complex parameters: leaf "
                f"{jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}. Use "
                "sgd, adam, adamw, nadamw, radam, qhadamw or lion for complex leaves "
                "(optax.partition can route them), or split them into real and imaginary parts."
            )


#: The longest axis that gets a dense (d, d) preconditioner when the caller set no limit: the
#: SOAP reference's own `max_precond_dim`. Past it one statistic alone is 400 MB of float32.
MAX_DENSE_FACTOR = 10000


def refuse_huge_factors(
    params: Any,
    algorithm: str,
    dense_axes: Callable[[tuple[int, ...]], list[int]],
    argument: str,
    reference: tuple[int, str],
) -> None:
    """Raise a ValueError naming the leaf whose dense (d, d) factors would exceed the limit.

    The crate rotates (or factors) every axis of a matrix, however long: an embedding of
    (1, 200000) would build a 200000 x 200000 matrix (160 GB). Without an explicit limit
    (`argument` None) such a leaf is refused at `init`, naming the argument that avoids it;
    `reference` is that argument's value in the authors' code and what it does to longer axes.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        shape = tuple(getattr(leaf, "shape", ()))
        too_long = [d for d in dense_axes(shape) if d > MAX_DENSE_FACTOR]
        if too_long:
            gb = sum(d * d for d in dense_axes(shape)) * 4 / 1e9
            raise ValueError(
                f"{algorithm}: leaf {jax.tree_util.keystr(path) or '<root>'} of shape {shape} "
                f"would keep dense {too_long[0]} x {too_long[0]} preconditioner matrices "
                f"({gb:.3g} GB of float32); pass {argument}=<limit> (the reference uses "
                f"{reference[0]}; longer axes are then {reference[1]}), or "
                f"{argument}={max(too_long)} to build them anyway."
            )


def scalar_dtype() -> jnp.dtype:
    """The dtype of per-update scalars: float64 when JAX has it enabled, else float32.

    Bias corrections, rectifiers and step sizes are computed once per update in this dtype and
    cast to each leaf's compute dtype where they are used, so float64 parameters get float64
    scalars and, with float64 disabled (JAX's default), nothing changes for float32 ones.
    """
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def bias_correction(decay: Any, count: jax.Array) -> jax.Array:
    """`1 - decay**count` in `scalar_dtype()`, `count` being the 1-based step."""
    dt = scalar_dtype()
    return 1.0 - jnp.asarray(decay, dt) ** count.astype(dt)


def cast_scalars(tree: Any, dtype: Any) -> Any:
    """Every floating array of `tree` cast to `dtype` (booleans and integers kept)."""

    def cast(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def zeros_like_tree(params: optax.Params, dtype: Any = None) -> optax.Params:
    """Zeros shaped like `params`; `None` leaves stay `None`."""
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype or p.dtype), params)


def tree_map_none(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """`jax.tree.map` that leaves `None` leaves of the first tree as `None`."""
    return jax.tree.map(
        lambda x, *r: None if x is None else fn(x, *r), tree, *rest, is_leaf=lambda x: x is None
    )


def tree_map_multi(fn: Callable[..., tuple], n_out: int, tree: Any, *rest: Any) -> tuple:
    """Map `fn` (returning `n_out` arrays) over leaves; return `n_out` trees.

    `None` leaves of `tree` give `None` in every output, so masked-out or frozen leaves pass
    through. `rest` must have the structure of `tree` (with `None` at the same places).
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    others = [treedef.flatten_up_to(r) for r in rest]
    outs: list[list[Any]] = [[None] * len(leaves) for _ in range(n_out)]
    for i, leaf in enumerate(leaves):
        if leaf is None:
            continue
        result = fn(leaf, *(o[i] for o in others))
        for k in range(n_out):
            outs[k][i] = result[k]
    return tuple(treedef.unflatten(o) for o in outs)


def as_tuple(container: Any) -> tuple | None:
    """A per-leaf tuple of state arrays, however a framework hands it back.

    `flax.nnx.Optimizer` returns tuples nested in the optimizer state as mappings with keys
    0..n-1; transforms that keep a tuple per leaf (one factor per axis) read them through this.
    """
    if container is None or isinstance(container, tuple):
        return container
    if hasattr(container, "keys"):
        return tuple(container[k] for k in sorted(container.keys()))
    return tuple(container)


# --------------------------------------------------------------------------- decay and chain


class EmptyState(NamedTuple):
    """State of a stateless transform."""


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def add_decayed_weights(
    weight_decay: Any = 0.0, mask: MaskOrFn = None
) -> optax.GradientTransformation:
    """`u + weight_decay * params` on the leaves selected by `mask`.

    Unlike `optax.add_decayed_weights`, a decay that is the Python number 0 needs no params, so
    `adam(lr).update(g, state)` works without them as in optax's own adam.
    """
    check_non_negative("weight_decay", weight_decay)

    def init_fn(params):
        del params
        return EmptyState()

    def update_fn(updates, state, params=None):
        if _is_zero(weight_decay):
            return updates, state
        if params is None:
            raise ValueError("weight_decay != 0 needs params: call update(grads, state, params)")
        new = tree_map_none(
            lambda u, p: (u + jnp.asarray(weight_decay, u.dtype) * p.astype(u.dtype)).astype(
                u.dtype
            ),
            updates,
            params,
        )
        return new, state

    inner = optax.GradientTransformation(init_fn, update_fn)
    if mask is not None and not _is_zero(weight_decay):
        return optax.masked(inner, mask)
    return inner


def alias(
    scale: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule,
    weight_decay: Any = 0.0,
    mask: MaskOrFn = None,
    *,
    decay: str = "decoupled",
) -> optax.GradientTransformationExtraArgs:
    """The standard optimizer: `scale` -> decay -> `scale_by_learning_rate`.

    `decay="decoupled"` adds `weight_decay * params` to the direction (AdamW, Lion, ...), so the
    decay is multiplied by the learning rate as in PyTorch and optax; `decay="l2"` folds it
    into the gradient before `scale` (the crate's SGD, Adam, RAdam, Kron).
    """
    check_learning_rate(learning_rate)
    decayed = add_decayed_weights(weight_decay, mask)
    parts = [scale, decayed] if decay == "decoupled" else [decayed, scale]
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


# --------------------------------------------------------------------------- presets

BEHAVIOURS = ("crate", "reference")


def resolve_preset(behaviour: str, presets: dict[str, dict[str, Any]], **given: Any) -> dict:
    """The switches of `behaviour`'s preset, with every argument not None taking precedence.

    `presets` maps "crate" and "reference" to {argument: value}; `given` holds the caller's
    arguments, None meaning "the preset's".
    """
    check_choice("behaviour", behaviour, BEHAVIOURS)
    chosen = presets[behaviour]
    return {k: chosen[k] if v is None else v for k, v in given.items()}
