"""One look per algorithm in every plot: a colour and a line style of its own.

The style is fixed by the algorithm's place in the registry, so an algorithm looks the same in
the demo, the benchmark plots and the notebooks, and no two of the 15 share a colour (a
10-colour cycle would pair them up); the line style tells neighbouring colours apart in
greyscale too.
"""

from __future__ import annotations

from typing import Any

from rlx_optax._src import registry

# 15 colours that stay apart on white: matplotlib's tab10 and five dark tones of tab20b/c.
COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#000000",
)
LINESTYLES = ("-", "--", "-.", ":")
TARGET = {"color": "0.35", "linewidth": 1.0, "linestyle": (0, (1, 3))}


def style(name: str) -> dict[str, Any]:
    """``ax.plot`` keywords for algorithm `name` (a registered factory name; others share the
    cycle after the registered ones)."""
    names = registry.names()
    i = names.index(name) if name in names else len(names) + sum(map(ord, name))
    return {"color": COLOURS[i % len(COLOURS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def target_line(ax: Any, target: float, what: str = "target loss") -> None:
    """A horizontal line at `target`, labelled in the legend."""
    ax.axhline(target, label=f"{what} {target:g}", **TARGET)
