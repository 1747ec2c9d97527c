"""A short training loop for Flax NNX: RUMUS's `Trainer`, on `nnx.Optimizer`, `jax.jit`, orbax.

Flax has the parts (`nnx.Optimizer`, `nnx.value_and_grad`) but no loop. This module is the
glue: one jitted, donated step per batch, the epoch loss kept on the device, gradient hooks,
epoch schedulers applied for the user, a progress bar, and orbax checkpoints.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlx_optax._src import common, schedules

Hook = Callable[[Any], tuple[Any, dict[str, Any]]]


class UpdateContext(NamedTuple):
    """What `Trainer`'s ``update_kwargs(ctx)`` sees inside the jitted step.

    Attributes:
      obj_fn: ``obj_fn(params) -> loss`` of the current batch as a function of the trained
        variables (an `nnx.State` like `params`): what Sophia's estimators and MARS-exact need.
      params: the trained variables before this update.
      grads: the gradients of this step (after the hook).
      key: a PRNG key for this step, ``fold_in(key(seed), optimizer step)``.
      previous_params: the trained variables before the previous update (the current ones at
        the first step); None unless the Trainer was built with ``keep_previous_params=True``.
      batch: the current batch.
    """

    obj_fn: Callable[[Any], jax.Array]
    params: Any
    grads: Any
    key: jax.Array
    previous_params: Any
    batch: Any


UpdateKwargs = Callable[[UpdateContext], dict[str, Any]]


def _step(graphdef, loss_fn, wrt, has_aux, hook, extra, state, batch, sums, aux):
    """One update, pure: (state, batch, (loss_sum, count), aux) -> (state, loss, sums, metrics,
    aux); `aux` is ``(seed key, previous params or None)``."""
    model, optimizer = nnx.merge(graphdef, state)
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)
    out, grads = grad_fn(model, batch)
    loss, metrics = out if has_aux else (out, {})
    if hook is not None:
        grads, extra_metrics = hook(grads)
        metrics = {**metrics, **extra_metrics}
    kwargs = {}
    seed, previous = aux
    if extra is not None:
        mgraph, params, rest = nnx.split(model, wrt, ...)

        def obj_fn(p):
            value = loss_fn(nnx.merge(mgraph, p, rest), batch)
            return value[0] if has_aux else value

        key = jax.random.fold_in(seed, optimizer.step[...])
        prev = params if previous is None else previous
        ctx = UpdateContext(obj_fn, params, grads, key, prev, batch)
        kwargs = extra(ctx)
        if previous is not None:
            previous = jax.tree.map(jnp.copy, params)
    optimizer.update(model, grads, **kwargs)
    n = jax.tree.leaves(batch)[0].shape[0]  # static: the batch size
    sums = (sums[0] + loss.astype(jnp.float32) * n, sums[1] + n)
    return nnx.state((model, optimizer)), loss, sums, metrics, (seed, previous)


# One compiled step per distinct (graph, loss, filter, hook, extra): a second Trainer of the same
# model and transform (the usual way to resume from a checkpoint) reuses the compiled program.
# Donated: the model/optimizer state, the loss sums and the previous parameters.
_jitted_step = jax.jit(_step, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(6, 8, 9))


class Trainer:
    """Train a Flax NNX model with an optax transform (RUMUS's `Trainer`, plus a loop).

    Args:
      model: an `nnx.Module`; updated in place by every step.
      tx: an optax transform. Build it with `optax.inject_hyperparams` (for example
        ``optax.inject_hyperparams(rlx_optax.adamw)(learning_rate=3e-4)``) to use `set_lr` or
        a scheduler; otherwise those raise a ValueError rather than silently doing nothing.
      loss_fn: ``loss_fn(model, batch) -> scalar loss`` (or ``(loss, metrics_dict)`` with
        ``has_aux=True``). Traced once per batch shape.
      wrt: which variables are trained (an `nnx` filter), as in `nnx.Optimizer`.
      has_aux: `loss_fn` also returns a dict of metrics.
      log_every: `fit` refreshes the progress bar (one host sync) every this many steps.
      update_kwargs: ``fn(ctx: UpdateContext) -> dict`` of extra keyword arguments for the
        transform's ``update``, built inside the jitted step: Sophia with an estimate
        (``lambda c: {"hessian_diag": rlx_optax.hutchinson_diag(c.obj_fn, c.params,
        c.key)}``) or its built-in estimator (``lambda c: {"obj_fn": c.obj_fn, "key":
        c.key}``), MARS-exact (``lambda c: {"previous_grads":
        jax.grad(c.obj_fn)(c.previous_params)}`` with ``keep_previous_params=True``).
      keep_previous_params: keep a copy of the trained variables before each update, for
        ``ctx.previous_params`` (one more copy of the parameters).
      seed: seed of ``ctx.key``.

    Attributes: ``model``, ``optimizer`` (the `nnx.Optimizer`), ``epoch`` (epochs finished by
    `fit`). The loss is summed on the device, weighted by batch size (the first axis of the
    first leaf of the batch), so steps never wait for the host; `epoch_avg_loss` syncs once.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax, rlx_optax
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> def mse(model, batch):
      ...     x, y = batch
      ...     return jnp.mean((model(x) - y) ** 2)
      >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> trainer = rlx_optax.Trainer(model, tx, mse)
      >>> x = np.ones((8, 2), np.float32); y = np.full((8, 1), 3.0, np.float32)
      >>> losses = [float(trainer.train_step((x, y))) for _ in range(20)]
      >>> losses[-1] < 1e-3 < losses[0]
      True
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        loss_fn: Callable[..., Any],
        *,
        wrt: Any = nnx.Param,
        has_aux: bool = False,
        log_every: int = 10,
        update_kwargs: UpdateKwargs | None = None,
        keep_previous_params: bool = False,
        seed: int = 0,
    ):
        common.check_positive_int("log_every", log_every)
        if update_kwargs is not None and not callable(update_kwargs):
            raise ValueError("update_kwargs must be a callable ctx -> dict, or None")
        if keep_previous_params and update_kwargs is None:
            raise ValueError("keep_previous_params=True is only used by update_kwargs: pass it")
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=wrt)
        self.loss_fn = loss_fn
        self.wrt = wrt
        self.has_aux = has_aux
        self.log_every = log_every
        self.update_kwargs = update_kwargs
        self.epoch = 0
        self._compiled: dict[Any, Callable] = {}
        previous = None
        if keep_previous_params:
            previous = jax.tree.map(jnp.copy, nnx.state(model, wrt))
        self._aux = (jax.random.key(seed), previous)
        self.reset_epoch()

    # ----------------------------------------------------------------- steps
    def _compiled_step(self, hook: Hook | None) -> Callable:
        if hook not in self._compiled:
            graphdef = nnx.graphdef((self.model, self.optimizer))
            self._compiled[hook] = functools.partial(
                _jitted_step,
                graphdef,
                self.loss_fn,
                self.wrt,
                self.has_aux,
                hook,
                self.update_kwargs,
            )
        return self._compiled[hook]

    def train_step_with(self, hook: Hook | None, batch: Any) -> tuple[jax.Array, dict[str, Any]]:
        """One step where ``hook(grads) -> (grads, metrics)`` runs inside the jitted step.

        The hook sees the gradients (an `nnx.State` shaped like the trained variables) before
        the optimizer and may transform them, for example clip and log the norm::

            def clip(grads):
                grads, norm = rlx_optax.clip_grad_norm(grads, 1.0)
                return grads, {"grad_norm": norm}

        Each distinct hook object compiles once (pass the same function every step).
        Returns ``(loss, metrics)`` as device arrays (no host sync).
        """
        state = nnx.state((self.model, self.optimizer))
        step = self._compiled_step(hook)
        state, loss, self._sums, metrics, self._aux = step(state, batch, self._sums, self._aux)
        nnx.update((self.model, self.optimizer), state)
        return loss, metrics

    def train_step(self, batch: Any) -> jax.Array:
        """One jitted, donated step on `batch`; returns the loss as a device scalar."""
        return self.train_step_with(None, batch)[0]

    # ----------------------------------------------------------------- epoch bookkeeping
    def reset_epoch(self) -> None:
        """Zero the running loss (`fit` calls it at the start of every epoch)."""
        self._sums = (jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32))

    def epoch_avg_loss(self) -> float:
        """Mean loss per item since `reset_epoch`, weighted by batch size; 0.0 with no steps.

        (RUMUS averages per step, so its short final batch weighs as much as a full one.)
        """
        total, count = jax.device_get(self._sums)
        return float(total / count) if count else 0.0

    # ----------------------------------------------------------------- learning rate
    @property
    def lr(self) -> float:
        """The current injected learning rate."""
        node = schedules.injected_states(self.optimizer.opt_state)[0]
        return float(node.hyperparams["learning_rate"][...])

    def set_lr(self, lr: float) -> None:
        """Set the learning rate without recompiling (see `tx` about `inject_hyperparams`)."""
        common.check_learning_rate(lr, "lr")
        for node in schedules.injected_states(self.optimizer.opt_state):
            variable = node.hyperparams["learning_rate"]
            variable[...] = jnp.asarray(lr, variable[...].dtype)

    # ----------------------------------------------------------------- the loop
    def fit(
        self,
        loader: Iterable[Any],
        epochs: int,
        scheduler: schedules.EpochScheduler | None = None,
        eval_fn: Callable[[nnx.Module], dict[str, Any]] | None = None,
        *,
        hook: Hook | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Train for `epochs` more epochs; return one record per epoch.

        Per epoch: apply ``scheduler.get_lr()`` (if given) with `set_lr`, `reset_epoch`, one
        `train_step_with(hook, batch)` per batch of ``iter(loader)`` with a tqdm bar showing
        the running loss, the rate and steps per second, then ``scheduler.step()`` and
        ``eval_fn(model)``. Records are ``{"epoch", "loss", "lr", **metrics, **eval}``: the
        batch-size-weighted mean loss, the last step's hook/aux metrics, `eval_fn`'s dict.
        `loader` is iterated once per epoch, so a `rlx_optax.DataLoader` reshuffles each time.
        """
        from tqdm.auto import tqdm

        common.check_positive_int("epochs", epochs)
        history = []
        for _ in range(epochs):
            if scheduler is not None:
                self.set_lr(scheduler.get_lr())
            self.reset_epoch()
            total = len(loader) if hasattr(loader, "__len__") else None
            bar = tqdm(total=total, desc=f"epoch {self.epoch}", disable=not progress)
            metrics: dict[str, Any] = {}
            for i, batch in enumerate(loader):
                _, metrics = self.train_step_with(hook, batch)
                bar.update()
                if (i + 1) % self.log_every == 0:
                    bar.set_postfix(loss=f"{self.epoch_avg_loss():.4g}")
            record = {"epoch": self.epoch, "loss": self.epoch_avg_loss()}
            record.update({k: jax.device_get(v) for k, v in metrics.items()})  # last step's
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            bar.close()
            if scheduler is not None:
                record["lr"] = scheduler.get_lr()
                scheduler.step()
            if eval_fn is not None:
                record.update(eval_fn(self.model))
            self.epoch += 1
            history.append(record)
        return history

    # ----------------------------------------------------------------- checkpoints
    def _pure_state(self) -> dict[str, Any]:
        return {
            "model": nnx.to_pure_dict(nnx.state(self.model)),
            "optimizer": nnx.to_pure_dict(nnx.state(self.optimizer)),
        }

    def save(self, directory: str, *, scheduler=None, loader=None, force: bool = False) -> None:
        """Save model, optimizer state and the epoch counter with orbax (synchronously).

        `scheduler` and `loader` (anything with `state_dict`) are saved beside them as JSON, so
        `restore` continues the same learning rates and data order. `directory` must not exist
        unless ``force=True``.
        """
        import orbax.checkpoint as ocp

        meta = {
            "epoch": self.epoch,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "loader": loader.state_dict() if loader is not None else None,
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(self._pure_state()), meta=ocp.args.JsonSave(meta)
        )
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(os.path.abspath(directory), args, force=force)

    def restore(self, directory: str, *, scheduler=None, loader=None) -> None:
        """Load what `save` wrote into this trainer (same model and `tx` structure)."""
        import orbax.checkpoint as ocp

        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, self._pure_state())
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(os.path.abspath(directory), args)
        for obj, key in ((self.model, "model"), (self.optimizer, "optimizer")):
            state = nnx.state(obj)
            nnx.replace_by_pure_dict(state, restored.state[key])
            nnx.update(obj, state)
        meta = restored.meta
        self.epoch = meta["epoch"]
        if scheduler is not None and meta["scheduler"] is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if loader is not None and meta["loader"] is not None:
            loader.load_state_dict(meta["loader"])
