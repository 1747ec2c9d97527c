"""The crate's classes (``Sgd``, ``AdamW``, ...), generated from `registry.ALGORITHMS`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlx_optax._src import registry
from rlx_optax._src.stateful.checks import Array, Slot, check_item
from rlx_optax._src.stateful.optimizer import Optimizer


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
    item = check_item(self._slots, name, shape, jnp.zeros(np.shape(h), dtype), h)
    state = self._state(self._transform(), item)
    new_state = _fold_hessian()(state, item[3], self.beta2)
    self._slots[name] = Slot(item[1], item[2].dtype, new_state)


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


def get(name: str) -> type[Optimizer]:
    """The stateful class of an algorithm (class, factory or crate name)."""
    if name in CLASSES:
        return CLASSES[name]
    return CLASSES[registry.get(name).stateful]
