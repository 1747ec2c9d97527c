"""Epoch schedulers against RUMUS's formulas (spec §1.5) and optax's schedules as oracles."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax

F32_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------- RUMUS transcriptions (f32)


class RumusStepLR:
    """RUMUS StepLR: a running float32 product, multiplied by gamma when e % step_size == 0."""

    def __init__(self, initial, step_size, gamma):
        self.initial, self.step_size, self.gamma = np.float32(initial), step_size, np.float32(gamma)
        self.lr, self.e = self.initial, 0

    def step(self):
        self.e += 1
        if self.e % self.step_size == 0:
            self.lr = np.float32(self.lr * self.gamma)

    def set_initial_lr(self, x):
        self.initial = np.float32(x)
        self.lr = np.float32(self.initial * self.gamma ** np.float32(self.e // self.step_size))


def rumus_cosine(initial, t_max, eta_min, e):
    """RUMUS CosineAnnealingLR after e steps, in float32 (e = 0 is the initial value)."""
    initial, eta_min = np.float32(initial), np.float32(eta_min)
    if e == 0:
        return initial
    if e >= t_max:
        return eta_min
    cos = np.float32(math.cos(math.pi * e / t_max))
    return np.float32(eta_min + np.float32(0.5) * (initial - eta_min) * (np.float32(1.0) + cos))


def epochs_of(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_lr())
        sched.step()
    return np.array(out)


# ---------------------------------------------------------------- StepLR


def test_steplr_page_example():
    # The RUMUS page: StepLR(0.1, 30, 0.1): epochs 0-29 at 0.1, 30-59 at 0.01, 60-89 at 0.001.
    lrs = epochs_of(rlx_optax.StepLR(0.1, 30, 0.1), 90)
    np.testing.assert_allclose(lrs[:30], 0.1, rtol=1e-15)
    np.testing.assert_allclose(lrs[30:60], 0.01, rtol=1e-15)
    np.testing.assert_allclose(lrs[60:], 0.001, rtol=1e-15)


@pytest.mark.parametrize(
    "initial, step_size, gamma, epochs", [(0.1, 30, 0.1, 90), (0.5, 3, 0.5, 60), (1.0, 1, 0.9, 400)]
)
def test_steplr_matches_rumus_running_product(initial, step_size, gamma, epochs):
    ours = epochs_of(rlx_optax.StepLR(initial, step_size, gamma), epochs)
    rumus = RumusStepLR(initial, step_size, gamma)
    theirs = []
    for _ in range(epochs):
        theirs.append(float(rumus.lr))
        rumus.step()
    decays = np.arange(epochs) // step_size
    # RUMUS rounds initial and gamma to float32 and then once per decay: the relative error
    # of its running product is at most about (2k + 1) float32 half-ulps after k decays.
    bound = (2 * decays + 1) * F32_EPS / 2 * 1.01
    rel = np.abs(np.array(theirs) - ours) / ours
    assert np.all(rel <= bound), float(np.max(rel / bound))


@pytest.mark.parametrize(
    "initial, step_size, gamma, epochs", [(0.1, 30, 0.1, 90), (0.5, 3, 0.5, 60), (1.0, 1, 0.9, 400)]
)
def test_steplr_matches_optax_exponential_decay(initial, step_size, gamma, epochs):
    ours = epochs_of(rlx_optax.StepLR(initial, step_size, gamma), epochs)
    oracle = optax.exponential_decay(initial, step_size, gamma, staircase=True)
    theirs = np.array([float(oracle(e)) for e in range(epochs)])
    # optax evaluates in float32: gamma rounded to float32 (its relative error compounds once
    # per decay), then one pow and one multiply (2 ulps).
    decays = np.arange(epochs) // step_size
    gamma_err = abs(float(np.float32(gamma)) / gamma - 1.0)
    bound = decays * gamma_err + 2 * F32_EPS
    rel = np.abs(theirs - ours) / ours
    assert np.all(rel <= bound), float(np.max(rel / bound))


def test_steplr_set_initial_lr_is_rumus():
    ours, rumus = rlx_optax.StepLR(0.1, 2, 0.5), RumusStepLR(0.1, 2, 0.5)
    for _ in range(5):
        ours.step()
        rumus.step()
    ours.set_initial_lr(1.0)
    rumus.set_initial_lr(1.0)
    for _ in range(6):
        np.testing.assert_allclose(ours.get_lr(), float(rumus.lr), rtol=4 * F32_EPS)
        ours.step()
        rumus.step()
    assert ours.get_lr() == 1.0 * 0.5 ** (11 // 2)


# ---------------------------------------------------------------- CosineAnnealingLR


@pytest.mark.parametrize(
    "initial, t_max, eta_min", [(0.1, 15, 1e-3), (3e-4, 100, 1e-6), (1.0, 7, 0.0)]
)
def test_cosine_matches_rumus_and_clamps(initial, t_max, eta_min):
    epochs = t_max + 10
    ours = epochs_of(rlx_optax.CosineAnnealingLR(initial, t_max, eta_min), epochs)
    theirs = np.array([float(rumus_cosine(initial, t_max, eta_min, e)) for e in range(epochs)])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=4 * F32_EPS * initial)
    # No restarts: eta_min exactly from t_max on.
    assert np.all(ours[t_max:] == eta_min)


@pytest.mark.parametrize(
    "initial, t_max, eta_min", [(0.1, 15, 1e-3), (3e-4, 100, 1e-6), (1.0, 7, 0.0)]
)
def test_cosine_matches_optax_cosine_decay(initial, t_max, eta_min):
    epochs = t_max + 10
    ours = epochs_of(rlx_optax.CosineAnnealingLR(initial, t_max, eta_min), epochs)
    oracle = optax.cosine_decay_schedule(initial, t_max, alpha=eta_min / initial)
    theirs = np.array([float(oracle(e)) for e in range(epochs)])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=4 * F32_EPS * initial)


def test_cosine_page_example_and_zero_initial():
    sched = rlx_optax.CosineAnnealingLR(0.1, 100, 1e-6)
    assert sched.get_lr() == 0.1
    assert sched.lr_at(50) == pytest.approx(1e-6 + 0.5 * (0.1 - 1e-6), rel=1e-12)
    assert sched.lr_at(100) == 1e-6
    # optax's alpha is a ratio and cannot express initial_lr = 0; the absolute floor can.
    zero = rlx_optax.CosineAnnealingLR(0.0, 4, 0.01)
    assert zero.lr_at(2) == pytest.approx(0.005, rel=1e-12)
    assert float(zero.as_schedule()(2)) == pytest.approx(0.005, rel=4 * F32_EPS)


def test_cosine_set_initial_lr_recomputes_current_epoch():
    sched = rlx_optax.CosineAnnealingLR(1.0, 10, 0.0)
    for _ in range(3):
        sched.step()
    sched.set_initial_lr(2.0)
    want = float(rumus_cosine(2.0, 10, 0.0, 3))
    np.testing.assert_allclose(sched.get_lr(), want, rtol=4 * F32_EPS)


# ---------------------------------------------------------------- warmup


def test_warmup_cosine_matches_optax_warmup_cosine_decay():
    start, peak, warmup, t_max, eta_min = 1e-4, 0.1, 5, 20, 1e-3
    sched = rlx_optax.CosineAnnealingLR(
        peak, t_max, eta_min, warmup_epochs=warmup, warmup_start_lr=start
    )
    ours = epochs_of(sched, warmup + t_max + 5)
    oracle = optax.warmup_cosine_decay_schedule(start, peak, warmup, warmup + t_max, eta_min)
    theirs = np.array([float(oracle(e)) for e in range(len(ours))])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=4 * F32_EPS * peak)


def test_warmup_steplr_formula():
    sched = rlx_optax.StepLR(0.2, 3, 0.5, warmup_epochs=4)
    ours = epochs_of(sched, 12)
    want = [0.2 * e / 4 for e in range(4)] + [0.2 * 0.5 ** ((e - 4) // 3) for e in range(4, 12)]
    np.testing.assert_allclose(ours, want, rtol=1e-15)


# ---------------------------------------------------------------- as_schedule


@pytest.mark.parametrize(
    "make",
    [
        lambda: rlx_optax.StepLR(0.1, 3, 0.5),
        lambda: rlx_optax.CosineAnnealingLR(0.1, 6, 1e-3),
        lambda: rlx_optax.CosineAnnealingLR(0.1, 6, 1e-3, warmup_epochs=2, warmup_start_lr=0.01),
        lambda: rlx_optax.StepLR(0.1, 2, 0.1, warmup_epochs=3),
    ],
)
@pytest.mark.parametrize("steps_per_epoch", [1, 7])
def test_as_schedule_is_epoch_lr_per_step(make, steps_per_epoch):
    sched = make()
    schedule = jax.jit(sched.as_schedule(steps_per_epoch))
    counts = np.arange(12 * steps_per_epoch)
    got = np.array([float(schedule(jnp.int32(c))) for c in counts])
    want = np.array([sched.lr_at(c // steps_per_epoch) for c in counts])
    np.testing.assert_allclose(got, want, rtol=2 * F32_EPS, atol=2 * F32_EPS * 0.1)


def test_as_schedule_drives_optax_optimizer():
    sched = rlx_optax.StepLR(0.5, 1, 0.5)
    tx = optax.sgd(sched.as_schedule(steps_per_epoch=2))
    params = jnp.zeros(1)
    state = tx.init(params)
    moves = []
    for _ in range(6):
        updates, state = tx.update(jnp.ones(1), state)
        moves.append(-float(updates[0]))
    assert moves == [0.5, 0.5, 0.25, 0.25, 0.125, 0.125]


# ---------------------------------------------------------------- applying to optax state


def test_apply_changes_rate_without_recompiling():
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    params = jnp.zeros(3)

    @jax.jit
    def train_step(params, state):
        updates, state = tx.update(jnp.ones(3), state, params)
        return optax.apply_updates(params, updates), state

    sched = rlx_optax.CosineAnnealingLR(0.1, 4, 0.0)
    state = tx.init(params)
    for _ in range(6):
        before = float(params[0])
        state = sched.apply(state)
        params, state = train_step(params, state)
        np.testing.assert_allclose(
            before - float(params[0]), sched.get_lr(), rtol=4 * F32_EPS, atol=1e-9
        )
        sched.step()
    assert train_step._cache_size() == 1


def test_apply_inside_chain_and_without_injection():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(0.1))
    state = rlx_optax.StepLR(0.1, 1, 0.5, warmup_epochs=0).apply(tx.init(jnp.zeros(2)))
    assert float(optax.tree.get(state, "learning_rate")) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        rlx_optax.StepLR(0.1, 1).apply(optax.adam(0.1).init(jnp.zeros(2)))
    scheduled = optax.inject_hyperparams(optax.adam)(learning_rate=optax.constant_schedule(0.1))
    with pytest.raises(ValueError, match="schedule"):
        rlx_optax.set_learning_rate(scheduled.init(jnp.zeros(2)), 0.01)


# ---------------------------------------------------------------- state and validation


def test_state_dict_round_trip():
    a = rlx_optax.CosineAnnealingLR(0.1, 10, 0.0, warmup_epochs=2)
    for _ in range(5):
        a.step()
    a.set_initial_lr(0.3)
    b = rlx_optax.CosineAnnealingLR(0.1, 10, 0.0, warmup_epochs=2)
    b.load_state_dict(a.state_dict())
    assert epochs_of(a, 8).tolist() == epochs_of(b, 8).tolist()


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: rlx_optax.StepLR(0.1, 0), "step_size"),  # RUMUS panics on 0
        (lambda: rlx_optax.StepLR(0.1, 2, gamma=-0.5), "gamma"),
        (lambda: rlx_optax.CosineAnnealingLR(0.1, 0), "t_max"),  # RUMUS panics on 0
        (lambda: rlx_optax.CosineAnnealingLR(-0.1, 3), "initial_lr"),
        (lambda: rlx_optax.CosineAnnealingLR(0.1, 3, warmup_epochs=-1), "warmup_epochs"),
    ],
)
def test_bad_arguments_raise(make, name):
    with pytest.raises(ValueError, match=name):
        make()
