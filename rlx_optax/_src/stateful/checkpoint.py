"""``state_dict`` / ``load_state_dict`` of the stateful API.

The nested form is ``{"algorithm": crate name, "step": int, "tensors": {name: {"shape",
"dtype", "state": {path: array}}}}``. `flatten` turns it into a flat mapping of NumPy arrays
that ``np.savez`` writes and ``np.load`` reads back; `load` accepts either form. A state is
validated completely before anything is replaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlx_optax._src.stateful.checks import Slot

_HYPER = ".hyperparams"  # the injected learning rate: rewritten before every update
_FLAT_MARK = "__rlx_optax_state__"


def state_leaves(state: Any) -> dict[str, Any]:
    """The state's leaves keyed by their path, without the injected hyperparameters."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    out = {jax.tree_util.keystr(path): leaf for path, leaf in leaves}
    return {k: v for k, v in out.items() if not k.startswith(_HYPER)}


def nested(algorithm: str, step: int, slots: Mapping[str, Slot]) -> dict[str, Any]:
    return {
        "algorithm": algorithm,
        "step": step,
        "tensors": {
            name: {
                "shape": slot.shape,
                "dtype": slot.dtype.name,
                "state": {k: np.array(v) for k, v in state_leaves(slot.state).items()},
            }
            for name, slot in sorted(slots.items())
        },
    }


def flatten(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The nested state as ``{key: ndarray}`` for ``np.savez`` (tensor names may hold any
    character: they are stored in one array and referred to by index)."""
    names = list(state["tensors"])
    out = {
        _FLAT_MARK: np.array(1),
        "algorithm": np.array(state["algorithm"]),
        "step": np.array(state["step"], np.int64),
        "names": np.array(names, dtype=str) if names else np.zeros(0, "<U1"),
    }
    for i, name in enumerate(names):
        t = state["tensors"][name]
        out[f"{i}/shape"] = np.array(t["shape"], np.int64)
        out[f"{i}/dtype"] = np.array(t["dtype"])
        for key, value in t["state"].items():
            out[f"{i}/state{key}"] = np.asarray(value)
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    names = [str(n) for n in np.asarray(flat["names"]).reshape(-1)]
    tensors = {}
    for i, name in enumerate(names):
        prefix = f"{i}/state"
        tensors[name] = {
            "shape": tuple(int(s) for s in np.asarray(flat[f"{i}/shape"]).reshape(-1)),
            "dtype": str(np.asarray(flat[f"{i}/dtype"])),
            "state": {k[len(prefix) :]: flat[k] for k in flat if k.startswith(prefix)},
        }
    return {
        "algorithm": str(np.asarray(flat["algorithm"])),
        "step": np.asarray(flat["step"]),
        "tensors": tensors,
    }


def load(
    owner: str,
    algorithm: str,
    init: Any,
    state: Any,
    known: Mapping[str, Slot],
    strict: bool,
) -> tuple[int, dict[str, Slot]]:
    """Validate `state` against this optimizer; return ``(step, slots)``, or raise ValueError
    naming what is wrong (nothing is changed by the caller until this returns)."""
    where = f"{owner}.load_state_dict"
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: expected the mapping of state_dict(), got {type(state)}")
    if _FLAT_MARK in state:
        try:
            state = _unflatten(state)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{where}: a malformed flat state ({err})") from None
    missing = [k for k in ("algorithm", "step", "tensors") if k not in state]
    if missing:
        raise ValueError(f"{where}: the state has no {missing} entry")
    if state["algorithm"] != algorithm:
        raise ValueError(f"{where}: the state is from {state['algorithm']!r}, not {owner}")
    step = np.asarray(state["step"])
    if step.shape != () or not np.issubdtype(step.dtype, np.integer) or int(step) < 0:
        raise ValueError(f"{where}: step must be a non-negative integer, got {state['step']!r}")
    tensors = state["tensors"]
    if not isinstance(tensors, Mapping):
        raise ValueError(f"{where}: tensors must be a mapping name -> tensor state")
    slots = {}
    for name, saved in tensors.items():
        slots[name] = _slot(where, init, name, saved, known.get(name))
    if strict and known and set(tensors) != set(known):
        raise ValueError(
            f"{where}: the state holds tensors {sorted(tensors)}, this optimizer "
            f"{sorted(known)} (load_state_dict(state, strict=False) replaces them anyway)"
        )
    return int(step), slots


def _slot(where: str, init: Any, name: str, saved: Any, known: Slot | None) -> Slot:
    try:
        shape = tuple(int(s) for s in saved["shape"])
        dtype = np.dtype(saved["dtype"])
        entries = saved["state"]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: tensor {name!r} needs shape, dtype and state ({err})") from None
    if known is not None and known.shape != shape:
        raise ValueError(
            f"{where}: parameter {name!r} has shape {known.shape}, the state is for shape {shape}"
        )
    template = jax.eval_shape(init, jax.ShapeDtypeStruct(shape, dtype))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(p) for p, _ in leaves]
    expected = [k for k in keys if not k.startswith(_HYPER)]
    if set(expected) != set(entries):
        raise ValueError(
            f"{where}: the state of parameter {name!r} does not match (expected entries "
            f"{expected}, got {sorted(entries)})"
        )
    values = []
    for key, (_, like) in zip(keys, leaves, strict=True):
        if key.startswith(_HYPER):
            values.append(jnp.zeros(like.shape, like.dtype))
            continue
        value = np.asarray(entries[key])
        if value.shape != like.shape or value.dtype != like.dtype:
            raise ValueError(
                f"{where}: {name!r}{key} is {value.dtype}{value.shape}, "
                f"expected {like.dtype}{like.shape}"
            )
        values.append(jnp.array(value, copy=True))
    return Slot(shape, dtype, jax.tree.unflatten(treedef, values))
