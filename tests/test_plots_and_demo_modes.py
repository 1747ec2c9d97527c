"""Plots tell every algorithm apart and label the target; the demo runs each family in its
meaningful mode and says which."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "examples"))
sys.path.insert(0, str(_ROOT))

import demo  # noqa: E402
import plotstyle  # noqa: E402

from benchmarks import convergence  # noqa: E402
from rlx_optax._src import registry  # noqa: E402

NAMES = registry.names()


def _drawn_lines(ax):
    target = [ln for ln in ax.get_lines() if ln.get_label().startswith("target")]
    curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("target")]
    return curves, target


def _assert_distinct_and_labelled(ax, n):
    curves, target = _drawn_lines(ax)
    assert len(curves) == n
    colours = [matplotlib.colors.to_hex(ln.get_color()) for ln in curves]
    assert len(set(colours)) == n, colours  # no two algorithms share a colour
    looks = {(c, ln.get_linestyle()) for c, ln in zip(colours, curves, strict=True)}
    assert len(looks) == n
    assert len(target) == 1
    assert matplotlib.colors.to_hex(target[0].get_color()) not in colours  # never an algorithm's
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("target") for t in legend), legend


def test_every_registered_algorithm_has_its_own_colour_and_style():
    styles = [plotstyle.style(n) for n in NAMES]
    assert len({s["color"] for s in styles}) == len(NAMES)
    assert len({s["linestyle"] for s in styles}) > 1


def test_convergence_plot_tells_all_algorithms_apart_and_labels_the_target():
    rng = np.random.default_rng(0)
    results = {n: {"curve_mean": rng.uniform(1, 2, 6).tolist(), "best_lr": 0.01} for n in NAMES}
    fig, ax = plt.subplots()
    convergence.draw(ax, "digits", results, 20, 1.2)
    _assert_distinct_and_labelled(ax, len(NAMES))
    plt.close(fig)


def test_demo_plot_tells_algorithms_apart_names_modes_and_labels_the_target():
    results = [
        {"name": n, "lr": 0.01, "mode": demo.mode_of(n).label, "curve": [(0, 3.0), (10, 2.0)]}
        for n in NAMES
    ]
    fig, ax = plt.subplots()
    demo.draw(ax, results, 2.5)
    _assert_distinct_and_labelled(ax, len(NAMES))
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "kron_psgd [reference (psgd-jax)]" in legend and "adamw [crate]" in legend
    plt.close(fig)


def test_demo_modes_are_meaningful():
    assert demo.mode_of("kron_psgd").label.startswith("reference")
    assert demo.mode_of("kron_psgd", crate_only=True).label == "crate"
    assert demo.mode_of("sophia").update_kwargs is not None
    assert demo.mode_of("adamw").label == "crate"


TINY = ["--steps", "3", "--eval-every", "2", "--batch-size", "2", "--eval-batches", "1"]
TINY += ["--context", "16", "--width", "16", "--layers", "1", "--no-progress"]


def test_tiny_demo_runs_kron_reference_and_sophia_with_estimates(tmp_path, capsys):
    results = demo.main(["--optimizers", "kron_psgd", "sophia", "--out", str(tmp_path), *TINY])
    assert [r["mode"] for r in results] == ["reference (psgd-jax)", "Hutchinson every 10 steps"]
    assert results[0]["lr"] == demo.KRON_REFERENCE_LR
    out = capsys.readouterr().out
    assert "| mode |" in out and "| kron_psgd | reference (psgd-jax) |" in out
    for r in results:
        assert np.isfinite(r["final_val_loss"])
