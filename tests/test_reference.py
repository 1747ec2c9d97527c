"""Replay of the recorded float64 reference trajectories (torch.optim, pytorch-optimizer).

`tests/reference_record.py` (run by hand, needs torch) recorded each case from the reference
implementation in float64, closed loop, on `tests/reference_problem.py`; here the same loop
runs through rlx_optax's reference preset with x64 enabled (inside a `jax.enable_x64`
context, so other tests are unaffected) and must land on the recorded parameters to 1e-10.
No torch is needed.
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

TOL = 1e-10

# case -> (the rlx_optax transform that reproduces the recorded reference, notes).
# Leaves are in PyTorch's (out, in, ...) layout, hence layout="out_in" for Muon.
CASES = {
    "sgd_torch": lambda: rx.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam_torch": lambda: rx.adam(0.02, weight_decay=0.01),
    "adamw_torch": lambda: rx.adamw(0.02, weight_decay=0.1),
    "radam_po": lambda: rx.radam(0.02, weight_decay=0.1, behaviour="reference"),
    # torch.optim.RAdam steps along the momentum during warm-up: one override
    "radam_torch": lambda: rx.radam(
        0.02, weight_decay=0.1, behaviour="reference", degenerate_to_sgd=True
    ),
    "qhadamw_po": lambda: rx.qhadamw(0.02),  # the crate's QHAdamW is the reference's
    "lion_po": lambda: rx.lion(3e-3, weight_decay=0.1),
    "adafactor_torch": lambda: rx.adafactor(behaviour="reference"),
    "adafactor_po": lambda: rx.adafactor(behaviour="reference", momentum=0.9, weight_decay=0.01),
    # torch.optim.Muon takes matrices only: the conv kernel went to AdamW with the vector
    "muon_torch": lambda: rx.muon(
        0.02,
        weight_decay=0.1,
        behaviour="reference",
        layout="out_in",
        flatten_conv=False,
        ns_dtype=jnp.float64,
    ),
    "muon_po": lambda: rx.muon(
        0.02, weight_decay=0.1, behaviour="reference", layout="out_in", ns_dtype=jnp.float64
    ),
    # pytorch-optimizer's MARS: rank >= 2 leaves take MARS, eps before the bias correction
    "mars_po": lambda: rx.mars(
        3e-3,
        weight_decay=0.1,
        behaviour="reference",
        matrix_rule="min_rank2",
        eps_placement="uncorrected",
    ),
    # axes above 60 pass through, so the 48x80 matrix is rotated on its 48 side only: its
    # 80-side statistic has rank 48 at the first step, a null space whose basis (arbitrary)
    # the reference's later steps would depend on
    "soap_po": lambda: rx.soap(
        3e-3, weight_decay=0.01, precond_freq=5, max_precond_dim=60, behaviour="reference"
    ),
    "mars_lion_po": lambda: rx.mars(
        1e-3,
        variant="lion",
        weight_decay=0.1,
        behaviour="reference",
        matrix_rule="min_rank2",
        eps_placement="uncorrected",
    ),
}

# The crate behaviour of the families with a preset, to show the recordings tell them apart.
CRATE = {
    "radam_po": lambda: rx.radam(0.02, weight_decay=0.1),
    "adafactor_po": lambda: rx.adafactor(momentum=0.9, weight_decay=0.01),
    "muon_po": lambda: rx.muon(0.02, weight_decay=0.1, layout="out_in", ns_dtype=jnp.float64),
    "mars_po": lambda: rx.mars(3e-3, weight_decay=0.1),
    "soap_po": lambda: rx.soap(3e-3, weight_decay=0.01, precond_freq=5, max_precond_dim=60),
}


def _load(name):
    path = os.path.join(rp.DATA_DIR, f"{name}.npz")
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    return data, json.loads(str(data.pop("meta")))


def replay(tx, name):
    """max |ours - recorded| over the stored steps and leaves; updates must stay float64."""
    problem = rp.load_problem()
    ref, meta = _load(name)
    worst = 0.0
    with jax.enable_x64(True):
        params = {k: jnp.asarray(v) for k, v in rp.init_params(problem).items()}
        state = tx.init(params)
        update = jax.jit(tx.update)
        for step in range(1, meta["steps"] + 1):
            g = rp.gradient(problem, {k: np.asarray(v) for k, v in params.items()})
            updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
            assert all(u.dtype == jnp.float64 for u in updates.values())
            params = optax.apply_updates(params, updates)
            for k in rp.LEAVES:
                if f"step{step}/{k}" in ref:
                    diff = np.abs(np.asarray(params[k]) - ref[f"step{step}/{k}"])
                    worst = max(worst, float(np.max(diff)))
    return worst


def test_every_recording_has_a_case_and_versions():
    names = {f[:-4] for f in os.listdir(rp.DATA_DIR) if f.endswith(".npz")}
    others = {"problem", "newton_schulz_bf16", "kron_po_statistics"}
    assert names - others == set(CASES)
    for name in [*CASES, "newton_schulz_bf16", "kron_po_statistics"]:
        _, meta = _load(name)
        assert meta["versions"]["torch"].startswith("2.13.0")
        assert meta["versions"]["pytorch_optimizer"] == "4.1.0"
        assert name not in CASES or meta["steps"] >= 30


def test_problem_moves_every_leaf():
    """The recorded runs travel far enough that a wrong rule cannot hide under 1e-10."""
    problem = rp.load_problem()
    for name in CASES:
        ref, meta = _load(name)
        for k in rp.LEAVES:
            moved = np.max(np.abs(ref[f"step{meta['steps']}/{k}"] - problem[f"init/{k}"]))
            assert moved > 1e-2, (name, k, moved)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_preset_replays_recording(name):
    err = replay(CASES[name](), name)
    assert err <= TOL, f"{name}: max |ours - reference| = {err:.3g}"


@pytest.mark.parametrize("name", sorted(CRATE))
def test_crate_behaviour_differs_from_recording(name):
    err = replay(CRATE[name](), name)
    assert err > 1e-4, f"{name}: the crate behaviour should not match the reference ({err:.3g})"


def _bf16_values(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("shape", ["48x80", "96x192"])
def test_bf16_newton_schulz_rounds_like_torch(shape):
    """bf16 Newton-Schulz: as close to the exact iteration as torch.optim.Muon's own bf16 run,
    and within bf16 rounding of its output (bit-identical where accumulation order agrees)."""
    with np.load(os.path.join(rp.DATA_DIR, "newton_schulz_bf16.npz")) as f:
        x, theirs = f[f"{shape}/x"], _bf16_values(f[f"{shape}/torch"])
    with jax.enable_x64(True):
        exact = np.asarray(
            rx.newton_schulz(jnp.asarray(x, jnp.float64), 5, eps=1e-7, ns_dtype=jnp.float64)
        )
    ours = np.asarray(
        rx.newton_schulz(jnp.asarray(x), 5, eps=1e-7, ns_dtype=jnp.bfloat16), np.float32
    )
    norm = np.linalg.norm(exact)
    ours_err = np.linalg.norm(ours - exact) / norm
    torch_err = np.linalg.norm(theirs - exact) / norm
    assert ours_err <= 1.05 * torch_err, (ours_err, torch_err)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 4e-3


def test_presets_set_switches_and_explicit_arguments_win():
    g = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.linspace(0.5, 1.0, 4)}
    params = jax.tree.map(jnp.ones_like, g)

    def first(tx):
        return tx.update(g, tx.init(params), params)[0]

    # RAdam reference takes no step during warm-up; overriding the switch restores the step
    ref = first(rx.radam(0.1, behaviour="reference"))
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in ref.values())
    moved = first(rx.radam(0.1, behaviour="reference", degenerate_to_sgd=True))
    np.testing.assert_allclose(moved["b"], -0.1 * g["b"], rtol=1e-6)
    # the reference Muon sends the vector to AdamW: |first step| = lr whatever g is
    mu = first(rx.muon(0.1, behaviour="reference", ns_dtype=jnp.float32))
    np.testing.assert_allclose(jnp.abs(mu["b"]), 0.1, rtol=1e-5)
    mu_sgd = first(rx.muon(0.1, behaviour="reference", fallback="sgd", ns_dtype=jnp.float32))
    assert float(jnp.max(jnp.abs(mu_sgd["b"] - mu["b"]))) > 1e-3
    for factory in (rx.radam, rx.muon, rx.mars, rx.adafactor):
        with pytest.raises(ValueError, match="behaviour"):
            factory(0.1, behaviour="authors")


def test_soap_qr_refresh_implies_reprojected_moments():
    g = [jnp.asarray(np.random.default_rng(i).normal(size=(5, 4)), jnp.float32) for i in range(6)]

    def run(**kw):
        tx = rx.scale_by_soap(precond_freq=2, **kw)
        state, out = tx.init(g[0]), []
        for x in g:
            u, state = tx.update(x, state)
            out.append(np.asarray(u))
        return np.stack(out)

    implied = run(refresh="qr")
    np.testing.assert_array_equal(implied, run(refresh="qr", reproject_moments=True))
    with pytest.warns(UserWarning, match="reproject_moments"):
        apart = run(refresh="qr", reproject_moments=False)
    assert np.max(np.abs(apart - implied)) > 1e-3


def _kron_final_losses(seeds: int, steps: int, **kw) -> np.ndarray:
    """Final loss of `kron_psgd(0.05, momentum=0.9, **kw)` on the problem, one run per key,
    in float32 (vmapped over the keys, the gradient in JAX)."""
    problem = rp.load_problem()
    target = {k: jnp.asarray(problem[f"target/{k}"], jnp.float32) for k in rp.LEAVES}
    spd = {k: jnp.asarray(problem[f"spd/{k}"], jnp.float32) for k in rp.LEAVES}
    p0 = {k: jnp.asarray(v, jnp.float32) for k, v in rp.init_params(problem).items()}

    def view(x):
        return x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1)

    def grad(params):
        out = {}
        for k, p in params.items():
            d = view(p - target[k])
            out[k] = (jnp.matmul(d, spd[k], precision="highest") + 0.1 * d**3).reshape(p.shape)
        return out

    def run(key):
        tx = rx.kron_psgd(0.05, momentum=0.9, key=key, **kw)

        def step(carry, _):
            params, state = carry
            u, state = tx.update(grad(params), state, params)
            return (optax.apply_updates(params, u), state), None

        (params, _), _ = jax.lax.scan(step, (p0, tx.init(p0)), None, length=steps)
        return params

    keys = jax.random.split(jax.random.PRNGKey(2026), seeds)
    finals = jax.jit(jax.vmap(run))(keys)
    return np.array(
        [rp.loss(problem, {k: np.asarray(v[i]) for k, v in finals.items()}) for i in range(seeds)]
    )


def test_kron_reference_preset_matches_pytorch_optimizer_in_distribution():
    """pytorch-optimizer's Kron draws its probes from torch's generator, so compare the final
    loss over seeds: the means agree within 4 standard errors of their difference, and the
    crate's Kron (no preconditioner learning) is far outside."""
    with np.load(os.path.join(rp.DATA_DIR, "kron_po_statistics.npz")) as f:
        theirs = f["final_loss"]
        meta = json.loads(str(f["meta"]))
    ours = _kron_final_losses(len(theirs), meta["steps"], behaviour="reference")
    se = np.sqrt(np.var(ours, ddof=1) / len(ours) + np.var(theirs, ddof=1) / len(theirs))
    assert abs(np.mean(ours) - np.mean(theirs)) < 4 * se, (np.mean(ours), np.mean(theirs), se)
    crate = _kron_final_losses(4, meta["steps"])
    assert abs(np.mean(crate) - np.mean(theirs)) > 20 * se, (np.mean(crate), se)
