"""Epoch-style learning-rate schedulers (RUMUS's `StepLR`, `CosineAnnealingLR`) over optax.

optax schedules are pure functions of the optimizer's step count, evaluated inside `jax.jit`.
Users coming from RUMUS or PyTorch think per epoch instead: a host-side object whose `step()`
is called once per epoch and whose `get_lr()` is handed to the optimizer. This module gives
both views of one schedule:

* the epoch object (`step`, `get_lr`, `set_initial_lr`, `state_dict`/`load_state_dict`), which
  must be *applied* to the optimizer state (`apply`, or `rlx_optax.Trainer.fit` does it): the
  learning rate lives in the state of an `optax.inject_hyperparams` transform, so writing a new
  value never recompiles the jitted step;
* `as_schedule(steps_per_epoch)`, the equivalent optax schedule for users who stay inside jit.

Unlike RUMUS, applying a scheduler to a state without an injected learning rate raises instead
of doing nothing.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlx_optax._src import common

_STATE_TYPES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _is_injected(node: Any) -> bool:
    return isinstance(node, _STATE_TYPES)


def injected_states(opt_state: Any, name: str = "learning_rate") -> list[Any]:
    """Every `optax.inject_hyperparams` state in `opt_state` that holds a settable `name`.

    Raises a ValueError when there is none, or when `name` was injected as a schedule (optax
    recomputes it from the step count on every update, so a written value would be overwritten:
    a silent no-op).
    """
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(n)]
    found = [n for n in found if name in n.hyperparams or name in n.hyperparams_states]
    if not found:
        raise ValueError(
            f"the optimizer state has no injected {name!r}: build the optimizer with "
            f"optax.inject_hyperparams, e.g. optax.inject_hyperparams(optax.adamw)"
            f"(learning_rate=1e-3), so the value can change without recompiling"
        )
    for node in found:
        if name in node.hyperparams_states:
            raise ValueError(
                f"{name!r} was injected as a schedule, so optax recomputes it every step and a "
                f"written value would be ignored; inject a number instead"
            )
    return found


def set_learning_rate(opt_state: Any, learning_rate: float) -> Any:
    """Return `opt_state` with every injected learning rate set to `learning_rate`.

    The value is written as a scalar of the dtype already stored (float32 by default), so a
    jitted step that takes the state as an argument is not retraced.

    Example:
      >>> import jax.numpy as jnp, optax, rlx_optax
      >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> state = rlx_optax.set_learning_rate(tx.init(jnp.zeros(2)), 0.05)
      >>> state.hyperparams["learning_rate"]
      Array(0.05, dtype=float32)
    """
    common.check_learning_rate(learning_rate)
    injected_states(opt_state)

    def write(node: Any) -> Any:
        if not _is_injected(node) or "learning_rate" not in node.hyperparams:
            return node
        old = jnp.asarray(node.hyperparams["learning_rate"])
        value = jnp.asarray(learning_rate, dtype=old.dtype)
        return node._replace(hyperparams={**node.hyperparams, "learning_rate": value})

    return jax.tree.map(write, opt_state, is_leaf=_is_injected)


class EpochScheduler:
    """Base of the epoch schedulers: an epoch counter, optional linear warmup, the glue.

    Epoch `e` (0-based, the number of `step()` calls so far) runs at `lr_at(e)`. With
    ``warmup_epochs = W > 0`` epochs ``e < W`` run at
    ``warmup_start_lr + (initial_lr - warmup_start_lr) * e / W`` and the decay starts at epoch
    W as if from epoch 0 (`optax.join_schedules` of `optax.linear_schedule` and the decay).
    Subclasses give the decay twice: `_decay_lr` on the host (float64) and `_decay_schedule`
    as an optax schedule over the epoch index.
    """

    def __init__(self, initial_lr: float, *, warmup_epochs: int = 0, warmup_start_lr: float = 0.0):
        common.check_learning_rate(initial_lr, "initial_lr")
        if warmup_epochs != 0:
            common.check_positive_int("warmup_epochs", warmup_epochs)
        common.check_learning_rate(warmup_start_lr, "warmup_start_lr")
        self.initial_lr = float(initial_lr)
        self.warmup_epochs = warmup_epochs
        self.warmup_start_lr = float(warmup_start_lr)
        self.epoch = 0

    # ----------------------------------------------------------------- subclass hooks
    def _decay_lr(self, epoch: int) -> float:
        raise NotImplementedError

    def _decay_schedule(self) -> optax.Schedule:
        raise NotImplementedError

    # ----------------------------------------------------------------- the RUMUS trait
    def step(self) -> None:
        """Advance one epoch (call at the end of each epoch)."""
        self.epoch += 1

    def get_lr(self) -> float:
        """The learning rate of the current epoch."""
        return self.lr_at(self.epoch)

    def set_initial_lr(self, lr: float) -> None:
        """Change the base (peak) rate; the current epoch's rate is recomputed from it."""
        common.check_learning_rate(lr, "lr")
        self.initial_lr = float(lr)

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch `epoch` (0-based), without changing the counter."""
        w = self.warmup_epochs
        if epoch < w:
            return self.warmup_start_lr + (self.initial_lr - self.warmup_start_lr) * epoch / w
        return self._decay_lr(epoch - w)

    # ----------------------------------------------------------------- glue
    def apply(self, opt_state: Any) -> Any:
        """Return `opt_state` with the current rate written in (see `set_learning_rate`)."""
        return set_learning_rate(opt_state, self.get_lr())

    def as_schedule(self, steps_per_epoch: int = 1) -> optax.Schedule:
        """The optax schedule equal to this scheduler from epoch 0: ``count -> lr_at(count //
        steps_per_epoch)`` (the current `initial_lr` is used; the epoch counter is not).

        `steps_per_epoch` is the loader's number of batches (``len(loader)``: ⌊N/B⌋ with
        `drop_last`, ⌈N/B⌉ without).
        """
        common.check_positive_int("steps_per_epoch", steps_per_epoch)
        epoch_schedule = self._decay_schedule()
        if self.warmup_epochs:
            warmup = optax.linear_schedule(
                self.warmup_start_lr, self.initial_lr, self.warmup_epochs
            )
            epoch_schedule = optax.join_schedules([warmup, epoch_schedule], [self.warmup_epochs])
        return lambda count: epoch_schedule(jnp.asarray(count) // steps_per_epoch)

    def state_dict(self) -> dict[str, Any]:
        """The mutable state (epoch, initial_lr) as plain Python numbers (JSON-friendly)."""
        return {"epoch": self.epoch, "initial_lr": self.initial_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.epoch = int(state["epoch"])
        self.initial_lr = float(state["initial_lr"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epoch={self.epoch}, lr={self.get_lr():.6g})"


class StepLR(EpochScheduler):
    r"""Multiply the rate by `gamma` every `step_size` epochs (RUMUS's and PyTorch's `StepLR`).

    .. math::
      \eta_e = \eta_0 \, \gamma^{\lfloor e / s \rfloor}

    computed as a power (RUMUS keeps a running float32 product, about 6e-7 relative away after
    200 decays). `as_schedule` is `optax.exponential_decay(..., staircase=True)`.

    Example:
      >>> import rlx_optax
      >>> sched = rlx_optax.StepLR(0.1, step_size=2, gamma=0.5)
      >>> lrs = []
      >>> for _ in range(5):
      ...     lrs.append(sched.get_lr()); sched.step()
      >>> lrs
      [0.1, 0.1, 0.05, 0.05, 0.025]
    """

    def __init__(
        self,
        initial_lr: float,
        step_size: int,
        gamma: float = 0.1,
        *,
        warmup_epochs: int = 0,
        warmup_start_lr: float = 0.0,
    ):
        common.check_positive_int("step_size", step_size)
        common.check_non_negative("gamma", gamma)
        super().__init__(initial_lr, warmup_epochs=warmup_epochs, warmup_start_lr=warmup_start_lr)
        self.step_size = step_size
        self.gamma = float(gamma)

    def _decay_lr(self, epoch: int) -> float:
        return self.initial_lr * self.gamma ** (epoch // self.step_size)

    def _decay_schedule(self) -> optax.Schedule:
        return optax.exponential_decay(self.initial_lr, self.step_size, self.gamma, staircase=True)


class CosineAnnealingLR(EpochScheduler):
    r"""Cosine from `initial_lr` down to `eta_min` over `t_max` epochs, then `eta_min`.

    .. math::
      \eta_e = \eta_{\min} + \tfrac12(\eta_0 - \eta_{\min})\bigl(1 + \cos(\pi e / T)\bigr)
      \quad (e < T), \qquad \eta_e = \eta_{\min} \quad (e \ge T)

    RUMUS's closed form: clamped, no restarts (PyTorch's chainable form rises again after
    `t_max`; use `optax.sgdr_schedule` for restarts). `eta_min` is absolute, not optax's
    ratio `alpha`, so `initial_lr = 0` works too.

    Example:
      >>> import rlx_optax
      >>> sched = rlx_optax.CosineAnnealingLR(1.0, t_max=2, eta_min=0.0)
      >>> [sched.lr_at(e) for e in range(4)]
      [1.0, 0.5, 0.0, 0.0]
    """

    def __init__(
        self,
        initial_lr: float,
        t_max: int,
        eta_min: float = 0.0,
        *,
        warmup_epochs: int = 0,
        warmup_start_lr: float = 0.0,
    ):
        common.check_positive_int("t_max", t_max)
        common.check_learning_rate(eta_min, "eta_min")
        super().__init__(initial_lr, warmup_epochs=warmup_epochs, warmup_start_lr=warmup_start_lr)
        self.t_max = t_max
        self.eta_min = float(eta_min)

    def _decay_lr(self, epoch: int) -> float:
        if epoch >= self.t_max:
            return self.eta_min
        cosine = 1.0 + math.cos(math.pi * epoch / self.t_max)
        return self.eta_min + 0.5 * (self.initial_lr - self.eta_min) * cosine

    def _decay_schedule(self) -> optax.Schedule:
        # optax's alpha is a ratio of init_value; decaying the span above eta_min instead keeps
        # an absolute floor and allows initial_lr == 0.
        span = optax.cosine_decay_schedule(self.initial_lr - self.eta_min, self.t_max)
        eta_min = self.eta_min
        return lambda epoch: eta_min + span(epoch)
