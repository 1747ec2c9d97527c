"""Learning-rate sweep: every configuration of the registry (the 15 algorithms with their
defaults and the presets, `registry.configurations()`) on a log grid of learning rates, several
seeds; the best rate by mean final validation loss, with its standard error.

Problems (from `benchmarks/convergence.py`): ``charlm``, the character-level transformer of
`examples/charlm.py`, and ``digits``, a two-layer MLP on scikit-learn's 8x8 digits.

The grid is ``centre * 3**k``: it starts at k = -1, 0, 1 around the configuration's
`train_lr` (its own for a preset, else the algorithm row's) and grows by one factor of 3 on a
side while the best mean final loss sits on that edge (up to `--max-rates` rates), so a best
rate at an edge of the final grid (marked `+`/`-` in the table) means the budget ran out, not
that the sweep saw the optimum. A rate whose run diverges (a non-finite loss) counts as an
infinite loss. Each (configuration, problem) compiles once: the rate and the seed are traced.
`start_lr` is the smallest rate swept within one standard error of the best (the registry's
`train_lr`).

Run: ``python benchmarks/lr_sweep.py [--small] [--only LABEL ...] [--problems charlm digits]``;
writes ``benchmarks/out/lr_sweep.json`` (``--json PATH`` elsewhere): every final loss per
(configuration, problem, rate, seed). The run behind the learning-rate table of
`docs/guides/choosing.md` is committed as ``benchmarks/results/lr_sweep.json``."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
    from benchmarks import convergence, harness
except ImportError:  # run as a script
    sys.path.insert(0, str(_ROOT))
    from benchmarks import convergence, harness

from rlx_optax._src import registry  # noqa: E402

FACTOR = 3.0

SIZES = {
    "full": {
        "seeds": 3,
        "max_rates": 7,
        "charlm": {"steps": 200, "eval_every": 50, "batch": 16, "width": 64, "context": 64},
        "digits": {"steps": 300, "eval_every": 100, "batch": 64, "hidden": 128},
    },
    "small": {
        "seeds": 2,
        "max_rates": 4,
        "charlm": {"steps": 4, "eval_every": 2, "batch": 2, "width": 16, "context": 16},
        "digits": {"steps": 4, "eval_every": 2, "batch": 8, "hidden": 8},
    },
}


def build_problems(size: dict, names: list[str]) -> list[tuple[convergence.Problem, dict]]:
    out = []
    if "charlm" in names:
        c = size["charlm"]
        cfg = convergence.charlm.Config(context=c["context"], width=c["width"], layers=1, heads=4)
        out.append((convergence.charlm_problem(c["steps"], c["batch"], cfg, 2.6), c))
    if "digits" in names:
        d = size["digits"]
        out.append((convergence.digits_problem(d["steps"], d["batch"], d["hidden"], 0.2), d))
    return out


def centre_lr(config: registry.Configuration) -> float:
    """The sweep's centre: the configuration's `train_lr`, else the row's, else a tenth of the
    row's contract rate."""
    lr = config.train_lr if config.train_lr is not None else config.row.train_lr
    return float(lr) if lr is not None else config.row.contract_lr / 10


def _mean(finals: list[float]) -> float:
    a = np.asarray(finals, np.float64)
    return float(np.mean(a)) if np.all(np.isfinite(a)) else math.inf


def sweep_one(problem, config, spec: dict, seeds: int, max_rates: int, data) -> dict[str, Any]:
    """The grid search of one configuration on one problem (see the module docstring)."""
    row = config.row
    steps, eval_every = spec["steps"], spec["eval_every"]
    train = convergence.make_train(problem, row, steps, eval_every, make=config.make)
    centre = centre_lr(config)
    finals: dict[int, list[float]] = {}

    def run_k(k: int) -> None:
        lr = centre * FACTOR**k
        out = []
        for s in range(seeds):
            params, batches = data[s]
            curve = np.asarray(train(jnp.float32(lr), params, batches, s), np.float64)
            out.append(float(curve[-1]) if np.isfinite(curve[-1]) else math.inf)
        finals[k] = out

    t0 = time.perf_counter()
    for k in (-1, 0, 1):
        run_k(k)
    while len(finals) < max_rates:
        best = min(finals, key=lambda k: _mean(finals[k]))
        lo, hi = min(finals), max(finals)
        if best == hi:
            run_k(hi + 1)
        elif best == lo:
            run_k(lo - 1)
        else:
            break
    ks = sorted(finals)
    best = min(ks, key=lambda k: _mean(finals[k]))
    a = np.asarray(finals[best], np.float64)
    edge = "+" if best == ks[-1] else "-" if best == ks[0] else ""
    return {
        "centre_lr": centre,
        "best_lr": centre * FACTOR**best,
        "edge": edge,
        "final_loss_mean": float(np.mean(a)),
        "final_loss_se": float(np.std(a, ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0,
        "sweep": [
            {"lr": centre * FACTOR**k, "final_losses": finals[k], "mean": _mean(finals[k])}
            for k in ks
        ],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def write(payload: dict[str, Any], path: pathlib.Path | None) -> pathlib.Path:
    """`payload` with the machine as JSON at `path` (default ``benchmarks/out/lr_sweep.json``)."""
    if path is None:
        return harness.write_json("lr_sweep", payload)
    path.write_text(json.dumps({"machine": harness.machine(), **payload}, indent=2))
    return path


def run(
    small: bool = False,
    labels: list[str] | None = None,
    problems: list[str] | None = None,
    max_rates: int | None = None,
    path: pathlib.Path | None = None,
) -> dict[str, Any]:
    """The sweep; the JSON is rewritten after every configuration (a partial run keeps its
    results)."""
    size = dict(SIZES["small" if small else "full"])
    if max_rates is not None:
        size["max_rates"] = max(3, max_rates)
    configs = [c for c in registry.configurations() if labels is None or c.label in labels]
    payload: dict[str, Any] = {
        "benchmark": "lr_sweep",
        "seeds": size["seeds"],
        "factor": FACTOR,
        "max_rates": size["max_rates"],
        "problems": {},
    }
    t_all = time.perf_counter()
    for problem, spec in build_problems(size, problems or ["charlm", "digits"]):
        data = {s: (problem.init(s), problem.batches(s)) for s in range(size["seeds"])}
        results: dict[str, Any] = {}
        payload["problems"][problem.name] = {**spec, "results": results}
        for config in configs:
            results[config.label] = sweep_one(
                problem, config, spec, size["seeds"], size["max_rates"], data
            )
            r = results[config.label]
            print(
                f"{problem.name} {config.label}: lr {r['best_lr']:.3g}{r['edge']} "
                f"loss {r['final_loss_mean']:.4g} ± {r['final_loss_se']:.2g} ({r['seconds']}s)",
                flush=True,
            )
            payload["seconds"] = round(time.perf_counter() - t_all, 1)
            write(payload, path)
    return payload


def _se(finals: list[float]) -> float:
    a = np.asarray(finals, np.float64)
    return float(np.std(a, ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


def start_lr(r: dict[str, Any]) -> float:
    """The smallest rate swept whose mean final loss is within one standard error (of the
    difference of the two means) of the best rate's: the one-standard-error rule, leaning to
    the lower rate because larger models want lower rates than this small one."""
    best = next(s for s in r["sweep"] if s["lr"] == r["best_lr"])
    for s in r["sweep"]:
        if s["lr"] >= r["best_lr"] or not math.isfinite(s["mean"]):
            continue
        se = math.hypot(_se(s["final_losses"]), _se(best["final_losses"]))
        if s["mean"] - best["mean"] <= se:
            return s["lr"]
    return r["best_lr"]


def _lr(r: dict[str, Any]) -> str:
    return f"{r['best_lr']:.2g}{r['edge']}"


def table(payload: dict[str, Any]) -> str:
    """Best rate, final loss ± standard error and `start_lr` per configuration and problem,
    and the rates swept."""
    probs = list(payload["problems"])
    head = "| configuration | " + " | ".join(
        f"{p}: best lr | {p}: loss ± s.e. | {p}: start at" for p in probs
    )
    lines = [head + " | rates swept |", "|---|" + "---:|---:|---:|" * len(probs) + "---|"]
    labels = list(next(iter(payload["problems"].values()))["results"]) if probs else []
    for label in labels:
        cells, grids = [], []
        for p in probs:
            r = payload["problems"][p]["results"][label]
            cells += [_lr(r), f"{r['final_loss_mean']:.3g} ± {r['final_loss_se']:.1g}"]
            cells.append(f"{start_lr(r):.2g}")
            lrs = [s["lr"] for s in r["sweep"]]
            grids.append(f"{p} {lrs[0]:.2g}-{lrs[-1]:.2g}")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'; '.join(grids)} |")
    return "\n".join(lines)


def grid_table(payload: dict[str, Any]) -> str:
    """Every rate swept: the mean final loss over the seeds per (configuration, problem)."""
    lines = ["| configuration | problem | rate: mean final loss |", "|---|---|---|"]
    labels = list(next(iter(payload["problems"].values()))["results"]) if payload else []
    for label in labels:
        for p, problem in payload["problems"].items():
            r = problem["results"][label]
            cells = [
                f"{s['lr']:.2g}: "
                + (f"**{s['mean']:.3g}**" if s["lr"] == r["best_lr"] else f"{s['mean']:.3g}")
                for s in r["sweep"]
            ]
            lines.append(f"| {label} | {p} | " + ", ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--only", nargs="*", help="configuration labels (default: all 21)")
    ap.add_argument("--problems", nargs="*", choices=["charlm", "digits"], help="default: both")
    ap.add_argument("--max-rates", type=int, help="rates per configuration at most (>= 3)")
    ap.add_argument("--json", help="write here instead of benchmarks/out/lr_sweep.json")
    args = ap.parse_args(argv)
    path = pathlib.Path(args.json) if args.json else None
    payload = run(args.small, args.only, args.problems, args.max_rates, path)
    path = write(payload, path)
    print(table(payload))
    print(f"(wrote {path.name}, {payload['seconds']:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
