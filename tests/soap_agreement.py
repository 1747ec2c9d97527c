"""How far apart jit, eager, vmap and float64 runs of SOAP land (run by hand; prints a table).

    python tests/soap_agreement.py [--steps 30]

Two problems: a digits MLP (64 -> 32 -> 10; its first gradient statistics are rank-deficient)
and a full-rank least-squares problem on a 12 x 8 matrix. For the crate's defaults and the
reference preset, every run starts from the same parameters and sees the same batches; the
figure is ``max|p_run - p_jit| / max|p_jit - p_0|`` over all leaves after the last step.
`tests/test_soap.py` asserts the well-posed rows; docs/numerics.md quotes the table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import rlx_optax  # noqa: E402

REFERENCE = {
    "skip_first_step": True,
    "reproject_moments": True,
    "refresh": "qr",
    "max_precond_dim": 10000,
    "precondition_nd": True,
}
MODES = {"crate": {}, "reference": REFERENCE}


def digits_problem(dtype=jnp.float32):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(64, 32)).astype(np.float32) / 8,
        "b1": np.zeros(32, np.float32),
        "w2": rng.normal(size=(32, 10)).astype(np.float32) / 6,
        "b2": np.zeros(10, np.float32),
    }

    def loss(p, batch):
        xb, yb = batch
        h = jnp.tanh(xb @ p["w1"] + p["b1"])
        logits = h @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    batches = [(x[i * 64 : (i + 1) * 64], y[i * 64 : (i + 1) * 64]) for i in range(25)]
    return loss, params, batches


def least_squares_problem():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(40, 12)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(40, 8)).astype(np.float32))
    params = {"w": rng.normal(size=(12, 8)).astype(np.float32) * 0.1}

    def loss(p, batch):
        i = batch
        return jnp.mean((a[i] @ p["w"] - b[i]) ** 2)

    batches = [rng.choice(40, size=32, replace=False) for _ in range(25)]
    return loss, params, batches


def run(tx, loss, params, batches, steps, *, how: str, dtype=jnp.float32):
    p = jax.tree.map(lambda v: jnp.asarray(v, dtype), params)
    state = tx.init(p)

    def step(p, state, batch):
        grads = jax.grad(loss)(p, batch)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    if how == "jit":
        step = jax.jit(step)
    elif how == "vmap":  # two identical copies through a batched program
        batched = jax.jit(jax.vmap(step, in_axes=(0, 0, None)))
        p2 = jax.tree.map(lambda v: jnp.stack([v, v]), p)
        s2 = jax.tree.map(lambda v: jnp.stack([v, v]), state)
        for i in range(steps):
            p2, s2 = batched(p2, s2, batches[i % len(batches)])
        return jax.tree.map(lambda v: np.asarray(v[0], np.float64), p2)
    for i in range(steps):
        p, state = step(p, state, batches[i % len(batches)])
    return jax.tree.map(lambda v: np.asarray(v, np.float64), p)


def disagreement(got, want, init) -> float:
    num = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    den = max(float(np.max(np.abs(want[k] - np.asarray(init[k], np.float64)))) for k in want)
    return num / den


def measure(problem: str, mode: str, steps: int, *, f64: bool = False) -> dict[str, float]:
    loss, params, batches = {"digits": digits_problem, "lsq": least_squares_problem}[problem]()
    tx = rlx_optax.soap(3e-3, **MODES[mode])
    ref = run(tx, loss, params, batches, steps, how="jit")
    out = {
        how: disagreement(run(tx, loss, params, batches, steps, how=how), ref, params)
        for how in ("eager", "vmap")
    }
    if f64:
        with jax.enable_x64(True):
            got = run(tx, loss, params, batches, steps, how="jit", dtype=jnp.float64)
        out["float64"] = disagreement(got, ref, params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"{args.steps} steps")
    print("| problem | mode | eager vs jit | vmap vs jit | float64 vs float32 |")
    print("|---|---|---|---|---|")
    for problem in ("digits", "lsq"):
        for mode in MODES:
            r = measure(problem, mode, args.steps, f64=True)
            print(
                f"| {problem} | {mode} | {r['eager']:.2e} | {r['vmap']:.2e} | {r['float64']:.2e} |"
            )


if __name__ == "__main__":
    main()
