"""`make demo`: train a small character-level transformer with several optimizers, compare.

Every optimizer gets the same model initialisation, the same batches and the same number of
steps. The data is a fixed list of Python standard-library sources (see `charlm.STDLIB_FILES`),
so the run needs no download and is deterministic for a given Python version.

Prints a table (final validation loss, steps to the target loss, ms per step, optimizer-state
bytes) and writes `demo_out/val_loss.png`, `demo_out/results.md` and `demo_out/results.json`.

    python examples/demo.py                         # adamw, muon, soap, kron_psgd
    python examples/demo.py --optimizers lion adam  # any registered algorithm
    python examples/demo.py --list                  # what is registered

Each family runs in the mode where it is what its name says (`MODES`; the table's `mode`
column names it): the crate's defaults, except Kron-PSGD, whose crate mode uses the gradient
as its own probe so that its preconditioner never moves (it would be clipped SGD momentum),
and which runs here as the reference Kron of psgd-jax (random probes, Li's factor step, RMS
clip, one factor per axis); and Sophia, which gets a Hutchinson Hessian estimate every 10
steps through `Trainer(update_kwargs=...)` (without one it is sign descent).
`--mode crate` runs every algorithm with its crate defaults instead. Learning rates come
from the registry (`Algorithm.train_lr`) or the mode; `--lr NAME=VALUE` overrides.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import charlm  # noqa: E402
import plotstyle  # noqa: E402
from flax import nnx  # noqa: E402

import rlx_optax  # noqa: E402
from rlx_optax._src import registry  # noqa: E402

DEFAULT_OPTIMIZERS = ("adamw", "muon", "soap", "kron_psgd")
# Reference Kron's step is RMS-normalised (clip_mode="rms"), so its rate is on Adam's scale,
# not the crate mode's `train_lr`; measured on this model (see docs/guides/training.md, "The demo").
KRON_REFERENCE_LR = 0.003


class Mode(NamedTuple):
    """How the demo runs one algorithm: a label for the table, the transform, extra update
    arguments (a `Trainer` ``update_kwargs``) and a learning rate when it differs from the
    registry's."""

    label: str
    make: Callable[[float, int], Any]
    update_kwargs: Callable[[Any], dict[str, Any]] | None = None
    lr: float | None = None


def _kron_reference(lr: float, seed: int) -> Any:
    return rlx_optax.kron_psgd(
        lr,
        momentum_before=True,
        probe="random",
        key=jax.random.key(seed),
        factor_update="reference",
        clip_mode="rms",
        clip=1.1,
        precondition_nd=True,
        max_size_triangular=8192,
    )


def _sophia_hutchinson(lr: float, seed: int) -> Any:
    del seed  # the Trainer's per-step key drives the probes
    return rlx_optax.sophia(lr, hessian_estimator=rlx_optax.hutchinson_diag, update_interval=10)


MODES = {
    "kron_psgd": Mode("reference (psgd-jax)", _kron_reference, lr=KRON_REFERENCE_LR),
    "sophia": Mode(
        "Hutchinson every 10 steps",
        _sophia_hutchinson,
        update_kwargs=lambda c: {"obj_fn": c.obj_fn, "key": c.key},
    ),
}


def mode_of(name: str, crate_only: bool = False) -> Mode:
    """The demo's mode for `name` (the crate's defaults unless `MODES` says otherwise)."""
    if name in MODES and not crate_only:
        return MODES[name]
    factory = registry.get(name).factory
    return Mode("crate", lambda lr, seed: factory(lr))


def train_lr(row: registry.Algorithm, mode: Mode | None = None) -> float:
    """The mode's learning rate, else the registry's for small transformers (a tenth of the
    contract rate when the row has none)."""
    if mode is not None and mode.lr is not None:
        return mode.lr
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
    mode: Mode | None = None,
) -> dict[str, Any]:
    """Train a fresh model with `name` for `steps` steps; validation loss every `eval_every`."""
    mode = mode_of(name) if mode is None else mode
    model = charlm.CharTransformer(cfg, nnx.Rngs(seed))
    trainer = rlx_optax.Trainer(
        model, mode.make(lr, seed), charlm.loss_fn, update_kwargs=mode.update_kwargs, seed=seed
    )
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
        "mode": mode.label,
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
        f"| optimizer | mode | lr | final val loss | steps to {target:g} | ms/step | state bytes |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        reached = steps_to(r["curve"], target)
        lines.append(
            f"| {r['name']} | {r.get('mode', 'crate')} | {r['lr']:g} | {r['final_val_loss']:.3f} | "
            f"{'-' if reached is None else reached} | {r['ms_per_step']:.0f} | "
            f"{r['state_bytes']:,} |"
        )
    return "\n".join(lines)


def draw(ax, results: list[dict[str, Any]], target: float) -> None:
    """Validation curves on `ax`: one colour and line style per algorithm, the mode each row
    ran in, and the target line labelled."""
    for r in results:
        steps, vals = zip(*r["curve"], strict=True)
        label = f"{r['name']} [{r.get('mode', 'crate')}] (lr {r['lr']:g})"
        ax.plot(steps, vals, label=label, **plotstyle.style(r["name"]))
    plotstyle.target_line(ax, target, "loss (steps to)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("char-level transformer on Python stdlib sources")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot(results: list[dict[str, Any]], target: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax, results, target)
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
    ap.add_argument(
        "--mode",
        choices=("meaningful", "crate"),
        default="meaningful",
        help="'crate': every algorithm with the crate's defaults (Kron then never "
        "preconditions, Sophia gets no Hessian estimate)",
    )
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
        mode = mode_of(name, crate_only=args.mode == "crate")
        lr = args.lr.get(name, train_lr(row, mode))
        results.append(
            train_one(
                name,
                lr,
                mode=mode,
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
