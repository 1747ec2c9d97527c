"""Where QHAdamW and pytorch-optimizer's QHAdam part in float64 (docs/robustness.md).

pytorch-optimizer keeps the bias-corrected moments themselves, averaged with the weights
``1 / (1 + b + ... + b^(t-1))`` (``exp_avg.lerp_(grad, 1 / beta_weight)``); rlx_optax (the
crate, optax, torch.optim.Adam) keeps the plain EMAs and divides by ``1 - b^t``. The two are
one number in exact arithmetic and differ by rounding only: fed the same gradients they agree
to ~1e-15. In the recorded closed loop (each side differentiates its *own* parameters) those
last-bit differences are amplified by the coordinates whose gradient stays near zero, where
``m / sqrt(v)`` divides by a tiny RMS, to ~1e-11 after 40 steps: no constant, no formula and
no float32 is involved. The oracles are float64 NumPy transcriptions of both orders.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax as rx

sys.path.insert(0, os.path.dirname(__file__))
import reference_problem as rp  # noqa: E402

B1, B2, NU1, NU2, LR, WD, EPS = 0.995, 0.999, 0.7, 1.0, 0.02, 0.01, 1e-8
STEPS = 40


def _lerp(a, b, w):
    """torch.lerp's formula (ATen: the form is chosen by |weight| < 0.5)."""
    return a + w * (b - a) if abs(w) < 0.5 else b - (b - a) * (1.0 - w)


def torch_order(init, gradient, steps, nu2=NU2, weights=np.float64):
    """pytorch-optimizer 4.1.0 `QHAdam.step` (foreach=False, weight_decouple=True) with float64
    weights, as `tests/reference_record.py` recorded it (``weights=np.float32``: the weights as
    pytorch-optimizer keeps them, a float32 tensor, its beta cast to float32 by torch)."""
    p = {k: v.copy() for k, v in init.items()}
    zero = weights(0.0)
    st = {k: [zero, zero, np.zeros_like(v), np.zeros_like(v)] for k, v in p.items()}
    out = []
    for t in range(steps):
        g = gradient(p, t)
        for k in p:
            w1, w2, m, v = st[k]
            p[k] = p[k] * (1.0 - LR * WD)
            w1, w2 = w1 * weights(B1) + weights(1.0), w2 * weights(B2) + weights(1.0)
            m = _lerp(m, g[k], float(weights(1.0) / w1))
            v = _lerp(v, g[k] ** 2, float(weights(1.0) / w2))
            rms = v * nu2 if nu2 == 1.0 else v * nu2 + g[k] ** 2 * (1.0 - nu2)
            p[k] = p[k] + (-LR) * ((m * NU1 + g[k] * (1.0 - NU1)) / (np.sqrt(rms) + EPS))
            st[k] = [w1, w2, m, v]
        out.append({k: v.copy() for k, v in p.items()})
    return out


def ours_order(init, gradient, steps, nu2=NU2):
    """rlx_optax's `qhadamw`: the EMAs, divided by the bias corrections ``1 - b^t``."""
    p = {k: v.copy() for k, v in init.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t in range(1, steps + 1):
        g = gradient(p, t - 1)
        for k in p:
            m[k] = B1 * m[k] + (1 - B1) * g[k]
            v[k] = B2 * v[k] + (1 - B2) * g[k] * g[k]
            num = (1 - NU1) * g[k] + NU1 * (m[k] / (1.0 - B1**t))
            d = num / (np.sqrt((1 - nu2) * g[k] * g[k] + nu2 * (v[k] / (1.0 - B2**t))) + EPS)
            p[k] = p[k] + (-LR) * (d + WD * p[k])
        out.append({k: x.copy() for k, x in p.items()})
    return out


def _rlx(init, steps, nu2=NU2):
    problem = rp.load_problem()
    tx = rx.qhadamw(LR, B1, B2, nu1=NU1, nu2=nu2, weight_decay=WD)
    out = []
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v) for k, v in init.items()}
        state, update = tx.init(p), jax.jit(tx.update)
        for _ in range(steps):
            g = rp.gradient(problem, {k: np.asarray(v) for k, v in p.items()})
            u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
            p = optax.apply_updates(p, u)
            out.append({k: np.asarray(v) for k, v in p.items()})
    return out


def _diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in rp.LEAVES)


def _recording():
    with np.load(os.path.join(rp.DATA_DIR, "qhadamw_po.npz")) as f:
        data = {k: f[k] for k in f.files}
    meta = json.loads(str(data.pop("meta")))
    return data, meta


def test_the_transcriptions_are_each_side():
    """Closed loop: the torch-order transcription is the recording, the other order is
    rlx_optax, each to the last bits while the loop has not yet amplified anything."""
    problem = rp.load_problem()
    init = rp.init_params(problem)
    ref, meta = _recording()
    assert meta["arguments"]["betas"] == [B1, B2] and meta["arguments"]["nus"] == [NU1, NU2]

    def closed(p, t):
        return rp.gradient(problem, p)

    theirs = torch_order(init, closed, 6)
    ours = ours_order(init, closed, 6)
    rlx = _rlx(init, 6)
    for step in (1, 6):
        recorded = {k: ref[f"step{step}/{k}"] for k in rp.LEAVES}
        assert _diff(theirs[step - 1], recorded) <= 1e-15
        assert _diff(ours[step - 1], rlx[step - 1]) <= 1e-15


@pytest.mark.parametrize("nu2", [NU2, 0.8])
def test_both_orders_agree_to_rounding_on_the_same_gradients(nu2):
    """Open loop (one gradient sequence for both): the orders differ by ~1e-15 after 40 steps;
    closed loop they differ by over a hundred times more: the amplification, not the rule."""
    problem = rp.load_problem()
    init = rp.init_params(problem)

    def closed(p, t):
        return rp.gradient(problem, p)

    theirs_closed = torch_order(init, closed, STEPS, nu2)
    grads = [rp.gradient(problem, init)] + [rp.gradient(problem, p) for p in theirs_closed[:-1]]

    def fixed(p, t):
        return grads[t]

    open_gap = _diff(
        torch_order(init, fixed, STEPS, nu2)[-1], ours_order(init, fixed, STEPS, nu2)[-1]
    )
    ours_closed = ours_order(init, closed, STEPS, nu2)
    closed_gap = _diff(theirs_closed[-1], ours_closed[-1])
    assert open_gap <= 1e-14, open_gap
    assert closed_gap > 100 * open_gap, (closed_gap, open_gap)
    # what amplifies: the largest gap sits where the gradient stayed near zero (its RMS over
    # the run is far below the typical one), while the typical gap stays at rounding level
    gaps = np.concatenate(
        [np.abs(theirs_closed[-1][k] - ours_closed[-1][k]).ravel() for k in rp.LEAVES]
    )
    rms = np.sqrt(
        np.mean([np.concatenate([g[k].ravel() for k in rp.LEAVES]) ** 2 for g in grads], axis=0)
    )
    worst = int(np.argmax(gaps))
    assert rms[worst] < 0.01 * np.median(rms), (rms[worst], np.median(rms))
    assert np.median(gaps) <= 1e-15


def test_float32_weights_are_what_moves_by_1e9():
    """pytorch-optimizer's own default (float32 weights) is where a 1e-9 gap comes from: its
    transcription leaves the float64 recording by ~2e-9 within 6 steps, while the float64-weight
    transcription stays at the last bit (above)."""
    problem = rp.load_problem()
    init = rp.init_params(problem)
    ref, _ = _recording()
    run = torch_order(init, lambda p, t: rp.gradient(problem, p), 6, weights=np.float32)
    recorded = {k: ref[f"step6/{k}"] for k in rp.LEAVES}
    assert _diff(run[0], {k: ref[f"step1/{k}"] for k in rp.LEAVES}) <= 1e-15  # weight 1 exact
    assert 1e-10 < _diff(run[5], recorded) < 1e-8
