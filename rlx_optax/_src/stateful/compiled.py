"""The compiled per-name step of the stateful API: one pure transform, jitted.

`Compiled` wraps the pure transform of one configuration in `optax.inject_hyperparams` with
every hyperparameter static except the learning rate, which is data (``set_lr`` never
recompiles). A step is ``tx.update`` followed by ``optax.apply_updates`` in one jitted call:
bit for bit what a jitted train step of the pure transform computes for one tensor
(``tests/test_stateful_pure.py``).
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import registry

# State fields that count updates (Adafactor's step size keeps its own ``step_count``).
_COUNTERS = ("count", "step_count")


def with_step(tree: Any, step: jax.Array) -> Any:
    """`tree` with every NamedTuple counter field (`_COUNTERS`) set to the global step."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(
            *(
                step.astype(v.dtype) if f in _COUNTERS else with_step(v, step)
                for f, v in zip(tree._fields, tree, strict=True)
            )
        )
    if isinstance(tree, (tuple, list)):
        return type(tree)(with_step(v, step) for v in tree)
    if isinstance(tree, dict):
        return {k: with_step(v, step) for k, v in tree.items()}
    return tree


def take_fields(tree: Any, source: Any, fields: tuple[str, ...]) -> Any:
    """`tree` with the NamedTuple fields in `fields` taken from `source` (same structure)."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(
            *(
                s if f in fields else take_fields(v, s, fields)
                for f, v, s in zip(tree._fields, tree, source, strict=True)
            )
        )
    if isinstance(tree, (tuple, list)):
        return type(tree)(take_fields(v, s, fields) for v, s in zip(tree, source, strict=True))
    if isinstance(tree, dict):
        return {k: take_fields(v, source[k], fields) for k, v in tree.items()}
    return tree


def own_buffers(state: Any, *inputs: Any) -> Any:
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


class Compiled:
    """The transform of one configuration and its jitted step and batch functions."""

    def __init__(self, row: registry.Algorithm, kwargs: dict[str, Any]):
        row.factory(**kwargs)  # validates the hyperparameters (inject_hyperparams defers it)
        static = [p for p in inspect.signature(row.factory).parameters if p != "learning_rate"]
        self.injected = kwargs.get("learning_rate") is not None
        if not self.injected:
            static.append("learning_rate")
        # The learning rate is data at the parameter's precision (inject_hyperparams casts it
        # to the parameter dtype when hyperparam_dtype is None), as a Python float is in the
        # pure transform: float32 for float32 params, float64 for float64 ones.
        self.tx = optax.inject_hyperparams(row.factory, static_args=tuple(static))(**kwargs)
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
            state = with_step(state, step)
        if self.injected:
            hyper = {**state.hyperparams, "learning_rate": lr}
            state = state._replace(hyperparams=hyper)
        updates, state = self.tx.update(grad, state, param)
        # (state, param) in the order of the arguments: donated buffers are matched to outputs
        # by shape in order, so any other order makes XLA copy every moment.
        return own_buffers(state, param, grad, step, lr), optax.apply_updates(param, updates)

    def _step(self, state, param, grad, step, lr, fresh):
        # fresh: the tensor's first step, at a global step > 0.
        if fresh and self.counted and self.first_sight:
            first, _ = self._update(state, param, grad, jnp.zeros_like(step), lr)
            state = take_fields(state, first, self.first_sight)
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


_CACHE: dict[Any, Compiled] = {}


def compiled(row: registry.Algorithm, kwargs: dict[str, Any]) -> Compiled:
    """The shared `Compiled` of a configuration (one per distinct hashable `kwargs`)."""
    key = (row.name, tuple(sorted(kwargs.items())))
    try:
        hit = _CACHE.get(key)
    except TypeError:  # an unhashable value: compile for this object only
        return Compiled(row, kwargs)
    if hit is None:
        hit = _CACHE[key] = Compiled(row, kwargs)
    return hit
