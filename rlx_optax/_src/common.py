"""Small pieces every transform shares: argument checks, decay, the alias chain.

Nothing here knows about a particular algorithm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def _is_numeric_scalar(value: Any) -> bool:
    """A real number: a Python int/float (not bool), a NumPy scalar or a 0-d array."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        return False
    if isinstance(value, (int, float)):
        return True
    dtype, shape = getattr(value, "dtype", None), getattr(value, "shape", None)
    if dtype is None or shape is None:
        return False
    return tuple(shape) == () and (
        jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    )


def check_learning_rate(
    learning_rate: Any, name: str = "learning_rate", *, optional: bool = False
) -> None:
    """A learning rate is a non-negative number (a Python number, a NumPy or JAX scalar) or a
    callable schedule; `None` only where `optional`. Anything else (a string, a list, a
    non-scalar array, a bool) is a ValueError naming `name` here, at construction, rather
    than a failure inside the first `update`."""
    if learning_rate is None and optional:
        return
    if not (
        callable(learning_rate)
        or isinstance(learning_rate, jax.core.Tracer)
        or _is_numeric_scalar(learning_rate)
    ):
        shown = f"{learning_rate!r}"
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(
            f"{name} must be a non-negative number or an optax schedule (a callable), got "
            f"{type(learning_rate).__name__} {shown}"
        )
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
    drop the imaginary part silently. Leaves JAX cannot hold are refused first
    (`check_params`), so every `init` that calls this checks both.
    """
    check_params(params, algorithm)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(
                f"{algorithm} does not support complex parameters: leaf "
                f"{jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}. Use "
                "sgd, adam, adamw, nadamw, radam, qhadamw or lion for complex leaves "
                "(optax.partition can route them), or split them into real and imaginary parts."
            )


def _leaf_name(path: Any) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _jax_cannot_hold(dtype: Any) -> bool:
    """True for a NumPy dtype JAX would silently narrow (float64 while x64 is off)."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # not a NumPy dtype (a JAX extended dtype such as a PRNG key)
        return False
    return jax.dtypes.canonicalize_dtype(dtype) != dtype


def check_params(params: Any, algorithm: str, what: str = "parameter") -> None:
    """Raise a ValueError naming the first leaf whose dtype JAX cannot hold.

    Without ``jax_enable_x64`` a float64 (or complex128) NumPy leaf would be narrowed to
    float32 by the first `jnp` operation, with only JAX's warning to say so: the state would be
    float32 and the updates float32, silently. The stateful API refuses such a parameter; so
    do the transforms' `init` (parameters) and `update` (gradients).
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and _jax_cannot_hold(dtype):
            raise ValueError(
                f"{algorithm}: {what} leaf {_leaf_name(path)} is {np.dtype(dtype)}, which JAX "
                "holds only with jax.config.update('jax_enable_x64', True); enable it or pass "
                f"{jax.dtypes.canonicalize_dtype(dtype)}"
            )


def _describe(state: Any) -> str:
    fields = getattr(state, "_fields", None)
    name = type(state).__name__
    if fields is not None:
        return f"{name}({', '.join(fields)})"
    if isinstance(state, (tuple, list)):
        return f"a {name} of {len(state)} ({', '.join(_describe(s) for s in state)})"
    return name


def _as_state(state: Any, state_cls: type) -> Any:
    """`state` as a `state_cls`, or None when it is not one.

    `state_cls` itself passes; so does a container some framework may hand back in its place:
    a mapping with exactly the field names (or keys 0..n-1), or a plain (not named) tuple or
    list of the right length whose first entry, the step count, is not itself a container.
    Any other named tuple (another transform's state) is refused. (`flax.nnx.Optimizer`
    hands the named tuples back as they are; only their per-leaf trees change container.)
    """
    if isinstance(state, state_cls):
        return state
    fields = state_cls._fields
    if hasattr(state, "_fields"):
        return None
    if hasattr(state, "keys") and hasattr(state, "__getitem__"):
        keys = set(state.keys())
        if keys == set(fields):
            return state_cls(**{k: state[k] for k in fields})
        if keys == set(range(len(fields))):
            return state_cls(*(state[i] for i in range(len(fields))))
        return None
    if isinstance(state, (tuple, list)) and len(state) == len(fields) and fields:
        first = state[0]
        if not isinstance(first, (tuple, list, dict)) and not hasattr(first, "_fields"):
            return state_cls(*state)
    return None


def check_state(
    algorithm: str,
    state: Any,
    state_cls: type,
    updates: Any,
    trees: tuple[str, ...] = (),
    *,
    per_axis: tuple[str, ...] = (),
    leaf_check: Callable[..., str | None] | None = None,
    params: Any = None,
) -> Any:
    """Check what `update` was handed before any computation; return the state as `state_cls`.

    Raises a ValueError naming `algorithm`:

    - unless `state` is a `state_cls` (the state of another transform, for example an AdamW
      state handed to Lion, would otherwise run, or fail deep inside JAX);
    - unless every field named in `trees` (one entry per gradient leaf) and every tree of the
      fields named in `per_axis` (tuples of such trees, one per axis) has the gradients' tree
      structure (a `None` field is skipped);
    - when a gradient leaf has a dtype JAX cannot hold (see `check_params`);
    - when a gradient leaf's shape disagrees with its entries: ``leaf_check(shape, *entries)``
      (entries in the order `trees` then `per_axis`, a tuple of per-axis entries for the
      latter, then the parameter when `params` is given) returns a description of what the
      state holds there ("the state's 'mu' of shape (3, 4)"), or None when they agree;
      by default the first entry that is an array must have the gradient's shape;
    - when `params` is given (transforms that need it) and a gradient leaf's shape is not its
      parameter's.

    Runs at trace time (shapes are static), so a jitted update pays nothing per step.
    """
    checked = _as_state(state, state_cls)
    if checked is None:
        raise ValueError(
            f"{algorithm}: update expected its own state, {state_cls.__name__}"
            f"({', '.join(state_cls._fields)}), as its init returns it, but got "
            f"{_describe(state)}. Pass the state that this optimizer's init made (within "
            "optax.chain, the chain's own state)."
        )
    # a masked-out gradient (`optax.MaskedNode`) may face None in the state: both are "no leaf"
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_empty)
    check_params(updates, algorithm, "gradient")
    columns: list[tuple[str, Any]] = []
    for name in trees + per_axis:
        value = getattr(checked, name)
        if value is None:
            continue
        parts = as_tuple(value) if name in per_axis else (value,)
        flat = []
        for part in parts:
            try:
                flat.append(treedef.flatten_up_to(part))
            except (ValueError, TypeError):
                raise ValueError(
                    f"{algorithm}: the state's {name!r} does not have the structure of the "
                    f"gradients: gradients {treedef}, state {jax.tree.structure(part)}. Was the "
                    "state made by this optimizer's init for these parameters?"
                ) from None
        columns.append((name, flat if name in per_axis else flat[0]))
        # the gradients' empty places in the state too (nnx hands a MaskedNode back as None)
        same = [
            treedef.unflatten(
                [g if is_empty(g) else x for (_, g), x in zip(leaves, f, strict=True)]
            )
            for f in flat
        ]
        checked = checked._replace(**{name: tuple(same) if name in per_axis else same[0]})
    if params is not None:
        try:
            columns.append(("params", treedef.flatten_up_to(params)))
        except (ValueError, TypeError):
            raise ValueError(
                f"{algorithm}: params do not have the structure of the gradients: gradients "
                f"{treedef}, params {jax.tree.structure(params)}"
            ) from None
    for i, (path, g) in enumerate(leaves):
        shape = getattr(g, "shape", None)
        if shape is None:
            continue
        shape = tuple(shape)
        entries = [tuple(p[i] for p in col) if n in per_axis else col[i] for n, col in columns]
        if leaf_check is not None:
            held = leaf_check(shape, *entries)
        else:
            held = None
            for (n, _), e in zip(columns, entries, strict=True):
                if hasattr(e, "shape"):
                    if tuple(e.shape) != shape:
                        what = "the parameter" if n == "params" else f"the state's {n!r}"
                        held = f"{what} of shape {tuple(e.shape)}"
                    break
        if held is not None:
            raise ValueError(
                f"{algorithm}: gradient leaf {_leaf_name(path)} has shape {shape}, which "
                f"disagrees with {held} there: the gradients must have the shapes of the "
                "parameters given to init"
            )
    return checked


def factors_disagree(shape: tuple[int, ...], factors: tuple[Any, ...]) -> str | None:
    """A `check_state` leaf check for one factor per axis ((d, d) or (d,), None where the leaf
    is passed through or has fewer axes): what the factors hold when they disagree with
    `shape`, else None."""
    held = tuple(f.shape[0] for f in factors if f is not None)
    if not held or held == shape:
        return None
    return f"the state's factors for axes of lengths {held}"


def working_shape_disagrees(shape: tuple[int, ...], mu: Any, *_: Any) -> str | None:
    """A `check_state` leaf check for a moment kept in a working shape of merged axes (the
    same entries as the leaf, reshaped): its size must be the gradient's."""
    if math.prod(shape) == math.prod(mu.shape):
        return None
    return f"the state's 'mu' of working shape {tuple(mu.shape)}"


_WARNED: set[str] = set()

#: The one-time warnings of defaults that are not the named algorithm (docs/robustness.md).
KRON_CRATE_WARNING = (
    "kron_psgd with factor_update='crate' and probe='gradient' (the crate's defaults): the "
    "probe pair is (g, g), so the factor step is exactly zero and the preconditioner stays "
    "the identity; the update is clipped SGD with momentum, as in the crate. For a moving "
    "preconditioner pass behaviour='reference' (or factor_update='reference', "
    "probe='random')."
)
SOPHIA_NO_HESSIAN_WARNING = (
    "sophia: update without a Hessian estimate (no hessian_diag=..., no hessian_estimator): "
    "until one arrives h = 0 and the step is sign descent, rho * sign(m). Pass "
    "update(..., hessian_diag=rlx_optax.hutchinson_diag(...)) (or constant_hessian_diag for "
    "the crate's hessian_init), or sophia(..., hessian_estimator=...)."
)


def warn_once(key: str, message: str) -> None:
    """Issue `message` as a UserWarning the first time `key` is seen in this process.

    For a default that is not the named algorithm (crate-mode Kron, Sophia without a
    Hessian): called at construction or trace time, never per step.
    """
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


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


def is_empty(x: Any) -> bool:
    """A place of a tree with no leaf: None, or `optax.MaskedNode` (what `optax.masked` puts
    where its mask is False). Frameworks may hand one back as the other: `flax.nnx.Optimizer`
    returns the state's MaskedNodes as None, while the gradients keep them."""
    return x is None or isinstance(x, optax.MaskedNode)


def tree_map_none(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """`jax.tree.map` that leaves the empty places (`is_empty`) of the first tree as they are."""
    return jax.tree.map(
        lambda x, *r: x if is_empty(x) else fn(x, *r), tree, *rest, is_leaf=is_empty
    )


def tree_map_multi(fn: Callable[..., tuple], n_out: int, tree: Any, *rest: Any) -> tuple:
    """Map `fn` (returning `n_out` arrays) over leaves; return `n_out` trees.

    Empty places of `tree` (None, `optax.MaskedNode`: see `is_empty`) are kept as they are in
    every output, so masked-out or frozen leaves pass through. `rest` must have the structure of
    `tree` (anything at its empty places).
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_empty)
    others = [treedef.flatten_up_to(r) for r in rest]
    outs: list[list[Any]] = [list(leaves) for _ in range(n_out)]
    for i, leaf in enumerate(leaves):
        if is_empty(leaf):
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
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The standard optimizer: `scale` -> decay -> `scale_by_learning_rate`.

    `decay="decoupled"` adds `weight_decay * params` to the direction (AdamW, Lion, ...), so the
    decay is multiplied by the learning rate as in PyTorch and optax; `decay="l2"` folds it
    into the gradient before `scale` (the crate's SGD, Adam, RAdam, Kron). `name` (the
    algorithm) is what `update` names when it is handed another optimizer's state.
    """
    check_learning_rate(learning_rate)
    decayed = add_decayed_weights(weight_decay, mask)
    parts = [scale, decayed] if decay == "decoupled" else [decayed, scale]
    return chain(name, *parts, optax.scale_by_learning_rate(learning_rate))


def chain(
    algorithm: str | None, *parts: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(*parts)` whose `update` first checks that it was handed a chain state of
    the same length, raising a ValueError naming `algorithm` and what it got (optax's own
    message names neither). The state is optax.chain's, unchanged."""
    inner = optax.chain(*parts)
    who = algorithm or "this optimizer"

    def update_fn(updates, state, params=None, **extra):
        if not isinstance(state, (tuple, list)) or len(state) != len(parts):
            raise ValueError(
                f"{who}: update expected the state its init returns (a chain of {len(parts)} "
                f"states), got {_describe(state)}. Pass the state that this optimizer's init "
                "made."
            )
        return inner.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


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
