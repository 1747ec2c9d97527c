"""The Flax NNX Trainer: steps, hooks, set_lr without recompiling, fit, bit-exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rlx_optax
from rlx_optax._src import trainer as trainer_module


class MLP(nnx.Module):
    def __init__(self, rngs, dropout=0.0):
        self.l1 = nnx.Linear(4, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.l1(x))))


def xent(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def toy_data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    return [(x[i], y[i]) for i in range(n)]


def injected_adamw(lr=1e-2):
    return optax.inject_hyperparams(rlx_optax.adamw)(learning_rate=lr)


def leaves(tree):
    def host(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [host(x) for x in jax.tree.leaves(tree)]


def test_steps_match_a_plain_optax_loop():
    graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
    tx = injected_adamw()
    opt_state = tx.init(params)
    trainer = rlx_optax.Trainer(MLP(nnx.Rngs(0)), tx, xent)
    batches = list(rlx_optax.DataLoader(toy_data(), 8))

    @jax.jit
    def plain_step(params, opt_state, batch):
        def loss(p):
            return xent(nnx.merge(graphdef, p, rest), batch)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    for batch in batches:
        params, opt_state, want = plain_step(params, opt_state, batch)
        got = trainer.train_step(batch)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for a, b in zip(leaves(nnx.state(trainer.model, nnx.Param)), leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def compiled_steps() -> int:
    """Programs compiled so far by every Trainer (they share one jitted step function)."""
    return trainer_module._jitted_step._cache_size()


def test_step_is_donated_and_compiled_once():
    tx = injected_adamw()
    before = compiled_steps()
    trainer = rlx_optax.Trainer(MLP(nnx.Rngs(0)), tx, xent)
    batch = next(iter(rlx_optax.DataLoader(toy_data(), 8)))
    trainer.train_step(batch)
    old_kernel = trainer.model.l1.kernel[...]
    trainer.train_step(batch)
    assert old_kernel.is_deleted()  # the state buffers were donated to the step
    assert compiled_steps() == before + 1
    # a second Trainer of the same model and transform (a resumed run) reuses the program
    again = rlx_optax.Trainer(MLP(nnx.Rngs(0)), tx, xent)
    again.train_step(batch)
    assert compiled_steps() == before + 1


def test_set_lr_takes_effect_without_recompiling():
    programs = compiled_steps()
    model = nnx.Linear(3, 1, use_bias=False, rngs=nnx.Rngs(0))
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    trainer = rlx_optax.Trainer(model, tx, lambda m, b: jnp.sum(m(b[0])))
    x = np.ones((1, 3), np.float32)
    for lr in [0.5, 0.25, 0.125, 0.0]:
        trainer.set_lr(lr)
        before = np.asarray(model.kernel[...]).copy()
        trainer.train_step((x,))
        # d(sum(x @ W))/dW = x^T = ones: SGD adds -lr to every weight (one float32 add).
        np.testing.assert_array_equal(np.asarray(model.kernel[...]), before + np.float32(-lr))
        assert trainer.lr == np.float32(lr)
    assert compiled_steps() == programs + 1


def test_set_lr_without_injection_raises_clearly():
    trainer = rlx_optax.Trainer(MLP(nnx.Rngs(0)), optax.adam(1e-3), xent)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        trainer.set_lr(1e-4)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        trainer.fit([], 1, scheduler=rlx_optax.StepLR(1e-3, 1), progress=False)
    scheduled = optax.inject_hyperparams(optax.adam)(learning_rate=optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="schedule"):
        rlx_optax.Trainer(MLP(nnx.Rngs(0)), scheduled, xent).set_lr(1e-4)


def test_epoch_avg_loss_is_weighted_by_batch_size():
    trainer = rlx_optax.Trainer(MLP(nnx.Rngs(0)), injected_adamw(0.0), xent)
    assert trainer.epoch_avg_loss() == 0.0  # no steps yet, as in RUMUS
    batches = list(rlx_optax.DataLoader(toy_data(10), 4))  # sizes 4, 4, 2
    losses = [float(trainer.train_step(b)) for b in batches]
    sizes = [len(b[1]) for b in batches]
    want = np.dot(np.array(losses, np.float64), sizes) / sum(sizes)
    np.testing.assert_allclose(trainer.epoch_avg_loss(), want, rtol=1e-6)
    assert abs(want - np.mean(losses)) > 1e-4  # the unweighted mean would differ
    trainer.reset_epoch()
    assert trainer.epoch_avg_loss() == 0.0


def test_hook_clips_like_the_logged_transform_and_returns_metrics():
    def clip_hook(grads):
        grads, norm = rlx_optax.clip_grad_norm(grads, 0.1)
        return grads, {"grad_norm": norm}

    before = compiled_steps()
    hooked = rlx_optax.Trainer(MLP(nnx.Rngs(0)), injected_adamw(), xent)
    tx = optax.chain(rlx_optax.clip_by_global_norm_logged(0.1), injected_adamw())
    chained = rlx_optax.Trainer(MLP(nnx.Rngs(0)), tx, xent)
    for batch in rlx_optax.DataLoader(toy_data(), 8):
        loss, metrics = hooked.train_step_with(clip_hook, batch)
        chained.train_step(batch)
        norm = optax.tree.get(chained.optimizer.opt_state, "norm")
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(norm[...]), rtol=1e-6)
        assert float(metrics["grad_norm"]) > 0.1  # the hook really clipped
    for a, b in zip(leaves(nnx.state(hooked.model)), leaves(nnx.state(chained.model)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert compiled_steps() == before + 2  # one program per trainer, whatever the batches


def test_has_aux_metrics():
    def loss_with_acc(model, batch):
        logits = model(batch[0])
        acc = jnp.mean(jnp.argmax(logits, -1) == batch[1])
        return xent(model, batch), {"accuracy": acc}

    trainer = rlx_optax.Trainer(MLP(nnx.Rngs(0)), injected_adamw(), loss_with_acc, has_aux=True)
    _, metrics = trainer.train_step_with(None, next(iter(rlx_optax.DataLoader(toy_data(), 8))))
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_fit_applies_the_scheduler_and_reports(capsys):
    before = compiled_steps()
    trainer = rlx_optax.Trainer(MLP(nnx.Rngs(0)), injected_adamw(0.05), xent, log_every=2)
    sched = rlx_optax.CosineAnnealingLR(0.05, t_max=3, eta_min=0.001, warmup_epochs=1)
    loader = rlx_optax.DataLoader(toy_data(), 8, shuffle=True, seed=1)
    seen = []

    def eval_fn(model):
        seen.append(trainer.lr)  # the rate the epoch just ran at
        return {"eval_loss": float(xent(model, next(iter(loader.iter_epoch(0)))))}

    def norm_hook(grads):
        return grads, {"grad_norm": rlx_optax.l2_norm(grads)}

    history = trainer.fit(loader, 5, scheduler=sched, eval_fn=eval_fn, hook=norm_hook)
    assert all(h["grad_norm"] > 0 for h in history)
    want = [sched.lr_at(e) for e in range(5)]
    np.testing.assert_allclose([h["lr"] for h in history], want, rtol=1e-15)
    np.testing.assert_allclose(seen, want, rtol=1e-6)  # applied to the optimizer (float32)
    assert [h["epoch"] for h in history] == list(range(5)) and trainer.epoch == 5
    assert sched.epoch == 5 and loader.epoch == 5
    assert history[-1]["loss"] < history[1]["loss"] and "eval_loss" in history[0]
    assert compiled_steps() == before + 1  # lr changes never recompile
    err = capsys.readouterr().err
    assert "epoch 4" in err and "loss=" in err and "it/s" in err


def train_run(tmp_path, split):
    """4 epochs with dropout, shuffle and a StepLR; with `split`, save after 2 and resume."""

    def make(seed):
        tx = optax.chain(rlx_optax.clip_by_global_norm_logged(1.0), injected_adamw(0.02))
        trainer = rlx_optax.Trainer(MLP(nnx.Rngs(seed), dropout=0.2), tx, xent)
        loader = rlx_optax.DataLoader(toy_data(), 6, shuffle=True, drop_last=True, seed=seed)
        return trainer, loader, rlx_optax.StepLR(0.02, 1, 0.5)

    trainer, loader, sched = make(0)
    if not split:
        return trainer, trainer.fit(loader, 4, sched, progress=False)
    history = trainer.fit(loader, 2, sched, progress=False)
    path = tmp_path / "ckpt"
    trainer.save(str(path), scheduler=sched, loader=loader)
    # A fresh process would start from other weights, rng state and counters.
    trainer, loader, sched = make(1)
    trainer.restore(str(path), scheduler=sched, loader=loader)
    return trainer, history + trainer.fit(loader, 2, sched, progress=False)


def test_resume_is_bit_exact(tmp_path):
    straight, history_a = train_run(tmp_path, split=False)
    resumed, history_b = train_run(tmp_path, split=True)
    assert [h["loss"] for h in history_a] == [h["loss"] for h in history_b]
    assert [h["lr"] for h in history_a] == [h["lr"] for h in history_b]
    for name, obj_a, obj_b in [
        ("model", straight.model, resumed.model),  # params and dropout rng state
        ("optimizer", straight.optimizer, resumed.optimizer),  # moments, counts, norm, lr
    ]:
        a, b = leaves(nnx.state(obj_a)), leaves(nnx.state(obj_b))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert resumed.epoch == 4


def test_save_refuses_to_overwrite(tmp_path):
    trainer = rlx_optax.Trainer(MLP(nnx.Rngs(0)), injected_adamw(), xent)
    trainer.save(str(tmp_path / "c"))
    with pytest.raises(ValueError):
        trainer.save(str(tmp_path / "c"))
    trainer.save(str(tmp_path / "c"), force=True)


# --------------------------------------------------------------------------- update_kwargs


def _plain_loop(tx, batches, kwargs_fn, keep_previous=False, seed=0):
    """The same training written by hand: jax.grad, tx.update(**kwargs), apply_updates."""
    graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
    opt_state = tx.init(params)
    previous = params

    @jax.jit
    def step(params, opt_state, previous, batch, k):
        def obj_fn(p):
            return xent(nnx.merge(graphdef, p, rest), batch)

        grads = jax.grad(obj_fn)(params)
        key = jax.random.fold_in(jax.random.key(seed), k)
        kwargs = kwargs_fn(obj_fn, params, grads, key, previous)
        updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
        return optax.apply_updates(params, updates), opt_state, params

    for k, batch in enumerate(batches):
        params, opt_state, prev = step(params, opt_state, previous, batch, k)
        previous = prev if keep_previous else params
    return params


_CASES = {
    "sophia_hessian_diag": (
        lambda: rlx_optax.sophia(0.05),
        lambda c: {"hessian_diag": rlx_optax.hutchinson_diag(c.obj_fn, c.params, c.key)},
        lambda f, p, g, k, prev: {"hessian_diag": rlx_optax.hutchinson_diag(f, p, k)},
        False,
    ),
    "sophia_estimator": (
        lambda: rlx_optax.sophia(
            0.05, hessian_estimator=rlx_optax.hutchinson_diag, update_interval=2
        ),
        lambda c: {"obj_fn": c.obj_fn, "key": c.key},
        lambda f, p, g, k, prev: {"obj_fn": f, "key": k},
        False,
    ),
    "mars_exact": (
        lambda: rlx_optax.mars(0.01, exact=True),
        lambda c: {"previous_grads": jax.grad(c.obj_fn)(c.previous_params)},
        lambda f, p, g, k, prev: {"previous_grads": jax.grad(f)(prev)},
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_update_kwargs_train_sophia_and_mars_exact_like_a_plain_loop(case):
    make_tx, ctx_fn, plain_fn, keep = _CASES[case]
    batches = list(rlx_optax.DataLoader(toy_data(), 8))
    trainer = rlx_optax.Trainer(
        MLP(nnx.Rngs(0)), make_tx(), xent, update_kwargs=ctx_fn, keep_previous_params=keep
    )
    start = leaves(nnx.state(trainer.model, nnx.Param))
    for batch in batches:
        trainer.train_step(batch)
    want = _plain_loop(make_tx(), batches, plain_fn, keep_previous=keep)
    got = leaves(nnx.state(trainer.model, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(got, start, strict=True))
    for a, b in zip(got, leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_mars_exact_without_previous_grads_fails_clearly_and_bad_update_kwargs():
    trainer = rlx_optax.Trainer(MLP(nnx.Rngs(0)), rlx_optax.mars(0.01, exact=True), xent)
    batch = next(iter(rlx_optax.DataLoader(toy_data(), 8)))
    with pytest.raises(ValueError, match="previous_grads"):
        trainer.train_step(batch)
    with pytest.raises(ValueError, match="update_kwargs"):
        rlx_optax.Trainer(MLP(nnx.Rngs(0)), injected_adamw(), xent, update_kwargs=3)
    with pytest.raises(ValueError, match="keep_previous_params"):
        rlx_optax.Trainer(MLP(nnx.Rngs(0)), injected_adamw(), xent, keep_previous_params=True)
