"""Low-precision momentum of the matrix families: Muon, Kron-PSGD (both momentum placements)
and SOAP's moments (bfloat16 only).

Oracles: a float64 NumPy transcription of Muon's momentum on the dequantized state, the
float32 run (within stated bounds), runs without `inject_hyperparams` and uninterrupted runs
(bit-exact resumes through flax serialization).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rlx_optax
from tests.problems import assert_injected_keeps_state, assert_resume_bit_exact
from tests.problems import lowbit_grads as grads_tree
from tests.problems import lowbit_params as params_tree

BF16_SR = {"mu_dtype": jnp.bfloat16, "stochastic_rounding": True}
CONFIGS = {
    "muon-q8": ("muon", {}, {"mu_dtype": "q8"}),
    "muon-bf16": ("muon", {}, BF16_SR),
    "muon-adamw-q8": (
        "muon",
        {"fallback": "adamw"},
        {"mu_dtype": "q8", "nu_dtype": "q8"},
    ),
    "kron-q8": ("kron_psgd", {}, {"mu_dtype": "q8"}),
    "kron-bf16": ("kron_psgd", {}, BF16_SR),
    "kron-ref-q8": ("kron_psgd", {"behaviour": "reference"}, {"mu_dtype": "q8"}),
    "soap-bf16": (
        "soap",
        {"weight_decay": 0.0},
        {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16, "stochastic_rounding": True},
    ),
    "soap-q8": ("soap", {"weight_decay": 0.0}, {"mu_dtype": "q8", "nu_dtype": "q8"}),
    # the preconditioner stored in bfloat16, computed in float32 (the reference SOAP: the
    # crate's eigenbases of rank-deficient statistics amplify any rounding, 30% here)
    "soap-ref-precond-bf16": (
        "soap",
        {"behaviour": "reference", "weight_decay": 0.0},
        {"precond_dtype": jnp.bfloat16},
    ),
    "kron-ref-precond-bf16": (
        "kron_psgd",
        {"behaviour": "reference"},
        {"precond_dtype": jnp.bfloat16},
    ),
    "soap-ref-q8": (
        "soap",
        {"behaviour": "reference", "weight_decay": 0.0},
        {"mu_dtype": "q8", "nu_dtype": "q8"},
    ),
}


def make(name: str, base: dict, extra: dict, lr: float = 1e-2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Kron's crate-default probe note
        return getattr(rlx_optax, name)(lr, **base, **extra)


def run(tx, p, s, seeds):
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
    )
    for i in seeds:
        p, s = step(p, s, grads_tree(i))
    return p, s


# --------------------------------------------------------------------------- oracles


def test_muon_q8_momentum_against_float64_transcription():
    """Per step: the new momentum ``mu m + g`` computed in float64 from the dequantized stored
    momentum; the stored codes stand for it within half a code step of the top binade
    (``1/128`` of the block scale, which bounds the block's magnitudes), and the update of
    the non-matrix leaf (SGD Nesterov ``g + mu m``) equals the float64 value from that
    momentum."""
    mu = 0.95
    tx = rlx_optax.scale_by_muon(momentum=mu, mu_dtype="q8")
    p = params_tree()
    s = tx.init(p)
    step = jax.jit(tx.update)
    for i in range(5):
        g = grads_tree(i)
        prev = np.asarray(rlx_optax.dequantize_blockwise(s.mu["e"]), np.float64)
        u, s = step(g, s)
        m64 = mu * prev + np.asarray(g["e"], np.float64)
        want = np.asarray(g["e"], np.float64) + mu * m64  # float32 rounding, with cancellation
        atol = 1e-6 * np.max(np.abs(want))
        np.testing.assert_allclose(np.asarray(u["e"], np.float64), want, rtol=2e-6, atol=atol)
        assert isinstance(s.mu["e"], rlx_optax.QuantizedArray)
        stored = np.asarray(rlx_optax.dequantize_blockwise(s.mu["e"]), np.float64)
        blocks = np.abs(m64).reshape(-1, 256).max(axis=1)
        scale = np.asarray(s.mu["e"].scale, np.float64).reshape(-1)
        assert np.all(scale >= blocks * (1 - 1e-6))
        # and it is the bound mu max|m| + max|g| of each block, known before the new moment
        prev_max = np.abs(prev).reshape(-1, 256).max(axis=1)
        g_max = np.abs(np.asarray(g["e"], np.float64)).reshape(-1, 256).max(axis=1)
        np.testing.assert_allclose(scale, mu * prev_max + g_max, rtol=1e-6)
        assert np.all(np.abs(stored - m64) <= (1 / 128) * scale.repeat(256) * (1 + 1e-5))


def test_muon_matrix_update_reads_the_dequantized_momentum():
    """The matrix leaf's update from a q8 state equals the float32 transform's update from
    the dequantized momentum (the same Newton-Schulz input)."""
    q8, f32 = rlx_optax.scale_by_muon(mu_dtype="q8"), rlx_optax.scale_by_muon()
    p = params_tree()
    s = q8.init(p)
    for i in range(3):
        _, s = jax.jit(q8.update)(grads_tree(i), s)
    dense = s._replace(
        mu=jax.tree.map(
            lambda m: (
                rlx_optax.dequantize_blockwise(m) if isinstance(m, rlx_optax.QuantizedArray) else m
            ),
            s.mu,
            is_leaf=lambda m: isinstance(m, rlx_optax.QuantizedArray),
        )
    )
    u_q, _ = jax.jit(q8.update)(grads_tree(9), s)
    u_f, _ = jax.jit(f32.update)(grads_tree(9), dense)
    for k in u_q:
        np.testing.assert_allclose(u_q[k], u_f[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_low_precision_run_follows_float32(config):
    """20 jitted steps: the displacement differs from the float32 run's by less than 5% of
    its size (bfloat16 with stochastic rounding: 2%)."""
    name, base, extra = CONFIGS[config]
    p0 = params_tree()
    out = []
    for opts in ({}, extra):
        tx = make(name, base, opts)
        out.append(run(tx, p0, tx.init(p0), range(20))[0])
    moved = float(optax.tree.norm(jax.tree.map(jnp.subtract, out[0], p0)))
    diff = float(optax.tree.norm(jax.tree.map(jnp.subtract, out[1], out[0])))
    bound = 0.05 if "q8" in config else 0.02
    assert moved > 0 and diff < bound * moved, (diff / moved, config)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_state_storage_and_defaults(config):
    name, base, extra = CONFIGS[config]
    leaves = jax.tree.leaves(make(name, base, extra).init(params_tree()))
    if "q8" in config:
        assert any(x.dtype == jnp.int8 for x in leaves)
    else:
        assert any(x.dtype == jnp.bfloat16 for x in leaves)
    for x in jax.tree.leaves(make(name, base, {}).init(params_tree())):  # the default
        assert x.dtype in (jnp.float32, jnp.int32, jnp.uint32), (config, x.dtype)


def test_unknown_storage_is_refused_naming_the_argument():
    for arg in ("mu_dtype", "nu_dtype"):
        with pytest.raises(ValueError, match=arg):
            rlx_optax.soap(1e-3, **{arg: "int4"})
    with pytest.raises(ValueError, match="mu_dtype"):
        rlx_optax.muon(1e-3, mu_dtype="int4")
    with pytest.raises(ValueError, match="mu_dtype"):
        rlx_optax.kron_psgd(1e-3, mu_dtype="int4")
    for factory in (rlx_optax.soap, rlx_optax.kron_psgd):
        for bad in ("q8", jnp.int8):
            with pytest.raises(ValueError, match="precond_dtype"):
                factory(1e-3, precond_dtype=bad)


def test_soap_bf16_second_moment_with_stochastic_rounding_does_not_stall():
    """A constant gradient for 600 steps with b2 = 0.999 (bfloat16 second moment): rounded to
    nearest the rotated second moment stalls; stochastically rounded its sum over the 512
    entries stays within 1% of the float32 run's."""
    p = {"w": jnp.zeros((32, 16))}
    g = {"w": jax.random.normal(jax.random.key(0), (32, 16))}  # full rank: 512 rotated entries
    got = {}
    for label, kw in {
        "f32": {},
        "sr": {"nu_dtype": jnp.bfloat16, "stochastic_rounding": True},
        "nearest": {"nu_dtype": jnp.bfloat16},
    }.items():
        tx = rlx_optax.scale_by_soap(b2=0.999, precond_freq=1000, **kw)
        s = tx.init(p)
        step = jax.jit(tx.update)
        for _ in range(600):
            _, s = step(g, s)
        got[label] = float(jnp.sum(s.nu["w"].astype(jnp.float32)))
    assert abs(got["sr"] - got["f32"]) < 0.01 * got["f32"]
    assert abs(got["nearest"] - got["f32"]) > 0.05 * got["f32"]


# --------------------------------------------------------------------------- plumbing


@pytest.mark.parametrize("config", ["muon-q8", "kron-ref-q8", "soap-bf16", "soap-q8"])
def test_inject_hyperparams_keeps_the_state_bits(config):
    """The state bit-equal to the plain transform's, the updates to float32 rounding."""
    name, base, extra = CONFIGS[config]
    static = tuple(k for k, v in extra.items() if not isinstance(v, str | bool))
    plain = make(name, base, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        injected = optax.inject_hyperparams(getattr(rlx_optax, name), static_args=static)(
            learning_rate=1e-2, **base, **extra
        )
    assert_injected_keeps_state(plain, injected, params_tree(), grads_tree)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_is_bit_exact(config):
    name, base, extra = CONFIGS[config]
    tx = make(name, base, extra)
    assert_resume_bit_exact(tx, run)
