"""Validation of the stateful API's inputs: every check runs before any state changes.

Rules (docs/guides/porting.md, "The rules the classes enforce"):

- `grad` has the logical `shape`, the param's own shape, or is flat (the crate takes flat
  slices); any other shape of the same size is an error, not a reshape.
- The update runs in the param's dtype: a grad of another floating dtype is cast to it. A dtype
  JAX cannot hold (float64 while ``jax_enable_x64`` is off) is an error naming the parameter,
  never a silent truncation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = np.ndarray | jax.Array


class Slot:
    """The state of one name: its logical shape, the dtype it is computed in, the state."""

    __slots__ = ("dtype", "shape", "state")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, state: Any):
        self.shape, self.dtype, self.state = shape, np.dtype(dtype), state


def check_lr(lr: Any, optional: bool, owner: str) -> float | None:
    """`lr` as a float; ValueError unless finite and >= 0 (None only where `optional`)."""
    if lr is None and optional:
        return None
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: lr must be a non-negative finite number, got {lr!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: lr must be a non-negative finite number, got {lr!r}")
    return value


def _jax_dtype_ok(dtype: np.dtype) -> bool:
    return jax.dtypes.canonicalize_dtype(dtype) == dtype


def check_item(
    slots: dict[str, Slot], name: Any, shape: Iterable[int], param: Array, grad: Array
) -> tuple[str, tuple[int, ...], Array, Array]:
    """Validate one ``step`` call; return ``(name, shape, param, grad)`` shaped for the
    transform (param and grad reshaped to `shape`, grad in the param's dtype)."""
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
    if not _jax_dtype_ok(param.dtype):
        raise ValueError(
            f"parameter {name!r}: param is {param.dtype}, which JAX holds only with "
            "jax.config.update('jax_enable_x64', True); enable it or pass float32"
        )
    size = math.prod(shape)
    if param.size != size or (param.shape != shape and param.ndim != 1):
        raise ValueError(
            f"parameter {name!r}: shape {shape} disagrees with the array's {param.shape}"
        )
    if grad.size != param.size:
        raise ValueError(
            f"parameter {name!r}: grad has {grad.size} elements, param has {param.size}"
        )
    if grad.shape not in (shape, param.shape) and grad.ndim != 1:
        raise ValueError(
            f"parameter {name!r}: grad has shape {grad.shape}, param has shape {shape} "
            "(a flat grad of that size is accepted, another shape is not reshaped)"
        )
    slot = slots.get(name)
    if slot is not None and (slot.shape != shape or slot.dtype != param.dtype):
        raise ValueError(
            f"parameter {name!r} was stepped with shape {slot.shape} {slot.dtype}, "
            f"now {shape} {param.dtype}"
        )
    if param.shape != shape:
        param = param.reshape(shape)
    if grad.dtype != param.dtype:
        # NumPy casts without JAX's truncation warning; a JAX grad is cast by JAX.
        grad = grad.astype(param.dtype)
    if grad.shape != shape:
        grad = grad.reshape(shape)
    return name, shape, param, grad


def buffer_key(x: Any) -> Any:
    try:
        return x.unsafe_buffer_pointer()
    except Exception:  # not a single-device array
        return id(x)


def write_back(param: Array, new: jax.Array) -> Array:
    """A NumPy `param` updated in place (and returned); else `new` in the param's shape."""
    if isinstance(param, np.ndarray):
        np.copyto(param, np.asarray(new).reshape(param.shape))
        return param
    return new.reshape(param.shape) if new.shape != param.shape else new
