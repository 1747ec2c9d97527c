"""Convergence: every registered algorithm on three problems, a small learning-rate sweep,
several seeds; final loss, steps to a target loss, and plots of the loss curves.

Problems:
- ``charlm``: the character-level transformer of `examples/charlm.py` (Python stdlib sources),
  validation loss;
- ``digits``: a two-layer MLP on scikit-learn's 8x8 digits, validation cross-entropy;
- ``quadratic``: ill-conditioned quadratics, ``0.5 ||L (W - W*) R||_F^2 + 0.5 ||d * (b - b*)||^2``
  with log-spaced diagonal curvatures (condition number 1e4 for the matrix, 1e3 for the
  vector); the optimum and the curvatures are drawn from the seed.

For each algorithm and problem the learning rates are ``base * (1/3, 1, 3)`` with ``base``
from the registry row (`train_lr` for the learned problems, `contract_lr` for the quadratic);
the rate with the lowest mean final loss over the seeds is reported. Each (algorithm,
problem) compiles once: the learning rate and the seed are traced arguments.

Run: ``python benchmarks/convergence.py [--small] [--only NAME ...]``;
writes ``benchmarks/out/convergence.json`` and ``benchmarks/out/convergence_<problem>.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "examples"))
try:
    from benchmarks import harness
except ImportError:  # run as a script
    sys.path.insert(0, str(_ROOT))
    from benchmarks import harness

import charlm  # noqa: E402
import plotstyle  # noqa: E402
from flax import nnx  # noqa: E402

from rlx_optax._src import registry  # noqa: E402

LR_FACTORS = (1 / 3, 1.0, 3.0)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A problem: ``init(seed) -> params``, ``batches(seed) -> pytree with a leading steps
    axis``, ``loss(params, batch)``, ``eval_loss(params, seed)``, the target for "steps to"."""

    name: str
    init: Callable[[int], Any]
    batches: Callable[[int], Any]
    loss: Callable[[Any, Any], jax.Array]
    eval_loss: Callable[[Any, Any], jax.Array]
    target: float
    learned: bool  # base learning rate: train_lr (learned problems) or contract_lr


def charlm_problem(steps: int, batch_size: int, cfg: charlm.Config, target: float) -> Problem:
    train, val = charlm.split(charlm.load_corpus())
    graphdef, _ = nnx.split(charlm.CharTransformer(cfg, nnx.Rngs(0)))
    x_val, y_val = (
        jnp.asarray(np.concatenate(a))
        for a in zip(*charlm.eval_batches(val, 32, cfg.context, 2), strict=True)
    )

    def init(seed):
        return nnx.split(charlm.CharTransformer(cfg, nnx.Rngs(seed)))[1]

    def batches(seed):
        it = charlm.train_batches(train, batch_size, cfg.context, seed=seed)
        xs, ys = zip(*(next(it) for _ in range(steps)), strict=True)
        return jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))

    def loss(params, batch):
        return charlm.loss_fn(nnx.merge(graphdef, params), batch)

    def eval_loss(params, seed):
        return loss(params, (x_val, y_val))

    return Problem("charlm", init, batches, loss, eval_loss, target, True)


def digits_problem(steps: int, batch_size: int, hidden: int, target: float) -> Problem:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    n_val = len(x) // 5
    x_val, y_val, x_tr, y_tr = (
        jnp.asarray(a) for a in (x[:n_val], y[:n_val], x[n_val:], y[n_val:])
    )

    def init(seed):
        k1, k2 = jax.random.split(jax.random.key(seed))
        return {
            "w1": jax.random.normal(k1, (64, hidden)) * math.sqrt(2 / 64),
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, 10)) * math.sqrt(1 / hidden),
            "b2": jnp.zeros(10),
        }

    def batches(seed):
        idx = np.random.default_rng(seed).integers(0, len(x_tr), (steps, batch_size))
        return x_tr[idx], y_tr[idx]

    def loss(params, batch):
        xb, yb = batch
        h = jax.nn.relu(xb @ params["w1"] + params["b1"])
        logits = h @ params["w2"] + params["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def eval_loss(params, seed):
        return loss(params, (x_val, y_val))

    return Problem("digits", init, batches, loss, eval_loss, target, True)


def quadratic_problem(steps: int, n: int, target: float) -> Problem:
    def parts(seed):
        k = jax.random.split(jax.random.key(1000 + seed), 3)
        left = jnp.logspace(0, 1, n)[jax.random.permutation(k[0], n)]  # cond(L^2 R^2) = 1e4
        right = jnp.logspace(0, 1, n)
        opt = {"w": jax.random.normal(k[1], (n, n)), "b": jax.random.normal(k[2], (n,))}
        curv = jnp.logspace(0, 1.5, n)  # cond(d^2) = 1e3
        return left, right, curv, opt

    def init(seed):
        return {"w": jnp.zeros((n, n)), "b": jnp.zeros(n)}

    def batches(seed):
        return jnp.arange(steps) * 0 + seed  # the seed selects the quadratic

    def value(params, seed):
        """The quadratic relative to its value at the start (zeros), so it starts at 1."""
        left, right, curv, opt = parts(seed)

        def half_sq(w, b):
            dw = left[:, None] * w * right[None, :]
            return jnp.sum(dw * dw) + jnp.sum((curv * b) ** 2)

        return half_sq(params["w"] - opt["w"], params["b"] - opt["b"]) / half_sq(opt["w"], opt["b"])

    return Problem("quadratic", init, batches, value, value, target, False)


def base_lr(row: registry.Algorithm, learned: bool) -> float:
    if learned:
        lr = getattr(row, "train_lr", None)
        return float(lr) if lr is not None else row.contract_lr / 10
    return row.contract_lr


def make_train(
    problem: Problem,
    row: registry.Algorithm,
    steps: int,
    eval_every: int,
    make: Callable[..., optax.GradientTransformationExtraArgs] | None = None,
):
    """A jitted ``(lr, params, batches, seed) -> eval losses`` for one algorithm (`make`, a
    ``make(learning_rate)`` such as a `registry.Configuration`'s, replaces `row.factory`)."""
    n_chunks = steps // eval_every

    def train(lr, params, batches, seed):
        tx = (make or row.factory)(lambda count: lr)
        state = tx.init(params)
        batches = jax.tree.map(lambda b: b.reshape(n_chunks, eval_every, *b.shape[1:]), batches)

        def step(carry, batch):
            params, state = carry
            grads = jax.grad(problem.loss)(params, batch)
            extra = row.update_extra(params, grads) if row.update_extra else {}
            updates, state = tx.update(grads, state, params, **extra)
            return (optax.apply_updates(params, updates), state), None

        def chunk(carry, chunk_batches):
            carry, _ = jax.lax.scan(step, carry, chunk_batches)
            return carry, problem.eval_loss(carry[0], seed)

        _, losses = jax.lax.scan(chunk, (params, state), batches)
        return jnp.concatenate([problem.eval_loss(params, seed)[None], losses])

    return jax.jit(train)


def steps_to(curve: np.ndarray, target: float, eval_every: int) -> int | None:
    hit = np.nonzero(curve <= target)[0]
    return int(hit[0]) * eval_every if len(hit) else None


def run_problem(problem: Problem, rows, steps: int, eval_every: int, seeds: int) -> dict:
    out = {}
    data = {s: (problem.init(s), problem.batches(s)) for s in range(seeds)}
    for row in rows:
        train = make_train(problem, row, steps, eval_every)
        sweep = []
        for factor in LR_FACTORS:
            lr = base_lr(row, problem.learned) * factor
            curves = []
            for s in range(seeds):
                params, batches = data[s]
                curve = np.asarray(train(jnp.float32(lr), params, batches, s), np.float64)
                curves.append(np.where(np.isfinite(curve), curve, np.inf))
            curves = np.stack(curves)
            sweep.append({"lr": lr, "curves": curves, "final": float(np.mean(curves[:, -1]))})
        best = min(sweep, key=lambda r: r["final"])
        reached = [steps_to(c, problem.target, eval_every) for c in best["curves"]]
        out[row.name] = {
            "best_lr": best["lr"],
            "final_loss_mean": best["final"],
            "final_loss_std": float(np.std(best["curves"][:, -1])),
            "steps_to_target": reached,
            "steps_to_target_median": (
                None if None in reached else float(np.median(np.asarray(reached)))
            ),
            "sweep": [{"lr": r["lr"], "final_loss_mean": r["final"]} for r in sweep],
            "curve_mean": np.mean(best["curves"], axis=0).tolist(),
        }
    return out


def draw(ax, problem: str, results: dict, eval_every: int, target: float) -> None:
    """The convergence curves of `results` on `ax`: one colour and line style per algorithm,
    the target drawn and labelled."""
    for name, r in results.items():
        curve = np.asarray(r["curve_mean"])
        steps = np.arange(len(curve)) * eval_every
        ax.plot(steps, curve, label=f"{name} (lr {r['best_lr']:.2g})", **plotstyle.style(name))
    plotstyle.target_line(ax, target, "loss (steps to)")
    ax.set_yscale("log" if problem == "quadratic" else "linear")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over seeds, best lr)")
    ax.set_title(problem)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)


def plot(problem: str, results: dict, eval_every: int, target: float, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    draw(ax, problem, results, eval_every, target)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SIZES = {
    # steps, eval_every, batch size, model size knobs, targets
    "full": {
        "seeds": 3,
        "charlm": {"steps": 200, "eval_every": 20, "batch": 16, "width": 64, "context": 64},
        "digits": {"steps": 300, "eval_every": 20, "batch": 64, "hidden": 128},
        "quadratic": {"steps": 300, "eval_every": 20, "n": 32},
        "targets": {"charlm": 2.6, "digits": 0.2, "quadratic": 1e-3},
    },
    "small": {
        "seeds": 2,
        "charlm": {"steps": 4, "eval_every": 2, "batch": 2, "width": 16, "context": 16},
        "digits": {"steps": 4, "eval_every": 2, "batch": 8, "hidden": 8},
        "quadratic": {"steps": 4, "eval_every": 2, "n": 4},
        "targets": {"charlm": 5.0, "digits": 2.0, "quadratic": 1.0},
    },
}


def build_problems(size: dict) -> list[tuple[Problem, int, int]]:
    c, d, q, t = size["charlm"], size["digits"], size["quadratic"], size["targets"]
    cfg = charlm.Config(context=c["context"], width=c["width"], layers=1, heads=4)
    return [
        (charlm_problem(c["steps"], c["batch"], cfg, t["charlm"]), c["steps"], c["eval_every"]),
        (
            digits_problem(d["steps"], d["batch"], d["hidden"], t["digits"]),
            d["steps"],
            d["eval_every"],
        ),
        (quadratic_problem(q["steps"], q["n"], t["quadratic"]), q["steps"], q["eval_every"]),
    ]


def run(small: bool = False, names: list[str] | None = None, problems: list[str] | None = None):
    size = SIZES["small" if small else "full"]
    rows = [r for r in registry.ALGORITHMS if names is None or r.name in names]
    payload: dict[str, Any] = {"benchmark": "convergence", "seeds": size["seeds"], "problems": {}}
    for problem, steps, eval_every in build_problems(size):
        if problems and problem.name not in problems:
            continue
        results = run_problem(problem, rows, steps, eval_every, size["seeds"])
        payload["problems"][problem.name] = {
            "steps": steps,
            "eval_every": eval_every,
            "target": problem.target,
            "lr_factors": list(LR_FACTORS),
            "results": results,
        }
        harness.OUT_DIR.mkdir(parents=True, exist_ok=True)
        plot(
            problem.name,
            results,
            eval_every,
            problem.target,
            harness.OUT_DIR / f"convergence_{problem.name}.png",
        )
    return payload


def table(payload: dict[str, Any]) -> str:
    probs = list(payload["problems"])
    head = "| algorithm | " + " | ".join(f"{p}: final (lr) | {p}: steps" for p in probs) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(probs)]
    names = list(next(iter(payload["problems"].values()))["results"]) if probs else []
    for name in names:
        cells = []
        for p in probs:
            r = payload["problems"][p]["results"][name]
            steps = r["steps_to_target_median"]
            cells.append(
                f"{r['final_loss_mean']:.3g} ± {r['final_loss_std']:.1g} ({r['best_lr']:.2g})"
            )
            cells.append("-" if steps is None else f"{steps:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--only", nargs="*", help="registry names (default: all)")
    ap.add_argument("--problems", nargs="*", help="charlm, digits, quadratic (default: all)")
    args = ap.parse_args(argv)
    payload = run(args.small, args.only, args.problems)
    path = harness.write_json("convergence", payload)
    print(table(payload))
    print(f"(wrote {path.name} and the convergence_<problem>.png plots)")
    return payload


if __name__ == "__main__":
    main()
