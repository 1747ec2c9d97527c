"""Sophia and MARS: step time against the memory-traffic floor, and Sophia's estimator cost.

Element-wise style (docs/guides/benchmarks.md): a jitted, donated ``update +
apply_updates`` on about 10M float32 parameters, divided by the bytes one fused pass must move
over the copy bandwidth measured in the same run. optax has no MARS and its contrib Sophia runs
its own estimator inside `update` (a different contract), so the peer reported is optax.adamw,
the step MARS reduces to at ``gamma=0``.

The Hessian-diagonal estimators are timed separately, per call, as a ratio to one gradient
evaluation of the same loss (an MLP classifier of about 8.4M parameters).

What the compiled steps show on CPU (XLA's HLO): MARS stores the raw gradient as the next
control variate; the gradient is not donated, so XLA copies it into the donated buffer and, to
keep the old one readable, copies that first (two extra passes the floor does not count), and
the first- and second-moment fusions each recompute the corrected gradient. The optional
win-rate reduction is not fused with the step and materialises the ratio. Hutchinson's cost is
a forward-over-reverse Hessian-vector product plus drawing one probe per parameter; with the
default threefry keys the probes alone can cost about a gradient.

Run: ``python benchmarks/sophia_mars.py [--small]``; writes ``benchmarks/out/sophia_mars.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

try:
    from benchmarks import harness
except ImportError:  # run as a script
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from benchmarks import harness

import rlx_optax

LR = 1e-3
F32 = 4  # bytes


def model_params(scale: float = 1.0) -> dict[str, jax.Array]:
    """Two square matrices, a rectangular one and vectors: about 10.0M float32 at scale 1."""
    d = max(16, int(2048 * math.sqrt(scale)))
    shapes = {"a": (d, d), "b": (d, d), "c": (d // 2, 3 * d // 4), "bias": (d,), "scale": (d,)}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return {
        n: 0.02 * jax.random.normal(k, s, jnp.float32)
        for k, (n, s) in zip(keys, sorted(shapes.items()), strict=True)
    }


def n_params(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def make_step(tx: optax.GradientTransformation, with_extra: bool) -> Callable:
    """Jitted ``(params, state, grads, extra) -> (params, state)``, params and state donated."""

    def step(params, state, grads, extra):
        kwargs = extra if with_extra else {}
        updates, state = tx.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def time_case(tx, params, grads, extra, iters):
    step = make_step(tx, extra is not None)

    def threaded(p, s):
        return step(p, s, grads, extra)

    carry = (jax.tree.map(jnp.copy, params), tx.init(params))
    return harness.time_step(threaded, carry, iters=iters)


# (name, transform, extra args or None, floor in float32 words per parameter, note)
# words: params read+write 2, gradient read 1, then each state buffer read+write 2.
def cases(params: Any, grads: Any) -> list[tuple[str, Any, Any, int, str]]:
    h_hat = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    return [
        ("sophia", rlx_optax.sophia(LR), None, 2 + 1 + 2 + 1, "mu r+w, h read only"),
        (
            "sophia+hessian_diag",
            rlx_optax.sophia(LR),
            {"hessian_diag": h_hat},
            2 + 1 + 2 + 2 + 1,
            "mu r+w, h r+w, estimate read",
        ),
        (
            "sophia+win_rate",
            rlx_optax.sophia(LR, track_win_rate=True),
            None,
            2 + 1 + 2 + 1,
            "as sophia; the win-rate reduction adds no bytes if fused",
        ),
        ("mars", rlx_optax.mars(LR), None, 2 + 1 + 2 + 2 + 2, "mu, nu, prev_grad r+w"),
        (
            "mars_noclip",
            rlx_optax.mars(LR, clip_c=False),
            None,
            2 + 1 + 2 + 2 + 2,
            "same bytes; no per-leaf norm pass",
        ),
        (
            "mars_lion",
            rlx_optax.mars(LR, variant="lion"),
            None,
            2 + 1 + 2 + 2,
            "mu, prev_grad r+w",
        ),
        ("optax.adamw", optax.adamw(LR, weight_decay=0.0), None, 2 + 1 + 2 + 2, "mu, nu r+w"),
    ]


def mlp_problem(scale: float = 1.0, batch: int = 64):
    """An MLP classifier, ``(batch, d) -> tanh(d, 4d) -> (4d, classes)``; about 8.4M params."""
    d = max(16, int(1024 * math.sqrt(scale)))
    classes = d
    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    params = {
        "w1": jax.random.normal(k1, (d, 4 * d)) / math.sqrt(d),
        "w2": jax.random.normal(k2, (4 * d, classes)) / math.sqrt(4 * d),
    }
    x = jax.random.normal(k3, (batch, d))
    labels = jax.random.randint(k4, (batch,), 0, classes)

    def logits_fn(p):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), labels).mean()

    return params, loss, logits_fn


def time_estimators(scale: float, iters: int) -> dict[str, Any]:
    params, loss, logits_fn = mlp_problem(scale)
    fns = {
        "gradient": jax.jit(jax.grad(loss)),
        "hutchinson_rademacher": jax.jit(
            lambda p, k: rlx_optax.hutchinson_diag(loss, p, k, distribution="rademacher")
        ),
        "hutchinson_gaussian": jax.jit(
            lambda p, k: rlx_optax.hutchinson_diag(loss, p, k, distribution="gaussian")
        ),
        "gauss_newton_bartlett": jax.jit(
            lambda p, k: rlx_optax.gauss_newton_bartlett_diag(logits_fn, p, k)
        ),
    }
    key = jax.random.key(0)
    times = {}
    for name, fn in fns.items():
        call = (lambda f=fn: f(params)) if name == "gradient" else (lambda f=fn: f(params, key))
        times[name] = harness.time_fn(call, warmup=2, iters=iters, min_time=0.3)
    grad_s = times["gradient"]
    return {
        "params": n_params(params),
        "gradient_ms": 1e3 * grad_s,
        "per_call": {
            name: {"ms": 1e3 * t, "over_gradient": t / grad_s}
            for name, t in times.items()
            if name != "gradient"
        },
        "note": "in-update estimation every k steps costs (over_gradient / k) gradients per step",
    }


def run(scale: float = 1.0, rounds: int = 2, iters: int = 10) -> dict[str, Any]:
    params = model_params(scale)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
    n = n_params(params)
    table = cases(params, grads)
    best: dict[str, float] = {}
    bandwidth = 0.0
    for _ in range(rounds):  # interleaved rounds; keep the best median of each
        bandwidth = max(bandwidth, harness.copy_bandwidth(max(4 * 2**20, 4 * n)))
        for name, tx, extra, _, _ in table:
            best[name] = min(best.get(name, math.inf), time_case(tx, params, grads, extra, iters))
    steps = []
    for name, _, _, words, note in table:
        floor_s = words * F32 * n / bandwidth
        steps.append(
            {
                "name": name,
                "step_ms": 1e3 * best[name],
                "floor_ms": 1e3 * floor_s,
                "floor_words_per_param": words,
                "over_floor": best[name] / floor_s,
                "over_optax_adamw": best[name] / best["optax.adamw"],
                "floor_note": note,
            }
        )
    return {
        "params": n,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "steps": steps,
        "estimators": time_estimators(scale, iters=3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 1/16 model, for a smoke run")
    args = parser.parse_args()
    result = run(scale=1 / 16 if args.small else 1.0)
    path = harness.write_json("sophia_mars" + ("_small" if args.small else ""), result)
    print(f"copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s, {result['params']} params")
    for s in result["steps"]:
        print(
            f"{s['name']:22s} {s['step_ms']:8.2f} ms  floor {s['floor_ms']:7.2f} ms  "
            f"x{s['over_floor']:.2f} floor  x{s['over_optax_adamw']:.2f} optax.adamw"
        )
    est = result["estimators"]
    print(f"gradient {est['gradient_ms']:.1f} ms on {est['params']} params")
    for name, e in est["per_call"].items():
        print(f"{name:22s} {e['ms']:8.1f} ms  x{e['over_gradient']:.2f} gradient")
    print(f"wrote {path.name}")


if __name__ == "__main__":
    main()
