"""SOAP and Kron-PSGD step time against the matmul floor of their per-step work.

For each shape: the time of a jitted, donated ``update + apply_updates`` on one (m, n) matrix,
divided by the floor = counted FLOPs / GEMM rate measured in the same run (harness.gemm_rate).
SOAP is timed over blocks of `precond_freq` steps, so its eigendecomposition refresh is
amortised as in training. Kron is also compared with psgd-jax's `kron` when psgd-jax is
installed (``pip install .[bench]``); nothing of psgd-jax is used by the library.

With ``--large`` it times the issue's large single matrices instead: Kron reference mode
against psgd-jax's ``kron`` on (2048, 2048), (1024, 4096) and (4096, 4096) (2-step blocks: the
factors are updated every step, nothing to amortise), and SOAP on (2048, 8192): its compile
time, and its step time over one block of `FREQ` steps (the eigendecomposition refresh
amortised) against the floor. On a 2-core CPU this takes about 10 minutes.

Run: ``python -m benchmarks.kron_soap [--large]`` (writes benchmarks/out/kron_soap.json or
kron_soap_large.json).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax

import rlx_optax
from benchmarks import harness

SHAPES = [(512, 512), (512, 1024)]
LARGE_KRON = [(2048, 2048), (1024, 4096), (4096, 4096)]
LARGE_SOAP = (2048, 8192)
FREQ = 10  # SOAP's precond_freq (the crate's default); also the block length for every timing


def eigh_flops(n: int) -> float:
    # symmetric eigendecomposition with vectors: ~4/3 n^3 tridiagonalisation, ~4/3 n^3 to form
    # the Householder product, ~6 n^3 implicit QR on the tridiagonal with vector updates
    return 9.0 * n**3


def soap_flops(m: int, n: int) -> float:
    """Per step: two Gram matrices, rotation in and out (2 products each); refresh / FREQ."""
    per_step = 2 * m * m * n + 2 * m * n * n + 2 * (2 * m * m * n + 2 * m * n * n)
    return per_step + (eigh_flops(m) + eigh_flops(n)) / FREQ


def kron_flops(m: int, n: int) -> float:
    """Per step, counting what triangular factors need (a triangular times a dense matrix is
    half a dense product; two triangular ones, a third): A (2 triangular products), B (2
    triangular solves), A A^T and B B^T on both sides (4 dense Gram products), triu(M) Q on
    both sides, P G (4 triangular products)."""
    mn = m * n
    tri_apply = mn * (m + n)  # Q_L X and X Q_R^T: half of 2 mn (m + n)
    # A, B (the solves cost a triangular product each), P G twice; Grams; factor steps
    return 4 * tri_apply + 4 * mn * (m + n) + (2 / 3) * (m**3 + n**3)


def load_psgd_jax():
    """psgd-jax's kron, or None. psgd-jax 0.2.9 imports a private optax module that moved."""
    try:
        sys.modules.setdefault("optax._src.clipping", optax.transforms._clipping)
        from psgd_jax.kron import kron
    except ImportError:
        return None
    return kron


def block_time(tx, shape, steps=FREQ, iters=3):
    """Median seconds per step of `steps` jitted, donated steps (one compiled scan)."""
    params = {"w": jax.random.normal(jax.random.key(0), shape, jnp.float32) * 0.02}
    grads = [jax.random.normal(jax.random.key(i + 1), shape, jnp.float32) for i in range(steps)]
    stacked = {"w": jnp.stack([g for g in grads])}

    def run(params, state):
        def body(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), stacked)[0]

    step = jax.jit(run, donate_argnums=(0, 1))
    carry = (params, tx.init(params))
    return harness.time_step(step, carry, warmup=1, iters=iters) / steps


def one_block(tx, shape, steps):
    """Compile seconds, and seconds per step of one timed block of `steps` donated steps
    (after one untimed block), all with the same gradient: for matrices too large to time
    repeatedly."""
    params = {"w": jax.random.normal(jax.random.key(0), shape, jnp.float32) * 0.02}
    grads = {"w": jax.random.normal(jax.random.key(1), shape, jnp.float32)}

    def run(params, state, g):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), None, length=steps)[0]

    step = jax.jit(run, donate_argnums=(0, 1))
    state = tx.init(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    carry = harness.block(compiled(params, state, grads))  # untimed: the first refresh
    t0 = time.perf_counter()
    harness.block(compiled(*carry, grads))
    return compile_s, (time.perf_counter() - t0) / steps


def large(psgd_kron) -> dict:
    gemm = harness.gemm_rate(2048)
    rows = []
    for m, n in LARGE_KRON:
        ref = rlx_optax.kron_psgd(
            1e-3, behaviour="reference", key=jax.random.key(0), update_probability=1.0
        )
        row = {"algorithm": "kron_psgd reference", "shape": [m, n]}
        row["compile_s"], row["step_s"] = one_block(ref, (m, n), 2)
        row["floor_s"] = kron_flops(m, n) / gemm
        if psgd_kron is not None:
            peer = psgd_kron(1e-3, b1=0.9, preconditioner_update_probability=1.0)
            _, row["psgd_jax_step_s"] = one_block(peer, (m, n), 2)
            row["ours/psgd_jax"] = row["step_s"] / row["psgd_jax_step_s"]
        rows.append(row)
        print(row, flush=True)
    m, n = LARGE_SOAP
    row = {"algorithm": "soap (crate default, eigh refresh)", "shape": [m, n]}
    row["compile_s"], row["step_s"] = one_block(rlx_optax.soap(3e-3), (m, n), FREQ)
    row["floor_s"] = soap_flops(m, n) / gemm
    row["ours/floor"] = row["step_s"] / row["floor_s"]
    rows.append(row)
    print(row, flush=True)
    return {"gemm_flops_per_s": gemm, "psgd_jax": psgd_kron is not None, "results": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="the large single matrices")
    args = ap.parse_args(argv)
    if args.large:
        path = harness.write_json("kron_soap_large", large(load_psgd_jax()))
        print(f"wrote {path.name}")
        return
    gemm = harness.gemm_rate(1024)
    psgd_kron = load_psgd_jax()
    results = []
    for m, n in SHAPES:
        row = {"shape": [m, n]}
        soap_t = block_time(rlx_optax.soap(3e-3), (m, n))
        row["soap_s"] = soap_t
        row["soap_floor_s"] = soap_flops(m, n) / gemm
        row["soap_over_floor"] = soap_t / row["soap_floor_s"]
        kron_t = block_time(rlx_optax.kron_psgd(1e-3), (m, n))
        row["kron_s"] = kron_t
        row["kron_floor_s"] = kron_flops(m, n) / gemm
        row["kron_over_floor"] = kron_t / row["kron_floor_s"]
        ref = rlx_optax.kron_psgd(
            1e-3, behaviour="reference", key=jax.random.key(0), update_probability=1.0
        )
        row["kron_reference_s"] = block_time(ref, (m, n))
        row["kron_reference_over_floor"] = row["kron_reference_s"] / row["kron_floor_s"]
        if psgd_kron is not None:
            peer = psgd_kron(
                1e-3, b1=0.9, preconditioner_update_probability=1.0, precond_update_precision=None
            )
            row["psgd_jax_kron_s"] = block_time(peer, (m, n))
            row["kron_reference_over_psgd_jax"] = row["kron_reference_s"] / row["psgd_jax_kron_s"]
        results.append(row)
        print(
            f"{m}x{n}: soap {soap_t * 1e3:.1f} ms ({row['soap_over_floor']:.2f}x floor), "
            f"kron {kron_t * 1e3:.1f} ms ({row['kron_over_floor']:.2f}x floor), "
            f"kron reference {row['kron_reference_s'] * 1e3:.1f} ms "
            f"({row['kron_reference_over_floor']:.2f}x floor)"
            + (
                f", psgd-jax kron {row['psgd_jax_kron_s'] * 1e3:.1f} ms "
                f"(ours/psgd-jax {row['kron_reference_over_psgd_jax']:.2f})"
                if psgd_kron is not None
                else ", psgd-jax not installed: comparison skipped"
            )
        )
    path = harness.write_json(
        "kron_soap",
        {
            "gemm_flops_per_s": gemm,
            "precond_freq": FREQ,
            "psgd_jax": psgd_kron is not None,
            "results": results,
        },
    )
    print(f"GEMM rate {gemm / 1e9:.1f} GFLOP/s; wrote {path.name}")


if __name__ == "__main__":
    main()
