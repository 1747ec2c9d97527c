"""The state-precision plot: state bytes per parameter and final loss, per family and storage.

Left: the bytes per parameter of each family's state in float32, bfloat16, 8 and 4 bits
(`benchmarks/memory.py --precision`'s measurement, recomputed here from the state pytrees;
a missing bar is a storage the family does not offer). Right: the final validation loss of the
char-level LM and of digits relative to float32 (mean over the seeds of
`benchmarks/precision_convergence.py`'s JSON, with the issue's bound as an error bar).
Run ``python benchmarks/plot_precision.py``; writes ``benchmarks/plots/state_precision.png``.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness, memory  # noqa: E402

FAMILIES = ("adamw", "lion", "muon", "soap", "kron_psgd", "mars", "sgd")
STORAGES = ("float32", "bf16", "q8", "q4")
CONVERGENCE_FAMILIES = ("adamw", "lion", "muon", "soap", "kron")
CONVERGENCE_STATES = ("bf16+sr", "q8", "q4")


def main() -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {row["name"]: row for row in memory.run_precision()["results"]}
    source = harness.OUT_DIR / "precision_convergence.json"
    convergence = json.loads(source.read_text()) if source.exists() else None

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(STORAGES)
    for k, storage in enumerate(STORAGES):
        xs = [i + (k - (len(STORAGES) - 1) / 2) * width for i in range(len(FAMILIES))]
        ys = [table[f].get(storage) or 0.0 for f in FAMILIES]
        axes[0].bar(xs, ys, width, label=storage)
    axes[0].set_xticks(range(len(FAMILIES)), FAMILIES, rotation=20)
    axes[0].set_ylabel("state bytes / parameter")
    axes[0].set_title("State size (model benchmark tree)")
    axes[0].legend()

    if convergence is not None:
        labels, offsets = [], 0
        for p, (problem, data) in enumerate(convergence["problems"].items()):
            for f in CONVERGENCE_FAMILIES:
                results = data["families"].get(f, {}).get("results", {})
                base = results.get("float32", {}).get("mean")
                for s, state in enumerate(CONVERGENCE_STATES):
                    r = results.get(state)
                    if not r or base is None or "mean" not in r:
                        continue
                    x = offsets + s * 0.3
                    rel = 100 * r["minus_float32"] / base
                    err = 100 * r["bound"] / base
                    axes[1].errorbar(
                        x,
                        rel,
                        yerr=err,
                        fmt="o",
                        color=f"C{s + 1}",
                        capsize=3,
                        label=state if offsets == 0 and p == 0 else None,
                    )
                labels.append((offsets + 0.3, f"{problem}\n{f}"))
                offsets += 1
        axes[1].axhline(0, color="k", lw=0.8)
        axes[1].set_xticks([x for x, _ in labels], [t for _, t in labels], fontsize=7)
        axes[1].set_ylabel("final loss vs float32 (%), bar: bound")
        axes[1].set_title("Convergence at reduced precision (3 seeds)")
        axes[1].legend()
    fig.tight_layout()
    path = ROOT / "benchmarks" / "plots" / "state_precision.png"
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    print(main())
