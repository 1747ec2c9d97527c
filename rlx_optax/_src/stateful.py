"""The crate's name-keyed optimizer objects (the seed API), on top of the pure transforms.

One object holds the state of every tensor of a model, keyed by name; per iteration the caller
runs ``step(name, shape, param, grad)`` for each tensor and then ``end_iteration()``. Each class
delegates to the pure transform of its `registry` row: this module holds state, compiles and
validates; it never re-implements an update rule.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlx_optax._src import registry

Array = np.ndarray | jax.Array

# --------------------------------------------------------------------------- compiled steps


def _with_step(tree: Any, step: jax.Array) -> Any:
    """`tree` with every NamedTuple field named ``count`` replaced by the global step."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(
            *(
                step.astype(v.dtype) if f == "count" else _with_step(v, step)
                for f, v in zip(tree._fields, tree, strict=True)
            )
        )
    if isinstance(tree, (tuple, list)):
        return type(tree)(_with_step(v, step) for v in tree)
    if isinstance(tree, dict):
        return {k: _with_step(v, step) for k, v in tree.items()}
    return tree


def _take_fields(tree: Any, source: Any, fields: tuple[str, ...]) -> Any:
    """`tree` with the NamedTuple fields in `fields` taken from `source` (same structure)."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(
            *(
                s if f in fields else _take_fields(v, s, fields)
                for f, v, s in zip(tree._fields, tree, source, strict=True)
            )
        )
    if isinstance(tree, (tuple, list)):
        return type(tree)(_take_fields(v, s, fields) for v, s in zip(tree, source, strict=True))
    if isinstance(tree, dict):
        return {k: _take_fields(v, source[k], fields) for k, v in tree.items()}
    return tree


def _own_buffers(state: Any, *inputs: Any) -> Any:
    """Copy the state leaves that are inputs or repeat another leaf (inside `jit`).

    The state is donated at the next step, so each leaf must own its buffer: MARS keeps the
    gradient itself, and the counts set from the global step are one value.
    """
    seen = {id(x) for x in inputs}

    def own(x):
        if id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(own, state)


class _Compiled:
    """The transform of one configuration and its jitted init, step and batch functions."""

    def __init__(self, row: registry.Algorithm, kwargs: dict[str, Any]):
        row.factory(**kwargs)  # validates the hyperparameters (inject_hyperparams defers it)
        static = [p for p in inspect.signature(row.factory).parameters if p != "learning_rate"]
        self.injected = kwargs.get("learning_rate") is not None
        if not self.injected:
            static.append("learning_rate")
        self.tx = optax.inject_hyperparams(
            row.factory, static_args=tuple(static), hyperparam_dtype=jnp.float32
        )(**kwargs)
        self.counted = row.crate_counter
        self.first_sight = row.first_sight_fields
        self.traces = 0
        self.init = self.tx.init  # once per name: eager is cheaper than compiling
        # Keyed by "donate the parameters too"; the state is always donated.
        self.step = {
            d: jax.jit(
                self._traced_step, donate_argnums=(0, 1) if d else 0, static_argnames="fresh"
            )
            for d in (False, True)
        }
        self.batch = {
            d: jax.jit(self._batch, donate_argnums=(0, 1) if d else 0, static_argnames="fresh")
            for d in (False, True)
        }

    def _update(self, state, param, grad, step, lr):
        if self.counted:
            state = _with_step(state, step)
        if self.injected:
            hyper = {**state.hyperparams, "learning_rate": lr}
            state = state._replace(hyperparams=hyper)
        updates, state = self.tx.update(grad, state, param)
        # (state, param) in the order of the arguments: donated buffers are matched to outputs
        # by shape in order, so any other order makes XLA copy every moment.
        return _own_buffers(state, param, grad, step, lr), optax.apply_updates(param, updates)

    def _step(self, state, param, grad, step, lr, fresh):
        # fresh: the tensor's first step, at a global step > 0.
        if fresh and self.counted and self.first_sight:
            first, _ = self._update(state, param, grad, jnp.zeros_like(step), lr)
            state = _take_fields(state, first, self.first_sight)
        return self._update(state, param, grad, step, lr)

    def _traced_step(self, state, param, grad, step, lr, fresh=False):
        self.traces += 1
        return self._step(state, param, grad, step, lr, fresh)

    def _batch(self, states, params, grads, step, lrs, fresh=()):
        self.traces += 1
        out_params, out_states = {}, {}
        for i, name in enumerate(sorted(states)):
            out_states[name], out_params[name] = self._step(
                states[name], params[name], grads[name], step, lrs[i], name in fresh
            )
        return out_states, out_params


_CACHE: dict[Any, _Compiled] = {}


def _compiled(row: registry.Algorithm, kwargs: dict[str, Any]) -> _Compiled:
    key = (row.name, tuple(sorted(kwargs.items())))
    try:
        hit = _CACHE.get(key)
    except TypeError:  # an unhashable value: compile for this object only
        return _Compiled(row, kwargs)
    if hit is None:
        hit = _CACHE[key] = _Compiled(row, kwargs)
    return hit


# --------------------------------------------------------------------------- the base class


class _Slot:
    __slots__ = ("dtype", "shape", "state")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, state: Any):
        self.shape, self.dtype, self.state = shape, dtype, state


_HYPER = ".hyperparams"  # the injected learning rate: rewritten before every update


def _state_leaves(state: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    out = {jax.tree_util.keystr(path): leaf for path, leaf in leaves}
    return {k: v for k, v in out.items() if not k.startswith(_HYPER)}


class Optimizer:
    """Base of the crate-style optimizers: per-name state over one pure transform.

    Subclasses (``Sgd``, ``AdamW``, ...) are generated from `registry.ALGORITHMS`: the
    constructor takes ``lr`` first and every public field of the crate's struct as a keyword
    with the crate's default, plus ``lr_scale`` (a mapping name -> factor, or a callable) and
    ``donate_params`` (JAX-array parameters are donated to the compiled step; default True).
    Changing a field (directly or through a ``with_*`` builder) takes effect at the next step
    and compiles once for the new configuration; ``lr`` is data and never recompiles.
    """

    algorithm: ClassVar[registry.Algorithm | None] = None
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        lr: float | None = None,
        *,
        lr_scale: Mapping[str, float] | Callable[[str], float] | None = None,
        donate_params: bool = True,
        **fields: Any,
    ):
        row = self.algorithm
        if row is None:
            raise TypeError("Optimizer is a base class: use Sgd, AdamW, Muon, ...")
        if lr is None and not row.lr_optional:
            raise TypeError(f"{type(self).__name__}() needs a learning rate `lr`")
        unknown = set(fields) - set(self._fields)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no field {sorted(unknown)}; fields: {self._fields}"
            )
        object.__setattr__(self, "_tx", None)
        for name, default in self._defaults().items():
            object.__setattr__(self, name, fields.get(name, default))
        self.lr = lr
        self._lr_scales = lr_scale
        self.donate_params = donate_params
        self._step = 0
        self._slots: dict[str, _Slot] = {}
        self._transform()  # validates the hyperparameters now

    # -------------------------------------------------------------- configuration

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        row = cls.algorithm
        sig = inspect.signature(row.factory).parameters
        out = {}
        for field in cls._fields:
            if field in row.crate_defaults:
                out[field] = row.crate_defaults[field]
            elif field in row.crate_fields and row.crate_fields[field] in sig:
                out[field] = sig[row.crate_fields[field]].default
            else:
                out[field] = row.crate_inert_fields[field]
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        lr_kind_changes = name == "lr" and (value is None) != (getattr(self, "lr", None) is None)
        if name in self._fields or lr_kind_changes:
            object.__setattr__(self, "_tx", None)
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}(lr={self.lr!r}, {fields})"

    def _transform(self) -> _Compiled:
        if self._tx is None:
            row = self.algorithm
            crate = {f: getattr(self, f) for f in self._fields if f in row.crate_fields}
            crate["lr"] = self.lr
            try:
                compiled = _compiled(row, row.factory_kwargs(**crate))
            except ValueError as err:
                raise ValueError(f"{type(self).__name__}: {err}") from None
            object.__setattr__(self, "_tx", compiled)
        return self._tx

    # -------------------------------------------------------------- the trait

    def lr_scale(self, name: str) -> float:
        """Multiplier on ``lr`` for `name` (the constructor's mapping or callable; else 1)."""
        scales = self._lr_scales
        if scales is None:
            return 1.0
        return float(scales(name) if callable(scales) else scales.get(name, 1.0))

    def set_lr(self, lr: float) -> None:
        """Set the learning rate; the compiled steps take it as data (no recompilation)."""
        self.lr = lr

    def end_iteration(self) -> None:
        """Advance the shared step counter: the next steps use ``t = calls + 1``."""
        self._step += 1

    def current_step(self) -> int:
        """The 1-based step the next `step` call uses, ``end_iteration() calls + 1``."""
        return self._step + 1

    def step(self, name: str, shape: Iterable[int], param: Array, grad: Array) -> Array:
        """Update `param` from `grad` with the state kept for `name`.

        A writable NumPy array is updated in place and returned; a JAX array is returned
        updated and, unless the optimizer was built with ``donate_params=False``, donated to
        the compiled step like in a donated ``jax.jit`` train step (the array passed in is
        deleted: keep the returned one). `shape` is the logical shape (a flat `param` of that
        size is accepted, as in
        the crate); a rank-2 shape takes the algorithm's matrix path. On a `ValueError` the
        parameter and the state are unchanged.
        """
        item = self._check(name, shape, param, grad)
        compiled = self._transform()
        fresh = bool(compiled.first_sight) and self._step > 0 and name not in self._slots
        state = self._state(compiled, item)
        donate = self.donate_params or item[2] is not param or isinstance(param, np.ndarray)
        new_state, new_param = compiled.step[donate](
            state, item[2], item[3], np.int32(self._step), self._lr(name), fresh=fresh
        )
        self._slots[name] = _Slot(item[1], item[2].dtype, new_state)
        return _write_back(param, new_param)

    def step_batch(self, items: Iterable[tuple[str, Iterable[int], Array, Array]]) -> list[Array]:
        """`step` for every ``(name, shape, param, grad)`` of an iteration, in one compiled call.

        The result equals the loop of `step` calls. Returns the new parameters in item order.
        """
        items = list(items)
        checked = [self._check(*item) for item in items]
        names = [c[0] for c in checked]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"step_batch: parameter names repeated: {dup}")
        donate = self.donate_params or all(
            c[2] is not item[2] or isinstance(item[2], np.ndarray)
            for c, item in zip(checked, items, strict=True)
        )
        if donate and len({id(c[2]) for c in checked}) != len(checked):
            raise ValueError("step_batch: the same param array is passed for several names")
        compiled = self._transform()
        fresh = ()
        if compiled.first_sight and self._step > 0:
            fresh = tuple(sorted(n for n in names if n not in self._slots))
        states = {c[0]: self._state(compiled, c) for c in checked}
        lrs = np.array([self._lr(n) for n in sorted(names)], np.float32)
        new_states, new_params = compiled.batch[donate](
            states,
            {c[0]: c[2] for c in checked},
            {c[0]: c[3] for c in checked},
            np.int32(self._step),
            lrs,
            fresh=fresh,
        )
        for name, _, p, _ in checked:
            self._slots[name] = _Slot(tuple(p.shape), p.dtype, new_states[name])
        return [_write_back(item[2], new_params[n]) for item, n in zip(items, names, strict=True)]

    # -------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """A copy of the whole state: NumPy arrays and Python scalars (savable with pickle).

        ``{"algorithm": crate name, "step": int, "tensors": {name: {"shape", "dtype",
        "state": {path: array}}}}``; `load_state_dict` resumes bit-exactly from it.
        """
        return {
            "algorithm": self.algorithm.crate_name,
            "step": self._step,
            "tensors": {
                name: {
                    "shape": slot.shape,
                    "dtype": np.dtype(slot.dtype).name,
                    "state": {k: np.array(v) for k, v in _state_leaves(slot.state).items()},
                }
                for name, slot in sorted(self._slots.items())
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the whole state by `state` (from `state_dict`); refuse a foreign one.

        Raises ValueError, leaving this optimizer unchanged, when `state` comes from another
        algorithm, another configuration with a different state layout, or gives a known
        parameter another shape.
        """
        cls = type(self).__name__
        algo = state.get("algorithm") if isinstance(state, Mapping) else None
        if algo != self.algorithm.crate_name:
            raise ValueError(f"{cls}.load_state_dict: the state is from {algo!r}, not {cls}")
        compiled = self._transform()
        slots = {}
        for name, saved in state["tensors"].items():
            shape, dtype = tuple(saved["shape"]), np.dtype(saved["dtype"])
            known = self._slots.get(name)
            if known is not None and known.shape != shape:
                raise ValueError(
                    f"{cls}.load_state_dict: parameter {name!r} has shape {known.shape}, "
                    f"the state is for shape {shape}"
                )
            template = jax.eval_shape(compiled.tx.init, jax.ShapeDtypeStruct(shape, dtype))
            leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
            keys = [jax.tree_util.keystr(p) for p, _ in leaves]
            expected = [k for k in keys if not k.startswith(_HYPER)]
            if set(expected) != set(saved["state"]):
                raise ValueError(
                    f"{cls}.load_state_dict: the state of parameter {name!r} does not match "
                    f"{self!r} (expected entries {expected}, got {sorted(saved['state'])})"
                )
            values = []
            for key, (_, like) in zip(keys, leaves, strict=True):
                if key.startswith(_HYPER):
                    values.append(jnp.zeros(like.shape, like.dtype))
                    continue
                value = np.asarray(saved["state"][key])
                if value.shape != like.shape or value.dtype != like.dtype:
                    raise ValueError(
                        f"{cls}.load_state_dict: {name!r}{key} is {value.dtype}{value.shape}, "
                        f"expected {like.dtype}{like.shape}"
                    )
                values.append(jnp.array(value, copy=True))
            slots[name] = _Slot(shape, dtype, jax.tree.unflatten(treedef, values))
        self._slots = slots
        self._step = int(state["step"])

    # -------------------------------------------------------------- helpers

    def _lr(self, name: str) -> np.float32:
        return np.float32(0.0 if self.lr is None else self.lr * self.lr_scale(name))

    def _state(self, compiled: _Compiled, item: tuple) -> Any:
        slot = self._slots.get(item[0])
        if slot is not None:
            return slot.state
        # Eager init may share buffers (cached scalar zeros) or keep the parameter itself; the
        # state is donated, so every leaf gets its own buffer.
        seen = {_buffer_key(item[2])}

        def own(x):
            key = _buffer_key(x)
            if key in seen:
                return jnp.array(x, copy=True)
            seen.add(key)
            return x

        return jax.tree.map(own, compiled.init(item[2]))

    def _check(self, name: str, shape: Iterable[int], param: Array, grad: Array) -> tuple:
        """Validate one call; return ``(name, shape, param, grad)`` shaped for the transform."""
        if not isinstance(name, str):
            raise ValueError(f"parameter name must be a string, got {name!r}")
        try:
            shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {name!r}: shape must be a sequence of ints") from None
        for what, x in (("param", param), ("grad", grad)):
            if not isinstance(x, (np.ndarray, jax.Array)):
                raise ValueError(f"parameter {name!r}: {what} must be a NumPy or JAX array")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(f"parameter {name!r}: {what} has non-float dtype {x.dtype}")
        if isinstance(param, np.ndarray) and not param.flags.writeable:
            raise ValueError(f"parameter {name!r}: param is a read-only NumPy array")
        size = math.prod(shape)
        if param.size != size or (param.shape != shape and param.ndim != 1):
            raise ValueError(
                f"parameter {name!r}: shape {shape} disagrees with the array's {param.shape}"
            )
        if grad.size != param.size:
            raise ValueError(
                f"parameter {name!r}: grad has {grad.size} elements, param has {param.size}"
            )
        slot = self._slots.get(name)
        if slot is not None and (slot.shape != shape or slot.dtype != param.dtype):
            raise ValueError(
                f"parameter {name!r} was stepped with shape {slot.shape} {slot.dtype}, "
                f"now {shape} {param.dtype}"
            )
        if param.shape != shape:
            param = param.reshape(shape)
        if grad.shape != shape:
            grad = grad.reshape(shape)
        if grad.dtype != param.dtype:
            grad = grad.astype(param.dtype)
        return name, shape, param, grad


def _buffer_key(x: Any) -> Any:
    try:
        return x.unsafe_buffer_pointer()
    except Exception:  # not a single-device array
        return id(x)


def _write_back(param: Array, new: jax.Array) -> Array:
    if isinstance(param, np.ndarray):
        np.copyto(param, np.asarray(new).reshape(param.shape))
        return param
    return new.reshape(param.shape) if new.shape != param.shape else new


# --------------------------------------------------------------------------- the classes


def _builder(name: str, fields: tuple[str, ...]) -> Callable:
    """The crate builder `name`: sets `fields` from its arguments and returns the optimizer."""

    def build(self, *values):
        if len(values) != len(fields):
            raise TypeError(f"{name}() takes {len(fields)} arguments ({', '.join(fields)})")
        for field, value in zip(fields, values, strict=True):
            setattr(self, field, value)
        return self

    build.__name__ = name
    build.__doc__ = f"Set {', '.join(f'``{f}``' for f in fields)}; returns the optimizer."
    return build


@functools.cache
def _fold_hessian() -> Callable:
    from rlx_optax._src.transforms.sophia import sophia_update_hessian

    return jax.jit(sophia_update_hessian)


def _update_hessian(self, name: str, h: Array, shape: Iterable[int] | None = None) -> None:
    """Fold a Hessian-diagonal estimate `h` into the EMA kept for `name` (crate's Sophia).

    `shape` defaults to the shape `name` was stepped with, else ``h.shape``; the state of a
    name never stepped is created here. On a `ValueError` the state is unchanged.
    """
    slot = self._slots.get(name)
    if shape is None:
        shape = slot.shape if slot is not None else np.shape(h)
    dtype = np.float32 if slot is None else slot.dtype
    h = h if isinstance(h, (np.ndarray, jax.Array)) else np.asarray(h, np.float32)
    _, shape, param, h = self._check(name, shape, jnp.zeros(np.shape(h), dtype), h)
    state = self._state(self._transform(), (name, shape, param, h))
    new_state = _fold_hessian()(state, h, self.beta2)
    self._slots[name] = _Slot(shape, param.dtype, new_state)


# Implementations of the extra methods a registry row lists in `stateful_methods`.
_METHODS: dict[str, Callable] = {"update_hessian": _update_hessian}


def _make_class(row: registry.Algorithm) -> type[Optimizer]:
    fields = tuple(f for f in row.crate_fields if f != "lr") + tuple(row.crate_inert_fields)
    namespace: dict[str, Any] = {
        "algorithm": row,
        "_fields": fields,
        "__module__": "rlx_optax",
        "__qualname__": row.stateful,
        "__doc__": (
            f"The crate's ``{row.stateful}`` over the pure ``rlx_optax.{row.name}``.\n\n"
            f"Fields (crate name -> ``{row.name}`` argument): "
            + ", ".join(f"``{k}`` -> ``{v}``" for k, v in row.crate_fields.items())
            + ". See `rlx_optax.Optimizer` for the methods."
        ),
        **{name: _builder(name, f) for name, f in row.crate_builders.items()},
        **{name: _METHODS[name] for name in row.stateful_methods},
    }
    cls = type(row.stateful, (Optimizer,), namespace)
    lr_default = None if row.lr_optional else inspect.Parameter.empty
    params = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("lr", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=lr_default),
        *(
            inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY, default=d)
            for f, d in cls._defaults().items()
        ),
        inspect.Parameter("lr_scale", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("donate_params", inspect.Parameter.KEYWORD_ONLY, default=True),
    ]
    cls.__init__ = _init_with_signature(inspect.Signature(params))
    return cls


def _init_with_signature(sig: inspect.Signature) -> Callable:
    def __init__(self, lr=None, **kwargs):
        Optimizer.__init__(self, lr, **kwargs)

    __init__.__signature__ = sig
    return __init__


CLASSES: dict[str, type[Optimizer]] = {
    row.stateful: _make_class(row) for row in registry.ALGORITHMS
}


globals().update(CLASSES)


def get(name: str) -> type[Optimizer]:
    """The stateful class of an algorithm (class, factory or crate name)."""
    if name in CLASSES:
        return CLASSES[name]
    return CLASSES[registry.get(name).stateful]
