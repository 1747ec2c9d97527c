"""`make demo`: train a small character-level transformer with several optimizers, compare.

Every optimizer gets the same model initialisation, the same batches and the same number of
steps. The data is a fixed list of Python standard-library sources (see `charlm.STDLIB_FILES`),
so the run needs no download and is deterministic for a given Python version.

Prints a table (final validation loss, steps to the target loss, ms per step, optimizer-state
bytes) and writes `demo_out/val_loss.png`, `demo_out/results.md` and `demo_out/results.json`.

    python examples/demo.py                         # adamw, muon, soap, kron_psgd
    python examples/demo.py --optimizers lion adam  # any registered algorithm
    python examples/demo.py --list                  # what is registered

Learning rates come from the registry (`Algorithm.train_lr`); `--lr NAME=VALUE` overrides.
Each algorithm runs with its crate defaults through `rlx_optax.Trainer`; `update` gets no
extra arguments, so Sophia keeps its initial curvature (see `benchmarks/convergence.py` for
a run with its Hessian estimate input).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import charlm  # noqa: E402
from flax import nnx  # noqa: E402

import rlx_optax  # noqa: E402
from rlx_optax._src import registry  # noqa: E402

DEFAULT_OPTIMIZERS = ("adamw", "muon", "soap", "kron_psgd")


def train_lr(row: registry.Algorithm) -> float:
    """The registry's learning rate for small transformers (a tenth of the contract rate when
    the row has none)."""
    lr = getattr(row, "train_lr", None)
    return float(lr) if lr is not None else row.contract_lr / 10


def state_bytes(opt_state: Any) -> int:
    """Bytes of every array in the optimizer state (moments, statistics, counters)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state) if hasattr(x, "size"))


def train_one(
    name: str,
    lr: float,
    *,
    steps: int,
    batch_size: int,
    eval_every: int,
    eval_sets: list,
    train: np.ndarray,
    cfg: charlm.Config,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Train a fresh model with `name` for `steps` steps; validation loss every `eval_every`."""
    row = registry.get(name)
    model = charlm.CharTransformer(cfg, nnx.Rngs(seed))
    trainer = rlx_optax.Trainer(model, row.factory(lr), charlm.loss_fn)
    batches = charlm.train_batches(train, batch_size, cfg.context, seed=seed)

    curve = [(0, charlm.validation_loss(trainer.model, eval_sets))]
    train_seconds, compile_seconds = 0.0, 0.0
    for step in range(1, steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()
        loss = trainer.train_step(batch)
        if step == 1:  # the first call compiles; it is not a training step's cost
            jax.block_until_ready(loss)
            compile_seconds = time.perf_counter() - t0
        elif step % eval_every == 0 or step == steps:
            jax.block_until_ready(loss)
        if step > 1:
            train_seconds += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            val = charlm.validation_loss(trainer.model, eval_sets)
            curve.append((step, val))
            if progress is not None:
                progress.set_postfix(opt=name, val=f"{val:.3f}")
        if progress is not None:
            progress.update()
    return {
        "name": name,
        "lr": lr,
        "curve": curve,
        "final_val_loss": curve[-1][1],
        "ms_per_step": 1e3 * train_seconds / max(1, steps - 1),
        "compile_s": compile_seconds,
        "state_bytes": state_bytes(trainer.optimizer.opt_state),
        "n_params": charlm.n_params(trainer.model),
    }


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose validation loss is at or below `target`."""
    return next((step for step, val in curve if val <= target), None)


def table(results: list[dict[str, Any]], target: float) -> str:
    lines = [
        f"| optimizer | lr | final val loss | steps to {target:g} | ms/step | state bytes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        reached = steps_to(r["curve"], target)
        lines.append(
            f"| {r['name']} | {r['lr']:g} | {r['final_val_loss']:.3f} | "
            f"{'-' if reached is None else reached} | {r['ms_per_step']:.0f} | "
            f"{r['state_bytes']:,} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], target: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        steps, vals = zip(*r["curve"], strict=True)
        ax.plot(steps, vals, label=f"{r['name']} (lr {r['lr']:g})")
    ax.axhline(target, color="gray", lw=0.8, ls="--", label=f"target {target:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("char-level transformer on Python stdlib sources")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--target", type=float, default=2.5, help="validation loss for 'steps to'")
    ap.add_argument("--lr", nargs="*", default=[], metavar="NAME=VALUE")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the registered algorithms")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(registry.names()))
        raise SystemExit(0)
    known = registry.names()
    unknown = [n for n in args.optimizers if n not in known]
    if unknown:
        ap.error(f"unknown optimizer(s) {unknown}; registered: {', '.join(known)}")
    overrides = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in known or not value:
            ap.error(f"--lr takes NAME=VALUE with a registered NAME, got {item!r}")
        overrides[name] = float(value)
    args.lr = overrides
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    cfg = charlm.Config(context=args.context, width=args.width, layers=args.layers)
    train, val = charlm.split(charlm.load_corpus())
    eval_sets = charlm.eval_batches(val, args.batch_size, cfg.context, args.eval_batches)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(
        f"char-level transformer: {len(charlm.STDLIB_FILES)} stdlib files, "
        f"{len(train):,} training bytes; {args.steps} steps x {args.batch_size} x {cfg.context} "
        f"per optimizer; jax {jax.__version__} on {jax.default_backend()}"
    )
    results = []
    bar = tqdm(total=args.steps * len(args.optimizers), disable=args.no_progress, unit="step")
    for name in args.optimizers:
        row = registry.get(name)
        lr = args.lr.get(name, train_lr(row))
        results.append(
            train_one(
                name,
                lr,
                steps=args.steps,
                batch_size=args.batch_size,
                eval_every=args.eval_every,
                eval_sets=eval_sets,
                train=train,
                cfg=cfg,
                seed=args.seed,
                progress=bar,
            )
        )
    bar.close()

    md = table(results, args.target)
    print(f"\n{results[0]['n_params']:,} parameters\n{md}")
    plot(results, args.target, out / "val_loss.png")
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'val_loss.png'}")
    return results


if __name__ == "__main__":
    main()
