"""`Optimizer`: the crate's name-keyed optimizer object over one pure transform.

One object holds the state of every tensor of a model, keyed by name; per iteration the caller
runs ``step(name, shape, param, grad)`` for each tensor and then ``end_iteration()``. The class
holds state and validates; the update itself is the pure transform of its `registry` row,
compiled in `compiled.Compiled`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from rlx_optax._src import registry
from rlx_optax._src.stateful import checkpoint
from rlx_optax._src.stateful.checks import Array, Slot, buffer_key, check_item, check_lr, write_back
from rlx_optax._src.stateful.compiled import Compiled, compiled

# Public attributes an instance may set besides the crate fields.
_SETTABLE = frozenset({"lr", "donate_params"})


#: The storage arguments a pure factory may take (the state-precision table's columns).
STATE_PRECISION_ARGS = ("mu_dtype", "nu_dtype", "stochastic_rounding")


def _state_precision(row: registry.Algorithm, given: Any, owner: Any) -> dict[str, Any]:
    """`given` checked against what `row`'s factory accepts; {} for None."""
    if given is None:
        return {}
    where = f"{type(owner).__name__}(state_precision=...)"
    if not isinstance(given, Mapping):
        raise TypeError(f"{where}: expected a mapping of argument names, got {given!r}")
    accepted = [a for a in STATE_PRECISION_ARGS if a in inspect.signature(row.factory).parameters]
    for key in given:
        if key not in accepted:
            raise ValueError(
                f"{where}: {row.name} takes no state-precision argument {key!r}; it takes "
                f"{accepted or 'none'}"
            )
    return dict(given)


class Optimizer:
    """Base of the crate-style optimizers: per-name state over one pure transform.

    Subclasses (``Sgd``, ``AdamW``, ...) are generated from `registry.ALGORITHMS`: the
    constructor takes ``lr`` first and every public field of the crate's struct as a keyword
    with the crate's default, plus ``lr_scale`` (a mapping name -> factor, or a callable) and
    ``donate_params`` (JAX-array parameters are donated to the compiled step; default True)
    and ``state_precision`` (a mapping of the pure factory's state-storage arguments, e.g.
    ``{"mu_dtype": "q8", "nu_dtype": jnp.bfloat16, "stochastic_rounding": True}``; see
    docs/guides/state_precision.md; fixed at construction).
    Changing a field (directly or through a ``with_*`` builder) takes effect at the next step
    and compiles once for the new configuration; ``lr`` is data and never recompiles. Setting
    any other public attribute (a misspelled field) raises `AttributeError`.
    """

    algorithm: ClassVar[registry.Algorithm | None] = None
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        lr: float | None = None,
        *,
        lr_scale: Mapping[str, float] | Callable[[str], float] | None = None,
        donate_params: bool = True,
        state_precision: Mapping[str, Any] | None = None,
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
        object.__setattr__(self, "_precision", _state_precision(row, state_precision, self))
        for name, default in self._defaults().items():
            object.__setattr__(self, name, fields.get(name, default))
        self.lr = lr
        self._lr_scales = lr_scale
        self.donate_params = donate_params
        self._step = 0
        self._slots: dict[str, Slot] = {}
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
        if not (name.startswith("_") or name in self._fields or name in _SETTABLE):
            if not hasattr(type(self), name):  # a property or attribute a subclass declares
                raise AttributeError(
                    f"{type(self).__name__} has no field {name!r}; fields: "
                    f"{('lr', *self._fields, 'donate_params')}"
                )
        if name == "lr":
            value = check_lr(value, self.algorithm.lr_optional, type(self).__name__)
        lr_kind_changes = name == "lr" and (value is None) != (getattr(self, "lr", None) is None)
        if name in self._fields or lr_kind_changes:
            object.__setattr__(self, "_tx", None)
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        if self._precision:
            fields += f", state_precision={self._precision!r}"
        return f"{type(self).__name__}(lr={self.lr!r}, {fields})"

    def _transform(self) -> Compiled:
        if self._tx is None:
            row = self.algorithm
            crate = {f: getattr(self, f) for f in self._fields if f in row.crate_fields}
            crate["lr"] = self.lr
            try:
                tx = compiled(row, {**row.factory_kwargs(**crate), **self._precision})
            except ValueError as err:
                raise ValueError(f"{type(self).__name__}: {err}") from None
            object.__setattr__(self, "_tx", tx)
        return self._tx

    # -------------------------------------------------------------- the trait

    def lr_scale(self, name: str) -> float:
        """Multiplier on ``lr`` for `name` (the constructor's mapping or callable; else 1)."""
        scales = self._lr_scales
        if scales is None:
            return 1.0
        return float(scales(name) if callable(scales) else scales.get(name, 1.0))

    def set_lr(self, lr: float) -> None:
        """Set the learning rate (finite, >= 0); the compiled steps take it as data (no
        recompilation)."""
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
        deleted: keep the returned one). `shape` is the logical shape (a flat `param` or
        `grad` of that size is accepted, as in the crate; another shape is an error); a rank-2
        shape takes the algorithm's matrix path. The update runs in the param's dtype (the
        grad is cast to it). On a `ValueError` the parameter and the state are unchanged.
        """
        item = check_item(self._slots, name, shape, param, grad)
        tx = self._transform()
        fresh = bool(tx.first_sight) and self._step > 0 and name not in self._slots
        state = self._state(tx, item)
        donate = self.donate_params or item[2] is not param or isinstance(param, np.ndarray)
        new_state, new_param = tx.step[donate](
            state, item[2], item[3], np.int32(self._step), self._lr(name), fresh=fresh
        )
        self._slots[name] = Slot(item[1], item[2].dtype, new_state)
        return write_back(param, new_param)

    def step_batch(self, items: Iterable[tuple[str, Iterable[int], Array, Array]]) -> list[Array]:
        """`step` for every ``(name, shape, param, grad)`` of an iteration, in one compiled call.

        The result equals the loop of `step` calls. Returns the new parameters in item order.
        """
        items = list(items)
        checked = [check_item(self._slots, *item) for item in items]
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
        tx = self._transform()
        fresh = ()
        if tx.first_sight and self._step > 0:
            fresh = tuple(sorted(n for n in names if n not in self._slots))
        states = {c[0]: self._state(tx, c) for c in checked}
        lrs = tuple(self._lr(n) for n in sorted(names))
        new_states, new_params = tx.batch[donate](
            states,
            {c[0]: c[2] for c in checked},
            {c[0]: c[3] for c in checked},
            np.int32(self._step),
            lrs,
            fresh=fresh,
        )
        for name, shape, p, _ in checked:
            self._slots[name] = Slot(shape, p.dtype, new_states[name])
        return [write_back(item[2], new_params[n]) for item, n in zip(items, names, strict=True)]

    # -------------------------------------------------------------- checkpoints

    def state_dict(self, *, flat: bool = False) -> dict[str, Any]:
        """A copy of the whole state: NumPy arrays and Python scalars.

        ``{"algorithm": crate name, "step": int, "tensors": {name: {"shape", "dtype",
        "state": {path: array}}}}`` (picklable). ``flat=True`` gives the same content as one
        flat mapping of NumPy arrays, for ``np.savez(path, **opt.state_dict(flat=True))``;
        `load_state_dict` takes either form, including what ``np.load`` returns, and resumes
        bit-exactly.
        """
        state = checkpoint.nested(self.algorithm.crate_name, self._step, self._slots)
        return checkpoint.flatten(state) if flat else state

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> None:
        """Replace the whole state by `state` (from `state_dict`, nested or flat).

        Everything is validated first: a `ValueError` (state of another algorithm, a missing
        ``step``, a state layout of another configuration, a known parameter given another
        shape, or, with `strict`, other tensor names than this optimizer already holds) leaves
        this optimizer unchanged.
        """
        step, slots = checkpoint.load(
            type(self).__name__,
            self.algorithm.crate_name,
            self._transform().tx.init,
            state,
            self._slots,
            strict,
        )
        self._slots = slots
        self._step = step

    # -------------------------------------------------------------- helpers

    def _lr(self, name: str) -> float:
        # A Python float: traced as a weak-typed scalar, cast to the parameter's dtype inside.
        if self.lr is None:
            return 0.0
        lr = float(self.lr * self.lr_scale(name))
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(
                f"parameter {name!r}: lr * lr_scale({name!r}) = {lr}, must be finite and >= 0"
            )
        return lr

    def _state(self, tx: Compiled, item: tuple) -> Any:
        slot = self._slots.get(item[0])
        if slot is not None:
            return slot.state
        # Eager init may share buffers (cached scalar zeros) or keep the parameter itself; the
        # state is donated, so every leaf gets its own buffer.
        seen = {buffer_key(item[2])}

        def own(x):
            key = buffer_key(x)
            if key in seen:
                return jnp.array(x, copy=True)
            seen.add(key)
            return x

        return jax.tree.map(own, tx.init(item[2]))
